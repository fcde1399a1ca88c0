"""Fused SwiGLU gate: out = silu(a) * b = a * sigmoid(a) * b (Shazeer 2020), as in llama.py's
FeedForward, w2(silu(w1 x) * w3 x), with a = w1 x and b = w3 x.

Backward, with s = sigmoid(a) recomputed from the saved a, b (no activation saved):
    da = dout * b * s * (1 + a * (1 - s))        (d silu / da = s + a s (1 - s))
    db = dout * a * s
Math in fp32, outputs in the input dtype: the unfused PyTorch composition rounds silu(a) to 16 bits
before the product; the fused path rounds once. a and b must have the same shape and dtype.
Select with impl="auto" | "triton" | "torch".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._select import cdiv, finish, kernels, out_buffer, select_for

__all__ = ["swiglu", "swiglu_reference", "SwiGLUFunction"]

BLOCK = 1024


def swiglu_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pure PyTorch, fp32 math, one rounding (differentiable by autograd)."""
    return (F.silu(a.float()) * b.float()).to(a.dtype)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        if a.shape != b.shape or a.dtype != b.dtype:
            raise ValueError(f"swiglu: a {tuple(a.shape)} {a.dtype} and b {tuple(b.shape)} {b.dtype} must match")
        a_c, b_c = a.contiguous(), b.contiguous()
        out = out_buffer(a.shape, a.dtype, a.device)
        n = a.numel()
        if n:
            kernels()._swiglu_fwd[(cdiv(n, BLOCK),)](a_c, b_c, out, n, BLOCK=BLOCK, num_warps=4)
        ctx.save_for_backward(a_c, b_c)
        return finish(out, a.dtype)

    @staticmethod
    def backward(ctx, dout):
        a, b = ctx.saved_tensors
        dout = dout.contiguous()
        da, db = out_buffer(a.shape, a.dtype, a.device), out_buffer(a.shape, a.dtype, a.device)
        n = a.numel()
        if n:
            kernels()._swiglu_bwd[(cdiv(n, BLOCK),)](dout, a, b, da, db, n, BLOCK=BLOCK, num_warps=4)
        return finish(da, a.dtype), finish(db, a.dtype)


def swiglu(a: torch.Tensor, b: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """silu(a) * b, differentiable in a and b; see the module docstring."""
    if select_for("swiglu", impl, a, b) == "torch":
        return F.silu(a) * b  # llama.py's unfused composition: bitwise the reference in fp32
    return SwiGLUFunction.apply(a, b)
