"""Step metrics: peak FLOP/s for MFU, and the sinks they go to (terminal, metrics.jsonl, TensorBoard).

Only rank 0 writes. Values are reduced across ranks by the trainer before they arrive here.
"""

from __future__ import annotations

import json
import os
import time

import torch

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

    def write(self, step: int, values: dict[str, float]) -> None:
        self.jsonl.write(json.dumps({"step": step, **values, "time": time.time()}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for key, value in values.items():
                if value is not None:
                    self.tb.add_scalar(f"train/{key}", value, step)
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
