"""Memory per GPU of a training step: what each rank holds at its peak, by component.

Sharded state (gigatron's FSDP2 with MixedPrecisionPolicy(bf16 params, fp32 reduce); parallel/fsdp.py):
    parameters   fp32 master shard: 4 bytes x the rank's shard of each tp-local tensor
    gradients    fp32 shard (4 bytes, same elements); with grad_sync="step" also the unsharded fp32
                 accumulation of the stage's tp-local parameters until the one reduce-scatter
    optimizer    AdamW exp_avg + exp_avg_sq: 8 bytes per shard element
FSDP2 shards each tp-local tensor on dim 0 in torch.chunk pieces over fsdp_shards = dp_shard * cp
ranks: rank r holds max(0, min(c, n - r c)) rows, c = ceil(n / k), so the count per rank is exact.

Activations, per token of one micro-batch and one block, for the saved tensors of core/models/llama.py
(bf16 a = 2 bytes, fp32 upcasts u = 4; local sizes q = H D / tp, kv = Hkv D / tp, f = ffn / tp, and
s = tp under sequence parallelism, else 1; counted from autograd's saved tensors and checked against
torch's MemTracker in tests/cluster/test_planner_activations.py, under the real TP plan too):
    "none":      2 norms x [(2u + a) d / s + a d]   (two fp32 copies and the normed value on T/s
                 tokens; the all-gathered norm output saved by the column-parallel matmuls)
                 + a (2 q + 2 kv cp) + 4 H/tp       (q, k, v for attention, its output, the
                 log-sum-exp; K/V of the whole sequence under all-gather context parallelism)
                 + a f (2 ffn_matrices - 2)          (SwiGLU: w1 x, silu, w3 x, their product)
    "selective": matmul and attention outputs only (parallel/checkpointing.py): the block input,
                 a (q + 2 kv + q + (ffn_matrices - 1) f), and the two row-parallel projections (wo,
                 w2): under tp > 1 kept units, each holding its input and its reduced output,
                 a (q + f) + 2 a d / s; at tp 1 their (T, d) matmul outputs, 2 a d
    "full":      the block input, a d / s; backward recomputes one block at a time, whose "none"
                 activations are added once as a transient.
The output stage also holds the logits, (a + u) V / tp per token (bf16 saved, fp32 inside the loss).

Pipeline: rank r holds its activations for every micro-batch in flight. 1F1B: min(m, pp - r)
micro-batches; interleaved (torch's ScheduleInterleaved1F1B, its `_get_warmup_ops` + 1):
(v - 1) k + 2 (pp - 1 - r) + 1 chunk micro-batches, k = m / max(1, m // pp) per round, at most v m;
GPipe: all m. "activations" is one micro-batch's worth, "pipeline" the rest in flight.

Buffers: the bf16 gathered weights (the whole stage while reshard_after_forward is false, Llama 3's
choice; two blocks otherwise), the gradients of two blocks in flight (bf16, plus the fp32 copy the
reduce-scatter sends when it runs every micro-batch), the CUDA context, and the caching allocator's
fragmentation over everything else (`allocator_overhead`, an assumption: not measured here).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from gigatron.cluster.planner.hardware import COST_MODEL, CostModel
from gigatron.cluster.planner.layout import Layout
from gigatron.cluster.planner.model_shape import ModelShape, ParameterTensor
from gigatron.parallel.pipeline_split import assign_layers, rank_chunks


def chunk_size(n: int, pieces: int, index: int) -> int:
    """Length of piece `index` of torch.chunk(range(n), pieces): ceil(n / pieces) each, last ones short."""
    c = -(-n // pieces)
    return max(0, min(c, n - index * c))


def local_shape(tensor: ParameterTensor, tp: int, tp_rank: int) -> tuple[int, ...]:
    shape = list(tensor.shape)
    if tensor.tp_dim is not None and tp > 1:
        shape[tensor.tp_dim] = chunk_size(shape[tensor.tp_dim], tp, tp_rank)
    return tuple(shape)


def shard_elements(shape: tuple[int, ...], shards: int, shard_rank: int) -> int:
    """Elements of FSDP2's dim-0 shard `shard_rank` of a tensor of `shape`."""
    rest = 1
    for s in shape[1:]:
        rest *= s
    return chunk_size(shape[0], shards, shard_rank) * rest


def numel(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


@lru_cache(maxsize=4096)
def _rank_blocks(n_layers: int, pp: int, virtual_stages: int, fewer: int, pp_rank: int) -> tuple[int, bool, bool]:
    """(blocks, holds chunk 0, holds the last chunk) of pipeline rank `pp_rank`."""
    chunks = assign_layers(n_layers, pp, virtual_stages, fewer)
    mine = rank_chunks(pp_rank, pp, virtual_stages)
    return sum(len(chunks[c]) for c in mine), 0 in mine, len(chunks) - 1 in mine


def stage_contents(shape: ModelShape, layout: Layout, pp_rank: int) -> tuple[int, list[ParameterTensor]]:
    """(blocks, non-block tensors) pipeline rank `pp_rank` holds over all its virtual stages: chunk 0
    adds the input layer, the last chunk the final norm and output layer (parallel/pipeline.py)."""
    blocks, first, last = _rank_blocks(shape.n_layers, layout.pp, layout.pp_virtual_stages,
                                       layout.pp_first_last_fewer_layers, pp_rank)
    extra = (shape.input_tensors() if first else []) + (shape.output_tensors() if last else [])
    return blocks, extra


def peak_candidate_ranks(shape: ModelShape, layout: Layout) -> list[int]:
    """Rank 0, the last rank, and the first rank holding the most blocks."""
    blocks = [stage_contents(shape, layout, r)[0] for r in range(layout.pp)]
    return sorted({0, layout.pp - 1, blocks.index(max(blocks))})


def stage_layers(shape: ModelShape, layout: Layout, pp_rank: int) -> int:
    return stage_contents(shape, layout, pp_rank)[0]


def held_elements(shape: ModelShape, layout: Layout, pp_rank: int = 0, tp_rank: int = 0,
                  shard_rank: int = 0) -> int:
    """Parameter elements this rank holds in its FSDP shards (tp_rank 0, shard_rank 0 hold the most)."""
    blocks, extra = stage_contents(shape, layout, pp_rank)
    count = lambda tensors: sum(shard_elements(local_shape(t, layout.tp, tp_rank), layout.fsdp_shards, shard_rank)
                                for t in tensors)  # noqa: E731
    return blocks * count(shape.layer_tensors(layout.tp)) + count(extra)


def tp_local_elements(shape: ModelShape, layout: Layout, pp_rank: int, tp_rank: int = 0) -> int:
    """Parameter elements of this rank's stage after tensor parallelism, before FSDP sharding."""
    blocks, extra = stage_contents(shape, layout, pp_rank)
    count = lambda tensors: sum(numel(local_shape(t, layout.tp, tp_rank)) for t in tensors)  # noqa: E731
    return blocks * count(shape.layer_tensors(layout.tp)) + count(extra)


def activation_bytes_per_token(shape: ModelShape, layout: Layout, mode: str | None = None,
                               constants: CostModel = COST_MODEL) -> float:
    """Saved activation bytes of one block per local token (see module docstring)."""
    mode = mode or layout.activation_checkpoint
    a, u, tp, cp = constants.activation_bytes, constants.upcast_bytes, layout.tp, layout.cp
    s = tp if layout.sequence_parallel and tp > 1 else 1
    d = shape.dim
    q = shape.query_dim / tp
    kv = shape.kv_dim / tp if shape.n_kv_heads >= tp else shape.kv_dim
    f = shape.ffn_dim / tp
    heads = shape.n_heads / tp
    if mode == "full":
        return a * d / s
    if mode == "selective":
        # wo and w2: under tp > 1 kept units (their inputs, the attention output as (T, q) and the
        # SwiGLU product, and their reduced outputs); at tp 1 their matmul outputs, cached as any other
        row_parallel = a * (q + f) + 2 * a * d / s if tp > 1 else 2 * a * d
        return a * d / s + a * (q + 2 * kv + q + (shape.ffn_matrices - 1) * f) + row_parallel + 4 * heads
    norms = 2 * ((2 * u + a) * d / s + a * d)
    attention = a * (2 * q + 2 * kv * cp) + 4 * heads
    ffn = a * f * (2 * shape.ffn_matrices - 2)
    return norms + attention + ffn


def in_flight_units(layout: Layout, pp_rank: int) -> int:
    """Chunk micro-batches whose activations rank `pp_rank` holds at its peak."""
    p, v, m = layout.pp, layout.pp_virtual_stages, layout.micro_batches
    if p == 1:
        return 1
    if layout.pp_schedule == "gpipe":
        return m * v
    if v == 1 and layout.pp_schedule == "1f1b":
        return min(m, p - pp_rank)
    per_round = m // max(1, m // p)  # torch runs the micro-batches in max(1, m // p) equal rounds
    return min(v * m, (v - 1) * per_round + 2 * (p - 1 - pp_rank) + 1)


@dataclass
class MemoryEstimate:
    """Bytes per GPU of the peak rank, by component; `detail` breaks them down further."""

    parameters: float
    gradients: float
    optimizer: float
    activations: float
    pipeline: float
    buffers: float
    pp_rank: int
    detail: dict = field(default_factory=dict)

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.optimizer + self.activations + self.pipeline + self.buffers

    def as_gb(self) -> dict:
        keys = ("parameters", "gradients", "optimizer", "activations", "pipeline", "buffers")
        out = {k: round(getattr(self, k) / 1e9, 3) for k in keys}
        out["total"] = round(self.total / 1e9, 3)
        return out


def rank_memory(shape: ModelShape, layout: Layout, pp_rank: int, constants: CostModel = COST_MODEL) -> MemoryEstimate:
    """Memory of tp rank 0 / shard rank 0 (the largest pieces) of pipeline rank `pp_rank`."""
    c = constants
    held = held_elements(shape, layout, pp_rank)
    local = tp_local_elements(shape, layout, pp_rank)
    layers = stage_layers(shape, layout, pp_rank)
    params = 4.0 * held
    grads_sharded = 4.0 * held
    accumulation = 4.0 * local if layout.grad_sync == "step" and layout.micro_batches > 1 else 0.0
    optimizer = 8.0 * held

    tokens = layout.micro_batch * shape.seq_len / layout.cp  # local tokens of one micro-batch
    per_layer = activation_bytes_per_token(shape, layout, constants=c) * tokens
    owns_output = pp_rank == (layout.pp * layout.pp_virtual_stages - 1) % layout.pp
    logits = 0.0
    if owns_output and shape.output_dim:
        out_tokens = tokens if not shape.output_tokens_per_sample else layout.micro_batch * shape.output_tokens_per_sample
        logits = (c.activation_bytes + c.upcast_bytes) * shape.output_dim / layout.tp * out_tokens
    one_micro = per_layer * layers
    transient = 0.0
    if layout.activation_checkpoint != "none":  # one block recomputed at a time in backward
        transient = activation_bytes_per_token(shape, layout, mode="none", constants=c) * tokens
    units = in_flight_units(layout, pp_rank)
    v = layout.pp_virtual_stages
    pipeline = max(0.0, units / v - 1) * one_micro if layout.pp > 1 else 0.0
    activations = one_micro + logits + transient

    block_local = sum(numel(local_shape(t, layout.tp, 0)) for t in shape.layer_tensors(layout.tp))
    gathered = 2.0 * (local if not layout.reshard_after_forward else 2 * block_local)
    # two blocks' bf16 gradients in flight; a reduce-scatter per micro-batch also stages their fp32
    # copy (reduce_dtype), while a deferred sync adds them into the fp32 accumulation instead
    staging = 2 * (2.0 + (4.0 if layout.grad_sync == "micro_batch" or layout.micro_batches == 1 else 0.0)) * block_local
    subtotal = params + grads_sharded + accumulation + optimizer + activations + pipeline + gathered + staging
    fragmentation = c.allocator_overhead * subtotal
    buffers = gathered + staging + c.context_bytes + fragmentation
    detail = {"parameters_sharded": params, "gradients_sharded": grads_sharded, "gradient_accumulation": accumulation,
              "optimizer_sharded": optimizer, "activation_per_layer": per_layer, "layers": layers,
              "logits": logits, "recompute_transient": transient, "in_flight_chunk_micro_batches": units,
              "gathered_weights": gathered, "reduce_scatter_staging": staging, "cuda_context": c.context_bytes,
              "fragmentation": fragmentation, "held_parameter_elements": held, "tp_local_elements": local}
    return MemoryEstimate(params, grads_sharded + accumulation, optimizer, activations, pipeline, buffers, pp_rank,
                          detail)


def estimate_memory(shape: ModelShape, layout: Layout, constants: CostModel = COST_MODEL) -> MemoryEstimate:
    """The peak over pipeline ranks: rank 0 holds the most micro-batches in flight (and the input
    layer), the last rank the output layer and logits, and the first rank with the most blocks the
    most weights; in-flight counts fall with the rank, so no other rank can exceed these three."""
    ranks = peak_candidate_ranks(shape, layout)
    return max((rank_memory(shape, layout, r, constants) for r in ranks), key=lambda e: e.total)
