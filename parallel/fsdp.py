"""Sharded data parallelism with FSDP2 (`torch.distributed.fsdp.fully_shard`) over the dp dimension.

Llama 3's choices are the defaults: each block's weights stay gathered from forward to backward
(`reshard_after_forward=False`, no second all-gather), gradients are reduce-scattered in FP32, and
parameters, gradients and optimizer state are sharded. With dp_replicate > 1 the mesh is 2-D and
FSDP2 runs HSDP: shard inside a group, all-reduce across groups.

Context-parallel ranks hold the same parameters but different tokens, so their gradients must be
averaged too: FSDP shards over the flattened (dp_shard, cp) mesh "fsdp_shard".

With tensor parallel, FSDP2 shards the tp-local part of each DTensor parameter again on dim 0:
2-D (fsdp_shard, tp) parameters, placed (_StridedShard(0), Shard(d)) when both split dim 0. Input:
the parameters' tp placements are untouched; gradients that DTensor leaves Partial over tp (norm
weights under sequence parallel, replicated KV heads) are all-reduced over tp by FSDP2 before its
reduce-scatter. Tested against one process in tests/parallel/test_tensor_parallel.py (dp, tp x dp,
HSDP 2x2 and tp x HSDP).

Collectives (issued inside FSDP2, per block): forward all-gather of the block's shards; backward
reduce-scatter of its gradients (and all-reduce across dp_replicate under HSDP).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from gigatron.core.config import ParallelConfig
from gigatron.core.family import blocks_of


def fsdp_mesh(mesh: DeviceMesh, cfg: ParallelConfig) -> DeviceMesh:
    if cfg.dp_replicate > 1:
        return mesh["dp_replicate", "fsdp_shard"]
    return mesh["fsdp_shard"]


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, cfg: ParallelConfig, param_dtype: torch.dtype, plan) -> nn.Module:
    """Wrap each of the family's blocks, then the root (embedding, final norm, output, ...)."""
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    dp_mesh = fsdp_mesh(mesh, cfg)
    blocks = list(blocks_of(model, plan).values())
    for i, block in enumerate(blocks):
        # The last block's weights are needed at once by backward: never reshard it.
        reshard = cfg.reshard_after_forward and i < len(blocks) - 1
        fully_shard(block, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=reshard)
    fully_shard(model, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=cfg.reshard_after_forward)
    return model
