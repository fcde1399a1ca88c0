"""Published training runs the planner is checked against (shared/notes/references.md).

Megatron-Core weak scaling (r0.8.0, H100, seq 4,096, vocab 131,072, DP 48): calibration rows.
Llama 3 405B, Table 4, the two 8K-sequence rows: held out of the calibration.

Layout facts the tables do not state, and what we assume (the same for every row):
- Megatron-Core: sequence parallelism on with TP, the distributed optimizer (gradients
  reduce-scattered once per step, overlapped with the last backward, parameters all-gathered
  behind the first forward), no activation recompute, the embedding on the first and the output on
  the last stage with no layers taken off (`pp_first_last_fewer_layers` 0). Without a pipeline a
  DP rank runs its 4 sequences as one micro-batch; with one, micro-batches of 1 sequence through
  the interleaved schedule with one layer per virtual stage (v = layers / pp), the rule Llama 3's
  405B layout follows too (126 layers + embedding + output = 16 x 8 chunks).
- Llama 3: TP 8, CP 1, PP 16 with 8 virtual stages (126 layers + embedding + output = 128 chunks,
  recipes/llama3_405b.yaml), micro-batch 1 sequence of 8,192 (batch per DP = micro-batches),
  FSDP without resharding after forward, reduce-scatter once per step, no recompute.
"""

from __future__ import annotations

from dataclasses import dataclass

from gigatron.cluster.planner.layout import Layout
from gigatron.cluster.planner.model_shape import ModelShape, megatron_gpt

# Layers per virtual pipeline stage on the Megatron-Core PP rows: an assumption (the table does not
# say), the same for every row.
MEGATRON_LAYERS_PER_VIRTUAL_STAGE = 1


@dataclass(frozen=True)
class PublishedRun:
    name: str
    shape: ModelShape
    layout: Layout
    gpu: str
    tflops_per_gpu: float  # published model TFLOP/s per GPU
    source: str


def _megatron(name, heads, hidden, layers, tp, pp, gpus, batch, tflops) -> PublishedRun:
    dp = gpus // (tp * pp)
    assert dp == 48, name
    v = layers // (pp * MEGATRON_LAYERS_PER_VIRTUAL_STAGE) if pp > 1 else 1
    micro_batch = 1 if pp > 1 else batch // dp
    layout = Layout(tp=tp, pp=pp, dp=dp, sequence_parallel=tp > 1, pp_virtual_stages=v,
                    pp_schedule="interleaved_1f1b" if v > 1 else "1f1b", pp_first_last_fewer_layers=0,
                    micro_batch=micro_batch, micro_batches=batch // (dp * micro_batch), grad_sync="step")
    return PublishedRun(f"Megatron-Core GPT {name}", megatron_gpt(layers, hidden, heads), layout, "h100-sxm",
                        tflops, "Megatron-Core r0.8.0 weak scaling")


MEGATRON_WEAK_SCALING = [
    _megatron("1.7B", 16, 2048, 24, 1, 1, 48, 192, 408.8),
    _megatron("7.1B", 32, 4096, 30, 2, 1, 96, 192, 465.9),
    _megatron("16B", 48, 6144, 32, 4, 1, 192, 192, 489.1),
    _megatron("32B", 56, 7168, 48, 8, 1, 384, 192, 459.6),
    _megatron("70B", 64, 8192, 84, 8, 2, 768, 384, 419.7),
    _megatron("119B", 80, 10240, 92, 8, 4, 1536, 768, 420.5),
    _megatron("177B", 96, 12288, 96, 8, 6, 2304, 1152, 432.8),
    _megatron("314B", 128, 16384, 96, 8, 8, 3072, 1536, 474.4),
    _megatron("462B", 144, 18432, 112, 8, 16, 6144, 3072, 459.9),
]


def llama3_405b_shape(seq_len: int = 8192) -> ModelShape:
    """Llama 3 405B (Table 3): 126 layers, dim 16,384, FFN 53,248, 128 heads, 8 KV heads, vocab 128,256."""
    return ModelShape(name="Llama 3 405B", n_layers=126, dim=16384, ffn_dim=53248, n_heads=128, n_kv_heads=8,
                      seq_len=seq_len, vocab_size=128256, output_dim=128256, ffn_matrices=3, causal=True)


def llama3_layout(dp: int, batch_per_dp: int) -> Layout:
    return Layout(tp=8, cp=1, pp=16, dp=dp, sequence_parallel=True, pp_virtual_stages=8,
                  pp_schedule="interleaved_1f1b", pp_first_last_fewer_layers=1, micro_batch=1,
                  micro_batches=batch_per_dp, grad_sync="step", reshard_after_forward=False)


LLAMA3_405B = [
    PublishedRun("Llama 3 405B, 8,192 GPUs", llama3_405b_shape(), llama3_layout(64, 32), "h100-sxm", 430.0,
                 "Llama 3 Table 4"),
    PublishedRun("Llama 3 405B, 16,384 GPUs", llama3_405b_shape(), llama3_layout(128, 16), "h100-sxm", 400.0,
                 "Llama 3 Table 4"),
]
