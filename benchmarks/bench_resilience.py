"""Projected effective training time of Llama 3 405B on 16,384 H100s at Llama 3's failure rate:
`checkpoint.interval: auto` (Young/Daly, core/goodput.py) against fixed intervals.

    python benchmarks/bench_resilience.py [--save-s 30] [--restart-s 600] [--seeds 200]

A Monte-Carlo simulation of 54 days of wall time with interruptions arriving as a Poisson process
at Meta's published rate (466 in 54 days: one every 2.78 h, all counted as failures, the 47 planned
ones included). Stated inputs:
- step time: recipes/llama3_405b.yaml's FLOPs per step (the family's own count, 16M tokens) at the
  published 400 TFLOP/s per GPU on 16,384 GPUs (Llama 3, Table 4): 6.7 s;
- save time (blocking): --save-s, default 30 s. The state is 405.9e9 parameters x 12 bytes (FP32
  weights + AdamW m, v) = 4.9 TB, 300 MB per GPU (Llama 3: 1 MB to 4 GB per GPU); 2.4 s at Tectonic's
  2 TB/s sustained, so 30 s leaves room for stragglers and metadata; swept in `sensitivity`;
- restart time: --restart-s, default 600 s: detection (a crash is seen at once; a hang after
  cluster.hang_timeout_s), scheduler, NCCL init at 16K ranks, checkpoint load, first compiled step.
  Not published; swept.
A failure loses the work since the last committed save (a save in progress is lost too) plus the
restart. Effective training time = surviving step time / wall time. The baseline is a fixed
interval of 500 steps (torchtitan's default), simulated in the same run on the same failure times.
Writes benchmarks/results/bench_resilience.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DAYS, INTERRUPTIONS, GPUS, TFLOPS_PER_GPU = 54, 466, 16384, 400e12


def step_seconds() -> tuple[float, float]:
    from gigatron.core.config import load_config
    from gigatron.core.family import get_family

    cfg = load_config(os.path.join(ROOT, "recipes", "llama3_405b.yaml"))
    flops = get_family(cfg.model.name).flops_per_sample(cfg) * cfg.train.global_batch_size
    return flops / (GPUS * TFLOPS_PER_GPU), flops


def simulate(interval_s: float, save_s: float, restart_s: float, failures: list[float], horizon: float) -> float:
    """Effective fraction for saves every `interval_s` of compute, on the given failure times."""
    t, kept, fi = 0.0, 0.0, 0
    while t < horizon:
        next_failure = failures[fi] if fi < len(failures) else math.inf
        done = t + interval_s + save_s  # one segment: compute, then a blocking save that commits it
        if done <= next_failure and done <= horizon:
            t, kept = done, kept + interval_s
            continue
        if next_failure >= horizon:  # the run ends inside the segment: its compute counts up to the end
            kept += max(0.0, min(horizon - t, interval_s))
            break
        t = next_failure + restart_s  # the segment is lost
        fi += 1
    return kept / horizon


def project(interval_s: float, save_s: float, restart_s: float, mtbf_s: float, seeds: int) -> dict:
    horizon = DAYS * 86400.0
    values = []
    for seed in range(seeds):
        rng, t, failures = random.Random(seed), 0.0, []
        while t < horizon:
            t += rng.expovariate(1 / mtbf_s)
            failures.append(t)
        values.append(simulate(interval_s, save_s, restart_s, failures, horizon))
    return {"interval_s": interval_s, "effective_mean": statistics.mean(values),
            "effective_std": statistics.pstdev(values)}


def main() -> int:
    from gigatron.core.goodput import young_daly_interval

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--save-s", type=float, default=30.0)
    parser.add_argument("--restart-s", type=float, default=600.0)
    parser.add_argument("--seeds", type=int, default=200)
    args = parser.parse_args()
    step_s, flops = step_seconds()
    mtbf_s = DAYS * 86400 / INTERRUPTIONS
    auto_s = young_daly_interval(args.save_s, mtbf_s)
    auto_steps = max(1, round(auto_s / step_s))
    policies = {"auto": auto_steps, "fixed_100": 100, "fixed_500 (baseline)": 500, "fixed_1000": 1000,
                "fixed_25": 25}
    rows = {}
    for name, steps in policies.items():
        rows[name] = {"steps": steps, **project(steps * step_s, args.save_s, args.restart_s, mtbf_s, args.seeds)}
    base = rows["fixed_500 (baseline)"]["effective_mean"]
    print(f"405B on {GPUS:,} H100: step {step_s:.2f} s ({flops:.3g} FLOP at {TFLOPS_PER_GPU / 1e12:.0f} TFLOP/s/GPU), "
          f"MTBF {mtbf_s / 3600:.2f} h ({INTERRUPTIONS} interruptions in {DAYS} days), save {args.save_s:.0f} s, "
          f"restart {args.restart_s:.0f} s, {args.seeds} simulated 54-day runs")
    print(f"checkpoint.interval=auto (Young/Daly): every {auto_s:.0f} s = {auto_steps} steps")
    for name, row in rows.items():
        print(f"  {name:22s} every {row['steps']:5d} steps: effective training time {row['effective_mean']:.2%} "
              f"+- {row['effective_std']:.2%}  ({row['effective_mean'] / base:.3f}x baseline)")
    sensitivity = []
    for save_s in (5.0, 30.0, 120.0):
        for restart_s in (300.0, 600.0, 1800.0):
            tau = young_daly_interval(save_s, mtbf_s)
            a = project(max(1, round(tau / step_s)) * step_s, save_s, restart_s, mtbf_s, 50)["effective_mean"]
            b = project(500 * step_s, save_s, restart_s, mtbf_s, 50)["effective_mean"]
            sensitivity.append({"save_s": save_s, "restart_s": restart_s, "auto_steps": max(1, round(tau / step_s)),
                                "auto": a, "fixed_500": b, "ratio": a / b})
            print(f"  save {save_s:5.0f} s, restart {restart_s:5.0f} s: auto every {max(1, round(tau / step_s)):4d} "
                  f"steps {a:.2%} vs fixed 500 {b:.2%} ({a / b:.3f}x)")
    out = {"model": "llama3_405b", "gpus": GPUS, "step_s": step_s, "tflops_per_gpu": TFLOPS_PER_GPU / 1e12,
           "interruptions": INTERRUPTIONS, "days": DAYS, "mtbf_h": mtbf_s / 3600, "save_s": args.save_s,
           "restart_s": args.restart_s, "seeds": args.seeds, "auto_interval_s": auto_s,
           "auto_interval_steps": auto_steps,
           "policies": rows, "ratio_auto_vs_fixed_500": rows["auto"]["effective_mean"] / base,
           "sensitivity": sensitivity}
    os.makedirs(os.path.join(ROOT, "benchmarks", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "benchmarks", "results", "bench_resilience.json"), "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
