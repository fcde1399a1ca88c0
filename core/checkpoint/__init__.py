"""Sharded, verified, atomically committed checkpoints (see `store` for the commit protocol).

`Checkpointer` is what the trainer holds: `save(step, ...)` (optionally asynchronous), `wait()` to
finish an asynchronous save, `resume_path()` (the checkpoint to start from, verified, with optional
fallback to the previous good one) and `load(path, ...)`. Layout on disk:

    run_dir/checkpoints/
        latest                  -> "step_00000200" (rewritten atomically after each commit)
        step_00000100/          .metadata, __{rank}_{i}.distcp, config.json, manifest.json
        step_00000200/
        step_00000300.tmp/      a save in progress, or one a crash interrupted (ignored, swept)
"""

from __future__ import annotations

import logging
import os
import shutil
import threading

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from gigatron.core import faults
from gigatron.core.checkpoint.manifest import MANIFEST, CheckpointError, crc32_file, verify, verify_distributed
from gigatron.core.checkpoint.store import (COMPLETE, CONFIG, LATEST, commit, committed, keys_of, latest, load,
                                            load_value, retain, step_dir, step_of, sweep_tmp, training_state)

__all__ = ["Checkpointer", "CheckpointError", "save", "load", "load_value", "keys_of", "latest", "committed",
           "verify", "step_dir", "step_of",
           "COMPLETE", "CONFIG", "LATEST", "MANIFEST"]
log = logging.getLogger("gigatron")


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


class Checkpointer:
    """Saves and finds the checkpoints of one run folder `root`.

    Args: keep_last/keep_every: retention (newest K, plus every step divisible by N);
    async_save: write with dcp.async_save in a background thread over its own gloo group, and
    commit at the next save/wait; fallback_to_previous: on a checkpoint that fails verification,
    resume from the newest older one that passes instead of stopping; config: the recipe as a
    dict, stored as config.json in every checkpoint."""

    def __init__(self, root: str, keep_last: int = 3, keep_every: int = 0, async_save: bool = False,
                 fallback_to_previous: bool = False, config: dict | None = None):
        self.root, self.keep_last, self.keep_every = root, keep_last, keep_every
        self.async_save, self.fallback, self.config = async_save, fallback_to_previous, config
        self.pending = None  # (future, tmp, final, step) of an async save not yet committed
        self.group = dist.new_group(backend="gloo") if async_save and dist.is_initialized() else None
        rank, _ = _rank_world()
        if rank == 0:
            os.makedirs(root, exist_ok=True)
            sweep_tmp(root)
        self._barrier()

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def save(self, step: int, model, optimizer, extra: dict) -> str:
        """Write step `step` (all ranks call this). Returns the final folder name (committed on
        return unless async_save, in which case it is committed by the next save() or wait())."""
        self.wait()
        rank, _ = _rank_world()
        final = step_dir(self.root, step)
        tmp = final + ".tmp"
        if rank == 0 and os.path.isdir(tmp):
            shutil.rmtree(tmp)
        self._barrier()
        state = training_state(model, optimizer, extra)
        if self.async_save and dist.is_initialized():
            future = dcp.async_save(state, checkpoint_id=tmp, process_group=self.group)
            future = getattr(future, "upload_completion", future)  # AsyncSaveResponse in newer torch
            sums: dict = {}

            def finish():  # off the training thread: wait for the write, then checksum this rank's shards
                try:
                    future.result()
                    sums.update(_own_checksums(tmp, rank))
                except BaseException as err:  # noqa: BLE001 - re-raised by wait()
                    sums["__error__"] = err

            thread = threading.Thread(target=finish, name="gigatron-checkpoint", daemon=True)
            thread.start()
            self.pending = (thread, sums, tmp, final, step)
        else:
            dcp.save(state, checkpoint_id=tmp, no_dist=not dist.is_initialized())
            self._commit(tmp, final, step)
        return final

    def wait(self) -> None:
        """Finish and commit an asynchronous save, if one is in flight (all ranks call this)."""
        if self.pending is not None:
            thread, sums, tmp, final, step = self.pending
            self.pending = None
            thread.join()
            if "__error__" in sums:
                raise sums["__error__"]
            self._commit(tmp, final, step, own=sums)

    def _commit(self, tmp: str, final: str, step: int, own: dict | None = None) -> None:
        rank, world = _rank_world()
        faults.at_checkpoint_write(step)  # drills only: a write that fails before the commit
        if own is None:
            own = _own_checksums(tmp, rank)
        self._barrier()  # every rank's shards (and rank 0's .metadata) are written
        gathered = [None] * world
        if dist.is_initialized() and world > 1:
            dist.gather_object(own, gathered if rank == 0 else None, dst=0)
        else:
            gathered = [own]
        if rank == 0:
            sums = {k: v for part in gathered for k, v in part.items()}
            commit(tmp, final, self.root, {"step": step, "world_size": world}, self.config, sums)
            gone = retain(self.root, self.keep_last, self.keep_every)
            log.info("checkpoint %s committed%s", final, f"; removed {len(gone)} old" if gone else "")
        self._barrier()

    def resume_path(self, initial: str = "") -> str | None:
        """The verified checkpoint to start from: the run's `latest`, else `initial` (checkpoint.load:
        where a fresh run starts). A bad one raises CheckpointError naming the file, unless
        fallback_to_previous finds an older good one in the run's folder."""
        path = latest(self.root)
        explicit = not path
        path = path or initial
        if not path:
            return None
        try:
            verify_distributed(path)
            return path
        except CheckpointError as err:
            older = [p for p in committed(self.root) if p < path] if not explicit else []
            if not self.fallback or not older:
                raise CheckpointError(f"{err}; refusing to load it (set checkpoint.fallback_to_previous=true "
                                      f"to fall back to the previous good checkpoint)") from err
            log.warning("%s; falling back to an older checkpoint", err)
            for candidate in reversed(older):
                try:
                    verify_distributed(candidate)
                    return candidate
                except CheckpointError as bad:
                    log.warning("%s", bad)
            raise CheckpointError(f"{err}; and no older checkpoint in {self.root} passes verification") from err

    def load(self, path: str, model, optimizer, extra: dict) -> dict | None:
        """Load `path` (already verified by resume_path) into any layout; None if model-only."""
        return load(path, model, optimizer, extra, verify=False)


def _own_checksums(tmp: str, rank: int) -> dict:
    """Size and CRC-32 of the shard files this rank wrote (DCP names them __<rank>_<i>.distcp)."""
    mine = sorted(n for n in os.listdir(tmp) if n.startswith(f"__{rank}_"))
    return {n: {"size": os.path.getsize(os.path.join(tmp, n)), "crc32": crc32_file(os.path.join(tmp, n))} for n in mine}


def save(root: str, step: int, model, optimizer, extra: dict, keep_last: int = 0, **options) -> str:
    """One synchronous save through a throwaway Checkpointer (kept for simple callers)."""
    return Checkpointer(root, keep_last=keep_last, **options).save(step, model, optimizer, extra)
