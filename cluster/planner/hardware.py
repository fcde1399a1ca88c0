"""GPU specifications and every constant of the planner's cost model, in one place.

Two kinds of numbers live here:

- `GPUS`: data-sheet figures of each GPU kind (dense BF16 peak, HBM capacity and bandwidth,
  NVLink bandwidth per direction, inter-node bandwidth per GPU, GPUs per NVLink domain, SMs).
- `COST_MODEL`: the few constants the projection needs beyond the data sheets. Each one is
  physically meaningful, documented with where its value comes from, and the same for every row
  that the planner projects (no per-model, per-layout or per-GPU fudge).

Only two cost-model constants were fitted: `gemm_efficiency` and `layer_collective_overlap`, on
the nine Megatron-Core weak-scaling rows (`published.py`, fit: `benchmarks/bench_planner.py
--fit`, checked by tests/cluster/test_planner_throughput.py), by minimising the mean absolute
relative error of TFLOP/s per GPU. The others are fixed from microbenchmarks that vendors and the
literature report, or counted from the code (cited per constant). Llama 3's two 8K-sequence 405B
rows were held out of the fit.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class GPU:
    """One GPU kind. Bandwidths in bytes/s, per GPU and per direction."""

    name: str
    peak_flops: float        # dense BF16 tensor-core peak, FLOP/s (no sparsity)
    memory_bytes: float      # HBM capacity the planner fills (bytes)
    hbm_bandwidth: float     # HBM bandwidth
    nvlink_bandwidth: float  # intra-node (NVLink/NVSwitch) bandwidth per GPU per direction
    network_bandwidth: float  # inter-node (InfiniBand / RoCE) bandwidth per GPU per direction
    gpus_per_node: int = 8   # size of the NVLink domain
    sms: int = 132           # streaming multiprocessors: the GEMM tiles run in waves of this many


GB = 1e9
GIB = 2 ** 30

GPUS: dict[str, GPU] = {
    # H100 SXM5: 989 TFLOP/s dense BF16, 80 GB HBM3 at 3.35 TB/s, NVLink 4 at 450 GB/s per
    # direction (900 GB/s bidirectional), one 400 Gb/s NDR NIC per GPU (shared/notes/references.md);
    # 132 SMs (NVIDIA H100 Tensor Core GPU Architecture whitepaper: SXM5 enables 132 of the GH100's 144)
    # capacity for planning: the marketed size in decimal GB (80e9 B), ~5.5 GB below the 81,559 MiB
    # the "80 GB" H100 reports, a margin beyond the allocator overhead below (likewise H200, A100)
    "h100-sxm": GPU("h100-sxm", 989e12, 80 * GB, 3.35e12, 450e9, 50e9, sms=132),
    # H200 SXM: the H100's compute, 141 GB HBM3e at 4.8 TB/s
    "h200": GPU("h200", 989e12, 141 * GB, 4.8e12, 450e9, 50e9, sms=132),
    # A100 SXM4 80 GB: 312 TFLOP/s BF16, HBM2e 2.04 TB/s, NVLink 3 300 GB/s/direction, HDR 200 Gb/s, 108 SMs
    "a100": GPU("a100", 312e12, 80 * GB, 2.04e12, 300e9, 25e9, sms=108),
    # H800: an H100 with NVLink cut to 200 GB/s per direction (export variant)
    "h800": GPU("h800", 989e12, 80 * GB, 3.35e12, 200e9, 50e9, sms=132),
    # B200: 2.25 PFLOP/s dense BF16, 180 GB HBM3e at 8 TB/s, NVLink 5 900 GB/s/direction, 400 Gb/s NIC,
    # 148 SMs
    "b200": GPU("b200", 2250e12, 180 * GB, 8e12, 900e9, 50e9, sms=148),
}
GPUS["h100"] = GPUS["h100-sxm"]


@dataclass(frozen=True)
class CostModel:
    """Constants of the step-time projection (`throughput.py`) and of the memory estimate (`memory.py`)."""

    # -- compute ---------------------------------------------------------------------------------
    # Fraction of the dense peak at which the GEMMs' arithmetic proceeds inside a training step;
    # their operand traffic and their last partial wave are added on top (throughput.py), so a
    # large Megatron GEMM runs at about half the peak overall. FITTED on the Megatron-Core rows.
    # It is lower than cuBLAS in isolation (700-800 TFLOP/s, 0.7-0.8 on H100) because it also
    # absorbs what the model does not itemise: kernel-launch gaps, host synchronisation, power
    # throttling, logging.
    gemm_efficiency: float = 0.559
    # GEMM size: a GEMM's output is computed in tiles of gemm_tile_rows x gemm_tile_cols, one
    # tile per SM at a time, in waves of `GPU.sms` tiles; the last wave is partly empty. cuBLAS
    # picks among several tile shapes and rasterisations, so the wave count's fractional part is
    # taken as spread evenly and the expected loss as `gemm_wave_tail` = half a wave: a GEMM with
    # w waves of work takes (w + 1/2) / w of its full-wave time. This is what makes the per-rank
    # GEMMs slower as TP and CP shrink them (fewer rows per micro-batch under CP, narrower
    # columns under TP). Applied to each of the three GEMMs of a linear layer with its own output
    # (forward (tokens, out), input gradient (tokens, in), weight gradient (out, in)). 128 x 256 is
    # the largest BF16 tile of the Hopper GEMMs in CUTLASS 3 / cuBLAS (one warpgroup pair per SM).
    gemm_tile_rows: int = 128
    gemm_tile_cols: int = 256
    gemm_wave_tail: float = 0.5
    # Fraction of the peak a fused (flash) attention kernel sustains on the FLOPs it executes,
    # forward + backward together: "FlashAttention-2 achieves only 35% utilization on the H100"
    # (Shah et al. 2024, FlashAttention-3, abstract), the kernel generation of the published runs.
    # Causal masks execute half the counted score FLOPs (throughput.py).
    attention_efficiency: float = 0.35
    # Fraction of the single-GPU flash-attention rate that attention keeps under context
    # parallelism, forward + backward, measured by ring-flash-attention on 8xH800 at Llama-3-8B
    # shapes (shared/notes/references.md): Llama-3-style all-gather on packed inputs 58%, plain
    # ring 54%. gigatron all-gathers K/V when causal and runs a ring when bidirectional.
    cp_attention_fraction_allgather: float = 0.58
    cp_attention_fraction_ring: float = 0.54
    # Fraction of the HBM bandwidth that memory-bound elementwise kernels (norms, activations,
    # residual adds, cross-entropy) sustain: STREAM-like copies reach ~85-90% on H100 (~2.9 TB/s).
    hbm_efficiency: float = 0.85
    # Elementwise traffic, counted from the block (forward + backward, bf16): each norm reads and
    # writes d, each residual add reads 2d and writes d, the activation reads the FFN input(s) and
    # writes f; backward moves about twice the forward. Elements per token per layer:
    # 3 * (2 * 2 norms + 3 * 2 adds) * d = 30 d for the width part ...
    elementwise_passes_width: float = 30.0
    # ... and 3 * (ffn_matrices) * f for the FFN part (GeLU: read f, write f; SwiGLU: read 2f, write f).
    elementwise_passes_ffn_per_matrix: float = 3.0
    # Cross-entropy over the vocabulary, unfused in FP32 (Megatron-Core r0.8's vocab-parallel loss,
    # torch's F.cross_entropy on upcast logits): bytes per logit per token, counted pass by pass:
    # bf16 logits written 2, upcast r2 w4, max r4, shift r4 w4, exp r4 w4, sum r4, backward softmax
    # r4 w4, minus one-hot r4 w4, scale r4 w4, downcast r4 w2 = 62.
    loss_bytes_per_logit: float = 62.0
    # AdamW update: bytes moved per local parameter (fp32 master read+write 8, gradient read 4,
    # two moments read+write 16, bf16 copy write 2) = 30.
    optimizer_bytes_per_parameter: float = 30.0

    # -- communication ---------------------------------------------------------------------------
    # Achieved fraction of link bandwidth by NCCL collectives at large messages ("bus bandwidth" of
    # nccl-tests): ~360 of 450 GB/s on NVLink 4 all-gather / reduce-scatter, ~40 of 50 GB/s per NDR
    # NIC across nodes.
    nvlink_efficiency: float = 0.80
    network_efficiency: float = 0.80
    # Share of the per-layer collectives (TP all-gather / reduce-scatter, CP ring hops)
    # hidden behind computation by overlapping them with the neighbouring GEMMs (Megatron-Core's
    # tp-comm-overlap). FITTED on the Megatron-Core rows. gigatron's own TP (torch DTensor, no
    # async TP yet) overlaps less: the projection is what a tuned implementation reaches.
    layer_collective_overlap: float = 0.923
    # The context-parallel all-gather of K and V (and the reduce-scatter of their gradients) sits
    # on the critical path: attention needs the whole K/V before it starts, and the QKV
    # projection's backward needs dK/dV. Llama 3 (section 3.3.2) says so of its all-gather CP and
    # accepts it because GQA keeps K/V small; gigatron's cp_mode "allgather" is the same
    # synchronous all-gather (parallel/context.py). The ring (bidirectional attention) overlaps
    # each hop with the previous block's attention instead: it keeps `layer_collective_overlap`.
    cp_allgather_overlap: float = 0.0
    # Pipeline P2P sends are asynchronous (Llama 3: "asynchronous point-to-point communication");
    # this share of their time hides behind the next micro-batch's compute.
    p2p_overlap: float = 0.90
    # Data-parallel collectives (FSDP all-gather, reduce-scatter) hide behind one micro-batch of
    # compute: the all-gather behind the first forward, the reduce-scatter behind the last
    # backward (gradients are final only then). No constant: the window follows from the schedule.

    # -- memory ----------------------------------------------------------------------------------
    # CUDA caching-allocator fragmentation and the CUDA context/cuBLAS workspaces: reserved bytes
    # exceed allocated bytes by this fraction at peak (torch memory_stats on long runs typically
    # show 5-10%), plus a fixed context of ~1 GB per process (CUDA context + NCCL + workspaces).
    allocator_overhead: float = 0.08
    context_bytes: float = 1.0 * GB
    # Bytes of an activation element (BF16 compute) and of the FP32 copies our norms and RoPE make
    # (they upcast before reducing / rotating: core/models/llama.py).
    activation_bytes: int = 2
    upcast_bytes: int = 4


COST_MODEL = CostModel()


def gpu(name: str) -> GPU:
    """The GPU kind `name` (case-insensitive; `h100` = `h100-sxm`); KeyError lists the known ones."""
    key = name.lower()
    if key not in GPUS:
        raise KeyError(f"unknown GPU kind '{name}'; known: {', '.join(sorted(GPUS))}")
    return GPUS[key]


def with_constants(**changes) -> CostModel:
    """A copy of the cost model with some constants changed (for fits and sensitivity studies)."""
    return replace(COST_MODEL, **changes)
