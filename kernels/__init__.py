"""gigatron.kernels: attention with log-sum-exp output (Triton flash kernels + a PyTorch reference).

Note: the function `attention` re-exported here shadows the submodule `gigatron.kernels.attention` as a
package attribute. `from gigatron.kernels.attention import resolve_backend` works as usual; to get the
module object itself use `importlib.import_module("gigatron.kernels.attention")`.
"""

from .attention import attention, attention_backward, attention_forward, merge_partials

__all__ = ["attention", "attention_forward", "attention_backward", "merge_partials"]
