"""Sharded checkpoints with torch.distributed.checkpoint (DCP).

Each rank writes only its own shards; DCP records the global layout, so a checkpoint loads into any
other layout. A checkpoint is the folder run_dir/checkpoints/step_{N:08d}; it counts only once its
`.complete` marker exists, which is written after every rank has finished (`latest()` ignores
folders without it).
"""

from __future__ import annotations

import os
import shutil

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

COMPLETE = ".complete"


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step:08d}")


def latest(root: str) -> str | None:
    if not os.path.isdir(root):
        return None
    done = sorted(d for d in os.listdir(root) if d.startswith("step_") and os.path.exists(os.path.join(root, d, COMPLETE)))
    return os.path.join(root, done[-1]) if done else None


def save(root: str, step: int, model, optimizer, extra: dict, keep_last: int = 0) -> str:
    """Save model + optimizer (sharded) and `extra` (small, identical on every rank)."""
    path = step_dir(root, step)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd, "extra": extra}, checkpoint_id=path)
    dist.barrier()
    if dist.get_rank() == 0:
        open(os.path.join(path, COMPLETE), "w").close()
        if keep_last > 0:
            done = sorted(d for d in os.listdir(root) if d.startswith("step_"))
            for old in done[:-keep_last]:
                shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    dist.barrier()
    return path


def load(path: str, model, optimizer, extra: dict) -> dict:
    """Load in place into model/optimizer of any layout; returns `extra` as saved."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd, "extra": extra}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return state["extra"]
