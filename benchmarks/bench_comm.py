"""Communication accounting: measured / analytic bytes per mesh dimension and collective kind, for
one micro-batch forward + backward of the small debug Llama under several tp/dp layouts (real gloo
processes). Every ratio must print 1.00. Also the bytes each rank holds for parameters, gradients
and AdamW state over total/(tp*dp).

    python benchmarks/bench_comm.py [--out runs/bench/comm.json] [--layouts tp2,dp2,tp2sp_dp2,...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

LAYOUTS = {  # name -> (world size, overrides)
    "tp2": (2, ["parallel.tp=2"]),
    "tp2_sp": (2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    "dp2": (2, ["parallel.dp=2"]),
    "tp2_sp_dp2": (4, ["parallel.tp=2", "parallel.dp=2", "parallel.sequence_parallel=true"]),
    "hsdp_2x2": (4, ["parallel.dp=4", "parallel.dp_replicate=2", "train.micro_batch_size=1"]),
    "tp2_kv1_sp_dp2": (4, ["parallel.tp=2", "parallel.dp=2", "parallel.sequence_parallel=true", "model.n_kv_heads=1"]),
    "tp4_sp_dp2": (8, ["parallel.tp=4", "parallel.dp=2", "parallel.sequence_parallel=true"]),
}


def main() -> int:
    from tests.distributed import run_distributed
    from tests.parallel.harness import run_jobs

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "runs/bench/comm.json"))
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    args = parser.parse_args()
    names = args.layouts.split(",")
    data_dir = tempfile.mkdtemp(prefix="bench_comm_")
    report, ok = {}, True
    print(f"{'layout':<16} {'dim':<13} {'kind':<15} {'measured B':>12} {'analytic B':>12} {'ratio':>6}")
    for world_size in sorted({LAYOUTS[n][0] for n in names}):
        group = [n for n in names if LAYOUTS[n][0] == world_size]
        ranks = run_distributed(run_jobs, world_size, [("comm", LAYOUTS[n][1]) for n in group], data_dir)
        for i, name in enumerate(group):
            r0 = ranks[0][i]
            rows = []
            for key in sorted(set(r0["measured"]) | set(r0["expected"])):
                got, want = r0["measured"].get(key, 0), r0["expected"].get(key, 0)
                ratio = got / want if want else float("inf")
                ok &= all(r[i]["measured"] == r[i]["expected"] for r in ranks)
                rows.append({"dim": key[0], "kind": key[1], "measured": got, "analytic": want, "ratio": ratio})
                print(f"{name:<16} {key[0]:<13} {key[1]:<15} {got:>12,} {want:>12,} {ratio:>6.2f}")
            memory = {k: max(r[i]["held"][k] / (r[i]["total"][k] / r[i]["shards"]) for r in ranks) for k in r0["held"]}
            print(f"{name:<16} memory held / (total/(tp*dp_shard)), worst rank: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in memory.items()))
            report[name] = {"world_size": world_size, "overrides": LAYOUTS[name][1], "comm": rows, "memory": memory}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}; all ranks measured == analytic: {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
