"""Chunked (fused linear) cross-entropy: the summed CE of hidden states through the output layer,
computed chunk of tokens by chunk, so that the (N, V) logits never exist; vocabulary-parallel ready.

Inputs: hidden h (N, d); weight W (V_local, d), this rank's shard of the output layer, holding global
vocabulary columns [vocab_offset, vocab_offset + V_local); labels y (N,) global ids in [0, V) or
ignore_index. Rows labelled ignore_index count 0 in the sum and get zero gradient (the same contract as
cross_entropy.cross_entropy_sum and torch's F.cross_entropy(reduction="sum")).

Forward, per chunk c of C rows (z = h_c W^T, (C, V_local), the only large temporary):
    m_n = max_v z_nv,   s_n = sum_v exp(z_nv - m_n),   t_n = z_n,y_n if y_n is in this shard else 0
then, once for all N rows, the three all-reduces over the vocabulary-parallel group (tp):
    M_n = all_reduce_max(m_n),  S_n = all_reduce_sum(s_n exp(m_n - M_n)),  T_n = all_reduce_sum(t_n)
    lse_n = M_n + log S_n,      loss = sum_{n valid} (lse_n - T_n)
Only lse (N,) fp32 is saved with h, W, y. Backward recomputes each chunk's logits:
    dz_nv = g [n valid] (exp(z_nv - lse_n) - [v == y_n - vocab_offset])
    dh_c  = dz W            (a partial sum over tp ranks: all-reduced when reduce_grad_input)
    dW   += dz^T h_c        (exact for the local shard; accumulated in fp32)
Peak extra memory: one (C, V_local) chunk, plus dW's fp32 accumulator (V_local, d) in backward.

Collectives stay out of this module: pass all_reduce(tensor, op) -> tensor with op "max" or "sum"
(the engine wraps torch.distributed over its tp group; it may reduce in place and return its input).
all_reduce=None means tp = 1. Forward: 3 calls on (N,) fp32 tensors; backward: 1 call on dh (N, d)
when reduce_grad_input (set it False when the caller's own region already sums the partial input
gradients, e.g. a sequence-parallel all-gather whose backward is a reduce-scatter).

impl: "triton" fuses the per-chunk statistics (one pass, online max) and the in-place softmax-minus-
one-hot gradient into Triton kernels, the matmuls stay cuBLAS; "torch" is the same algorithm in
PyTorch ops; "auto" picks triton on CUDA, torch on CPU. `cross_entropy_full_reference` is the
unchunked ground truth for tests (it builds the full logits).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ._select import interpret_mode, kernels, next_pow2, select_impl

__all__ = ["chunked_cross_entropy", "cross_entropy_full_reference", "ChunkedCrossEntropyFunction",
           "default_chunk_size"]

AllReduce = Callable[[torch.Tensor, str], torch.Tensor]
CHUNK_BYTES = 256 * 2**20  # default logits budget per chunk (fp32): 512 rows at V_local = 128k


def default_chunk_size(n_rows: int, v_local: int, budget_bytes: int = CHUNK_BYTES) -> int:
    """Rows per chunk so that one fp32 (C, V_local) chunk stays within budget_bytes (at least 1 row)."""
    return max(1, min(max(n_rows, 1), budget_bytes // max(4 * v_local, 1)))


def cross_entropy_full_reference(hidden, weight, labels, ignore_index=-100):
    """Unchunked tp = 1 ground truth: F.cross_entropy(h W^T, y, reduction="sum") in fp32."""
    return F.cross_entropy(hidden.float() @ weight.float().t(), labels, ignore_index=ignore_index, reduction="sum")


def _local_labels(labels, ignore_index, vocab_offset, v_local):
    """(valid (N,) bool, local index (N,) int32: y - offset when in this shard and valid, else -1)."""
    valid = labels != ignore_index
    local = labels - vocab_offset
    in_shard = valid & (local >= 0) & (local < v_local)
    return valid, torch.where(in_shard, local, -1).to(torch.int32)


def _logits(h_c, weight, use_fp32):
    """(C, V_local) logits of one chunk: fp32 when use_fp32 (CPU / interpreter / fp32 inputs), else in
    the input dtype with fp32 accumulation by cuBLAS; the kernels upcast on load."""
    if use_fp32:
        return h_c.float() @ weight.float().t()
    return h_c @ weight.t()


def _stats_torch(z, local):
    """(m, s, t) with m = logsumexp_v z and s = 1: the same (max, sum-exp) pair up to the shift, in one
    vectorised torch call (the combine step only needs s * exp(m - M))."""
    m = torch.logsumexp(z.float(), dim=-1)  # (C,)
    t = torch.where(local >= 0, z.gather(1, local.clamp(min=0).long()[:, None]).squeeze(1).float(), 0.0)
    return m, torch.ones_like(m), t


def _stats_triton(z, local):
    C, V = z.shape
    m, s, t = (torch.empty(C, dtype=torch.float32, device=z.device) for _ in range(3))
    block_v = min(4096, max(16, next_pow2(V)))
    kernels()._ce_chunk_stats[(C,)](z, local, m, s, t, V, z.stride(0), BLOCK_V=block_v,
                                    num_warps=8 if block_v >= 2048 else 4)
    return m, s, t


def _grad_torch(z, local, lse, scale):
    g = z.float()  # a fresh fp32 chunk (the recomputed logits): overwritten in place
    torch.exp(g.sub_(lse[:, None]), out=g)  # (C, V_local) softmax
    rows = torch.nonzero(local >= 0).squeeze(1)
    g[rows, local[rows].long()] -= 1.0
    return g.mul_(scale[:, None]).to(z.dtype)


def _grad_triton(z, local, lse, scale):
    C, V = z.shape
    block_v = min(4096, max(16, next_pow2(V)))
    kernels()._ce_chunk_grad[(C,)](z, z, local, lse, scale, V, z.stride(0), z.stride(0), BLOCK_V=block_v,
                                   num_warps=8 if block_v >= 2048 else 4)  # in place
    return z


class ChunkedCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, vocab_offset, ignore_index, chunk_size, all_reduce,
                reduce_grad_input, impl):
        N, d = hidden.shape
        V_local = weight.shape[0]
        if weight.dim() != 2 or weight.shape[1] != d or labels.shape != (N,):
            raise ValueError(f"chunked_cross_entropy: hidden (N, d), weight (V_local, d), labels (N,); got "
                             f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(labels.shape)}")
        use_fp32 = hidden.dtype == torch.float32 or impl == "torch" or interpret_mode()
        stats = _stats_triton if impl == "triton" else _stats_torch
        valid, local = _local_labels(labels, ignore_index, vocab_offset, V_local)
        m, s, t = (torch.empty(N, dtype=torch.float32, device=hidden.device) for _ in range(3))
        for lo in range(0, N, chunk_size):
            rows = slice(lo, lo + chunk_size)
            m[rows], s[rows], t[rows] = stats(_logits(hidden[rows], weight, use_fp32), local[rows])
            # the chunk's logits are freed here, before the next chunk is computed
        if all_reduce is not None:
            M = all_reduce(m.clone(), "max")
            s = all_reduce(s * torch.exp(m - M), "sum")
            t = all_reduce(t, "sum")
        else:
            M = m
        lse = M + torch.log(s)
        loss = torch.where(valid, lse - t, 0.0).sum()
        ctx.save_for_backward(hidden, weight, local, valid, lse)
        ctx.chunk_size, ctx.all_reduce, ctx.reduce_grad_input = chunk_size, all_reduce, reduce_grad_input
        ctx.impl, ctx.use_fp32 = impl, use_fp32
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, local, valid, lse = ctx.saved_tensors
        N = hidden.shape[0]
        grad_fn = _grad_triton if ctx.impl == "triton" else _grad_torch
        scale = valid.float() * grad_loss.float()  # (N,)
        dh = torch.empty_like(hidden)
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        w_mm = weight.float() if ctx.use_fp32 else weight
        for lo in range(0, N, ctx.chunk_size):
            rows = slice(lo, lo + ctx.chunk_size)
            h_c = hidden[rows].float() if ctx.use_fp32 else hidden[rows]
            dz = grad_fn(_logits(hidden[rows], weight, ctx.use_fp32), local[rows], lse[rows], scale[rows])
            dh[rows] = (dz @ w_mm).to(hidden.dtype)
            if dz.dtype == torch.float32:
                dw.addmm_(dz.t(), h_c)
            else:  # 16-bit matmul with fp32 accumulation inside cuBLAS, rounded once per chunk
                dw.add_(dz.t() @ h_c)
        if ctx.all_reduce is not None and ctx.reduce_grad_input:
            dh = ctx.all_reduce(dh, "sum")
        return dh, dw.to(weight.dtype), None, None, None, None, None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          vocab_offset: int = 0, ignore_index: int = -100, chunk_size: Optional[int] = None,
                          all_reduce: Optional[AllReduce] = None, reduce_grad_input: bool = True,
                          impl: str = "auto") -> torch.Tensor:
    """Summed cross-entropy of (hidden @ weight^T) against labels, chunked; see the module docstring.

    hidden (N, d), weight (V_local, d) from global column vocab_offset, labels (N,) global ids.
    Returns an fp32 scalar (the same on every tp rank). Differentiable in hidden and weight."""
    choice = select_impl("chunked_cross_entropy", impl, hidden.device)
    if chunk_size is None:
        chunk_size = default_chunk_size(hidden.shape[0], weight.shape[0])
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return ChunkedCrossEntropyFunction.apply(hidden, weight, labels, int(vocab_offset), int(ignore_index),
                                             int(chunk_size), all_reduce, reduce_grad_input, choice)
