"""A second model family, defined only here, to prove the seam (core/family.py): the trainer, the
pipeline and the parallel plans train it without knowing it.

It is deliberately unlike Llama: continuous inputs (a multichannel signal, no vocabulary), learned
absolute positions, bidirectional self-attention named `mix` inside blocks named `stack.<i>` (no
`layers` / `attention`), LayerNorm with biases, GELU, and an MSE objective over the positions each
sample marks valid, so the count of loss terms differs from sample to sample and rank to rank.

Data ("signal" reader): sample g is drawn from the layout-invariant generator (core/rng.py) keyed by
g, so every layout sees the same samples. The target needs the whole sequence (a mean over time),
which makes bidirectional attention, and context parallelism, matter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from gigatron.core import rng
from gigatron.core.config_loader import ConfigError
from gigatron.core.family import InitRule, ModelFamily, ParallelPlan, register_family
from gigatron.core.models.attention import AttentionCore
from gigatron.data_pipeline.loader import register_format


@dataclass
class SignalConfig:
    name: Literal["signal"] = "signal"
    channels_in: int = 6          # input channels per position
    channels_out: int = 3         # predicted channels per position
    width: int = 32               # model width
    depth: int = 2                # number of units in the stack
    heads: int = 4                # attention heads of `mix`
    hidden: int = 64              # MLP width
    max_len: int = 256            # positions the learned position table covers


class Mixer(nn.Module):
    """Bidirectional multi-head self-attention; `core` is what context parallelism swaps."""

    def __init__(self, cfg: SignalConfig):
        super().__init__()
        self.head_dim = cfg.width // cfg.heads
        self.query = nn.Linear(cfg.width, cfg.width)
        self.key = nn.Linear(cfg.width, cfg.width)
        self.value = nn.Linear(cfg.width, cfg.width)
        self.merge = nn.Linear(cfg.width, cfg.width)
        self.core = AttentionCore(causal=False, backend="torch")

    def forward(self, x, positions):
        B, D = x.shape[0], self.head_dim
        q = self.query(x).unflatten(-1, (-1, D)).transpose(1, 2)  # (B, H/tp, T/cp, D)
        k = self.key(x).unflatten(-1, (-1, D)).transpose(1, 2)
        v = self.value(x).unflatten(-1, (-1, D)).transpose(1, 2)
        out = self.core(q, k, v, positions, None)  # (B, H/tp, T/cp, D)
        return self.merge(out.transpose(1, 2).reshape(B, out.shape[2], -1))  # (B, T/cp, width)


class Unit(nn.Module):
    def __init__(self, cfg: SignalConfig):
        super().__init__()
        self.pre_mix = nn.LayerNorm(cfg.width)
        self.mix = Mixer(cfg)
        self.pre_mlp = nn.LayerNorm(cfg.width)
        self.expand = nn.Linear(cfg.width, cfg.hidden)
        self.contract = nn.Linear(cfg.hidden, cfg.width)

    def forward(self, x, positions):
        x = x + self.mix(self.pre_mix(x), positions)
        return x + self.contract(F.gelu(self.expand(self.pre_mlp(x))))


class SignalNet(nn.Module):
    def __init__(self, cfg: SignalConfig):
        super().__init__()
        self.reader = nn.Linear(cfg.channels_in, cfg.width)
        self.position = nn.Embedding(cfg.max_len, cfg.width)
        self.stack = nn.ModuleDict({str(i): Unit(cfg) for i in range(cfg.depth)})
        self.final_norm = nn.LayerNorm(cfg.width)
        self.writer = nn.Linear(cfg.width, cfg.channels_out)

    def forward(self, signal, positions):
        """signal (B, T, channels_in) on the first stage, hidden (B, T, width) after; positions (T,)."""
        h = self.reader(signal) + self.position(positions) if self.reader is not None else signal
        for unit in self.stack.values():
            h = unit(h, positions)
        return self.writer(self.final_norm(h)) if self.writer is not None else h


class MaskedMSE:
    """sum over valid positions and output channels of (prediction - target)^2; count = their number."""

    sequence_keys = ("signal", "target", "valid")

    def prepare(self, batch):
        return batch

    def inputs(self, batch):
        return (batch["signal"],), {"positions": batch["positions"]}

    def count(self, batch):
        return batch["valid"].sum() * batch["target"].shape[-1]

    def loss(self, prediction, batch, model=None):
        return ((prediction.float() - batch["target"]) ** 2 * batch["valid"][..., None]).sum()

    def metrics(self, prediction, batch):
        valid = batch["valid"][..., None]
        return {"abs_error": (((prediction.float() - batch["target"]).abs() * valid).sum(), self.count(batch))}


def _tp_model(cfg):
    from gigatron.parallel.tensor import ReplicateParallel

    return {name: ReplicateParallel() for name in ("reader", "position", "final_norm", "writer")}


def _tp_block(cfg):
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    from gigatron.parallel.tensor import ReplicateParallel

    return {"pre_mix": ReplicateParallel(), "mix.query": ColwiseParallel(), "mix.key": ColwiseParallel(),
            "mix.value": ColwiseParallel(), "mix.merge": RowwiseParallel(), "pre_mlp": ReplicateParallel(),
            "expand": ColwiseParallel(), "contract": RowwiseParallel()}


def validate(cfg) -> None:
    m, p = cfg.model, cfg.parallel
    if m.heads % p.tp:
        raise ConfigError("parallel.tp", f"model.heads={m.heads} is not divisible by tp={p.tp}")
    if p.tp > 1 and p.sequence_parallel:
        raise ConfigError("parallel.sequence_parallel", "the signal family has no sequence-parallel plan; set "
                                                        "parallel.sequence_parallel=false")
    if cfg.train.seq_len > m.max_len:
        raise ConfigError("train.seq_len", f"{cfg.train.seq_len} exceeds model.max_len={m.max_len}")


def init(m: SignalConfig, name: str) -> InitRule:
    if "norm" in name or name.startswith("pre_") or ".pre_" in name:
        return InitRule("ones") if name.endswith("weight") else InitRule("zeros")
    if name.endswith("bias"):
        return InitRule("zeros")
    return InitRule("normal", 0.1)


def no_decay(name: str) -> bool:
    return name.endswith("bias") or "norm" in name or ".pre_" in name or name.startswith("position")


# -- the data: deterministic per global sample ------------------------------------------------------

class SignalLoader:
    """Samples g = consumed + dp_rank * B + j of one global order, as the token stream does."""

    def __init__(self, cfg, split: str, dp_rank: int, dp_size: int):
        self.m, self.T, self.B = cfg.model, cfg.train.seq_len, cfg.train.micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.key = rng.stream_key("signal", cfg.train.seed, split)
        self.consumed = 0

    def next_batch(self):
        m, T, B = self.m, self.T, self.B
        first = self.consumed + self.dp_rank * B
        g = torch.arange(first, first + B)  # (B,)
        counters = (g[:, None, None] * T + torch.arange(T)[None, :, None]) * m.channels_in + \
            torch.arange(m.channels_in)[None, None, :]
        signal = rng.normal(self.key, counters)  # (B, T, Cin)
        c = m.channels_out
        target = 0.5 * signal[..., :c] + signal[..., c:2 * c].mean(dim=1, keepdim=True)  # needs all of T
        valid_len = T - (g % 4) * (T // 8)  # 1, 7/8, 3/4 or 5/8 of the positions carry a loss
        valid = (torch.arange(T)[None, :] < valid_len[:, None]).float()  # (B, T)
        self.consumed += B * self.dp_size
        return {"sample_index": g, "signal": signal, "target": target, "valid": valid}

    def state_dict(self):
        return {"consumed": self.consumed}

    def load_state_dict(self, state):
        self.consumed = int(state["consumed"])

    def stats(self):
        return {}


def _block_cost(cfg):
    m, T = cfg.model, cfg.train.seq_len
    return 6 * (4 * m.width ** 2 + 2 * m.width * m.hidden) * T + 12 * m.width * T * T


SIGNAL = register_family(ModelFamily(
    name="signal",
    config=SignalConfig,
    build=SignalNet,
    init=init,
    plan=ParallelPlan(blocks="stack", first_stage=("reader", "position"), last_stage=("final_norm", "writer"),
                      tp_model=_tp_model, tp_block=_tp_block, cp_attention=("mix.core",), causal=False,
                      block_cost=_block_cost),
    objective=lambda cfg, mesh: MaskedMSE(),
    validate=validate,
    n_blocks=lambda m: m.depth,
    no_decay=no_decay,
    flops_per_sample=lambda cfg: cfg.model.depth * _block_cost(cfg),
    samples_unit="samples",
    units_per_sample=lambda cfg: 1,
    data_format="signal",
))
register_format("signal", SignalLoader)
