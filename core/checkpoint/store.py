"""Saving and loading training state with torch.distributed.checkpoint (DCP), committed atomically.

Atomic commit protocol (every step is safe to interrupt with SIGKILL):
  1. every rank writes its shards with DCP into `step_N.tmp/` (rank 0 first removes a stale one);
  2. once all ranks are done, each checksums its own `__{rank}_*.distcp` files, rank 0 gathers the
     sums, writes `config.json` (the recipe, so `gigatron convert to-hf` needs only the folder) and
     then `manifest.json` (files, sizes, CRC-32; fsynced);
  3. rank 0 renames `step_N.tmp` -> `step_N` (atomic on POSIX) and fsyncs the parent folder;
  4. rank 0 rewrites the `latest` pointer: `latest.tmp` then os.replace -> `latest`;
  5. retention deletes old `step_*` folders (never the one `latest` names).
A crash before 3 leaves only a `.tmp` folder, which is ignored and swept on the next start; a crash
between 3 and 4 leaves a committed folder that `latest` does not name yet. Either way `latest`
still names the previous good checkpoint.

State dict layout (DCP keys): `model.<full parameter name>` (pipeline stages keep the full model's
names, so any tp/pp/vpp/dp/cp layout reshards on load), `optim.state.<name>.<exp_avg|...>` and
`optim.param_groups.<name>.<lr|...>` (torch's flattened optimizer state, keyed by parameter name
too), `extra.*` (step, LR scheduler, data-loader position: identical on every rank), and
`rng.<rank>.{cpu,cuda}` (each rank's generator state, restored only into the same world size).
A checkpoint without `optim.*` keys (e.g. from `gigatron convert from-hf`) is model-only: loading
it gives fresh optimizer state and step 0.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from gigatron.core.checkpoint.manifest import (MANIFEST, describe,
                                               verify_distributed, write_manifest)

log = logging.getLogger("gigatron")
LATEST = "latest"
CONFIG = "config.json"
COMPLETE = ".complete"  # kept for older readers; the manifest is the real commit record
_OPTIM = StateDictOptions(flatten_optimizer_state_dict=True)


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step:08d}")


def committed(root: str) -> list[str]:
    """Committed checkpoint folders (with a manifest), oldest first."""
    if not os.path.isdir(root):
        return []
    names = sorted(d for d in os.listdir(root) if d.startswith("step_") and not d.endswith(".tmp")
                   and os.path.isfile(os.path.join(root, d, MANIFEST)))
    return [os.path.join(root, d) for d in names]


def latest(root: str) -> str | None:
    """The folder the `latest` pointer names, else the newest committed folder, else None."""
    pointer = os.path.join(root, LATEST)
    if os.path.isfile(pointer):
        with open(pointer) as f:
            path = os.path.join(root, f.read().strip())
        if os.path.isdir(path):
            return path
    done = committed(root)
    return done[-1] if done else None


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_latest(root: str, path: str) -> None:
    tmp = os.path.join(root, LATEST + ".tmp")
    with open(tmp, "w") as f:
        f.write(os.path.basename(path) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, LATEST))
    _fsync_dir(root)


def retain(root: str, keep_last: int, keep_every: int = 0) -> list[str]:
    """Delete committed folders except the newest `keep_last` (0 = all), every step divisible by
    `keep_every`, and the one `latest` names. Returns the deleted folders."""
    done = committed(root)
    if keep_last <= 0:
        return []
    keep = set(done[-keep_last:]) | {latest(root)}
    if keep_every > 0:
        keep |= {p for p in done if int(os.path.basename(p)[5:]) % keep_every == 0}
    gone = [p for p in done if p not in keep]
    for path in gone:
        shutil.rmtree(path, ignore_errors=True)
    return gone


def sweep_tmp(root: str) -> None:
    """Remove `.tmp` folders that crashed saves left behind (rank 0, before any new save)."""
    if os.path.isdir(root):
        for d in os.listdir(root):
            if d.endswith(".tmp") and d.startswith("step_"):
                shutil.rmtree(os.path.join(root, d), ignore_errors=True)


def commit(tmp: str, final: str, root: str | None, info: dict, config: dict | None, own: dict[str, dict]) -> None:
    """Steps 2-4 of the protocol, on one process, given the checksums other ranks already made."""
    if config is not None:
        with open(os.path.join(tmp, CONFIG), "w") as f:
            json.dump(config, f, indent=1)
    names = [n for n in os.listdir(tmp) if n not in own and n != MANIFEST and not n.endswith(".tmp")]
    write_manifest(tmp, {**own, **describe(tmp, names)}, info)
    open(os.path.join(tmp, COMPLETE), "w").close()
    if os.path.isdir(final):  # a re-save of the same step: replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(os.path.dirname(final))
    if root is not None:  # None: a standalone checkpoint (e.g. converted), no run folder pointer
        write_latest(root, final)


def _parts(model) -> list:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def _optimizers(optimizer, n: int) -> list:
    return list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer] * n


def training_state(model, optimizer, extra: dict | None) -> dict:
    """The DCP state dict of model parts (full names), their optimizers, `extra` and this rank's RNG."""
    parts = _parts(model)
    state = {"model": {k: v for p in parts for k, v in get_model_state_dict(p).items()}}
    if optimizer is not None:
        state["optim"] = {k: v for p, o in zip(parts, _optimizers(optimizer, len(parts)))
                          for k, v in get_optimizer_state_dict(p, o, options=_OPTIM).items()}
    if extra is not None:
        state["extra"] = extra
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    state["rng"] = {str(rank): rng}
    return state


def keys_of(path: str) -> set[str]:
    return set(dcp.FileSystemReader(path).read_metadata().state_dict_metadata)


def load_value(path: str, key: str):
    """One saved non-tensor value by its flat key (e.g. "extra.data_dp_size"), or None if absent."""
    if key not in keys_of(path):
        return None
    nested: dict = {}
    node = nested
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = 0
    dcp.load(nested, checkpoint_id=path, no_dist=True)
    for part in parts:
        nested = nested[part]
    return nested


def step_of(path: str) -> int:
    """The step number of a step folder (".../step_00000200" -> 200)."""
    return int(os.path.basename(os.path.normpath(path)).split("_")[-1])


def load(path: str, model, optimizer, extra: dict | None, verify: bool = True, strict: bool = True) -> dict | None:
    """Load a checkpoint in place into model/optimizer of any layout. Returns `extra` as saved, or
    None for a model-only checkpoint (then the optimizer keeps its fresh state). strict=False (a
    new stage of a multi-stage recipe): tensors the checkpoint lacks keep their current values
    (modules the stage adds), tensors the model lacks are left behind (modules it drops)."""
    if verify:
        verify_distributed(path)
    keys = keys_of(path)
    full = any(k.startswith("optim.") for k in keys)
    state = training_state(model, optimizer if full else None, extra if full else None)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    saved_world = len({k.split(".")[1] for k in keys if k.startswith("rng.")})
    restore_rng = strict and saved_world == world and f"rng.{rank}.cpu" in keys
    if not restore_rng:
        state.pop("rng")
        state["rng"] = {}
    if not torch.cuda.is_available() or f"rng.{rank}.cuda" not in keys:
        state["rng"].get(str(rank), {}).pop("cuda", None)
    if not strict:
        state["model"] = {k: v for k, v in state["model"].items() if f"model.{k}" in keys}
        if "optim" in state:
            state["optim"] = _present(state["optim"], "optim", keys)
    dcp.load({k: v for k, v in state.items() if v}, checkpoint_id=path, no_dist=not dist.is_initialized())
    parts = _parts(model)
    strict = strict and len(parts) == 1
    for part in parts:
        set_model_state_dict(part, state["model"], options=StateDictOptions(strict=strict))
    if full and "optim" in state:
        for part, opt in zip(parts, _optimizers(optimizer, len(parts))):
            set_optimizer_state_dict(part, opt, state["optim"], options=_OPTIM)
    if restore_rng:
        rng = state["rng"][str(rank)]
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"])
    return state.get("extra") if full else None


def _present(tree: dict, prefix: str, keys: set[str]) -> dict:
    """The parts of a nested optimizer state dict whose flat keys the checkpoint holds."""
    out = {}
    for k, v in tree.items():
        flat = f"{prefix}.{k}"
        if isinstance(v, dict):
            sub = _present(v, flat, keys)
            if sub:
                out[k] = sub
        elif flat in keys or any(key.startswith(flat + ".") for key in keys):
            out[k] = v
    return out
