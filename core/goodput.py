"""Effective training time across restarts, and the checkpoint interval that maximises it.

Effective training time = productive step time / wall time since the run (supervisor session)
started, as Meta reports it for Llama 3. Productive: the step time of every step whose result
survived, i.e. the last record of each step in RUN_DIR/metrics.jsonl (a step re-done after a restart
has two records, the earlier one lost). Lost steps = step records written - steps that survived.
Wall time starts at GIGATRON_RUN_START (set by cluster/supervisor.py once per run, kept across
restarts and requeues), else when this process started. cluster/monitor/restarts.py computes the
same figures after the fact for `gigatron status`.

`young_daly_interval(save_s, mtbf_s)`: Daly's (2006) higher-order optimum of the time between
checkpoints, sqrt(2 d M) * (1 + sqrt(d / 2M) / 3 + d / 18M) - d for a save time d < 2M (else M);
to first order Young's (1974) sqrt(2 d M).
"""

from __future__ import annotations

import json
import math
import os
import time


def young_daly_interval(save_s: float, mtbf_s: float) -> float:
    """Seconds of training between checkpoint saves that minimise the expected lost time."""
    d, m = max(save_s, 1e-9), mtbf_s
    if d >= 2 * m:
        return m
    return math.sqrt(2 * d * m) * (1 + math.sqrt(d / (2 * m)) / 3 + d / (18 * m)) - d


def read_records(path: str) -> list[dict]:
    records = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a crash
                    continue
    return records


def survivors(records: list[dict], since: float = 0.0) -> tuple[dict[int, float], int]:
    """({step: step_time_s of its surviving record}, lost step records) among records written at or
    after `since` (epoch seconds)."""
    last: dict[int, float] = {}
    count = 0
    for r in records:
        if "step" in r and "step_time_s" in r and r.get("time", since) >= since:
            last[r["step"]] = r["step_time_s"]
            count += 1
    return last, count - len(last)


class Goodput:
    """Running effective-time figures for the metrics of rank 0 (one per Trainer)."""

    def __init__(self, run_dir: str, resume_step: int):
        self.start = float(os.environ.get("GIGATRON_RUN_START", time.time()))
        records = read_records(os.path.join(run_dir, "metrics.jsonl"))
        last, lost = survivors(records, self.start)
        self.productive = sum(t for s, t in last.items() if s <= resume_step)
        self.lost = lost + sum(1 for s in last if s > resume_step)  # about to be re-done

    def update(self, step_time_s: float) -> dict[str, float]:
        self.productive += step_time_s
        wall = max(time.time() - self.start, 1e-9)
        return {"effective_time_fraction": min(self.productive / wall, 1.0), "lost_steps": self.lost}


class AutoInterval:
    """checkpoint.interval=auto: steps between saves from the measured save time and step time."""

    def __init__(self, mtbf_hours: float):
        self.mtbf_s = mtbf_hours * 3600
        self.save_s: float | None = None
        self.step_s: float | None = None  # the step time the interval was derived from
        self.step_times: list[float] = []
        self.interval = 1  # save after the first step: it measures the save time

    def observe_step(self, seconds: float) -> None:
        self.step_times = (self.step_times + [seconds])[-50:]

    def median_step(self) -> float:
        times = sorted(self.step_times) or [1.0]
        return times[len(times) // 2]

    def observe_save(self, seconds: float, step_s: float) -> tuple[int, float]:
        """Record a save's blocking time and the step time (median of the last 50 steps; both the
        slowest rank's); returns (interval in steps, interval in s)."""
        self.save_s = seconds if self.save_s is None else max(seconds, 0.5 * self.save_s + 0.5 * seconds)
        self.step_s = step_s
        tau = young_daly_interval(self.save_s, self.mtbf_s)
        self.interval = max(1, round(tau / step_s))
        return self.interval, tau
