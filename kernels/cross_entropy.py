"""Cross-entropy from logits without the (N, V) intermediates of log_softmax + nll_loss.

With a 128,256-token vocabulary the logits dominate activation memory and, on CPU, time. The
standard path writes log_softmax's (N, V) output, then nll_loss's backward fills a zero (N, V)
tensor, scatters -1 into it, and log_softmax's backward reads two (N, V) tensors to write a third.
Here:
  forward   lse_n = logsumexp_v(z_nv)           (row chunks: temporaries stay small)
            loss  = sum_n [lse_n - z_n,y_n]     (over rows whose label is not ignore_index)
  backward  dz_nv = g * (exp(z_nv - lse_n) - [v == y_n])   written once, in place
Only the logits are saved; backward recomputes the softmax per row chunk (torch's vectorised
softmax is faster on CPU than exp(z - lse) from a saved lse). Same values as torch's
cross_entropy with reduction='sum'.

Contract (both paths below, and chunked_cross_entropy.py):
  - labels are global vocabulary ids in [0, V) or ignore_index (default -100, torch's default);
  - a row labelled ignore_index contributes 0 to the sum and gets an all-zero gradient row;
  - the result is the SUM over non-ignored rows (fp32 scalar); the caller divides by its global
    count of non-ignored tokens (all-reduced over dp / cp), never by N;
  - math in fp32 whatever the logits dtype; the gradient comes back in the logits dtype.

Vocabulary-parallel (tp > 1): pass the rank's logits shard (N, V_local) holding global columns
[vocab_offset, vocab_offset + V_local) and all_reduce(tensor, op) -> tensor (op "max" / "sum", the
engine's tp collective; this module never imports torch.distributed). Forward: three all-reduces of
(N,) fp32 (max, rescaled sum of exp, target logit); backward: none (each rank's gradient is
softmax - one_hot on its own columns). Ignored rows are excluded exactly as at tp = 1.
"""

from __future__ import annotations

import torch

ROWS_PER_CHUNK = 64


class CrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)  # (N,)
        for start in range(0, logits.shape[0], ROWS_PER_CHUNK):
            lse[start:start + ROWS_PER_CHUNK] = torch.logsumexp(logits[start:start + ROWS_PER_CHUNK].float(), dim=-1)
        valid = labels != ignore_index
        safe_labels = torch.where(valid, labels, 0)
        target = logits.gather(1, safe_labels[:, None]).squeeze(1).float()  # (N,)
        ctx.save_for_backward(logits, safe_labels, valid)
        return ((lse - target) * valid).sum()

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        logits, labels, valid = ctx.saved_tensors
        grad = torch.empty_like(logits, dtype=torch.float32)
        scale = (grad_loss * valid).float()[:, None]  # (N, 1)
        for start in range(0, logits.shape[0], ROWS_PER_CHUNK):
            rows = slice(start, start + ROWS_PER_CHUNK)
            torch.softmax(logits[rows].float(), dim=-1, out=grad[rows]).mul_(scale[rows])  # exp(z - lse)
        grad.scatter_add_(1, labels[:, None], -scale)
        return grad.to(logits.dtype), None, None


class VocabParallelCrossEntropySum(torch.autograd.Function):
    """Summed CE of a vocabulary shard of the logits (module docstring); all_reduce over tp."""

    @staticmethod
    def forward(ctx, logits, labels, ignore_index, vocab_offset, all_reduce):
        from .chunked_cross_entropy import _local_labels, _stats_torch

        N, V_local = logits.shape
        valid, local = _local_labels(labels, ignore_index, vocab_offset, V_local)
        m, s, t = (torch.empty(N, dtype=torch.float32, device=logits.device) for _ in range(3))
        for start in range(0, N, ROWS_PER_CHUNK):
            rows = slice(start, start + ROWS_PER_CHUNK)
            m[rows], s[rows], t[rows] = _stats_torch(logits[rows], local[rows])
        M = all_reduce(m.clone(), "max")
        s = all_reduce(s * torch.exp(m - M), "sum")
        t = all_reduce(t, "sum")
        lse = M + torch.log(s)
        ctx.save_for_backward(logits, local, valid, lse)
        return torch.where(valid, lse - t, 0.0).sum()

    @staticmethod
    def backward(ctx, grad_loss):
        logits, local, valid, lse = ctx.saved_tensors
        scale = (grad_loss * valid).float()  # (N,)
        grad = torch.empty_like(logits, dtype=torch.float32)
        for start in range(0, logits.shape[0], ROWS_PER_CHUNK):
            rows = slice(start, start + ROWS_PER_CHUNK)
            torch.exp(logits[rows].float() - lse[rows, None], out=grad[rows]).mul_(scale[rows, None])
        hit = torch.nonzero(local >= 0).squeeze(1)
        grad[hit, local[hit].long()] -= scale[hit]
        return grad.to(logits.dtype), None, None, None, None


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, *,
                      vocab_offset: int = 0, all_reduce=None) -> torch.Tensor:
    """Summed cross-entropy of logits (N, V) against labels (N,); rows labelled ignore_index count 0
    (see the contract in the module docstring). With all_reduce, logits are the (N, V_local) shard
    starting at global column vocab_offset and the result is the full-vocabulary sum on every rank."""
    if all_reduce is None:
        if vocab_offset:
            raise ValueError("vocab_offset needs all_reduce (a vocabulary shard alone is not a distribution)")
        return CrossEntropySum.apply(logits, labels, ignore_index)
    return VocabParallelCrossEntropySum.apply(logits, labels, ignore_index, int(vocab_offset), all_reduce)
