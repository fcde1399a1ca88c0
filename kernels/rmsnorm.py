"""Fused RMSNorm: y = x / sqrt(mean(x^2) + eps) * w over the last dim (Zhang & Sennrich 2019).

Shapes: x (..., D), w (D,); y (..., D) in promote(x.dtype, w.dtype), the dtype core/models/llama.py's
RMSNorm returns. Math in fp32 everywhere. Backward, with xhat = x * rstd and rstd saved (N,) fp32:

    dx = rstd * (w*dy - xhat * mean_d(xhat * w*dy))
    dw = sum_rows dy * xhat

Difference from llama.py's module in 16-bit: that one rounds xhat to x's dtype before multiplying by w
(two roundings); the fused kernel rounds once. fp32 results agree to fp32 rounding.

Triton (`_rmsnorm_fwd` / `_rmsnorm_bwd` in fused_triton_kernels.py): a program normalises BLOCK_ROWS
whole rows (D <= 65536); the backward writes per-program dw partials that torch sums (deterministic).
Select with impl="auto" | "triton" | "torch" (`_select.py`).
"""

from __future__ import annotations

import torch

from ._select import cdiv, finish, kernels, next_pow2, out_buffer, select_for

__all__ = ["rms_norm", "rms_norm_reference", "rms_norm_unfused", "RMSNormFunction"]

MAX_D = 65536


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Pure PyTorch, fp32 math, one rounding to the output dtype (differentiable by autograd)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return y.to(torch.promote_types(x.dtype, weight.dtype))


def _rows(x):
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _blocks(D):
    block_d = max(16, next_pow2(D))
    return max(1, min(16, 4096 // block_d)), block_d  # (BLOCK_ROWS, BLOCK_D): ~4k elements per tile


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        D = x.shape[-1]
        if D > MAX_D:
            raise ValueError(f"rms_norm: hidden size {D} > {MAX_D}")
        x2 = _rows(x)  # (N, D)
        N = x2.shape[0]
        out_dtype = torch.promote_types(x.dtype, weight.dtype)
        y = out_buffer((N, D), out_dtype, x.device)
        rstd = torch.empty(N, dtype=torch.float32, device=x.device)
        block_rows, block_d = _blocks(D)
        if N:
            kernels()._rmsnorm_fwd[(cdiv(N, block_rows),)](x2, weight.contiguous(), y, rstd, N, D, x2.stride(0),
                                                           y.stride(0), float(eps), BLOCK_ROWS=block_rows,
                                                           BLOCK_D=block_d, num_warps=4 if block_d <= 4096 else 8)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape = x.shape
        return finish(y, out_dtype).view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        N, D = x2.shape
        dy2 = _rows(dy)
        dx = out_buffer((N, D), x2.dtype, x2.device)
        block_rows, block_d = _blocks(D)
        # ~4 programs per SM on an H100 (132 SMs): enough parallelism, few dw partials to sum.
        rows_per_program = max(block_rows, cdiv(cdiv(N, 528), block_rows) * block_rows) if N else block_rows
        programs = cdiv(N, rows_per_program)
        dw_partial = torch.zeros(max(programs, 1), D, dtype=torch.float32, device=x2.device)
        if N:
            kernels()._rmsnorm_bwd[(programs,)](dy2, x2, weight.contiguous(), rstd, dx, dw_partial, N, D,
                                                dy2.stride(0), x2.stride(0), dx.stride(0), rows_per_program,
                                                BLOCK_ROWS=block_rows, BLOCK_D=block_d,
                                                num_warps=4 if block_d <= 4096 else 8)
        dw = dw_partial.sum(0).to(weight.dtype)
        return finish(dx, x2.dtype).view(ctx.x_shape), dw, None


def rms_norm_unfused(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The PyTorch path: llama.py's RMSNorm as it always was (normalise in fp32, round to x's dtype,
    multiply by the weight): bitwise the reference in fp32, one more rounding in 16 bits."""
    normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return normed.type_as(x) * weight


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, *, impl: str = "auto") -> torch.Tensor:
    """RMSNorm of x (..., D) with weight (D,); see the module docstring. Differentiable in x and weight.
    impl "torch" (and DTensor / compile inputs) runs `rms_norm_unfused`."""
    if select_for("rms_norm", impl, x, weight) == "torch":
        return rms_norm_unfused(x, weight, eps)
    return RMSNormFunction.apply(x, weight, eps)
