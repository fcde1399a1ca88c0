"""Apply every parallelism to a model, in one fixed order: TP/SP -> CP -> activation checkpointing
-> compile -> FSDP. Each step takes the mesh and its own config; the model code knows nothing of it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from gigatron.core.config import Config
from gigatron.parallel.checkpointing import apply_ac
from gigatron.parallel.context import apply_cp
from gigatron.parallel.fsdp import apply_fsdp
from gigatron.parallel.mesh import ParallelDims
from gigatron.parallel.tensor import apply_tp, grad_to_param_layout


def parallelize_llama(model: nn.Module, dims: ParallelDims, cfg: Config, param_dtype: torch.dtype) -> nn.Module:
    mesh = dims.mesh
    # 1. tensor + sequence parallel: column/row-parallel projections over mesh["tp"] (parallel/tensor.py)
    if dims.tp > 1:
        apply_tp(model, mesh, cfg)
    # 2. context parallel: AttentionCore -> all-gather or ring over mesh["cp"] (parallel/context.py)
    if dims.cp > 1:
        apply_cp(model, mesh, cfg)
    # 3. activation checkpointing per block (parallel/checkpointing.py)
    apply_ac(model, mesh, cfg)
    # 4. torch.compile per block: fuses the elementwise work between matmuls
    if cfg.train.compile:
        for block in model.layers.values():
            block.compile()  # in place: parameter names stay those of the model
    # 5. FSDP over (dp_shard x cp), HSDP with dp_replicate: the outermost dimension
    if dims.dp * dims.cp > 1:
        apply_fsdp(model, mesh, cfg.parallel, param_dtype)
    return model


def place_shard(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The local part of a full initial value: every rank computes the same `full`, so each keeps
    its own shard without communication (src_data_rank=None). Also the first moment the final
    parameter objects exist (after `to_empty`): register tensor parallel's gradient-layout hook."""
    if isinstance(param, DTensor):
        grad_to_param_layout(param)
        return distribute_tensor(full.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
    return full
