"""CrossFlow's objective: flow matching from the text latent z0 to the image latent x1, plus the KL term.

Per sample: the image latent x1 (the pixel stand-in of core/objectives/flow_matching.py: images are
one-frame clips), the reparameterisation noise eps ~ N(0, I) of the latent's shape, t ~
logit-normal, and whether the row is unconditional (the share model.text_dropout: its prompt is
replaced by the empty prompt and its indicator is 0). All are drawn in `prepare` from the
layout-invariant generator keyed by the sample (flow matching's `draw`, whose noise is eps here),
before context parallelism splits the tokens. The model (core/models/crossflow.py) encodes the
prompt, forms z0 = mu + sigma eps, x_t and the target velocity, and returns (prediction, target, kl, mu):

    loss = sum over real tokens and features of
           (prediction - target)^2 + kl_weight * kl + align_weight * (mu - x1)^2;
    count = their number (each latent element's KL and alignment counted once, on the rank holding it)
"""

from __future__ import annotations

import torch

from gigatron.core.models.patch_embed import grid_of, patchify
from gigatron.core.objectives.flow_matching import (FlowMatchingObjective, grid_positions, guidance_text,
                                                    sample_keys, to_latents)
from gigatron.parallel.context import padding_segment_ids


class CrossFlowObjective(FlowMatchingObjective):
    sequence_keys = ("x1", "eps", "grid_positions")

    def prepare(self, batch: dict) -> dict:
        m = self.m
        x1 = to_latents(batch["images"].float()[:, :, None], m)  # (B, C, 1, H', W')
        eps, t, dropped = self.draw(sample_keys(batch), x1.shape)
        text, lengths = guidance_text(batch, m, dropped)
        out = {k: v for k, v in batch.items() if k not in ("images", "text_embeddings", "text_lengths")}
        grid = grid_of(x1.shape, m.patch)
        out.update({"x1": patchify(x1, m.patch), "eps": patchify(eps, m.patch), "t": t,
                    "indicator": (~dropped).long(), "grid_positions": grid_positions(grid, x1.shape[0]),
                    "text": text, "text_lengths": lengths})
        return out

    def inputs(self, batch: dict) -> tuple[tuple, dict]:
        return (batch["x1"],), {"eps": batch["eps"], "t": batch["t"], "indicator": batch["indicator"],
                                "grid_positions": batch["grid_positions"], "text": batch["text"],
                                "text_lengths": batch["text_lengths"], "positions": batch["positions"],
                                "segment_ids": padding_segment_ids(batch)}

    def count(self, batch: dict) -> torch.Tensor:
        x1 = batch["x1"]
        real = batch.get("real_tokens")
        tokens = real.sum() if real is not None else torch.tensor(x1.shape[0] * x1.shape[1])
        return tokens * x1.shape[-1]

    def _terms(self, output, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sums over this rank's real tokens and features of the flow error, the KL and the alignment error."""
        prediction, target, kl, mu = output
        terms = [(prediction.float() - target.float()) ** 2, kl.float(), (mu.float() - batch["x1"].float()) ** 2]
        real = self._real(batch)
        return tuple((x * real).sum() if real is not None else x.sum() for x in terms)

    def loss(self, output, batch: dict, model=None) -> torch.Tensor:
        flow, kl, align = self._terms(output, batch)
        return flow + self.m.kl_weight * kl + self.m.align_weight * align

    def metrics(self, output, batch: dict) -> dict:
        n = self.count(batch).float()
        return {name: (x.detach(), n) for name, x in zip(("flow", "kl", "align"), self._terms(output, batch))}
