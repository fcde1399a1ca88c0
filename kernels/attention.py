"""Public attention API: `attention` (autograd), block-wise `attention_forward` / `attention_backward`
dispatchers and `merge_partials`, over two backends with identical semantics:

- "triton": `attention_triton.py`, fused flash-attention kernels (GPU; CPU under TRITON_INTERPRET=1).
- "torch":  `attention_reference.py`, pure PyTorch (the CPU training path and the ground truth).
- "auto":   triton for CUDA tensors when triton is importable, torch otherwise (CPU tensors run the
            Triton kernels only when backend="triton" is named and TRITON_INTERPRET=1 is set). Each
            distinct choice is logged once on "gigatron.kernels".

Shapes: q (B, H, T, D); k, v (B, Hkv, S, D), H % Hkv == 0; out (B, H, T, D); lse (B, H, T) fp32.
Mask: key j is visible to query i iff (not causal or kv_positions[j] <= q_positions[i]) and
(no segment ids or q_segment_ids[b, i] == kv_segment_ids[b, j]). A query that sees no key gets out = 0,
lse = -inf and zero gradients.

Kernel variants (triton backend; `attention_triton.plan_mask`). Causal attention whose positions are
None or contiguous ranges (q0 + i, k0 + j) takes the diagonal fast path: loop bounds stop at the
diagonal (offset q0 - k0), positions are never loaded. Other explicit positions take the data-driven
path (positions loaded, per-tile skip test). `positions_hint` says how to decide:
  "auto"     (default) check whether given positions are ranges: one host sync per positions tensor,
             cached by tensor identity / version, so a step with one shared positions tensor pays one;
  "default"  the caller guarantees positions are arange(T) / arange(S): fast path, no check, no sync
             (the engine's single-device self-attention: positions = arange(T));
  "explicit" always the data-driven path;
  an int     the caller guarantees ranges with q0 - k0 = that int: fast path, no sync (ring context
             parallelism knows each block's start on the host).
deterministic=True (the engine drives it from config for bitwise resume): no autotune; one fixed,
documented block config per (head dim, dtype) (`attention_triton_kernels.DETERMINISTIC_CONFIGS`),
so the accumulation order is the same in every run and process. The torch backend is deterministic
for fixed shapes regardless.

Merging partial attentions (context parallelism). If keys are split into disjoint sets A and B and
(out_a, lse_a), (out_b, lse_b) are attention over each set alone, then the attention over A u B is

    lse = log(exp(lse_a) + exp(lse_b))
    out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b

because each out_x is its set's softmax-weighted average with normaliser exp(lse_x). `merge_partials`
evaluates this relative to m = max(lse_a, lse_b) so nothing overflows, and treats lse = -inf (no
visible key in that set) as weight 0. The backward of the merged result needs no merge rule: call
`attention_backward` per key block with the GLOBAL out / lse; the per-block dq add up, dk / dv are exact.
"""

from __future__ import annotations

import logging

import torch

from .attention_reference import attention_backward_reference, attention_forward_reference
from .attention_triton import (attention_backward_triton, check_positions_hint, attention_forward_triton, interpret_mode,
                               triton_available)

__all__ = ["AttentionFunction", "attention", "attention_forward", "attention_backward", "merge_partials",
           "resolve_backend"]

logger = logging.getLogger("gigatron.kernels")
_BACKENDS = ("auto", "triton", "torch")
_logged: set = set()  # (backend, reason) pairs already logged


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map "auto" / "triton" / "torch" to the backend that runs on `device`; log each new choice once."""
    if backend not in _BACKENDS:
        raise ValueError(f"attention backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("attention backend 'triton' requested but triton is not importable")
        if device.type != "cuda" and not interpret_mode():
            raise RuntimeError(f"attention backend 'triton' needs CUDA tensors or TRITON_INTERPRET=1 (got {device})")
        choice, reason = "triton", "requested explicitly"
    elif backend == "torch":
        choice, reason = "torch", "requested explicitly"
    elif not triton_available():
        choice, reason = "torch", "triton is not importable"
    elif device.type == "cuda":
        choice, reason = "triton", "CUDA tensors and triton is importable"
    else:  # the interpreter is a test vehicle (~100-300x slower): CPU runs take it only when asked by name
        choice, reason = "torch", f"{device.type} tensors (backend='triton' runs the kernels in the interpreter)"
    if (choice, reason) not in _logged:
        _logged.add((choice, reason))
        logger.info("attention backend %r -> %r: %s", backend, choice, reason)
    return choice


def _reference_forward(q, k, v, *, positions_hint="auto", deterministic=False, **kw):
    _drop_default_positions(positions_hint, kw)
    return attention_forward_reference(q, k, v, **kw)


def _reference_backward(dout, q, k, v, out, lse, *, positions_hint="auto", deterministic=False, **kw):
    _drop_default_positions(positions_hint, kw)
    return attention_backward_reference(dout, q, k, v, out, lse, **kw)


def _drop_default_positions(positions_hint, kw):
    """The reference computes the same mask whatever the hint (it is a kernel-selection hint); with
    "default" the caller vouches that positions are the default aranges, so they are not even read.
    The reference is deterministic for fixed shapes, so `deterministic` changes nothing there."""
    check_positions_hint(positions_hint)
    if positions_hint == "default":
        kw["q_positions"] = kw["kv_positions"] = None


_FORWARD = {"triton": attention_forward_triton, "torch": _reference_forward}
_BACKWARD = {"triton": attention_backward_triton, "torch": _reference_backward}


def attention_forward(q, k, v, *, causal=True, q_positions=None, kv_positions=None, q_segment_ids=None,
                      kv_segment_ids=None, scale=None, backend="auto", positions_hint="auto", deterministic=False):
    """Non-differentiable forward: return (out, lse). Use per key block, then `merge_partials`.
    positions_hint / deterministic: see the module docstring."""
    fn = _FORWARD[resolve_backend(backend, q.device)]
    return fn(q, k, v, causal=causal, q_positions=q_positions, kv_positions=kv_positions,
              q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, scale=scale,
              positions_hint=positions_hint, deterministic=deterministic)


def attention_backward(dout, q, k, v, out, lse, *, causal=True, q_positions=None, kv_positions=None,
                       q_segment_ids=None, kv_segment_ids=None, scale=None, backend="auto", positions_hint="auto",
                       deterministic=False):
    """Return (dq, dk, dv) for the keys k / v given (possibly global, merged) out and lse."""
    fn = _BACKWARD[resolve_backend(backend, q.device)]
    return fn(dout, q, k, v, out, lse, causal=causal, q_positions=q_positions, kv_positions=kv_positions,
              q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, scale=scale,
              positions_hint=positions_hint, deterministic=deterministic)


def merge_partials(out_a, lse_a, out_b, lse_b):
    """Exact merge of two attentions over disjoint key sets (see the module docstring); fp32 math.

    out_* (B, H, T, D), lse_* (B, H, T). Returns (out in out_a's dtype, lse fp32)."""
    lse_a, lse_b = lse_a.float(), lse_b.float()
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(torch.isneginf(m), 0.0, m)  # both -inf: weights exp(-inf) = 0, no NaN
    w_a, w_b = torch.exp(lse_a - m), torch.exp(lse_b - m)
    total = w_a + w_b
    lse = m + torch.log(total)  # log(0) = -inf when neither set had a visible key
    inv = torch.where(total > 0, 1.0 / torch.where(total > 0, total, 1.0), 0.0)
    out = (out_a.float() * (w_a * inv)[..., None] + out_b.float() * (w_b * inv)[..., None]).to(out_a.dtype)
    return out, lse


class AttentionFunction(torch.autograd.Function):
    """Autograd wrapper: forward saves q, k, v, out, lse; backward calls `attention_backward`."""

    @staticmethod
    def forward(ctx, q, k, v, causal, q_positions, kv_positions, q_segment_ids, kv_segment_ids, scale, backend,
                positions_hint="auto", deterministic=False):
        backend = resolve_backend(backend, q.device)
        out, lse = _FORWARD[backend](q, k, v, causal=causal, q_positions=q_positions, kv_positions=kv_positions,
                                     q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, scale=scale,
                                     positions_hint=positions_hint, deterministic=deterministic)
        ctx.save_for_backward(q, k, v, out, lse, q_positions, kv_positions, q_segment_ids, kv_segment_ids)
        ctx.causal, ctx.scale, ctx.backend = causal, scale, backend
        ctx.positions_hint, ctx.deterministic = positions_hint, deterministic
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):  # dlse is ignored: lse is non-differentiable
        q, k, v, out, lse, q_positions, kv_positions, q_segment_ids, kv_segment_ids = ctx.saved_tensors
        dq, dk, dv = _BACKWARD[ctx.backend](dout.contiguous(), q, k, v, out, lse, causal=ctx.causal,
                                            q_positions=q_positions, kv_positions=kv_positions,
                                            q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                                            scale=ctx.scale, positions_hint=ctx.positions_hint,
                                            deterministic=ctx.deterministic)
        return dq, dk, dv, None, None, None, None, None, None, None, None, None


def attention(q, k, v, *, causal=True, q_positions=None, kv_positions=None, q_segment_ids=None,
              kv_segment_ids=None, scale=None, backend="auto", return_lse=False, positions_hint="auto",
              deterministic=False):
    """softmax(scale * q k^T + mask) v with autograd through q, k, v. Returns out, or (out, lse) when
    return_lse (lse carries no gradient). See the module docstring for shapes, masking, positions_hint
    and deterministic."""
    out, lse = AttentionFunction.apply(q, k, v, causal, q_positions, kv_positions, q_segment_ids,
                                       kv_segment_ids, scale, backend, positions_hint, deterministic)
    return (out, lse) if return_lse else out
