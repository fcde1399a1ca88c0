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

Soft targets (`soft_cross_entropy_sum`, SWAG's normalised multi-hot labels): the same log-sum-exp
combine over tp (`global_lse`), the target term a q-weighted sum of the logits instead of one gather.
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


def global_lse(m: torch.Tensor, s: torch.Tensor, all_reduce) -> torch.Tensor:
    """log-sum-exp over the whole vocabulary from each shard's (max m, sum of exp(z - m) s), (N,) fp32:
    two all-reduces over tp (max, then the rescaled sums). Shared by the hard- and soft-target losses."""
    M = all_reduce(m.clone(), "max")
    s = all_reduce(s * torch.exp(m - M), "sum")
    return M + torch.log(s)


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
        lse = global_lse(m, s, all_reduce)
        t = all_reduce(t, "sum")
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


class SoftCrossEntropySum(torch.autograd.Function):
    """Summed cross-entropy against soft targets q (N, V) (SWAG's normalised multi-hot hashtags):
        loss    = sum_n [ (sum_v q_nv) * lse_n - sum_v q_nv z_nv ]
        dz_nv   = g * (exp(z_nv - lse_n) * sum_v q_nv - q_nv)
    A row with q = 0 adds nothing. Vocabulary-parallel with all_reduce: logits and targets are this
    rank's columns; forward all-reduces over tp the row max and sum of exponentials (`global_lse`),
    the target mass and the target-weighted logit, each (N,) fp32; backward has no collective."""

    @staticmethod
    def forward(ctx, logits, targets, all_reduce):
        N = logits.shape[0]
        lse = torch.empty(N, dtype=torch.float32, device=logits.device)
        for start in range(0, N, ROWS_PER_CHUNK):
            lse[start:start + ROWS_PER_CHUNK] = torch.logsumexp(logits[start:start + ROWS_PER_CHUNK].float(), dim=-1)
        q = targets.float()
        mass, t = q.sum(-1), (q * logits.float()).sum(-1)  # (N,)
        if all_reduce is not None:
            lse = global_lse(lse, torch.ones_like(lse), all_reduce)
            mass, t = all_reduce(mass, "sum"), all_reduce(t, "sum")
        ctx.save_for_backward(logits, q, mass, lse)
        return (mass * lse - t).sum()

    @staticmethod
    def backward(ctx, grad_loss):
        logits, q, mass, lse = ctx.saved_tensors
        grad = torch.empty_like(logits, dtype=torch.float32)
        for start in range(0, logits.shape[0], ROWS_PER_CHUNK):
            rows = slice(start, start + ROWS_PER_CHUNK)
            torch.exp(logits[rows].float() - lse[rows, None], out=grad[rows]).mul_(mass[rows, None])
        grad.sub_(q).mul_(grad_loss.float())
        return grad.to(logits.dtype), None, None


def soft_cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor, *, all_reduce=None) -> torch.Tensor:
    """Summed soft-target cross-entropy of logits (N, V) against targets (N, V) >= 0 (rows summing to 1
    for a normalised multi-hot target; a zero row adds nothing). With all_reduce, both are the rank's
    (N, V_local) columns and the result is the full-vocabulary sum on every rank."""
    if targets.shape != logits.shape:
        raise ValueError(f"soft targets {tuple(targets.shape)} do not match the logits {tuple(logits.shape)}")
    return SoftCrossEntropySum.apply(logits, targets, all_reduce)


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
