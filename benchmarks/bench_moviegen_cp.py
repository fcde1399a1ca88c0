"""Context-parallel traffic of Movie Gen 30B's self-attention, counted (not run), against the textbook minimum.

Shape (recipes/moviegen_30b.yaml): 73,728 tokens, 48 heads of 128 (no GQA), bf16 K/V, tensor
parallel 8 (each rank's attention holds 6 heads), micro-batch 1, cp in {2, 4, 8}. Per layer and
rank, forward + backward, the bytes each mode puts on the wire (what a rank receives; sends are
symmetric), from `parallel.comm.cp_attention_bytes` (the byte model tests/parallel and
benchmarks/bench_context.py check against the recorded collectives, 1.00 on every row):
    kv        = K and V of the whole sequence: 2 x B x H/tp x T x D x 2 bytes
    minimum   = 2 (cp-1)/cp kv: every rank must receive the K/V it lacks once and return the dK/dV of
                the keys it does not own once (K/V kept from the forward, as all-gather does)
    allgather = all-gather of kv ((cp-1)/cp kv on the wire) + reduce-scatter of dK/dV (the same)
    ring      = cp-1 K/V hops forward, cp-1 K/V hops again in backward (the ring keeps only its own
                block) and cp dK/dV hops: (3 cp - 2)/cp kv
The ratio to the minimum is the price of each design: all-gather 1.00 but a (T, 2 H/tp D) buffer per
layer; the ring (3cp-2)/(2cp-2) (1.67 at cp 4) and memory of one block.

The note: H100 attention compute per layer and rank (12 x (d/tp) x T x T/cp FLOPs for forward +
backward, the planner's convention) at 989 TFLOP/s dense bf16 and at 50% of it (FlashAttention-3
class kernels; FA2 sustains ~35%), against the wire time of each mode over InfiniBand (tp 8 fills
the node, so cp ranks sit on different nodes: 50 GB/s per GPU, 400 Gb/s NICs) and over NVLink
(450 GB/s, if cp were placed inside a node). Communication that takes less time than the compute
it overlaps with (the ring overlaps each hop with a block's attention) costs nothing.

    python benchmarks/bench_moviegen_cp.py [--out benchmarks/results/bench_moviegen_cp.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time

from gigatron.parallel.comm import cp_attention_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T, HEADS, HEAD_DIM, DIM, TP, BYTES = 73728, 48, 128, 6144, 8, 2
PEAK, IB, NVLINK = 989e12, 50e9, 450e9


def wire(mode: str, cp: int, kv_heads: int) -> float:
    """Bytes one rank receives per attention call (forward + backward): the recorder's convention
    (an all-gather's output, a reduce-scatter's input; send/recv per hop) turned into wire bytes."""
    counted = cp_attention_bytes(mode, 1, T, kv_heads, HEAD_DIM, cp, element_size=BYTES, segment_ids=False)
    if mode == "allgather":
        return (counted[("cp", "all_gather")] + counted[("cp", "reduce_scatter")]) * (cp - 1) / cp
    return counted[("cp", "recv")]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks/results/bench_moviegen_cp.json"))
    args = parser.parse_args(argv)
    kv_heads = HEADS // TP
    kv = 2 * kv_heads * T * HEAD_DIM * BYTES
    rows = []
    for cp in (2, 4, 8):
        minimum = 2 * (cp - 1) / cp * kv
        flops = 12 * (DIM // TP) * T * (T // cp)  # per layer and rank, forward + backward
        compute_peak, compute_half = flops / PEAK, flops / (0.5 * PEAK)
        for mode in ("allgather", "ring"):
            b = wire(mode, cp, kv_heads)
            rows.append({"cp": cp, "mode": mode, "kv_bytes": kv, "wire_bytes": b, "textbook_bytes": minimum,
                         "ratio": b / minimum, "attention_ms_peak": 1e3 * compute_peak,
                         "attention_ms_at_50pct": 1e3 * compute_half, "wire_ms_infiniband": 1e3 * b / IB,
                         "wire_ms_nvlink": 1e3 * b / NVLINK, "comm_over_compute_ib": (b / IB) / compute_half})
    for r in rows:
        print(f"cp{r['cp']} {r['mode']:>9}: {r['wire_bytes'] / 1e6:7.1f} MB/layer/rank, {r['ratio']:.3f} x textbook "
              f"({r['textbook_bytes'] / 1e6:.1f} MB); wire {r['wire_ms_infiniband']:.2f} ms on IB, "
              f"{r['wire_ms_nvlink']:.2f} ms on NVLink vs attention {r['attention_ms_at_50pct']:.1f} ms at 50% "
              f"of peak ({r['attention_ms_peak']:.1f} ms at peak): comm/compute {r['comm_over_compute_ib']:.2f}")
    result = {"benchmark": "bench_moviegen_cp", "date": time.strftime("%Y-%m-%d"), "counted_not_run": True,
              "shape": {"seq_len": T, "heads": HEADS, "head_dim": HEAD_DIM, "dim": DIM, "tp": TP, "dtype": "bf16",
                        "micro_batch": 1},
              "bandwidth": {"infiniband_per_gpu": IB, "nvlink": NVLINK}, "peak_flops": PEAK, "rows": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
