"""Shape buckets: clips of several durations and aspect ratios trained together, as Movie Gen trains.

Every clip is assigned to the bucket (frames, height, width) of the longest duration it can fill
and the aspect ratio nearest to its own (in log ratio), then resized to cover the bucket and
centre-cropped to it (`fit`). A micro-batch holds clips of ONE bucket: samples wait in a queue per
bucket, and a batch leaves as soon as one queue holds B clips. Every tp / cp / pp rank of a
data-parallel rank reads the same stream (core/train.py), so they form identical batches: every
rank of a TP/CP group sees the same shape, with no collective. A token count that cp does not
divide is padded by context parallelism (parallel/context.py) and masked out.

`data.format: video_buckets` (registered by the moviegen family): the webdataset reader, one clip
at a time, bucketed here. The buckets derive from data.num_frames F and data.image_size S:
durations F and F/2, aspect ratios 1:1, 9:16 and 16:9 at about S^2 pixels, sides rounded to
`multiple` pixels (patch x pixel downsample: 2 x model.patch_hw x model.pixel_downsample).

Exact resume: the state is the inner reader's state as of just before the oldest clip still
waiting in a queue, plus the ids of the clips read since then that already left in a batch; a
resumed loader rewinds the reader there and skips those, so its queues refill exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .decode import CLIP_EXTENSIONS, SampleDecoder, SampleError, decode_clip, load_array

ASPECTS = (1.0, 9 / 16, 16 / 9)  # height / width


@dataclass(frozen=True)
class Bucket:
    frames: int
    height: int
    width: int


def make_buckets(frames: int, size: int, multiple: int, aspects=ASPECTS) -> list[Bucket]:
    """Durations `frames` and `frames // 2` x the aspect ratios, each at about size^2 pixels."""
    out = []
    for f in sorted({frames, max(1, frames // 2)}, reverse=True):
        for a in aspects:
            h = max(multiple, round(size * math.sqrt(a) / multiple) * multiple)
            w = max(multiple, round(size / math.sqrt(a) / multiple) * multiple)
            out.append(Bucket(f, h, w))
    return out


def assign(frames: int, height: int, width: int, buckets: list[Bucket]) -> Bucket | None:
    """The bucket of a clip of frames x height x width: the longest duration it fills, then the
    nearest aspect ratio. None: shorter than every bucket."""
    fitting = [b for b in buckets if b.frames <= frames]
    if not fitting:
        return None
    longest = max(b.frames for b in fitting)
    ratio = math.log(height / width)
    return min((b for b in fitting if b.frames == longest), key=lambda b: abs(math.log(b.height / b.width) - ratio))


def fit(clip: np.ndarray, bucket: Bucket) -> np.ndarray:
    """(F, H, W, 3) uint8 -> (bucket.frames, bucket.height, bucket.width, 3) uint8: the first frames,
    resized (bilinear) to cover the bucket, centre-cropped."""
    x = torch.from_numpy(np.ascontiguousarray(clip[: bucket.frames])).permute(0, 3, 1, 2).float()  # (F, 3, H, W)
    scale = max(bucket.height / x.shape[2], bucket.width / x.shape[3])
    size = (max(bucket.height, round(x.shape[2] * scale)), max(bucket.width, round(x.shape[3] * scale)))
    if size != tuple(x.shape[2:]):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    top, left = (size[0] - bucket.height) // 2, (size[1] - bucket.width) // 2
    x = x[:, :, top:top + bucket.height, left:left + bucket.width]
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


class BucketDecoder(SampleDecoder):
    """The video decoder with the clip fitted to its bucket instead of a square random crop."""

    def __init__(self, buckets: list[Bucket], **kwargs):
        super().__init__(modality="video", **kwargs)
        self.buckets = buckets

    def _video(self, sample: dict, rng: np.random.Generator) -> np.ndarray:
        if "frames.npy" in sample:
            frames = load_array(sample["frames.npy"])
        else:
            key = next((k for k in CLIP_EXTENSIONS if k in sample), None)
            if key is None:
                raise SampleError("missing", f"no frames.npy or clip member (has {', '.join(sorted(sample))})")
            frames = decode_clip(sample[key], max(b.frames for b in self.buckets))
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise SampleError("shape", f"frames are {frames.dtype} {frames.shape}, need uint8 (F, H, W, 3)")
        bucket = assign(*frames.shape[:3], self.buckets)
        if bucket is None:
            raise SampleError("shape", f"{frames.shape[0]} frames is shorter than every bucket")
        return fit(frames, bucket)


def _merge(batches: list[dict]) -> dict:
    out = {}
    for key in batches[0]:
        values = [b[key] for b in batches]
        if key == "text_embeddings":  # prompts of different lengths: zero-pad to the longest
            length = max(v.shape[1] for v in values)
            values = [F.pad(v, (0, 0, 0, length - v.shape[1])) for v in values]
        out[key] = torch.cat(values)
    return out


class BucketedLoader:
    """Micro-batches of B clips of one bucket, from an inner loader of one clip per batch."""

    def __init__(self, inner, micro_batch_size: int):
        self.inner, self.B = inner, micro_batch_size
        self.queues: dict[tuple, list[tuple[dict, dict, int]]] = {}  # shape -> [(clip, inner state before it, read no)]
        self.emitted: list[tuple[int, int]] = []  # (read no, clip id) of clips that left in a batch
        self.skip: set[int] = set()  # after a resume: clips that already left before the checkpoint
        self.reads = 0

    @staticmethod
    def _id(clip: dict) -> int:
        return int(clip["sample_ids"][0]) ^ (int(clip["epochs"][0]) << 40)

    def next_batch(self) -> dict:
        while True:
            before = self.inner.state_dict()
            clip = self.inner.next_batch()
            self.reads += 1
            if self._id(clip) in self.skip:
                self.skip.discard(self._id(clip))
                self.emitted.append((self.reads, self._id(clip)))
                continue
            shape = tuple(clip["videos"].shape[2:])
            queue = self.queues.setdefault(shape, [])
            queue.append((clip, before, self.reads))
            if len(queue) == self.B:
                del self.queues[shape]
                self.emitted += [(n, self._id(c)) for c, _, n in queue]
                oldest = self._oldest()
                self.emitted = [e for e in self.emitted if oldest is not None and e[0] > oldest[2]]
                return _merge([c for c, _, _ in queue])

    def _oldest(self):
        waiting = [entry for queue in self.queues.values() for entry in queue]
        return min(waiting, key=lambda e: e[2]) if waiting else None

    def state_dict(self) -> dict:
        oldest = self._oldest()
        if oldest is None:
            return {"inner": self.inner.state_dict(), "emitted": []}
        return {"inner": oldest[1], "emitted": [sid for n, sid in self.emitted if n > oldest[2]]}

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state["inner"])
        self.queues, self.emitted, self.skip, self.reads = {}, [], set(state["emitted"]), 0

    def stats(self) -> dict:
        return self.inner.stats()

    def close(self) -> None:
        if hasattr(self.inner, "close"):
            self.inner.close()


def build_bucket_loader(cfg, split: str, dp_rank: int, dp_size: int) -> BucketedLoader:
    """`data.format: video_buckets`: the webdataset shards, bucketed (see the module docstring)."""
    from .shard_loader import ShardLoader, _split_urls
    from .tar_reader import read_tar_shard

    d, t, m = cfg.data, cfg.train, cfg.model
    multiple = 2 * getattr(m, "patch_hw", 1) * getattr(m, "pixel_downsample", 1)
    buckets = make_buckets(d.num_frames, d.image_size, multiple)
    shards, indices = _split_urls(d, split)
    if len(indices) == 0:
        raise ValueError(f"data.path {d.path!r} has no shard for the {split} split")
    decoder = BucketDecoder(buckets, label_key=d.label_key, num_labels=d.num_labels, text_embeddings=d.text_embeddings)
    offset = indices.start
    inner = ShardLoader(lambda i: shards[offset + i], len(indices), read_tar_shard, decoder, 1, dp_rank, dp_size,
                        d.num_workers, t.seed + (7919 if split == "eval" else 0), d.shuffle_buffer, d.prefetch,
                        d.num_labels, d.max_skip_fraction, d.skip_check_after, "video_buckets")
    return BucketedLoader(inner, t.micro_batch_size)
