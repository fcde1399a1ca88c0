"""Projected step time, TFLOP/s per GPU and MFU of a layout, from a cost model.

Per micro-batch, on the slowest pipeline rank (t_tokens = micro_batch * seq_len / cp local tokens):

    compute   = GEMM FLOPs / (peak * gemm_efficiency) + GEMM operand bytes / HBM'
              + executed attention FLOPs / (peak * attention_efficiency)
              + elementwise bytes / HBM'                 (HBM' = HBM bandwidth * hbm_efficiency)
        GEMMs             per block and rank (M, K, N): fused QKV (t, d, (H + 2 Hkv) D / tp),
                          output (t, H D / tp, d), FFN in (t, d, (m - 1) f / tp), FFN out
                          (t, f / tp, d); forward + 2 backward GEMMs of the same size: 6 M K N
                          FLOPs and 3 x 2 (M K + K N + M N) bytes (an additive roofline: what makes
                          narrow GEMMs slower); x 4/3 under full recompute, per block: with mixed
                          recompute (every K-th block of the rank full) each factor below is the
                          mean over the rank's blocks of each block's own; the output projection
                          (t, d, V / tp) on the last stage
        GEMM waves        each of a linear's three GEMMs (outputs (t, N), (t, K), (N, K)) runs in
                          ceil(rows / 128) ceil(cols / 256) tiles over the GPU's SMs; its
                          arithmetic takes (w + 1/2) / w of the full-wave time for w waves (the
                          expected half-empty last wave): small per-rank GEMMs run slower
        attention FLOPs   12 H D seq_len x t_tokens / tp per block, half executed when causal
                          (4/3 x under full recompute); under context parallelism the kernel
                          keeps a measured fraction of its single-GPU rate
        elementwise bytes 2 bytes x t_tokens x (30 d / s + 3 ffn_matrices f / tp) per block
                          (s = tp with sequence parallelism, else 1), plus the loss over V / tp logits
    layer collectives = (1 - layer_collective_overlap) x [TP: 8 all-gathers/reduce-scatters of the
                          (t_tokens, d) activation per block (+2 under selective, +4 under full
                          recompute), each moving (tp - 1)/tp of it; CP: all-gather of K and V
                          forward, reduce-scatter of their gradients backward, (cp - 1)/cp of the
                          sequence's K/V] over NVLink when the group fits a node, else the network;
                          the CP all-gather (causal) is not overlapped: attention waits for it
                          (`cp_allgather_overlap`), the ring (bidirectional) hides like TP
    p2p       = (1 - p2p_overlap) x 2 v sends of the (t_tokens, d / s) activation

    pipeline  = t_micro x (m + (p - 1) / v)       1F1B, interleaved 1F1B, GPipe: bubble (p-1)/(v m + p-1)
              = t_micro x (m + (p - 1) / (3 v))   zero bubble (ZB-H1 keeps a third of 1F1B's bubble)
    data parallel (per-GPU bandwidth: `data_parallel_bandwidth`): the bf16 all-gather of the stage's
              weights hides behind the first forward (1/3 of t_micro), the fp32 reduce-scatter of
              its gradients behind the last backward (2/3), each over min(m, pp) micro-batches in
              an interleaved schedule; what does not fit is exposed. grad_sync "micro_batch":
              a reduce-scatter (and an all-gather) per micro-batch, each behind its own micro-batch;
              reshard_after_forward: an all-gather for every forward and every backward.
    optimizer = 30 bytes per held parameter / (HBM bandwidth * hbm_efficiency)

    step = pipeline + data parallel exposed + optimizer

TFLOP/s per GPU = flops_per_token x tokens per step / GPUs / step (the model FLOPs of
ModelShape.flops_per_token, the convention of Megatron-Core and Llama 3); MFU = that / peak.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gigatron.cluster.planner.hardware import COST_MODEL, GPU, CostModel
from gigatron.cluster.planner.layout import Layout
from gigatron.cluster.planner.memory import held_elements, local_shape, numel, peak_candidate_ranks, stage_contents
from gigatron.cluster.planner.model_shape import ModelShape
from gigatron.parallel.pipeline_split import theoretical_bubble


# What recompute adds, per block and by the block's policy (counted from parallel/checkpointing.py;
# fixed by the code, not fitted, so they live here rather than among the cost model's constants):
# - GEMMs: forward + 2 backward GEMMs per linear = 6 units of work; full recompute re-runs the
#   forward (+2 of 6); selective saves every matmul output and keeps the row-parallel projections
#   as units, so it re-runs no GEMM.
RECOMPUTE_GEMM_FACTOR = {"full": 8 / 6}
# - attention: forward 1 + backward 2 = 3 units; full re-runs the forward (+1 of 3); selective keeps
#   the attention core as a unit (never re-run).
RECOMPUTE_ATTENTION_FACTOR = {"full": 4 / 3}
# - elementwise (norms, SwiGLU, RoPE, residual adds): forward 1 + backward 2; both policies re-run the
#   forward (selective recomputes exactly these cheap ops).
RECOMPUTE_ELEMENTWISE_FACTOR = {"full": 4 / 3, "selective": 4 / 3}
# - TP collectives of a block's (tokens, d) activation: 2 all-gathers and 2 reduce-scatters forward,
#   and their transposes backward = 8; selective re-runs the two sequence-parallel all-gathers of the
#   norm outputs (+2), full re-runs all four forward collectives (+4): the kept units skip the
#   reduce-scatters under selective.
TP_COLLECTIVES_PER_BLOCK = 8
RECOMPUTE_TP_COLLECTIVES = {"selective": 2, "full": 4}
# - CP: the K/V all-gather forward and the reduce-scatter of their gradients backward = 2; full
#   recompute re-runs the all-gather (+1); selective keeps the attention core, the all-gather inside it.
CP_COLLECTIVES_PER_BLOCK = 2
RECOMPUTE_CP_COLLECTIVES = {"full": 1}


@dataclass
class Projection:
    step_time_s: float
    tflops_per_gpu: float
    mfu: float
    tokens_per_s_per_gpu: float
    bubble: float
    breakdown: dict  # seconds per step by component, for the slowest pipeline rank


def _link(group_span: int, gpu: GPU, c: CostModel) -> float:
    """Bandwidth of a collective over ranks spanning `group_span` consecutive GPUs."""
    if group_span <= gpu.gpus_per_node:
        return gpu.nvlink_bandwidth * c.nvlink_efficiency
    return gpu.network_bandwidth * c.network_efficiency


def data_parallel_bandwidth(layout: Layout, gpu: GPU, c: CostModel = COST_MODEL) -> float:
    """Per-GPU bandwidth of an FSDP collective. Data parallel is the outermost mesh dimension, so
    g = gpus_per_node / (tp cp pp) shard peers share a node when that is above 1; NCCL's rings
    then cross the network once per node per ring, and each NIC carries 1/g of a GPU's traffic:
    min(NVLink, g x network). A job inside one node runs on NVLink alone."""
    if layout.world_size <= gpu.gpus_per_node:
        return gpu.nvlink_bandwidth * c.nvlink_efficiency
    peers_per_node = max(1, gpu.gpus_per_node // (layout.tp * layout.cp * layout.pp))
    return min(gpu.nvlink_bandwidth * c.nvlink_efficiency, peers_per_node * gpu.network_bandwidth * c.network_efficiency)


def wave_factor(rows: float, cols: float, gpu: GPU, c: CostModel = COST_MODEL) -> float:
    """Time of a GEMM with a (rows, cols) output over its time in full waves: its tiles run
    `gpu.sms` at a time and the last wave is on average `gemm_wave_tail` empty (hardware.py)."""
    tiles = math.ceil(rows / c.gemm_tile_rows) * math.ceil(cols / c.gemm_tile_cols)
    waves = tiles / gpu.sms
    return (waves + c.gemm_wave_tail) / waves


def linear_wave_flops(m: float, k: float, n: float, gpu: GPU, c: CostModel = COST_MODEL) -> float:
    """Training FLOPs of a linear layer on m tokens (k in, n out), each of its three GEMMs (2 m k n
    FLOPs) scaled by the wave tail of its output: forward (m, n), input gradient (m, k), weight
    gradient (n, k)."""
    return 2 * m * k * n * sum(wave_factor(r, q, gpu, c) for r, q in ((m, n), (m, k), (n, k)))


def micro_batch_costs(shape: ModelShape, layout: Layout, gpu: GPU, pp_rank: int,
                      c: CostModel = COST_MODEL) -> dict:
    """Seconds of one micro-batch on pipeline rank `pp_rank` (all its virtual stages), by component."""
    tp, cp = layout.tp, layout.cp
    blocks, extra = stage_contents(shape, layout, pp_rank)
    tokens = layout.micro_batch * shape.seq_len / cp
    sp = tp if layout.sequence_parallel and tp > 1 else 1
    # recompute: each block's factor by its own policy (layout.block_modes: mixed recompute makes every
    # K-th block of the rank full), averaged over the rank's blocks
    modes = layout.block_modes(blocks)
    mean = lambda table: sum(table.get(mode, 1.0) for mode in modes) / blocks if blocks else 1.0  # noqa: E731
    gemm_factor = mean(RECOMPUTE_GEMM_FACTOR)
    attention_factor = mean(RECOMPUTE_ATTENTION_FACTOR)
    elementwise_factor = mean(RECOMPUTE_ELEMENTWISE_FACTOR)

    # GEMMs of one block, (M, K, N) per rank: fused QKV, output projection, fused FFN input(s), FFN output
    q_local = shape.query_dim / tp
    kv_local = shape.kv_dim / tp if shape.n_kv_heads >= tp else shape.kv_dim
    f_local = shape.ffn_dim / tp
    d = shape.dim
    block_gemms = [(tokens, d, q_local + 2 * kv_local), (tokens, q_local, d),
                   (tokens, d, (shape.ffn_matrices - 1) * f_local), (tokens, f_local, d)]
    gemm_flops = gemm_bytes = gemm_arithmetic = 0.0  # arithmetic: FLOPs scaled by their wave tails
    for m_, k_, n_ in block_gemms:
        gemm_flops += blocks * 3 * 2 * m_ * k_ * n_
        gemm_bytes += blocks * 3 * c.activation_bytes * (m_ * k_ + k_ * n_ + m_ * n_)
        gemm_arithmetic += blocks * linear_wave_flops(m_, k_, n_, gpu, c)
    extra_flops = blocks * shape.extra_layer_flops_per_token * tokens / tp  # no shapes known: no tail
    gemm_flops += extra_flops
    gemm_arithmetic += extra_flops
    gemm_flops *= gemm_factor
    gemm_bytes *= gemm_factor
    gemm_arithmetic *= gemm_factor
    executed = 0.5 if shape.causal else 1.0
    attention = blocks * 12 * shape.query_dim * shape.seq_len * tokens / tp * executed * attention_factor
    attention_rate = gpu.peak_flops * c.attention_efficiency
    if cp > 1:  # gigatron's cp_mode "auto": all-gather K/V when causal, a ring when bidirectional
        attention_rate *= c.cp_attention_fraction_allgather if shape.causal else c.cp_attention_fraction_ring
    a = c.activation_bytes
    per_block_bytes = a * tokens * (c.elementwise_passes_width * shape.dim / sp
                                    + c.elementwise_passes_ffn_per_matrix * shape.ffn_matrices * shape.ffn_dim / tp)
    elementwise = blocks * per_block_bytes * elementwise_factor
    names = {t.name for t in extra}
    out_tokens = tokens if not shape.output_tokens_per_sample else layout.micro_batch * shape.output_tokens_per_sample
    if "output.weight" in names or ("norm.weight" in names and shape.tied_embeddings):
        v_local = shape.output_dim / tp
        gemm_flops += 6 * d * shape.output_dim * out_tokens / tp
        gemm_arithmetic += linear_wave_flops(out_tokens, d, v_local, gpu, c)
        gemm_bytes += 3 * a * (out_tokens * d + d * v_local + out_tokens * v_local)
        elementwise += c.loss_bytes_per_logit * v_local * out_tokens
    if shape.input_features and any(t.group == "input" for t in extra):
        gemm_flops += 6 * shape.input_features * d * tokens / tp
        gemm_arithmetic += linear_wave_flops(tokens, shape.input_features, d / tp, gpu, c)
    hbm = gpu.hbm_bandwidth * c.hbm_efficiency
    # GEMM time: compute at the sustained rate, each GEMM's last partial wave included, plus its
    # operand traffic (an additive roofline: the operand loads of a tiled GEMM are not fully
    # hidden, which is what makes narrow GEMMs slower)
    compute = (gemm_arithmetic / (gpu.peak_flops * c.gemm_efficiency) + gemm_bytes / hbm
               + attention / attention_rate + elementwise / hbm)
    gemm = gemm_flops

    # per-layer collectives
    tp_time = cp_time = 0.0
    if tp > 1:
        count = sum(TP_COLLECTIVES_PER_BLOCK + RECOMPUTE_TP_COLLECTIVES.get(mode, 0) for mode in modes)
        message = a * tokens * shape.dim
        tp_time = count * (tp - 1) / tp * message / _link(tp, gpu, c)
    cp_overlap = c.layer_collective_overlap
    if cp > 1:
        kv_local = shape.kv_dim / tp if shape.n_kv_heads >= tp else shape.kv_dim
        count = sum(CP_COLLECTIVES_PER_BLOCK + RECOMPUTE_CP_COLLECTIVES.get(mode, 0) for mode in modes)
        message = a * layout.micro_batch * shape.seq_len * 2 * kv_local
        cp_time = count * (cp - 1) / cp * message / _link(tp * cp, gpu, c)
        if shape.causal:  # gigatron's cp_mode "auto": the all-gather when causal, on the critical path
            cp_overlap = c.cp_allgather_overlap
    layer_comm = (1 - c.layer_collective_overlap) * tp_time + (1 - cp_overlap) * cp_time

    p2p = 0.0
    if layout.pp > 1:
        message = a * tokens * shape.dim / sp
        p2p = (1 - c.p2p_overlap) * 2 * layout.pp_virtual_stages * message / _link(tp * cp * 2, gpu, c)
    return {"compute": compute, "layer_collectives": layer_comm, "p2p": p2p,
            "forward": compute / 3, "backward": 2 * compute / 3,
            "gemm_flops": gemm, "gemm_bytes": gemm_bytes, "attention_flops": attention, "elementwise_bytes": elementwise,
            "tp_collectives_raw": tp_time, "cp_collectives_raw": cp_time}


def data_parallel_exposed(shape: ModelShape, layout: Layout, gpu: GPU, pp_rank: int, micro: dict,
                          c: CostModel = COST_MODEL) -> tuple[float, float]:
    """(exposed seconds per step, raw seconds per step) of the FSDP collectives of this rank."""
    shards = layout.fsdp_shards
    if shards == 1 and layout.dp_replicate == 1:
        return 0.0, 0.0
    blocks, extra = stage_contents(shape, layout, pp_rank)
    local = blocks * sum(numel(local_shape(t, layout.tp, 0)) for t in shape.layer_tensors(layout.tp))
    local += sum(numel(local_shape(t, layout.tp, 0)) for t in extra)
    bandwidth = data_parallel_bandwidth(layout, gpu, c)
    all_gather = 2.0 * local * (shards - 1) / shards / bandwidth
    reduce_scatter = 4.0 * local * (shards - 1) / shards / bandwidth
    if layout.dp_replicate > 1:  # HSDP: the reduced shard is all-reduced across replicas
        r = layout.dp_replicate
        reduce_scatter += 2 * 4.0 * local / shards * (r - 1) / r / (gpu.network_bandwidth * c.network_efficiency)
    m = layout.micro_batches
    forward, backward = micro["forward"], micro["backward"]  # one micro-batch on this rank
    # The window behind which a once-per-step collective hides: one micro-batch; in an interleaved
    # schedule virtual stage j first runs after the warm-up forwards of the stages before it and
    # last runs in the cool-down, so a rank's collectives hide behind min(m, pp) micro-batches.
    window = min(m, layout.pp) if layout.pp_virtual_stages > 1 else 1
    if layout.grad_sync == "micro_batch":  # a reduce-scatter after every backward
        exposed_rs, raw_rs = m * max(0.0, reduce_scatter - backward), m * reduce_scatter
    else:
        exposed_rs, raw_rs = max(0.0, reduce_scatter - window * backward), reduce_scatter
    if layout.reshard_after_forward:  # gathered again for every forward and every backward
        exposed_ag = m * (max(0.0, all_gather - forward) + max(0.0, all_gather - backward))
        raw_ag = 2 * m * all_gather
    elif layout.grad_sync == "micro_batch":  # FSDP reshards after each backward: one gather per micro-batch
        exposed_ag, raw_ag = m * max(0.0, all_gather - forward), m * all_gather
    else:  # pipeline stages stay unsharded until the last backward: one gather per step
        exposed_ag, raw_ag = max(0.0, all_gather - window * forward), all_gather
    exposed, raw = exposed_rs + exposed_ag, raw_rs + raw_ag
    return exposed, raw


def project(shape: ModelShape, layout: Layout, gpu: GPU, c: CostModel = COST_MODEL) -> Projection:
    """Step time and rates of `layout` for `shape` on `gpu` (see module docstring)."""
    p, v, m = layout.pp, layout.pp_virtual_stages, layout.micro_batches
    # the slowest stage is the first or the last (input / output layers) or one with the most blocks
    costs = {r: micro_batch_costs(shape, layout, gpu, r, c) for r in peak_candidate_ranks(shape, layout)}
    per_micro = {r: x["compute"] + x["layer_collectives"] + x["p2p"] for r, x in costs.items()}
    slowest = max(per_micro, key=lambda r: per_micro[r])
    t_micro = per_micro[slowest]
    warmup = (p - 1) / v if p > 1 else 0.0
    if layout.pp_schedule == "zero_bubble":
        warmup /= 3
    pipeline = t_micro * (m + warmup)
    dp_exposed, dp_raw = data_parallel_exposed(shape, layout, gpu, slowest, costs[slowest], c)
    held = max(held_elements(shape, layout, r) for r in costs)
    optimizer = c.optimizer_bytes_per_parameter * held / (gpu.hbm_bandwidth * c.hbm_efficiency)
    step = pipeline + dp_exposed + optimizer
    tokens_per_step = layout.global_batch * shape.seq_len
    tflops = shape.flops_per_token() * tokens_per_step / layout.world_size / step / 1e12
    x = costs[slowest]
    breakdown = {"compute": m * x["compute"], "layer_collectives_exposed": m * x["layer_collectives"],
                 "p2p_exposed": m * x["p2p"], "bubble": t_micro * warmup,
                 "data_parallel_exposed": dp_exposed, "data_parallel_raw": dp_raw, "optimizer": optimizer,
                 "tp_collectives_raw": m * x["tp_collectives_raw"], "cp_collectives_raw": m * x["cp_collectives_raw"],
                 "slowest_pp_rank": slowest}
    return Projection(step_time_s=step, tflops_per_gpu=tflops, mfu=tflops * 1e12 / gpu.peak_flops,
                      tokens_per_s_per_gpu=tokens_per_step / layout.world_size / step,
                      bubble=theoretical_bubble(p, v, m) if p > 1 else 0.0, breakdown=breakdown)
