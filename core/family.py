"""The model-family seam: everything the engine needs to know about a model, registered once.

The trainer, the pipeline, the parallel plans, checkpoints, metrics and `gigatron plan` see a model
only through a `ModelFamily` (compare torchtitan's TrainSpec). A family is selected by `model.name`
in the recipe and provides:

    config        the dataclass of the `model:` section, with its own `validate(cfg)` rules
    build         cfg.model -> nn.Module, called on the meta device (nothing allocated)
    init          (cfg.model, parameter name) -> InitRule: how each parameter starts; the engine
                  draws each rank's shard of it from the layout-invariant generator (core/rng.py)
    plan          a ParallelPlan: the TP tables, the self-attention modules CP swaps, the repeated
                  blocks (activation-checkpoint, compile and FSDP units, pipeline layers), the
                  modules of the first and last pipeline stages, the pipeline cost per layer
    objective     (cfg, mesh) -> Objective: what a batch holds, the loss sum and the count it
                  averages over (below)
    no_decay      parameter names that get no weight decay (norms, biases, position embeddings)
    flops_per_sample, parameters: for MFU and `gigatron plan`
    planner_shape cfg -> the planner's ModelShape (cluster/planner/model_shape.py), for full-scale plans
    converters    optional exporters (Hugging Face, ...)
    sample        optional: what `gigatron sample CKPT --prompt ...` does with a checkpoint of the family
                  (core/sample.py parses the command, finds the checkpoint and its family, and calls it)

The global mean is exact for any objective and any layout: before any backward, the trainer sums
`objective.count(batch)` over the step's micro-batches and all-reduces it over the "loss" mesh
(dp x cp): N, the number of loss terms of the global batch. Each micro-batch then back-propagates
`loss_sum * (dp * cp) / N` (FSDP averages gradients over its dp x cp ranks), so the gradient is that
of sum(all terms) / N whatever each rank's share of N, e.g. with ignored labels or masked patches.
An objective whose loss is the same on every cp rank (a pooled classifier) reports count/cp.

Built-in families are registered by module path and imported on first use, so importing the trainer
imports no model: `FAMILIES = {"llama3": "gigatron.core.families.llama3"}`. A new family calls
`register_family(ModelFamily(...))` from its own module (tests/ define one this way).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
from torch import nn


class Objective(Protocol):
    """The loss of a family: what the trainer calls per micro-batch. Batches are dicts of tensors
    as the loader returns them (data_pipeline/loader.py), with "sample_index" (B,) int64: the global
    index of each row, which keys per-sample randomness (core/rng.py)."""

    # batch fields of shape (B, T, ...) that context parallelism splits along T (the rest stay whole)
    sequence_keys: tuple[str, ...]

    def prepare(self, batch: dict) -> dict:
        """Add what the loss needs before the batch is split over cp (masks, noise, targets); the
        randomness must come from core/rng.py keyed by batch["sample_index"]."""
        ...

    def inputs(self, batch: dict) -> tuple[tuple, dict]:
        """(positional args for the first pipeline stage, keyword args for every stage). The keyword
        "positions" (T,) is the same for every row and is never split along the batch."""
        ...

    def count(self, batch: dict) -> torch.Tensor:
        """Number of loss terms this rank's part of `batch` holds (a 0-dim tensor)."""
        ...

    def loss(self, output: Any, batch: dict, model: nn.Module) -> torch.Tensor:
        """Summed loss over this rank's terms, fp32 0-dim. `model` is the (stage) module that made
        `output`, so a loss may own the output head (a chunked cross-entropy takes hidden states)."""
        ...

    def metrics(self, output: Any, batch: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Evaluation metrics beyond the loss: name -> (sum, count), summed over ranks by the trainer."""
        ...


@dataclass(frozen=True)
class InitRule:
    """How one parameter starts: kind "normal" (mean 0, `std`), "ones", "zeros" or "constant"."""

    kind: str = "normal"
    std: float = 0.02
    value: float = 0.0


@dataclass
class ParallelPlan:
    """How the engine parallelizes a family's model. Module paths are attribute paths ("a.b.c")."""

    blocks: str = "layers"                       # attribute holding the ModuleDict of repeated blocks
    first_stage: tuple[str, ...] = ()            # top-level modules run before the blocks (pp stage 0)
    last_stage: tuple[str, ...] = ()             # top-level modules run after them (last pp stage)
    tp_model: Callable[[Any], dict] | None = None   # cfg -> {top-level path: ParallelStyle}
    tp_block: Callable[[Any], dict] | None = None   # cfg -> {path inside a block: ParallelStyle}
    cp_attention: tuple[str, ...] = ()           # paths inside a block of the self-attention cores CP swaps;
                                                 # any other attention (cross-attention to text) stays local
    causal: bool = True                          # self-attention mask, for cp_mode "auto" (allgather vs ring)
    tied: Callable[[Any], list] = lambda m: []   # cfg.model -> [(parameter path, the path it shares)], re-tied after TP
    block_cost: Callable[[Any], float] | None = None   # cfg -> training FLOPs per sample of one block
    first_cost: Callable[[Any], float] | None = None   # ... of the first-stage modules
    last_cost: Callable[[Any], float] | None = None    # ... of the last-stage modules (output, loss)


@dataclass
class ModelFamily:
    name: str
    config: type                                     # the model section's dataclass (has a `name` field)
    build: Callable[[Any], nn.Module]                # cfg.model -> module (called on meta)
    init: Callable[[Any, str], InitRule]             # (cfg.model, parameter name) -> InitRule
    plan: ParallelPlan
    objective: Callable[[Any, Any], Objective]       # (cfg, mesh) -> Objective
    validate: Callable[[Any], None] = lambda cfg: None   # raise ConfigError naming the key and the fix
    n_blocks: Callable[[Any], int] = lambda m: 0         # cfg.model -> number of repeated blocks
    parameters: Callable[[Any], int] | None = None       # cfg.model -> parameter count (default: built on meta)
    no_decay: Callable[[str], bool] = lambda name: False  # parameter name -> exempt from weight decay
    flops_per_sample: Callable[[Any], float] = lambda cfg: 0.0  # training FLOPs of one sample (MFU)
    samples_unit: str = "tokens"                     # what tokens_per_s counts: tokens, images, ...
    units_per_sample: Callable[[Any], int] = lambda cfg: cfg.train.seq_len  # e.g. tokens per sequence
    data_format: str = "tokens"                      # the default data.format of this family
    converters: dict[str, Callable] = field(default_factory=dict)
    planner_shape: Callable[[Any], Any] | None = None  # cfg -> cluster.planner.model_shape.ModelShape (gigatron plan)
    sample: Callable[[Any, str, dict], str] | None = None  # (gigatron sample's arguments, checkpoint folder, its
                                                           # config.json) -> a summary line; writes under args.out


FAMILIES: dict[str, str | ModelFamily] = {
    "llama3": "gigatron.core.families.llama3",
    "vit": "gigatron.core.families.vit",
    "moviegen": "gigatron.core.families.moviegen",
    "emu_video": "gigatron.core.families.emu_video",
    "omnivore": "gigatron.core.families.omnivore",
    "crossflow": "gigatron.core.families.crossflow",
    "imagebind": "gigatron.core.families.imagebind",
}


def register_family(family: ModelFamily) -> ModelFamily:
    FAMILIES[family.name] = family
    return family


def get_family(name: str) -> ModelFamily:
    """The family registered under `name` (importing its module on first use)."""
    if name not in FAMILIES:
        from gigatron.core.config_loader import ConfigError

        raise ConfigError("model.name", f"unknown model family {name!r}; choose one of {', '.join(sorted(FAMILIES))}")
    entry = FAMILIES[name]
    if isinstance(entry, str):
        importlib.import_module(entry)  # registers itself
        entry = FAMILIES[name]
        assert isinstance(entry, ModelFamily), f"{name}: its module did not call register_family"
    return entry


def pipeline_costs(family: ModelFamily, cfg) -> tuple[float, float, float]:
    """(one block, first-stage modules, last-stage modules): training FLOPs, for the pipeline split."""
    p = family.plan
    cost = lambda fn: float(fn(cfg)) if fn is not None else 0.0  # noqa: E731
    return cost(p.block_cost) or 1.0, cost(p.first_cost), cost(p.last_cost)


def parameter_count(family: ModelFamily, model_cfg) -> int:
    """Parameters of the whole model, built on the meta device (nothing allocated, even for 405B)."""
    if family.parameters is not None:
        return family.parameters(model_cfg)
    with torch.device("meta"):
        model = family.build(model_cfg)
    return sum(p.numel() for p in model.parameters())


def module_at(root: nn.Module, path: str) -> nn.Module | None:
    for part in path.split("."):
        root = getattr(root, part, None)
        if root is None:
            return None
    return root


def blocks_of(model: nn.Module, plan: ParallelPlan) -> nn.ModuleDict:
    return getattr(model, plan.blocks)
