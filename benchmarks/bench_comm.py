"""Communication per training step against the textbook minimum of the layout (parallel/comm.py
`textbook_bytes`: FSDP one parameter all-gather and one gradient reduce-scatter per unit per step,
Megatron's per-layer TP/SP formulas, Llama 3's CP K/V all-gather and reduce-scatter), for one whole
step (2 micro-batches per rank, parallel.grad_sync=per_step) of the small debug Llama under several
layouts, real gloo processes. Ratios must lie in [1, 1.05]; the rows the minimum has no entry for
are scalars (loss-term count, loss, stop flags, gradient norm). Also the bytes each rank holds for
parameters, gradients and AdamW state over total/(tp*dp).

    python benchmarks/bench_comm.py [--out benchmarks/results/bench_comm.json] [--layouts dp2,tp2_sp_dp2,...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MB1 = "train.micro_batch_size=1"  # 2 micro-batches per rank and step at global batch 4 over dp 2
LAYOUTS = {  # name -> (world size, overrides)
    "dp2": (2, ["parallel.dp=2", MB1]),
    "cp2": (2, ["parallel.cp=2", "parallel.dp=1"]),
    "tp2_sp_dp2": (4, ["parallel.tp=2", "parallel.dp=2", "parallel.sequence_parallel=true", MB1]),
    "hsdp_2x2": (4, ["parallel.dp=4", "parallel.dp_replicate=2", MB1, "train.global_batch_size=8"]),
    "dp2_per_microbatch": (2, ["parallel.dp=2", MB1, "parallel.grad_sync=per_microbatch"]),
}


def main() -> int:
    from tests.distributed import run_distributed
    from tests.parallel.harness import run_jobs

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks/results/bench_comm.json"))
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    args = parser.parse_args()
    names = args.layouts.split(",")
    data_dir = tempfile.mkdtemp(prefix="bench_comm_")
    report, ok = {}, True
    print(f"{'layout':<20} {'dim':<13} {'kind':<15} {'measured B':>12} {'textbook B':>12} {'ratio':>6}")
    for world_size in sorted({LAYOUTS[n][0] for n in names}):
        group = [n for n in names if LAYOUTS[n][0] == world_size]
        ranks = run_distributed(run_jobs, world_size, [("comm", LAYOUTS[n][1]) for n in group], data_dir)
        for i, name in enumerate(group):
            r0 = ranks[0][i]
            rows = []
            for key in sorted(set(r0["measured"]) | set(r0["expected"])):
                got, want = r0["measured"].get(key, 0), r0["expected"].get(key, 0)
                ratio = got / want if want else None
                if want:
                    ok &= all(want <= r[i]["measured"].get(key, 0) <= 1.05 * want for r in ranks)
                rows.append({"dim": key[0], "kind": key[1], "measured": got, "textbook": want, "ratio": ratio})
                shown = f"{ratio:>6.3f}" if ratio is not None else "scalar"
                print(f"{name:<20} {key[0]:<13} {key[1]:<15} {got:>12,} {want:>12,} {shown:>6}")
            memory = {k: max(r[i]["held"][k] / (r[i]["total"][k] / r[i]["shards"]) for r in ranks) for k in r0["held"]}
            print(f"{name:<20} memory held / (total/(tp*dp_shard)), worst rank: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in memory.items()))
            report[name] = {"world_size": world_size, "overrides": LAYOUTS[name][1], "comm": rows, "memory": memory}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}; every textbook row within [1, 1.05] on every rank: {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
