"""One lane's deterministic, resumable sample stream: shard plan -> shuffle buffer -> decoded samples.

A lane is one worker of one data-parallel rank (lane l = dp_rank * num_workers + worker, L lanes).
It reads the work items of its plan (`shards.lane_plan`) in order, puts raw samples into a buffer
of K samples, and emits one chosen by position: pick number n takes buffer slot
mix64(key ^ n) mod len(buffer) (key from seed and lane) and fills the slot with the last entry.
At the end of an epoch the buffer is drained, so an epoch's samples never mix with the next one's.

State, all plain ints and lists, O(K) in size and independent of the dataset size:
    epoch     the normal epoch being read (or, during a carry phase, the one that follows it)
    carry     None, or the work items left over from another layout (see `carry_over`)
    cursor    index of the work item being read in the carry list or the epoch plan
    in_item   samples already pulled from that item
    buffer    [[epoch, shard, index], ...]: the buffered samples, in slot order, by reference
    picks     picks so far (the buffer's random stream is a counter, not a generator state)
    counters  cumulative samples / skipped_<kind> / lost_samples of this lane
Resuming re-reads the referenced samples from their shards (the few shards the buffer spans),
then continues the item at `in_item`: the next emitted sample is the one that would have come.

Layout changes (`carry_over`): given every old lane's state, the remaining work of each epoch up
to E, the latest epoch any old lane has started, is (a) its buffered samples, grouped per shard
into explicit items, (b) the unread rest of its current item, (c) its unread items of that epoch,
(d) its whole plan of later epochs <= E. The concatenation over old lanes (in lane order) is dealt
round-robin to the new lanes as their carry; new lanes then read normal epochs from E + 1 on in the
new layout. So every sample of every epoch <= E is read exactly once, across the change.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from .decode import SampleError
from .sampler import GOLDEN64, MASK64, _mix64
from .shards import lane_plan
from .tar_reader import ShardEnd

__all__ = ["LaneStream", "carry_over", "fresh_lane_state"]


def fresh_lane_state(lane: int, num_lanes: int) -> dict:
    return {"lane": lane, "num_lanes": num_lanes, "epoch": 0, "carry": None, "cursor": 0, "in_item": 0,
            "buffer": [], "picks": 0, "counters": {}}


class LaneStream:
    """Decoded samples of one lane, forever (epoch after epoch).

    Args:
        num_shards: shards in this split; shard_url(i) gives shard i's location.
        read_shard: (url, start, wanted) -> iterator of (index, raw sample) then one ShardEnd.
        decode: (raw sample, rng) -> decoded sample dict, raising SampleError for bad data.
        seed: keys the shard permutations, the buffer picks and the per-sample crops.
        state: a `fresh_lane_state` or a saved `state_dict()`.
        buffer_size: K, samples in the shuffle buffer.
        epochs: stop after this many epochs (None: endless, for training).
    """

    def __init__(self, num_shards: int, shard_url: Callable[[int], str], read_shard: Callable, decode: Callable,
                 seed: int, state: dict, buffer_size: int, epochs: int | None = None):
        self.num_shards, self.shard_url, self.read_shard, self.decode = num_shards, shard_url, read_shard, decode
        self.seed, self.buffer_size, self.epochs = seed, max(1, buffer_size), epochs
        self.state = {**state, "counters": dict(state["counters"]), "buffer": []}
        lane, num_lanes = state["lane"], state["num_lanes"]
        self.pick_key = _mix64(_mix64(seed & MASK64) ^ ((lane + 1) * GOLDEN64 & MASK64) ^ num_lanes)
        self._plan_epoch, self._plan = None, []
        self._reader: Iterator | None = None
        self._buffer: list[tuple[list, dict]] = []  # (reference, raw sample)
        self._delivered_at_epoch_start = -1  # to detect passes that deliver nothing (no readable shard)
        self._restore_buffer(state["buffer"])

    # ---- work items -------------------------------------------------------------------------
    def _items(self) -> list[list]:
        if self.state["carry"] is not None:
            return self.state["carry"]
        epoch = self.state["epoch"]
        if self._plan_epoch != epoch:
            self._plan, self._plan_epoch = lane_plan(self.num_shards, self.seed, epoch, self.state["lane"],
                                                     self.state["num_lanes"]), epoch
        return self._plan

    def _count(self, key: str, n: int = 1) -> None:
        self.state["counters"][key] = self.state["counters"].get(key, 0) + n

    def _read_one(self) -> tuple[list, dict] | None:
        """The next raw sample of the current epoch (or carry) with its reference; None when it is done."""
        while True:
            items = self._items()
            if self.state["cursor"] >= len(items):
                return None
            epoch, shard, start, explicit = items[self.state["cursor"]]
            if self._reader is None:
                rest = explicit[self.state["in_item"]:] if explicit is not None else None
                self._reader = self.read_shard(self.shard_url(shard), start + (0 if rest is not None else self.state["in_item"]), rest)
            for got in self._reader:
                if isinstance(got, ShardEnd):
                    if got.error:
                        self._count("truncated_shards" if got.parsed else "unreadable_shards")
                    self._count("lost_samples", got.lost)
                    break
                index, raw = got
                self.state["in_item"] += 1
                return [epoch, shard, index], raw
            self._reader = None
            self.state["cursor"] += 1
            self.state["in_item"] = 0

    def _restore_buffer(self, references: list[list]) -> None:
        by_shard: dict[int, list[int]] = {}
        for _, shard, index in references:
            by_shard.setdefault(shard, []).append(index)
        found: dict[tuple[int, int], dict] = {}
        for shard, indices in by_shard.items():
            for got in self.read_shard(self.shard_url(shard), 0, sorted(indices)):
                if not isinstance(got, ShardEnd):
                    found[(shard, got[0])] = got[1]
        for reference in references:
            raw = found.get((reference[1], reference[2]))
            if raw is None:  # the shard changed or vanished since the checkpoint
                self._count("lost_samples")
                continue
            self._buffer.append((list(reference), raw))

    # ---- the stream -------------------------------------------------------------------------
    def _pull(self) -> tuple[list, dict] | None:
        while len(self._buffer) < self.buffer_size:
            got = self._read_one()
            if got is None:
                break
            self._buffer.append(got)
        if not self._buffer:
            return None
        slot = _mix64(self.pick_key ^ (self.state["picks"] * GOLDEN64 & MASK64)) % len(self._buffer)
        self.state["picks"] += 1
        chosen = self._buffer[slot]
        self._buffer[slot] = self._buffer[-1]
        self._buffer.pop()
        return chosen

    def _next_epoch(self) -> None:
        if self.state["carry"] is not None:
            self.state["carry"] = None  # the carried work is done; "epoch" is already the next one
        else:
            self.state["epoch"] += 1
        self.state["cursor"] = self.state["in_item"] = 0

    def __iter__(self) -> Iterator[dict]:
        empty_epochs = 0
        while True:
            got = self._pull()
            if got is None:
                delivered = self.state["counters"].get("samples", 0)
                self._next_epoch()
                if self.epochs is not None and self.state["epoch"] >= self.epochs and self.state["carry"] is None:
                    return  # a finite pass (evaluation, tests): stop after `epochs` epochs
                empty_epochs = empty_epochs + 1 if delivered == self._delivered_at_epoch_start else 0
                self._delivered_at_epoch_start = delivered
                if empty_epochs > 2:
                    from .loader import DataError

                    raise DataError(f"lane {self.state['lane']} read no usable sample in 3 passes over its shards; "
                                    f"check data.path (first shard: {self.shard_url(0)})")
                continue
            (epoch, shard, index), raw = got
            rng = np.random.default_rng([self.seed & MASK64, epoch, shard, index])
            try:
                sample = self.decode(raw, rng)
            except SampleError as err:
                self._count("skipped_samples")
                self._count(f"skipped_{err.kind}")
                continue
            self._count("samples")
            sample["sample_id"], sample["epoch"] = (shard << 32) | index, epoch
            yield sample

    def state_dict(self) -> dict:
        return {**self.state, "counters": dict(self.state["counters"]), "buffer": [list(ref) for ref, _ in self._buffer]}


def _remaining(state: dict, num_shards: int, seed: int, last_epoch: int) -> list[list]:
    """Work items an old lane has not yet delivered, for epochs <= last_epoch (see the module doc)."""
    items: list[list] = []
    by_shard: dict[tuple[int, int], list[int]] = {}
    for epoch, shard, index in state["buffer"]:
        by_shard.setdefault((epoch, shard), []).append(index)
    items += [[epoch, shard, 0, sorted(indices)] for (epoch, shard), indices in by_shard.items()]
    lane, num_lanes = state["lane"], state["num_lanes"]
    current = state["carry"] if state["carry"] is not None else lane_plan(num_shards, seed, state["epoch"], lane, num_lanes)
    cursor, in_item = state["cursor"], state["in_item"]
    if cursor < len(current):
        epoch, shard, start, explicit = current[cursor]
        if explicit is not None:
            if explicit[in_item:]:
                items.append([epoch, shard, 0, explicit[in_item:]])
        else:
            items.append([epoch, shard, start + in_item, None])
        items += [list(item) for item in current[cursor + 1:]]
    first_untouched = state["epoch"] if state["carry"] is not None else state["epoch"] + 1
    for epoch in range(first_untouched, last_epoch + 1):
        items += lane_plan(num_shards, seed, epoch, lane, num_lanes)
    return items


def carry_over(old_states: list[dict], num_shards: int, seed: int, num_lanes: int) -> list[dict]:
    """New lane states (for num_lanes lanes) that finish the old lanes' epochs exactly once."""
    last_epoch = max(s["epoch"] - (1 if s["carry"] is not None else 0) for s in old_states)
    work: list[list] = []
    for state in old_states:
        work += _remaining(state, num_shards, seed, last_epoch)
    new = [fresh_lane_state(lane, num_lanes) for lane in range(num_lanes)]
    for lane_state in new:
        lane_state["epoch"], lane_state["carry"] = last_epoch + 1, []
    for i, item in enumerate(work):
        new[i % num_lanes]["carry"].append(item)
    counters: dict[str, float] = {}  # the old totals continue on new lane 0, so global sums stay right
    for state in old_states:
        for key, value in state["counters"].items():
            counters[key] = counters.get(key, 0) + value
    new[0]["counters"] = counters
    return new
