"""Implementation selector shared by the fused kernels (rmsnorm, swiglu, rope, chunked cross-entropy).

impl="auto":   the Triton kernel for CUDA tensors when triton is importable, the PyTorch path otherwise
               (CPU tensors never pick the interpreter by themselves: it is a test vehicle, ~100-300x
               slower than torch);
impl="triton": the Triton kernel (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1);
impl="torch":  the PyTorch path.
Tensor subclasses (DTensor, torch.compile's FakeTensor) always take the PyTorch path (`select_for`).
Each distinct (op, choice, reason) is logged once on "gigatron.kernels" (a child of "gigatron", so
handlers on logging.getLogger("gigatron") see it). The engine drives `impl` from config, never env vars.
"""

from __future__ import annotations

import logging

import torch

from .attention_triton import interpret_mode, triton_available

__all__ = ["IMPLS", "select_impl", "select_for", "out_buffer", "finish"]

logger = logging.getLogger("gigatron.kernels")
IMPLS = ("auto", "triton", "torch")
_logged: set = set()


def select_impl(op: str, impl: str, device: torch.device) -> str:
    """Return "triton" or "torch" for `op` on `device` (see the module docstring)."""
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "triton":
        if not triton_available():
            raise RuntimeError(f"{op}: impl 'triton' requested but triton is not importable")
        if device.type != "cuda" and not interpret_mode():
            raise RuntimeError(f"{op}: impl 'triton' needs CUDA tensors or TRITON_INTERPRET=1 (got {device})")
        choice, reason = "triton", "requested explicitly"
    elif impl == "torch":
        choice, reason = "torch", "requested explicitly"
    elif device.type == "cuda" and triton_available():
        choice, reason = "triton", "CUDA tensors and triton is importable"
    elif device.type == "cuda":
        choice, reason = "torch", "triton is not importable"
    else:
        choice, reason = "torch", f"{device.type} tensors"
    if (op, choice, reason) not in _logged:
        _logged.add((op, choice, reason))
        logger.info("%s impl %r -> %r: %s", op, impl, choice, reason)
    return choice


def select_for(op: str, impl: str, *tensors: torch.Tensor) -> str:
    """select_impl for these tensors: tensor subclasses (DTensor under tensor parallelism, FakeTensor
    under torch.compile) take the PyTorch path, which DTensor shards and inductor fuses by itself."""
    if any(type(t) not in (torch.Tensor, torch.nn.Parameter) for t in tensors):
        if impl == "triton":
            raise RuntimeError(f"{op}: impl 'triton' needs plain tensors, got {[type(t).__name__ for t in tensors]}")
        choice, reason = "torch", "tensor subclass (DTensor / torch.compile)"
        if (op, choice, reason) not in _logged:
            _logged.add((op, choice, reason))
            logger.info("%s impl %r -> %r: %s", op, impl, choice, reason)
        return choice
    return select_impl(op, impl, tensors[0].device)


def out_buffer(shape, dtype, device):
    """Kernel output buffer. Under the interpreter 16-bit outputs are written in fp32 and rounded by
    torch (`finish`): the interpreter's fp32 -> bf16 store truncates, GPU stores round to nearest."""
    return torch.empty(shape, dtype=torch.float32 if interpret_mode() else dtype, device=device)


def finish(buf, dtype):
    return buf if buf.dtype == dtype else buf.to(dtype)


def kernels():
    """The lazily imported @triton.jit kernels of the fused ops."""
    if not triton_available():
        raise RuntimeError("the triton kernels need triton (pip install triton)")
    from . import fused_triton_kernels

    return fused_triton_kernels


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << (max(int(n), 1) - 1).bit_length()
