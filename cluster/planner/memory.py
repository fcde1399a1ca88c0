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

Mixed recompute (layout.full_recompute_every = K > 0): a rank's blocks at positions 0, K, 2K, ...
count as "full", the rest as activation_checkpoint (layout.block_modes, parallel/checkpointing.py).

Pipeline (torch.distributed.pipelining, torch 2.13; parallel/pipeline.py). The peak is found by
walking rank r's own order of forwards and backwards (`schedule_order`, the order torch computes:
1F1B: min(m, pp - r) warm-up forwards, then backward/forward pairs; interleaved 1F1B (and, as an
approximation, zero bubble): `_get_warmup_ops` = min(v m, (v - 1) k + 2 (pp - 1 - r)) warm-up
forwards, k = m / max(1, m // pp) per round, then forward/backward pairs, forward j on local chunk
(j // k) % v and backward j on v - 1 - (j // k) % v; GPipe: all forwards, then all backwards).
During each backward the rank holds
    the activations of every chunk micro-batch forwarded and not yet backwarded; each is its
        blocks' saved tensors, plus the chunk's output, which the stage keeps in its forward cache
        until that micro-batch's backward (`fwd_cache`: the last block's output is saved by no op of
        its own chunk), minus the chunk's input where its first block saves it (selective, full): that
        is the receive buffer below;
    the recompute transient of the chunk being backwarded (one block's "none" activations);
    the FP32 unsharded gradient accumulation of each chunk that has run at least one backward and
        not yet all m (FSDP2 with requires_gradient_sync off keeps it per chunk from the chunk's first
        backward; the schedule's REDUCE_GRAD after its m-th backward reduce-scatters and frees it).
        Without a pipeline the same holds for one chunk with grad_sync "step" and m > 1.
Besides, the stage allocates its receive buffers once, for all m micro-batches: each chunk that is
not the model's first gets m activation buffers, each chunk that is not the last m gradient buffers,
bf16 (micro_batch, tokens / cp / s, d) each (`_setup_forward_recv_info`, `_setup_backward_recv_info`).
"activations" is one micro-batch through each of the rank's chunks (plus logits and the transient),
"pipeline" the rest of what is in flight at the peak and the receive buffers, "gradients" the
sharded FP32 gradient and the accumulation live at the peak.

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
    return _held_elements(shape, layout.tp, layout.pp, layout.pp_virtual_stages, layout.pp_first_last_fewer_layers,
                          layout.fsdp_shards, pp_rank, tp_rank, shard_rank)


@lru_cache(maxsize=65536)
def _held_elements(shape: ModelShape, tp: int, pp: int, v: int, fewer: int, shards: int, pp_rank: int,
                   tp_rank: int, shard_rank: int) -> int:
    blocks, first, last = _rank_blocks(shape.n_layers, pp, v, fewer, pp_rank)
    extra = (shape.input_tensors() if first else []) + (shape.output_tensors() if last else [])
    count = lambda tensors: sum(shard_elements(local_shape(t, tp, tp_rank), shards, shard_rank)  # noqa: E731
                                for t in tensors)
    return blocks * count(shape.layer_tensors(tp)) + count(extra)


@lru_cache(maxsize=4096)
def tp_local_counts(shape: ModelShape, tp: int) -> tuple[int, int, int]:
    """Elements of (one block, the input-layer tensors, the output-layer tensors) on tp rank 0."""
    count = lambda tensors: sum(numel(local_shape(t, tp, 0)) for t in tensors)  # noqa: E731
    return count(shape.layer_tensors(tp)), count(shape.input_tensors()), count(shape.output_tensors())


def tp_local_elements(shape: ModelShape, layout: Layout, pp_rank: int, tp_rank: int = 0) -> int:
    """Parameter elements of this rank's stage after tensor parallelism, before FSDP sharding."""
    blocks, extra = stage_contents(shape, layout, pp_rank)
    if tp_rank == 0:
        block, first, last = tp_local_counts(shape, layout.tp)
        _, has_first, has_last = _rank_blocks(shape.n_layers, layout.pp, layout.pp_virtual_stages,
                                              layout.pp_first_last_fewer_layers, pp_rank)
        return blocks * block + (first if has_first else 0) + (last if has_last else 0)
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
    """Chunk micro-batches whose activations rank `pp_rank` holds at most (`schedule_order`)."""
    p, v, m = layout.pp, layout.pp_virtual_stages, layout.micro_batches
    if p == 1:
        return 1
    if layout.pp_schedule == "gpipe":
        return m * v
    if v == 1 and layout.pp_schedule == "1f1b":
        return min(m, p - pp_rank)
    per_round = m // max(1, m // p)  # torch runs the micro-batches in max(1, m // p) equal rounds
    return min(v * m, (v - 1) * per_round + 2 * (p - 1 - pp_rank) + 1)


@lru_cache(maxsize=4096)
def schedule_order(schedule: str, pp: int, virtual_stages: int, micro_batches: int, pp_rank: int
                   ) -> tuple[tuple[bool, int], ...]:
    """Rank `pp_rank`'s forwards and backwards in the order torch's schedule runs them, as
    (is_backward, local chunk) pairs (module docstring)."""
    p, v, m = pp, virtual_stages, micro_batches
    if p == 1:
        return ((False, 0), (True, 0)) * m
    if schedule == "gpipe":
        return ((False, 0),) * m + ((True, 0),) * m
    if v == 1 and schedule == "1f1b":
        warmup = min(m, p - pp_rank)
        return ((False, 0),) * warmup + ((True, 0), (False, 0)) * (m - warmup) + ((True, 0),) * warmup
    k = m // max(1, m // p)
    warmup = min(v * m, (v - 1) * k + 2 * (p - 1 - pp_rank))
    forward = lambda j: (False, (j // k) % v)  # noqa: E731
    backward = lambda j: (True, v - 1 - (j // k) % v)  # noqa: E731
    order = [forward(j) for j in range(warmup)]
    for j in range(warmup, v * m):
        order += [forward(j), backward(j - warmup)]
    order += [backward(j) for j in range(v * m - warmup, v * m)]
    return tuple(order)


@lru_cache(maxsize=4096)
def backward_states(schedule: str, pp: int, virtual_stages: int, micro_batches: int, pp_rank: int):
    """At each backward of `schedule_order`: (chunk micro-batches in flight per local chunk, the one
    being backwarded included; backwards each chunk has finished; the chunk), as numpy arrays."""
    import numpy as np

    order = schedule_order(schedule, pp, virtual_stages, micro_batches, pp_rank)
    forwards, backwards = [0] * virtual_stages, [0] * virtual_stages
    in_flight, done, chunks = [], [], []
    for is_backward, chunk in order:
        if not is_backward:
            forwards[chunk] += 1
            continue
        in_flight.append([f - b for f, b in zip(forwards, backwards)])
        done.append(list(backwards))
        chunks.append(chunk)
        backwards[chunk] += 1
    return np.array(in_flight, dtype=float), np.array(done), np.array(chunks)


@lru_cache(maxsize=4096)
def _rank_chunk_layout(n_layers: int, pp: int, virtual_stages: int, fewer: int, pp_rank: int
                       ) -> tuple[tuple[int, bool, bool], ...]:
    """(blocks, is the model's first chunk, is its last chunk) of each of rank `pp_rank`'s chunks."""
    chunks = assign_layers(n_layers, pp, virtual_stages, fewer)
    return tuple((len(chunks[c]), c == 0, c == len(chunks) - 1) for c in rank_chunks(pp_rank, pp, virtual_stages))


def blocks_activation_bytes_per_token(shape: ModelShape, layout: Layout, modes: list[str],
                                      constants: CostModel = COST_MODEL) -> float:
    """Saved activation bytes per local token of consecutive blocks with these recompute `modes`."""
    per_mode = {mode: activation_bytes_per_token(shape, layout, mode, constants) for mode in set(modes)}
    return sum(per_mode[mode] for mode in modes)


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
    optimizer = 8.0 * held
    a = c.activation_bytes
    s = layout.tp if layout.sequence_parallel and layout.tp > 1 else 1
    m, pipelined = layout.micro_batches, layout.pp > 1

    tokens = layout.micro_batch * shape.seq_len / layout.cp  # local tokens of one micro-batch
    boundary = a * tokens * shape.dim / s  # one stage input / output (bf16, sequence-parallel shard)
    block_local, input_local, output_local = tp_local_counts(shape, layout.tp)
    modes = layout.block_modes(layers)
    none_block = activation_bytes_per_token(shape, layout, "none", c) * tokens
    chunk_bytes, chunk_accumulation, chunk_transient, receive_buffers, position = [], [], [], 0.0, 0
    deferred = pipelined or (layout.grad_sync == "step" and m > 1)  # unsharded FP32 gradients accumulate
    for blocks, first, last in _rank_chunk_layout(shape.n_layers, layout.pp, layout.pp_virtual_stages,
                                                  layout.pp_first_last_fewer_layers, pp_rank):
        mine = modes[position:position + blocks]
        position += blocks
        saved = blocks_activation_bytes_per_token(shape, layout, mine, c) * tokens
        if pipelined:
            saved += 0.0 if last else boundary  # the chunk's output in the forward cache
            if not first and mine and mine[0] != "none":
                saved -= boundary  # the first block saves its input: the receive buffer, counted below
            receive_buffers += m * boundary * ((not first) + (not last))
        chunk_bytes.append(saved)
        elements = blocks * block_local + (input_local if first else 0) + (output_local if last else 0)
        chunk_accumulation.append(4.0 * elements if deferred else 0.0)
        chunk_transient.append(none_block if any(mode != "none" for mode in mine) else 0.0)

    import numpy as np

    in_flight, done, chunk = backward_states(layout.pp_schedule, layout.pp, layout.pp_virtual_stages, m, pp_rank)
    held_activations = in_flight @ np.array(chunk_bytes)
    accumulating = ((done > 0) & (done < m)) @ np.array(chunk_accumulation)
    transient_at = np.array(chunk_transient)[chunk]
    peak = int(np.argmax(held_activations + accumulating + transient_at))
    accumulation, transient, in_flight_bytes = float(accumulating[peak]), float(transient_at[peak]), float(held_activations[peak])

    owns_output = pp_rank == (layout.pp * layout.pp_virtual_stages - 1) % layout.pp
    logits = 0.0
    if owns_output and shape.output_dim:
        out_tokens = tokens if not shape.output_tokens_per_sample else layout.micro_batch * shape.output_tokens_per_sample
        logits = (c.activation_bytes + c.upcast_bytes) * shape.output_dim / layout.tp * out_tokens
    one_micro = min(sum(chunk_bytes), in_flight_bytes)  # one micro-batch through each of the rank's chunks
    activations = one_micro + logits + transient
    pipeline = in_flight_bytes - one_micro + receive_buffers

    gathered = 2.0 * (local if not layout.reshard_after_forward else 2 * block_local)
    # two blocks' bf16 gradients in flight; a reduce-scatter per micro-batch also stages their fp32
    # copy (reduce_dtype), while a deferred sync adds them into the fp32 accumulation instead
    staging = 2 * (2.0 + (4.0 if layout.grad_sync == "micro_batch" or m == 1 else 0.0)) * block_local
    subtotal = params + grads_sharded + accumulation + optimizer + activations + pipeline + gathered + staging
    fragmentation = c.allocator_overhead * subtotal
    buffers = gathered + staging + c.context_bytes + fragmentation
    detail = {"parameters_sharded": params, "gradients_sharded": grads_sharded, "gradient_accumulation": accumulation,
              "gradient_accumulation_all_chunks": float(sum(chunk_accumulation)),
              "optimizer_sharded": optimizer, "activation_per_micro_batch": float(sum(chunk_bytes)), "layers": layers,
              "full_recompute_blocks": modes.count("full") if layout.activation_checkpoint != "full" else layers,
              "logits": logits, "recompute_transient": transient,
              "in_flight_chunk_micro_batches": int(in_flight[peak].sum()), "receive_buffers": receive_buffers,
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
