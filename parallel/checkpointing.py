"""Activation checkpointing per transformer block (Chen et al. 2016; selective: Korthikanti et al. 2022).

- "full": a block keeps only its input; backward re-runs its whole forward.
- "selective": per op type. The outputs of matmuls and attention (the expensive ops) are saved, the
  cheap elementwise work (norms, SiLU, RoPE, residual adds) is recomputed, and so is a sequence-
  parallel all-gather (its reduce-scatter conjugate is saved, as torchtitan does).

The block's `forward` is wrapped in place (no wrapper module): parameter names, and therefore the
name-seeded initialisation and checkpoint keys, stay those of the plain model. Collectives: none of
its own; "full" recomputes the block's forward collectives (tp all-gathers / reduce-scatters) in
backward, "selective" recomputes the all-gathers only.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from gigatron.core.family import blocks_of

_aten = torch.ops.aten
SAVE = {
    _aten.mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _aten._scaled_dot_product_cudnn_attention.default,
    torch.ops._c10d_functional.reduce_scatter_tensor.default,
}


def _policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVE else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(_policy)


def _checkpointed(forward, context_fn, *args, **kwargs):
    return checkpoint(forward, *args, use_reentrant=False, context_fn=context_fn, **kwargs)


def apply_ac(model: nn.Module, mesh: DeviceMesh | None, cfg, plan) -> nn.Module:
    """Wrap every block's forward per cfg.parallel.activation_checkpoint ("none", "full", "selective").
    Input/output placements are unchanged (whatever the block takes and returns)."""
    mode = cfg.parallel.activation_checkpoint
    if mode == "none":
        return model
    from torch.utils.checkpoint import noop_context_fn

    context_fn = _selective_context if mode == "selective" else noop_context_fn
    for block in blocks_of(model, plan).values():
        block.forward = functools.partial(_checkpointed, block.forward, context_fn)
    return model
