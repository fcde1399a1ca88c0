"""Shard lists without a global index, per-shard sample counts, and the per-epoch shard plan.

A dataset is a list of shards, never a list of samples. `ShardList` expands "d/s-{000000..999999}.tar"
lazily (name i is computed, not stored), so a million shard names cost a few integers; comma lists
and several patterns are expanded once (their names are the user's own list). The only per-sample
metadata is a shard's own index file (DALI's format, `<shard>.idx`: first line "v1.2 N"), read
when that shard is opened, to count the samples lost to a truncated or missing shard.

Epoch plan. With L = dp_size * num_workers lanes (lane l = dp_rank * num_workers + worker), epoch e
visits shard perm_e(p) at position p, where perm_e is the O(1)-memory Feistel permutation of
`sampler.py` keyed by (seed, e); lane l reads positions p = l, l + L, l + 2L, ... in order. Every
shard is read by exactly one lane per epoch, and a lane's plan is computed from (seed, e, l, L)
alone. A work item is [epoch, shard_index, start, explicit]: read shard `shard_index` from its
sample `start` on, or only the sample indices in `explicit` (a list) when it is not None.
"""

from __future__ import annotations

import os
import re

from .sampler import FeistelPermutation

__all__ = ["ShardList", "lane_plan", "shard_sample_count", "split_shards"]

_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")


class ShardList:
    """The shard names of `spec`: a pattern with one lazy {a..b} range, or a comma list of names/patterns."""

    def __init__(self, spec: str | list[str]):
        parts = [p.strip() for p in (spec.split(",") if isinstance(spec, str) else spec) if p.strip()]
        if not parts:
            raise ValueError("data.path names no shard")
        self._lazy = None
        if len(parts) == 1 and len(_RANGE.findall(parts[0])) == 1 and "{" not in _RANGE.sub("", parts[0]):
            match = _RANGE.search(parts[0])
            first, last = int(match.group(1)), int(match.group(2))
            self._lazy = (parts[0][: match.start()], parts[0][match.end():], first, len(match.group(1)))
            self._count = last - first + 1
        else:
            import braceexpand

            self._names = [name for part in parts for name in braceexpand.braceexpand(part)]
            self._count = len(self._names)
        if self._count < 1:
            raise ValueError(f"data.path {spec!r} expands to no shard")

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int) -> str:
        if not 0 <= index < self._count:
            raise IndexError(index)
        if self._lazy is None:
            return self._names[index]
        head, tail, first, width = self._lazy
        return f"{head}{first + index:0{width}d}{tail}"


def split_shards(train: ShardList, eval_fraction: float) -> tuple[range, range]:
    """Shard index ranges of the train and eval splits of one list: the last shards are held out."""
    n = len(train)
    n_eval = min(n - 1, max(1, round(n * eval_fraction))) if eval_fraction > 0 and n > 1 else 0
    return range(0, n - n_eval), range(n - n_eval, n)


def shard_sample_count(url: str) -> int | None:
    """Samples listed in the shard's index file (`<shard>.idx`, or `<stem>.idx`), None when it has none."""
    for index in (url + ".idx", os.path.splitext(url)[0] + ".idx"):
        try:
            with open(index) as f:
                head = f.readline().split()
            return int(head[1]) if len(head) == 2 and head[0].startswith("v") else None
        except (OSError, ValueError, IndexError):
            continue
    return None


def lane_plan(num_shards: int, seed: int, epoch: int, lane: int, num_lanes: int) -> list[list]:
    """Work items of `lane` in epoch `epoch`: every num_lanes-th position of the epoch's permutation."""
    permutation = FeistelPermutation(num_shards, seed, epoch=epoch)
    return [[epoch, permutation(p), 0, None] for p in range(lane, num_shards, num_lanes)]
