"""Run directories for the monitor tests.

`real_run(path)`: a real short training run of the debug recipe (tiny model, byte tokens, 12
steps, checkpoints every 5), by `python -m gigatron.core.train`.

`simulated_run(path, ...)`: a GENERATED run directory in the trainer's format for what a CPU test
cannot produce: 16 ranks with per-rank compute times (`step_time_per_rank`, seeded noise, one rank
made slow over a window of steps), the trainer's `stragglers` lists, GPU-like MFU and peak memory,
restart/requeue events, launcher exit files and per-rank logs, committed and uncommitted
checkpoints, and a pipeline timeline. The tests derive their expectations from the generation
parameters (which rank is slow, when), never from stored outputs.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import time

from gigatron.cluster.monitor.stragglers import find_stragglers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def real_run(path: str, data_dir: str, steps: int = 12) -> subprocess.CompletedProcess:
    overrides = ["parallel.dp=1", "model.vocab_size=258", "data.tokenizer=bytes", "data.max_mb=0.2",
                 f"data.path={data_dir}/bytes", f"train.steps={steps}", "train.warmup_steps=2", f"run.dir={path}",
                 "checkpoint.interval=5", "run.progress=false", "model.dim=64", "model.n_layers=2",
                 "train.global_batch_size=2", "train.micro_batch_size=2", "train.seq_len=128"]
    cmd = [sys.executable, "-m", "gigatron.core.train", os.path.join(ROOT, "recipes/llama3_debug.yaml")]
    for o in overrides:
        cmd += ["--set", o]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)


def metric_record(step: int, t: float, ranks: int, slow_rank: int | None, slow_factor: float, rng: random.Random,
                  with_ranks: bool) -> dict:
    loss = 2.2 + 8.5 * math.exp(-step / 60) + rng.gauss(0, 0.03)
    times = [1.0 + rng.gauss(0, 0.01) for _ in range(ranks)]
    if slow_rank is not None:
        times[slow_rank] *= slow_factor
    step_time = max(times) + 0.05
    tokens = 16 * 8192 / step_time
    record = {"step": step, "loss": loss, "lr": 3e-4 * min(1.0, step / 20), "grad_norm": 1.0 + rng.random(),
              "tokens_per_s": tokens, "tflops_per_device": 400.0 / step_time, "mfu": 0.404 / step_time,
              "step_time_s": step_time, "skipped_steps": 0, "time": t, "data_wait_fraction": 0.01,
              "skipped_samples": 0, "peak_memory_gb": 61.5 + 0.01 * rng.random()}
    if with_ranks:
        record["step_time_per_rank"] = times
        record["stragglers"] = find_stragglers(times, 0.10)
    return record


def simulated_run(path: str, steps: int = 120, ranks: int = 16, slow_rank: int = 5, slow_steps=(60, 80),
                  slow_factor: float = 1.25, total_steps: int = 1000, start: float | None = None, crash: bool = False,
                  seed: int = 0) -> dict:
    """Write the run (its last step about now, unless `start` is given); return the generation
    parameters the tests check against."""
    rng = random.Random(seed)
    start = time.time() - 1.1 * steps if start is None else start
    os.makedirs(os.path.join(path, "checkpoints"), exist_ok=True)
    lines, t = [], start
    for step in range(1, steps + 1):
        slow = slow_rank if slow_steps[0] <= step < slow_steps[1] else None
        record = metric_record(step, t, ranks, slow, slow_factor, rng, with_ranks=step % 5 == 0)
        t += record["step_time_s"]
        lines.append(json.dumps(record))
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")
    recipe = {"model": {"name": "llama3", "dim": 16384, "n_layers": 126, "n_heads": 128, "n_kv_heads": 8,
                        "ffn_dim": 53248, "vocab_size": 128256},
              "parallel": {"tp": 8, "pp": 16, "dp": 128, "pp_schedule": "interleaved_1f1b", "pp_virtual_stages": 8},
              "train": {"steps": total_steps, "warmup_steps": total_steps // 10, "seq_len": 8192, "global_batch_size": 2048,
                        "micro_batch_size": 1}}
    marks = ((int(steps * 0.4), True), (int(steps * 0.8), True), (steps, False))
    for step, committed in marks:
        folder = os.path.join(path, "checkpoints", f"step_{step:08d}")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(recipe, f)
        if committed:
            open(os.path.join(folder, ".complete"), "w").close()
            with open(os.path.join(folder, "manifest.json"), "w") as f:
                json.dump({"step": step}, f)
    with open(os.path.join(path, "checkpoints", "latest"), "w") as f:
        f.write(f"step_{steps:08d}")  # being written: the pointer may run ahead of the commit
    events = [{"time": start - 60, "kind": "start", "attempt": 0, "detail": "job 1234"},
              {"time": start + 30, "kind": "requeue", "attempt": 1, "detail": "node preempted"},
              {"time": start + 45, "kind": "restart", "attempt": 1, "detail": f"resumed from step_{marks[0][0]:08d}"}]
    if crash:
        events.append({"time": t + 1, "kind": "crash", "attempt": 1, "detail": "rank 3: CUDA error"})
    with open(os.path.join(path, "events.jsonl"), "w") as f:
        f.write("".join(json.dumps(e) + "\n" for e in events))
    exit_dir = os.path.join(path, ".exit", "attempt-1")
    os.makedirs(exit_dir, exist_ok=True)
    for rank in range(4):
        with open(os.path.join(exit_dir, f"rank-{rank}"), "w") as f:
            f.write("1\n" if crash and rank == 3 else "0\n")
    for rank in range(4):
        log_dir = os.path.join(path, "logs", "attempt-1", "node0", "run", "attempt_0", str(rank))
        os.makedirs(log_dir, exist_ok=True)
        with open(os.path.join(log_dir, "stderr.log"), "w") as f:
            f.write(f"gigatron-launch: rank {rank}/16 local_rank {rank} node node0\n")
            f.write(f"[rank{rank}]: step {steps}\n")
            if crash and rank == 3:
                f.write("[rank3]: Traceback (most recent call last):\n[rank3]: RuntimeError: CUDA error: an illegal "
                        "memory access was encountered\n")
    timeline = {"stats": {"bubble_wall": 0.2}, "events": [
        [{"kind": k, "stage": r, "mb": mb, "start": (mb + r) * 1.0 + (0 if k == "F" else 4 + 2 * (3 - r)),
          "end": (mb + r) * 1.0 + (0.9 if k == "F" else 4 + 2 * (3 - r) + 1.8)} for mb in range(4) for k in "FB"]
        for r in range(4)]}
    with open(os.path.join(path, "pipeline_timeline.json"), "w") as f:
        json.dump(timeline, f)
    return {"steps": steps, "ranks": ranks, "last_good": f"step_{marks[1][0]:08d}",
            "uncommitted": f"step_{steps:08d}", "slow_rank": slow_rank, "slow_steps": slow_steps,
            "total_steps": total_steps, "end_time": t, "slow_factor": slow_factor}
