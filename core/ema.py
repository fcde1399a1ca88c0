"""An exponential moving average of the weights, kept for sampling as diffusion training does.

    ema <- decay * ema + (1 - decay) * param        after every optimizer step (train.ema_decay; 0 = off)

Each EMA tensor is a detached copy of its parameter, so it is sharded exactly like it (the same
DTensor placements under FSDP / TP: each rank holds the EMA of its own shard, and the update is
local, with no collective), kept in fp32 like the master weights. The trainer saves it in the
checkpoint beside the model (`extra.ema.<parameter name>`), and DCP reshards it with the rest;
`gigatron sample` loads it in place of the weights.
"""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.params = dict(model.named_parameters())
        self.shadow = {name: p.detach().clone() for name, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for name, p in self.params.items():
            self.shadow[name].lerp_(p.detach(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow  # the tensors themselves: a checkpoint load fills them in place
