"""The shard readers' loader: per-rank, per-worker lanes in background processes, exact resume.

    rank r, W workers --torch DataLoader (W processes, `prefetch` batches each)--> next_batch()
    worker w runs lane l = r * W + w (`stream.LaneStream`) and collates B samples per batch

torch's DataLoader returns the batches of its workers in strict rotation (0, 1, ..., W-1, 0, ...),
and every batch carries its lane's state after the batch, so the rank's state after batch k is
{W lane states as of their last returned batch, k mod W}. On resume, DataLoader worker i runs
lane (i + k mod W) mod W, so the rotation continues where it stopped. Loading overlaps compute:
workers fill up to W * prefetch batches while the model runs; the trainer measures the wait.

A change of dp_size (`resume_from_layout`) or of num_workers re-deals the unfinished work of every
old lane over the new lanes (`stream.carry_over`): each sample of the interrupted epoch is read
exactly once across the change. Memory: a lane holds its plan (shards / L integers for the
epoch), K raw samples and one open shard; nothing grows with the number of shards or samples.
"""

from __future__ import annotations

import atexit
import weakref

import numpy as np
import torch

from .decode import SampleDecoder
from .loader import DataError, check_skip_fraction
from .shards import ShardList, split_shards
from .stream import LaneStream, carry_over, fresh_lane_state
from .tar_reader import read_tar_shard

__all__ = ["ShardLoader", "build_webdataset_loader", "collate"]

MEAN = torch.tensor([0.485, 0.456, 0.406]) * 255  # ImageNet statistics, in uint8 units
STD = torch.tensor([0.229, 0.224, 0.225]) * 255


def normalise(pixels: np.ndarray) -> torch.Tensor:
    """(B, S, S, 3) or (B, F, S, S, 3) uint8 -> (B, 3, S, S) or (B, 3, F, S, S) float32, normalised."""
    x = torch.from_numpy(pixels)
    x = x.permute(0, 3, 1, 2) if x.ndim == 4 else x.permute(0, 4, 1, 2, 3)  # channels second, one permute per batch
    shape = (1, 3) + (1,) * (x.ndim - 2)
    out = torch.empty(x.shape, dtype=torch.float32).copy_(x)  # contiguous (B, 3, ...) float32
    return out.sub_(MEAN.view(shape)).div_(STD.view(shape))


def collate(samples: list[dict], num_labels: int) -> dict[str, torch.Tensor]:
    """Decoded samples -> one batch (keys in `data_pipeline/loader.py`)."""
    pixels = np.stack([s["pixels"] for s in samples])  # (B, S, S, 3) or (B, F, S, S, 3) uint8
    batch = {"images" if pixels.ndim == 4 else "videos": normalise(pixels)}
    if "label" in samples[0]:
        if num_labels > 0:
            labels = torch.zeros(len(samples), num_labels)  # (B, K) multi-hot
            for row, s in enumerate(samples):
                labels[row, s["label"]] = 1.0
            batch["labels"] = labels
        else:
            batch["labels"] = torch.tensor([s["label"] for s in samples], dtype=torch.int64)  # (B,)
    if "text" in samples[0]:
        length = max(s["text"].shape[0] for s in samples)
        text = torch.zeros(len(samples), length, samples[0]["text"].shape[1])  # (B, L, D), zero-padded
        for row, s in enumerate(samples):
            text[row, : s["text"].shape[0]] = torch.from_numpy(s["text"])
        batch["text_embeddings"] = text
        batch["text_lengths"] = torch.tensor([s["text"].shape[0] for s in samples], dtype=torch.int64)
    batch["sample_ids"] = torch.tensor([s["sample_id"] for s in samples], dtype=torch.int64)
    batch["epochs"] = torch.tensor([s["epoch"] for s in samples], dtype=torch.int64)
    return batch


_LIVE: "weakref.WeakSet[ShardLoader]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    """Stop every loader's workers at exit (a worker blocked on a full queue would delay the exit)."""
    for loader in list(_LIVE):
        loader.close()


class _Lanes(torch.utils.data.IterableDataset):
    """The dataset each DataLoader worker iterates: its lane's batches, with the lane state after each.

    It copies what the lanes need instead of holding the loader: loader -> iterator -> dataset ->
    loader would be a reference cycle, and a cycle collected late tears the worker queues down
    before the iterator can stop its workers (each then waits out a 5 s join timeout)."""

    def __init__(self, loader: "ShardLoader", rotation: int):
        self.rotation, self.lane_states = rotation, [dict(s) for s in loader.lane_states]
        self.stream_args = (loader.num_shards, loader.shard_url, loader.read_shard, loader.decode, loader.seed)
        self.buffer_size, self.epochs, self.num_labels = loader.buffer_size, loader.epochs, loader.num_labels
        self.micro_batch_size, self.num_lanes = loader.micro_batch_size, loader.num_lanes_per_rank

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = ((info.id if info is not None else 0) + self.rotation) % self.num_lanes
        stream = LaneStream(*self.stream_args, self.lane_states[worker], self.buffer_size, self.epochs)
        samples = []
        for sample in stream:
            samples.append(sample)
            if len(samples) == self.micro_batch_size:
                yield collate(samples, self.num_labels), stream.state_dict(), worker
                samples = []
        if samples:  # the end of a finite pass: a last, partial batch
            yield collate(samples, self.num_labels), stream.state_dict(), worker
        yield None, stream.state_dict(), worker  # the final counters of a finite pass


class ShardLoader:
    """One rank's loader over a shard list (see the module docstring); implements the Loader protocol.

    Args:
        shard_url, num_shards: the split's shards; read_shard: the format's shard reader.
        decode: raw sample -> decoded sample; micro_batch_size: B.
        dp_rank, dp_size: this rank's place; num_workers: W (0 = read in the main process, one lane).
        seed: the run's seed (train.seed); buffer_size: K; prefetch: batches each worker prepares ahead.
        epochs: None for an endless stream (training); n for a finite pass of n epochs (StopIteration
            at the end, the last batch may be partial; such a pass is not resumable after its end).
    """

    def __init__(self, shard_url, num_shards: int, read_shard, decode, micro_batch_size: int, dp_rank: int,
                 dp_size: int, num_workers: int, seed: int, buffer_size: int, prefetch: int = 2, num_labels: int = 0,
                 max_skip_fraction: float = 0.01, skip_check_after: int = 1000, name: str = "webdataset",
                 epochs: int | None = None):
        self.shard_url, self.num_shards, self.read_shard, self.decode = shard_url, num_shards, read_shard, decode
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        self.num_workers, self.num_lanes_per_rank = num_workers, max(1, num_workers)
        self.seed, self.buffer_size, self.prefetch, self.num_labels = seed, buffer_size, prefetch, num_labels
        self.max_skip_fraction, self.skip_check_after, self.name = max_skip_fraction, skip_check_after, name
        self.epochs = epochs  # None: endless (training); n: next_batch raises StopIteration after n epochs
        num_lanes = dp_size * self.num_lanes_per_rank
        if num_shards < num_lanes:
            raise ValueError(f"{name}: {num_shards} shards cannot feed dp_size x num_workers = {num_lanes} readers; "
                             f"write more, smaller shards or lower data.num_workers")
        first = dp_rank * self.num_lanes_per_rank
        self.lane_states = [fresh_lane_state(first + w, num_lanes) for w in range(self.num_lanes_per_rank)]
        self.batches = 0
        self._iterator = None
        _LIVE.add(self)

    # ---- protocol ---------------------------------------------------------------------------
    def next_batch(self) -> dict[str, torch.Tensor]:
        if self._iterator is None:
            self._start()
        batch, lane_state, worker = self._next()
        while batch is None:  # a lane finished its finite pass: keep its final counters
            self.lane_states[worker] = lane_state
            batch, lane_state, worker = self._next()
        expected = self.batches % self.num_lanes_per_rank
        if self.epochs is None and worker != expected:  # an endless stream keeps the strict rotation
            raise RuntimeError(f"batch from worker {worker}, expected {expected}: DataLoader order broken")
        self.lane_states[worker] = lane_state
        self.batches += 1
        check_skip_fraction(self.stats(), self.max_skip_fraction, self.skip_check_after,
                            f"data ({self.name}, dp rank {self.dp_rank})")
        return batch

    def state_dict(self) -> dict:
        return {"format": self.name, "dp_rank": self.dp_rank, "dp_size": self.dp_size,
                "num_workers": self.num_lanes_per_rank, "seed": self.seed, "num_shards": self.num_shards,
                "batches": self.batches, "lanes": [dict(s) for s in self.lane_states]}

    def load_state_dict(self, state: dict) -> None:
        self._check(state)
        if state["dp_size"] != self.dp_size or state["num_workers"] != self.num_lanes_per_rank:
            raise ValueError(f"{self.name}: the state was saved with dp_size={state['dp_size']}, num_workers="
                             f"{state['num_workers']}; this run has {self.dp_size}, {self.num_lanes_per_rank}: "
                             f"use resume_from_layout with every old rank's state")
        self._stop()
        self.lane_states, self.batches = [dict(s) for s in state["lanes"]], int(state["batches"])

    def resume_from_layout(self, states: list[dict]) -> None:
        """Continue from every old rank's state (old dp-rank order) under this run's dp_size / num_workers.

        The unfinished work of the old lanes (their buffers, open shards and unread shards of the
        epochs they had started) is dealt round-robin over all new lanes; afterwards every lane reads
        normal epochs in the new layout. Each sample of the interrupted epoch(s) is delivered exactly
        once over all new ranks; the per-rank sequence differs from an uninterrupted run's."""
        for state in states:
            self._check(state)
        if len(states) == self.dp_size and all(s["num_workers"] == self.num_lanes_per_rank for s in states):
            self.load_state_dict(states[self.dp_rank])
            return
        old_lanes = [lane for state in states for lane in state["lanes"]]
        new_lanes = carry_over(old_lanes, self.num_shards, self.seed, self.dp_size * self.num_lanes_per_rank)
        first = self.dp_rank * self.num_lanes_per_rank
        self._stop()
        self.lane_states, self.batches = new_lanes[first:first + self.num_lanes_per_rank], 0

    def stats(self) -> dict[str, float]:
        total: dict[str, float] = {}
        for state in self.lane_states:
            for key, value in state["counters"].items():
                total[key] = total.get(key, 0) + value
        total.setdefault("samples", 0)
        total.setdefault("skipped_samples", 0)
        total.setdefault("lost_samples", 0)
        return total

    # ---- internals --------------------------------------------------------------------------
    def _next(self):
        try:
            return next(self._iterator)
        except DataError as err:  # raised in a worker: torch re-raises it with the worker's traceback
            lines = [line for line in str(err).splitlines() if "DataError: " in line]
            raise DataError(lines[-1].split("DataError: ", 1)[1] if lines else str(err).splitlines()[0]) from None

    def _check(self, state: dict) -> None:
        for key, mine in (("seed", self.seed), ("num_shards", self.num_shards)):
            if state[key] != mine:
                raise ValueError(f"cannot resume {self.name}: the checkpoint has {key}={state[key]}, this run has "
                                 f"{mine}; the sample order depends on it")

    def _start(self) -> None:
        dataset = _Lanes(self, rotation=self.batches % self.num_lanes_per_rank)
        if self.num_workers == 0:
            self._iterator = iter(dataset)
        else:
            self._iterator = iter(torch.utils.data.DataLoader(
                dataset, batch_size=None, num_workers=self.num_workers, prefetch_factor=self.prefetch,
                multiprocessing_context="fork", persistent_workers=False))

    def _stop(self) -> None:
        shutdown = getattr(self._iterator, "_shutdown_workers", None)  # a DataLoader's multiprocess iterator
        if shutdown is not None:
            shutdown()
        self._iterator = None

    def close(self) -> None:
        self._stop()


def _split_urls(data, split: str) -> tuple[ShardList, range]:
    if split == "eval" and data.eval_path:
        shards = ShardList(data.eval_path)
        return shards, range(len(shards))
    shards = ShardList(data.path)
    if data.eval_path:
        return shards, range(len(shards))
    train, held_out = split_shards(shards, data.eval_fraction)
    return shards, (held_out if split == "eval" else train)


def build_webdataset_loader(cfg, split: str, dp_rank: int, dp_size: int) -> ShardLoader:
    """`data.format: webdataset`: tar shards of images (jpg/png + cls) or videos (frames.npy or mp4 + cls)."""
    d, t = cfg.data, cfg.train
    shards, indices = _split_urls(d, split)
    if len(indices) == 0:
        raise ValueError(f"data.path {d.path!r} has no shard for the {split} split")
    decoder = SampleDecoder(d.modality, d.image_size, d.crop_scale_min, d.num_frames,
                            d.label_key, d.num_labels, d.text_embeddings)
    offset = indices.start
    return ShardLoader(lambda i: shards[offset + i], len(indices), read_tar_shard, decoder, t.micro_batch_size,
                       dp_rank, dp_size, d.num_workers, t.seed + (7919 if split == "eval" else 0), d.shuffle_buffer,
                       d.prefetch, d.num_labels, d.max_skip_fraction, d.skip_check_after, "webdataset")
