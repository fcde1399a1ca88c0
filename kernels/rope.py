"""Fused rotary position embedding (Su et al. 2021) in the half-split layout of llama.py's apply_rope:

    out = x * cos + rotate_half(x) * sin,   rotate_half(x) = cat(-x2, x1),  x = cat(x1, x2) on the last dim

x (B, H, T, D) (any strides with a contiguous head dim, e.g. a transposed projection), cos / sin (T, D)
(usually cat(freqs, freqs) halves, but the halves may differ). In halves:
    forward   y1 = x1 c1 - x2 s1,       y2 = x2 c2 + x1 s2
    backward  dx = cos dy + rotate_half^T(sin dy):  dx1 = dy1 c1 + dy2 s2,  dx2 = dy2 c2 - dy1 s1
cos / sin are constants (position tables): no gradient flows to them. Math in fp32, out in x's dtype,
as apply_rope does. Select with impl="auto" | "triton" | "torch".
"""

from __future__ import annotations

import torch

from ._select import cdiv, finish, kernels, next_pow2, out_buffer, select_for

__all__ = ["apply_rope", "apply_rope_reference", "RoPEFunction"]


def apply_rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """llama.py's apply_rope (differentiable by autograd)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x.float() * cos + rotated.float() * sin).type_as(x)


def _table(t, T, D):
    t = t.reshape(T, D) if t.numel() == T * D else t
    if tuple(t.shape) != (T, D):
        raise ValueError(f"apply_rope: cos / sin must be ({T}, {D}), got {tuple(t.shape)}")
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch(x, cos, sin, backward):
    B, H, T, D = x.shape
    if D % 2:
        raise ValueError(f"apply_rope: head dim {D} must be even")
    x = x if x.stride(-1) == 1 else x.contiguous()
    y = out_buffer((B, H, T, D), x.dtype, x.device)
    half = D // 2
    block_half = max(16, next_pow2(half))
    block_t = max(1, min(64, 4096 // block_half))
    if y.numel():
        kernels()._rope[(cdiv(T, block_t), B * H)](
            x, cos, sin, y, x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1), y.stride(2),
            cos.stride(0), sin.stride(0), H, T, HALF=half, BLOCK_HALF=block_half, BLOCK_T=block_t,
            BACKWARD=backward, num_warps=4)
    return finish(y, x.dtype)


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        T, D = x.shape[-2], x.shape[-1]
        cos, sin = _table(cos, T, D), _table(sin, T, D)
        ctx.save_for_backward(cos, sin)
        return _launch(x, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _launch(dy, cos, sin, backward=True), None, None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """Rotate x (B, H, T, D) by the (T, D) cos / sin tables; differentiable in x."""
    if x.dim() != 4:
        raise ValueError(f"apply_rope: x must be (B, H, T, D), got {tuple(x.shape)}")
    if select_for("apply_rope", impl, x, cos, sin) == "torch":
        return apply_rope_reference(x, cos, sin)
    return RoPEFunction.apply(x, cos, sin)
