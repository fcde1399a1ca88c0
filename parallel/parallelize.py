"""Apply every parallelism to a model, in one fixed order: TP/SP -> FP8 -> CP -> activation
checkpointing -> compile -> FSDP; then give each rank its shard of the initial weights. Each step takes the mesh,
its own config and the family's plan (core/family.py); the model code knows nothing of it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from gigatron.core import rng
from gigatron.core.family import ModelFamily, blocks_of, module_at
from gigatron.parallel.checkpointing import apply_ac
from gigatron.parallel.context import apply_cp
from gigatron.parallel.fp8 import apply_fp8
from gigatron.parallel.fsdp import apply_fsdp
from gigatron.parallel.mesh import ParallelDims
from gigatron.parallel.tensor import apply_tp, grad_to_param_layout


def parallelize(model: nn.Module, dims: ParallelDims, cfg, family: ModelFamily, param_dtype: torch.dtype) -> nn.Module:
    mesh, plan = dims.mesh, family.plan
    # 1. tensor + sequence parallel: the family's TP tables over mesh["tp"] (parallel/tensor.py)
    if dims.tp > 1:
        apply_tp(model, mesh, cfg, plan)
        for path, source in plan.tied(cfg.model):  # TP distributed each user of a shared parameter apart
            owner, _, name = path.rpartition(".")
            setattr(module_at(model, owner), name, _parameter_at(model, source))
    # 1b. FP8 (cfg.fp8): the blocks' linears -> FP8 linears, after TP (they keep its styles and see their
    # shards' placements) and before FSDP (which then shards them as it does nn.Linear) (parallel/fp8.py)
    apply_fp8(model, mesh, cfg, plan, family.n_blocks(cfg.model))
    # 2. context parallel: the plan's self-attention cores -> all-gather or ring over mesh["cp"]
    if dims.cp > 1:
        apply_cp(model, mesh, cfg, plan)
    # 3. activation checkpointing per block (parallel/checkpointing.py)
    apply_ac(model, mesh, cfg, plan)
    # 4. torch.compile per block: fuses the elementwise work between matmuls
    if cfg.train.compile:
        for block in blocks_of(model, plan).values():
            block.compile()  # in place: parameter names stay those of the model
    # 5. FSDP over (dp_shard x cp), HSDP with dp_replicate: the outermost dimension. It also carries the
    # mixed-precision policy (FP32 master weights, compute in param_dtype, FP32 gradient reduction), so
    # a layout with dp x cp = 1 (tp8 on one node) is wrapped too, over its 1-rank mesh, when compute
    # is not FP32: every layout computes in the same dtype (no collective runs on a 1-rank mesh)
    if dims.dp * dims.cp > 1 or param_dtype != torch.float32:
        apply_fsdp(model, mesh, cfg.parallel, param_dtype, plan)
    return model


def _parameter_at(model: nn.Module, path: str) -> nn.Parameter:
    owner, _, name = path.rpartition(".")
    return getattr(module_at(model, owner), name)


def precision_policy(param_dtype: torch.dtype) -> str:
    """The mixed-precision policy every layout runs (logged at start-up)."""
    name = str(param_dtype).replace("torch.", "")
    return (f"parameters float32 (master copy, optimizer state float32), compute {name}, "
            f"gradients reduced and accumulated in float32")


@torch.no_grad()
def init_weights(model: nn.Module, family: ModelFamily, cfg, seed: int) -> None:
    """Fill this rank's shard of every parameter (after `to_empty`), and nothing more.

    The value of element i of parameter `name` is a pure function of (seed, name, i)
    (core/rng.py), so every layout (tp, fsdp, pipeline stage, dp) starts from the same model and
    each rank draws only the box of the global tensor it holds: DTensor gives the box's global offset
    and local shape (Shard and FSDP's _StridedShard alike). Also the first moment the final
    parameter objects exist: register tensor parallel's gradient-layout hook here."""
    for name, param in model.named_parameters():
        rule = family.init(cfg.model, name)
        if isinstance(param, DTensor):
            grad_to_param_layout(param)
            shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
            local = param.to_local()
            assert tuple(local.shape) == tuple(shape), (name, local.shape, shape)
        else:
            local, offset = param, (0,) * param.dim()
        if rule.kind == "ones":
            local.fill_(1.0)
        elif rule.kind == "zeros":
            local.zero_()
        elif rule.kind == "constant":
            local.fill_(rule.value)
        elif rule.kind == "normal":
            key = rng.stream_key("init", seed, name)
            local.copy_(rng.normal_box(key, param.shape, offset, local.shape, local.device).mul_(rule.std))
        else:
            raise ValueError(f"{name}: unknown init kind {rule.kind!r}")
    for module in model.modules():
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()
