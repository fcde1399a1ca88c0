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


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Summed cross-entropy of logits (N, V) against labels (N,); rows labelled ignore_index count 0."""
    return CrossEntropySum.apply(logits, labels, ignore_index)
