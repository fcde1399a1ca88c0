"""Step metrics: peak FLOP/s for MFU, and the sinks they go to (terminal, metrics.jsonl, TensorBoard).

Only rank 0 writes. Values are reduced across ranks by the trainer before they arrive here.
The terminal gets `Progress`: one live bar when stderr is a terminal; under torchrun's tee or in
a SLURM log (not a terminal) no redraws at all, a plain progress line every `run.progress_every`
steps instead, so that the step log lines stay readable.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import torch
from tqdm import tqdm

# Dense BF16 peak of one device in FLOP/s (vendor data sheets, no sparsity).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "B200": 2250e12, "GB200": 2500e12}


def device_peak_flops() -> float | None:
    """Peak of the local device, or None where no honest figure exists (CPU)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, peak in PEAK_FLOPS.items():
        if key in name:
            return peak
    return None


class MetricsWriter:
    """One JSON object per step in run_dir/metrics.jsonl, the same scalars to TensorBoard."""

    def __init__(self, run_dir: str, tensorboard: bool):
        os.makedirs(run_dir, exist_ok=True)
        self.jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(run_dir, "tb"))

    def write(self, step: int, values: dict) -> None:
        """Every value to metrics.jsonl; numbers to TensorBoard as train/<key>, and dicts of numbers
        as train/<key>/<name> (e.g. train/straggler_ratio/rank_5); lists and strings only to the file."""
        self.jsonl.write(json.dumps({"step": step, **values, "time": time.time()}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for key, value in values.items():
                items = value.items() if isinstance(value, dict) else [(None, value)]
                for name, v in items:
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        self.tb.add_scalar(f"train/{key}" + (f"/{name}" if name is not None else ""), v, step)
            self.tb.flush()

    def close(self) -> None:
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def format_step(step: int, total: int, v: dict[str, float]) -> str:
    """One log line; the throughput key is the family's unit (tokens_per_s, images_per_s, ...)."""
    mfu = f" mfu {v['mfu']:.1%}" if v.get("mfu") is not None else ""
    rate = next((k for k in v if k.endswith("_per_s")), None)
    speed = f" {rate[:-6]}/s {v[rate]:,.0f}" if rate else ""
    evals = "".join(f" {k} {v[k]:.4f}" for k in v if k.startswith("eval_"))
    return (f"step {step:>5}/{total} loss {v['loss']:.4f} lr {v['lr']:.2e} grad_norm {v['grad_norm']:.3f}"
            f"{speed} tflops/dev {v['tflops_per_device']:.3f}{mfu}{evals}")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, m, sec = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"


class Progress:
    """Rank 0's progress (the others pass enabled=False). A live tqdm bar on `stream` (stderr) when
    it is a terminal; otherwise a plain line every `every` steps and at the last one: "train step
    120/1000 (12.0%) 1.23 s/step eta 18m02s loss 2.3456". `write` prints a log line to stdout (above
    the bar when there is one)."""

    def __init__(self, total: int, initial: int, enabled: bool, desc: str, every: int, stream=None, out=None):
        self.total, self.every, self.desc, self.enabled = total, every, desc, enabled
        self.stream, self.out = stream or sys.stderr, out or sys.stdout
        isatty = getattr(self.stream, "isatty", lambda: False)
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, file=self.stream) \
            if enabled and isatty() else None
        self.start_step, self.start_time = initial, time.perf_counter()

    def update(self, step: int, values: dict) -> None:
        loss = values.get("loss")
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if isinstance(loss, float):
                self.bar.set_postfix(loss=f"{loss:.3f}")
            return
        if not self.enabled or (step % self.every and step != self.total):
            return
        done = step - self.start_step
        per_step = (time.perf_counter() - self.start_time) / done if done > 0 else float("nan")
        eta = f" eta {_duration(per_step * (self.total - step))}" if math.isfinite(per_step) else ""
        loss_text = f" loss {loss:.4f}" if isinstance(loss, float) else ""
        print(f"{self.desc} step {step}/{self.total} ({step / max(self.total, 1):.1%}) {per_step:.3g} s/step{eta}"
              f"{loss_text}", file=self.out, flush=True)

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=self.out)
        else:
            print(line, file=self.out, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
