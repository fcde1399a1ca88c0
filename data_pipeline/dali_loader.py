"""`data.format: dali`: NVIDIA DALI decodes and augments; GPU pipelines with a GPU, CPU ones without.

    fn.readers.webdataset (shard_id = dp_rank, num_shards = dp_size, shuffle buffer K, seeded)
      -> fn.decoders.image (device "mixed" = nvJPEG on a GPU, "cpu" otherwise)
      -> fn.random_resized_crop(S, area [crop_scale_min, 1], aspect [3/4, 4/3])
      -> fn.crop_mirror_normalize(float32, CHW, ImageNet mean / std)          -> "images" (B, 3, S, S)
    video (data.modality video, data.path = prepare-videos' vp9/file_list.txt):
    fn.experimental.readers.video (VP9 only on the CPU) -> random S x S crop, normalise -> "videos" (B, 3, F, S, S)

One interface for both devices: `device_id=None` builds DALI's CPU-only pipeline (no CUDA needed),
an integer builds the GPU one on that device (LOCAL_RANK); the batch comes back as CPU tensors on
the CPU path, CUDA tensors on the GPU path. data.num_workers is DALI's CPU thread count.

Resumption uses DALI's own checkpointing (`enable_checkpointing=True`, `pipeline.checkpoint()`):
it covers the reader's position and shuffle buffer and every random operator's state, and
corresponds to the last batch returned. The state keeps it base64-encoded (a plain str).

Bad data. DALI's reader needs the DALI index of every shard (prepare-images writes them) and
holds the per-sample offsets of its rank's shards (unlike the webdataset reader, which holds none).
Samples with a missing member are dropped by the reader (missing_component_behavior="skip") and
are not counted: DALI does not report them. A sample that does not decode fails its whole batch
(measured with DALI 2.4.0: "Critical error in pipeline"); the loader drops that batch, counts
it (skipped_batches, and its B samples in skipped_samples / skipped_decode) and runs the pipeline
again: the reader has moved past the batch, and the sequence that follows is deterministic (a
resume reproduces it) though its random crops differ from those of a clean run. Validate shards
at preparation to avoid losing the good samples of such a batch.

DP-size change: a DALI checkpoint belongs to one (shard_id, num_shards) layout, so
`resume_from_layout` starts the new layout at the beginning of a new epoch (seeded by the old
ranks' batch count): samples of the interrupted epoch may repeat or be missed. Exactly-once
across a dp change is a property of the webdataset and mds readers, not of this one.
"""

from __future__ import annotations

import base64
import os

import numpy as np
import torch

from .loader import check_skip_fraction
from .shard_loader import _split_urls

__all__ = ["DaliLoader", "build_dali_loader"]

MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]


def _image_pipeline(paths, batch_size, num_threads, device_id, seed, shard_id, num_shards, buffer_size,
                    size, scale_min, checkpoint=None):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(enable_checkpointing=True)
    def pipeline():
        jpegs, labels = fn.readers.webdataset(
            paths=paths, index_paths=[p + ".idx" for p in paths], ext=["jpg", "cls"], name="reader",
            random_shuffle=True, initial_fill=max(1, buffer_size), seed=seed, shard_id=shard_id,
            num_shards=num_shards, missing_component_behavior="skip", dtypes=[types.UINT8, types.UINT8])
        on_gpu = device_id is not None
        images = fn.decoders.image(jpegs, device="mixed" if on_gpu else "cpu", output_type=types.RGB)
        images = fn.random_resized_crop(images, size=(size, size), random_area=(scale_min, 1.0),
                                        random_aspect_ratio=(3 / 4, 4 / 3), seed=seed + 1)
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mean=MEAN, std=STD)
        return images, labels

    return _finish(pipeline, batch_size, num_threads, device_id, seed, checkpoint)


def _video_pipeline(paths, batch_size, num_threads, device_id, seed, shard_id, num_shards, buffer_size,
                    size, num_frames, labels, checkpoint=None):
    """VP9 clips (prepare-videos --vp9) -> "videos" (B, 3, F, S, S): a random S x S crop per clip."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(enable_checkpointing=True)
    def pipeline():
        video, label = fn.experimental.readers.video(
            device="cpu" if device_id is None else "gpu", filenames=paths, labels=labels, sequence_length=num_frames,
            random_shuffle=True, initial_fill=max(1, buffer_size), seed=seed, shard_id=shard_id,
            num_shards=num_shards, name="reader")
        video = fn.crop_mirror_normalize(video, dtype=types.FLOAT, output_layout="CFHW", crop=(size, size),
                                         crop_pos_x=fn.random.uniform(range=(0.0, 1.0), seed=seed + 1),
                                         crop_pos_y=fn.random.uniform(range=(0.0, 1.0), seed=seed + 2),
                                         mean=MEAN, std=STD)
        return video, label

    return _finish(pipeline, batch_size, num_threads, device_id, seed, checkpoint)


def _finish(pipeline, batch_size, num_threads, device_id, seed, checkpoint):
    kwargs = {"checkpoint": checkpoint} if checkpoint is not None else {}
    pipe = pipeline(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                    prefetch_queue_depth=2, **kwargs)
    pipe.build()
    return pipe


class DaliLoader:
    """One rank's DALI image reader (see the module docstring); implements the Loader protocol."""

    def __init__(self, paths: list[str], micro_batch_size: int, dp_rank: int, dp_size: int, num_threads: int,
                 seed: int, buffer_size: int, size: int, scale_min: float, num_labels: int = 0,
                 max_skip_fraction: float = 0.01, skip_check_after: int = 1000, device_id: int | None = None,
                 num_frames: int = 0, video_labels: list[int] | None = None):
        if len(paths) < dp_size:
            raise ValueError(f"dali: {len(paths)} shards cannot feed {dp_size} ranks")
        self.paths, self.micro_batch_size, self.dp_rank, self.dp_size = paths, micro_batch_size, dp_rank, dp_size
        self.num_threads, self.seed, self.buffer_size, self.size = max(1, num_threads), seed, buffer_size, size
        self.scale_min, self.num_labels, self.device_id = scale_min, num_labels, device_id
        self.max_skip_fraction, self.skip_check_after = max_skip_fraction, skip_check_after
        self.shard_of = {p: i for i, p in enumerate(paths)}
        self.num_frames, self.video_labels = num_frames, video_labels  # num_frames > 0: the VP9 video reader
        self.batches, self.counters = 0, {"samples": 0, "skipped_samples": 0, "lost_samples": 0}
        self.layout_epoch = 0  # > 0 after a dp change: a fresh seed for the new layout
        self._pipe = None
        self._checkpoint: bytes | None = None

    def _build(self) -> None:
        seed = (self.seed * 1_000_003 + self.dp_rank * 7919 + self.layout_epoch * 104_729) % (2 ** 31)
        if self.num_frames:
            self._pipe = _video_pipeline(self.paths, self.micro_batch_size, self.num_threads, self.device_id, seed,
                                         self.dp_rank, self.dp_size, self.buffer_size, self.size, self.num_frames,
                                         self.video_labels, self._checkpoint)
            return
        self._pipe = _image_pipeline(self.paths, self.micro_batch_size, self.num_threads, self.device_id, seed,
                                     self.dp_rank, self.dp_size, self.buffer_size, self.size, self.scale_min,
                                     self._checkpoint)

    def _count(self, key: str, n: int) -> None:
        self.counters[key] = self.counters.get(key, 0) + n

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self._pipe is None:
            self._build()
        for _ in range(100):
            try:
                images, labels = self._pipe.run()
                break
            except RuntimeError as err:  # one undecodable sample fails the whole batch: drop it, count it
                if "decod" not in str(err).lower():
                    raise
                self._count("skipped_batches", 1)
                self._count("skipped_samples", self.micro_batch_size)
                self._count("skipped_decode", self.micro_batch_size)
                check_skip_fraction(self.counters, self.max_skip_fraction, self.skip_check_after,
                                    f"data (dali, dp rank {self.dp_rank})")
        else:
            from .loader import DataError

            raise DataError(f"data (dali, dp rank {self.dp_rank}): 100 batches in a row failed to decode")
        self.batches += 1
        batch = self._to_batch(images, labels)
        self._count("samples", self.micro_batch_size)
        check_skip_fraction(self.counters, self.max_skip_fraction, self.skip_check_after,
                            f"data (dali, dp rank {self.dp_rank})")
        return batch

    def _to_batch(self, images, labels) -> dict[str, torch.Tensor]:
        if self.device_id is not None:
            images = images.as_cpu()  # TODO(data owner): hand the CUDA buffer over via DLPack, no copy
        pixels = torch.from_numpy(np.array(images.as_tensor()))  # (B, 3, S, S) or (B, 3, F, S, S) float32
        if self.device_id is not None:
            pixels = pixels.cuda(self.device_id, non_blocking=True)
        if self.num_frames:
            return {"videos": pixels, "labels": torch.from_numpy(np.array(labels.as_tensor()).reshape(-1).astype(np.int64)),
                    "sample_ids": torch.tensor([self.shard_of.get(labels[i].source_info().split(":")[0], -1)
                                                for i in range(len(labels))], dtype=torch.int64)}
        classes, ids = [], []
        for i in range(len(labels)):
            text = np.array(labels[i]).tobytes().decode(errors="replace")
            classes.append([int(c) for c in text.split(",") if c.strip().isdigit()])
            path, offset, _ = labels[i].source_info().rsplit(":", 2)
            ids.append((self.shard_of.get(path, -1) << 32) | (int(offset) // 512))
        batch = {"images": pixels, "sample_ids": torch.tensor(ids, dtype=torch.int64)}
        if self.num_labels > 0:
            multi_hot = torch.zeros(len(classes), self.num_labels)  # (B, K)
            for row, c in enumerate(classes):
                multi_hot[row, [x for x in c if x < self.num_labels]] = 1.0
            batch["labels"] = multi_hot
        else:
            batch["labels"] = torch.tensor([c[0] if c else -1 for c in classes], dtype=torch.int64)  # (B,)
        return batch

    def state_dict(self) -> dict:
        checkpoint = self._pipe.checkpoint() if self._pipe is not None else self._checkpoint
        return {"format": "dali", "dp_rank": self.dp_rank, "dp_size": self.dp_size, "seed": self.seed,
                "num_shards": len(self.paths), "batches": self.batches, "layout_epoch": self.layout_epoch,
                "counters": dict(self.counters),
                "checkpoint": base64.b64encode(checkpoint).decode() if checkpoint else ""}

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("dp_size", self.dp_size), ("seed", self.seed), ("num_shards", len(self.paths))):
            if state[key] != mine:
                raise ValueError(f"cannot resume dali: the checkpoint has {key}={state[key]}, this run has {mine}"
                                 + ("; use resume_from_layout" if key == "dp_size" else ""))
        self.batches, self.layout_epoch = int(state["batches"]), int(state["layout_epoch"])
        self.counters = dict(state["counters"])
        self._checkpoint = base64.b64decode(state["checkpoint"]) if state["checkpoint"] else None
        self._pipe = None

    def resume_from_layout(self, states: list[dict]) -> None:
        """New layout: a fresh epoch with a new seed (see the module docstring); counters continue on rank 0."""
        if len(states) == self.dp_size:
            self.load_state_dict(states[self.dp_rank])
            return
        self.layout_epoch = max(int(s["layout_epoch"]) for s in states) + 1
        self.batches, self._checkpoint, self._pipe = 0, None, None
        if self.dp_rank == 0:
            for s in states:
                for key, value in s["counters"].items():
                    self._count(key, value)

    def stats(self) -> dict[str, float]:
        return dict(self.counters)

    def close(self) -> None:
        self._pipe = None


def build_dali_loader(cfg, split: str, dp_rank: int, dp_size: int) -> DaliLoader:
    """`data.format: dali`: WebDataset shards with DALI index files (images: jpg + cls)."""
    d, t = cfg.data, cfg.train
    device_id = int(os.environ.get("LOCAL_RANK", "0")) if torch.cuda.is_available() else None
    if d.modality == "video":  # data.path: the file_list.txt of prepare-videos --vp9 ("path label" lines)
        with open(d.eval_path if split == "eval" and d.eval_path else d.path) as f:
            rows = [line.split() for line in f if line.strip()]
        return DaliLoader([r[0] for r in rows], t.micro_batch_size, dp_rank, dp_size, d.num_workers,
                          t.seed + (7919 if split == "eval" else 0), d.shuffle_buffer, d.image_size, 0.0, 0,
                          d.max_skip_fraction, d.skip_check_after, device_id, d.num_frames,
                          [int(r[1]) if len(r) > 1 else 0 for r in rows])
    shards, indices = _split_urls(d, split)
    return DaliLoader([shards[i] for i in indices], t.micro_batch_size, dp_rank, dp_size, d.num_workers,
                      t.seed + (7919 if split == "eval" else 0), d.shuffle_buffer, d.image_size, d.crop_scale_min,
                      d.num_labels, d.max_skip_fraction, d.skip_check_after, device_id)
