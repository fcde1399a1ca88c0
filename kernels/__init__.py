"""gigatron.kernels: attention with log-sum-exp output (Triton flash kernels + a PyTorch reference)."""

from .attention import attention, attention_backward, attention_forward, merge_partials

__all__ = ["attention", "attention_forward", "attention_backward", "merge_partials"]
