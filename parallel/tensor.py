"""Tensor and sequence parallelism (Megatron-LM, Shoeybi et al. 2019; sequence
parallel: Korthikanti et al. 2022), written as DTensor parallel styles, as torchtitan does.

Why DTensor styles rather than hand-written collectives: parameters become DTensors with a global
shape and placements, so FSDP2 composes on top (2-D (dp, tp) layouts, `_StridedShard`), DCP saves
the global layout and reshards a checkpoint across tp/dp changes for free, and state_dict keys and
shapes stay those of the single-device model (the vocabulary keeps its true size even when tp does
not divide it: DTensor shards it unevenly, torch.chunk style, so no padding row ever exists).

A family's plan (core/family.py ParallelPlan.tp_model / tp_block, e.g. parallel/plans/llama3.py)
is a literal table {module path: style}; `apply_tp` applies it to the top level and to every block.
This file holds the generic styles the tables use beyond torch's (`ReplicateParallel`,
`ReplicatedKV`), the gradient-layout hook, and the vocabulary-parallel cross-entropy.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, distribute_module
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.distributed.tensor.parallel import parallelize_module
from torch.distributed.tensor.parallel.style import ParallelStyle

from gigatron.core.family import blocks_of, module_at
from gigatron.kernels.cross_entropy import cross_entropy_sum, soft_cross_entropy_sum
from gigatron.parallel.comm import all_reduce

IGNORE_INDEX = -100  # a label that carries no loss (torch's convention)


class ReplicateParallel(ParallelStyle):
    """Parameters replicated over tp (Replicate DTensors), plain tensors in and out: the norms when
    sequence parallel is off, so that every parameter is a DTensor on the same tp mesh (gradient
    clipping and FSDP then see one layout). Identical inputs on every rank: no collective."""

    def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
        def input_fn(mod, inputs, mesh):
            return tuple(DTensor.from_local(x, mesh, [Replicate()], run_check=False)
                         if isinstance(x, torch.Tensor) and not isinstance(x, DTensor) else x for x in inputs)

        return distribute_module(module, mesh, None, input_fn, lambda mod, out, mesh: out.to_local())


class ReplicatedKV(ParallelStyle):
    """wk / wv when n_kv_heads < tp: the weight is replicated (Replicate DTensor), every rank computes
    all Hkv heads from the gathered input (Replicate, (B, T, dim)) and keeps the one kv head its query
    heads use: rank r holds queries [r*H/tp, (r+1)*H/tp), which read kv head r // (tp/Hkv).
    Output: a local (B, T, D) tensor. Backward: the sliced gradient is a Partial sum over tp, so the
    weight gradient is all-reduced over tp (`grad_to_param_layout`)."""

    def __init__(self, n_kv_heads: int, head_dim: int):
        super().__init__()
        self.n_kv_heads, self.head_dim = n_kv_heads, head_dim

    def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
        kv_head = mesh.get_local_rank() // (mesh.size() // self.n_kv_heads)
        D = self.head_dim

        def input_fn(mod, inputs, mesh):
            x = inputs[0]
            return (x if isinstance(x, DTensor) else DTensor.from_local(x, mesh, [Replicate()], run_check=False),)

        def output_fn(mod, out, mesh):
            local = out.to_local(grad_placements=[Partial()])  # (B, T, Hkv*D), same on all tp ranks
            return local[..., kv_head * D:(kv_head + 1) * D]  # (B, T, D): this rank's kv head

        return distribute_module(module, mesh, None, input_fn, output_fn)


def apply_tp(model: nn.Module, mesh: DeviceMesh, cfg, plan) -> nn.Module:
    """Parallelize `model` over mesh["tp"] in place with the family's tables (`plan.tp_model(cfg)` for
    top-level modules, `plan.tp_block(cfg)` inside every block). Pipeline stages may have dropped
    top-level modules (None): those rows are skipped."""
    tp_mesh = mesh["tp"]
    if tp_mesh.size() == 1:
        return model
    top = {k: v for k, v in plan.tp_model(cfg).items() if module_at(model, k) is not None}
    parallelize_module(model, tp_mesh, top)
    for block in blocks_of(model, plan).values():
        parallelize_module(block, tp_mesh, plan.tp_block(cfg))
    return model


def grad_to_param_layout(param: torch.Tensor) -> None:
    """Make `param`'s gradient arrive in the parameter's own placements, in backward. DTensor leaves
    a replicated parameter whose inputs were sharded (norms under SP: T/tp tokens; replicated KV
    heads: one head's slice) with a Partial gradient -> all-reduce over tp, once; and the vocab-
    parallel embedding with a Replicate gradient -> keep the local rows (no collective). Called on
    the materialised parameters (`to_empty` drops hooks), by parallelize.place_shard. Under FSDP2 the
    hook never fires (FSDP sets the sharded gradients itself, after the same redistribution)."""
    if isinstance(param, DTensor) and param.requires_grad:
        placements = param.placements
        param.register_hook(lambda g: g.redistribute(placements=placements) if g.placements != placements else g)


# -- the vocabulary-parallel loss -----------------------------------------------------------------

def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """Summed cross-entropy; labels equal to IGNORE_INDEX add nothing, as on one device.

    logits (B, T, V): a DTensor sharded on V (evenly or not) over mesh["tp"], or a plain tensor
    (tp=1). labels (B, T) global ids. Returns a plain fp32 scalar, the same on every tp rank. The
    kernel (kernels/cross_entropy.py) never gathers the logits: forward all-reduces over tp the row
    max, the sum of exponentials and the target logit, each (B*T,) fp32; backward has no collective.
    Its backward needs no context manager (pipeline schedules call backward elsewhere)."""
    if not isinstance(logits, DTensor):
        return cross_entropy_sum(logits.flatten(0, 1), labels.flatten(), IGNORE_INDEX)  # fused, no (N, V) temporaries
    _, offset = compute_local_shape_and_global_offset(logits.shape, logits.device_mesh, logits.placements)

    def tp_all_reduce(tensor: torch.Tensor, op: str) -> torch.Tensor:
        return all_reduce(tensor, mesh, "tp", {"max": torch.distributed.ReduceOp.MAX,
                                              "sum": torch.distributed.ReduceOp.SUM}[op])

    return cross_entropy_sum(logits.to_local().flatten(0, 1), labels.flatten(), IGNORE_INDEX,
                             vocab_offset=offset[-1], all_reduce=tp_all_reduce)


def tp_all_reduce_fn(mesh: DeviceMesh):
    """(tensor, "max" | "sum") -> tensor all-reduced over mesh["tp"]: the kernels' collective."""
    ops = {"max": torch.distributed.ReduceOp.MAX, "sum": torch.distributed.ReduceOp.SUM}
    return lambda tensor, op: all_reduce(tensor, mesh, "tp", ops[op])


def vocab_parallel_soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """Summed soft-target cross-entropy (kernels/cross_entropy.py SoftCrossEntropySum) of logits (N, V),
    a DTensor sharded on V over mesh["tp"] or a plain tensor, against full targets (N, V): each rank
    keeps its own columns of the targets, so no rank gathers the logits. Plain fp32 scalar, the same
    on every tp rank."""
    if not isinstance(logits, DTensor):
        return soft_cross_entropy_sum(logits, targets)
    shape, offset = compute_local_shape_and_global_offset(logits.shape, logits.device_mesh, logits.placements)
    local_targets = targets[..., offset[-1]:offset[-1] + shape[-1]]
    return soft_cross_entropy_sum(logits.to_local(), local_targets, all_reduce=tp_all_reduce_fn(mesh))
