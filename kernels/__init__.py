"""gigatron.kernels: Triton kernels, each with a pure-PyTorch reference and an autograd wrapper.

- attention.py (+ attention_reference / attention_triton / attention_triton_kernels): flash attention
  with log-sum-exp output, GQA, causal / document masks, diagonal fast path, deterministic mode;
- cross_entropy.py: summed CE from logits (tp = 1, or a vocabulary shard with an all_reduce callback);
- chunked_cross_entropy.py: CE from hidden states and the output weight, chunked (no (N, V) logits),
  vocabulary-parallel through an all_reduce callback;
- rmsnorm.py, swiglu.py, rope.py: fused elementwise / row ops (kernels in fused_triton_kernels.py), called
  by core/models/llama.py: Triton on CUDA, on CPU (and for DTensor / compile inputs) the PyTorch formula
  the model always had, bitwise;
- fp8.py: FP8 scaling recipes, quantize-dequantize emulation, Fp8Linear, convert_linears (the engine's
  use of them: parallel/fp8.py);
- _select.py: impl="auto" | "triton" | "torch" selection, logged once (logger "gigatron.kernels").
No module here imports torch.distributed: collectives come in as callbacks from the engine.

Note: the function `attention` re-exported here shadows the submodule `gigatron.kernels.attention` as a
package attribute. `from gigatron.kernels.attention import resolve_backend` works as usual; to get the
module object itself use `importlib.import_module("gigatron.kernels.attention")`.
"""

from .attention import attention, attention_backward, attention_forward, merge_partials

__all__ = ["attention", "attention_forward", "attention_backward", "merge_partials"]
