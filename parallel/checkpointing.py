"""Activation checkpointing per block (Chen et al. 2016; selective: Korthikanti et al. 2022).

- "full": a block keeps only its input; backward re-runs its whole forward (attention, and the
  collectives inside it: tp all-gathers / reduce-scatters, cp's K/V all-gather).
- "selective": per op type. The outputs of matmuls (the expensive ops) are saved, the cheap
  elementwise work (norms, SiLU, RoPE, residual adds) is recomputed, and so is a sequence-parallel
  all-gather (its reduce-scatter conjugate is saved, as torchtitan does). Attention is never
  recomputed, whatever kernel runs it (SDPA, gigatron's Triton or PyTorch kernels, context-
  parallel all-gather or ring attention): every module with `attention_core = True` keeps its own
  saved tensors (q, k, v, output, log-sum-exp: exempt from the checkpoint's recompute hooks), and
  when backward re-runs the block, the core hands back the output it computed in forward instead
  of running again, so neither its FLOPs nor its collectives are repeated.

Why not simply mark attention's aten ops "must save": the kernels update matmul outputs in place
(scores += mask bias), and a saved-then-mutated tensor replayed in the recompute is wrong (measured:
a 20% gradient-norm error). The core is one unit instead: no op inside it is cached.

The block's `forward` is wrapped in place (no wrapper module): parameter names, and therefore the
name-keyed initialisation and checkpoint keys, stay those of the plain model.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import threading

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
_state = threading.local()  # .recomputing: inside a backward re-run; .in_core: inside an attention core


def _policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if getattr(_state, "in_core", False):
        return CheckpointPolicy.PREFER_RECOMPUTE  # cache nothing: the core is not re-run (see below)
    return CheckpointPolicy.MUST_SAVE if op in SAVE else CheckpointPolicy.PREFER_RECOMPUTE


@contextlib.contextmanager
def _flag(name: str, value: bool):
    old = getattr(_state, name, False)
    setattr(_state, name, value)
    try:
        yield
    finally:
        setattr(_state, name, old)


@contextlib.contextmanager
def _recomputing(recompute):
    with recompute, _flag("recomputing", True):
        yield


def _selective_context():
    forward, recompute = create_selective_checkpoint_contexts(_policy)
    return forward, _recomputing(recompute)


def _checkpointed(forward, context_fn, *args, **kwargs):
    return checkpoint(forward, *args, use_reentrant=False, context_fn=context_fn, **kwargs)


def _saved_core(forward, outputs: collections.deque, *args, **kwargs):
    """An attention core under selective checkpointing: run once, keep its saved tensors, and replay
    its output (a FIFO: backward re-runs blocks in the order their forwards ran, under every
    pipeline schedule) when backward re-runs the block."""
    if getattr(_state, "recomputing", False):
        out, requires_grad = outputs.popleft()
        # a leaf that requires grad as the original did, so the ops after it save the same tensors
        return out.detach().requires_grad_(requires_grad)
    with _flag("in_core", True), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        out = forward(*args, **kwargs)
    if torch.is_grad_enabled():
        outputs.append((out.detach(), out.requires_grad))
    return out


def apply_ac(model: nn.Module, mesh: DeviceMesh | None, cfg, plan) -> nn.Module:
    """Wrap every block's forward per cfg.parallel.activation_checkpoint ("none", "full", "selective").
    Input/output placements are unchanged (whatever the block takes and returns)."""
    mode = cfg.parallel.activation_checkpoint
    if mode == "none":
        return model
    from torch.utils.checkpoint import noop_context_fn

    context_fn = _selective_context if mode == "selective" else noop_context_fn
    for block in blocks_of(model, plan).values():
        if mode == "selective":
            for module in block.modules():
                if getattr(module, "attention_core", False):
                    module.forward = functools.partial(_saved_core, module.forward, collections.deque())
        block.forward = functools.partial(_checkpointed, block.forward, context_fn)
    return model
