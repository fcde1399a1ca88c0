"""The loader protocol every reader implements, and the registry that maps `data.format` to a reader.

A loader is one data-parallel rank's endless stream of micro-batches:

    loader = build_loader(cfg, split="train", dp_rank=r, dp_size=n)
    batch = loader.next_batch()          # dict[str, Tensor], one micro-batch (B = train.micro_batch_size)
    state = loader.state_dict()          # this rank's position: plain ints / strs / lists / dicts
    loader.load_state_dict(state)        # continue exactly after the last batch returned
    loader.stats()                       # cumulative counters for the step metrics, may be {}
    loader.resume_from_layout(states)    # optional: every old rank's state after a dp_size change

State is PER RANK: the trainer saves each data-parallel rank's `state_dict()` in the checkpoint and
hands it back to the same rank. When the layout changed (dp_size, or data.num_workers), it calls
`resume_from_layout(states)` instead, with the states of all old ranks in old dp-rank order; with
an unchanged layout `resume_from_layout(states)` is `load_state_dict(states[dp_rank])`, so a trainer
may simply always call it when the loader has it (the states are small: O(shuffle buffer) ints). Shard readers (webdataset, mds) then finish
the interrupted epoch(s) exactly once across the new ranks (see `data_pipeline/stream.py`), the
tokens reader needs only the (rank-independent) global sample count, DALI re-shards from the epoch
start (its checkpoints are per-layout; see `data_pipeline/dali_loader.py`).

Batch keys (B = train.micro_batch_size, S = data.image_size, F = data.num_frames):
    tokens      "input_ids" (B, T) int64, "labels" (B, T) int64, "document_ids" (B, T) int32
    images      "images" (B, 3, S, S) float32, CHW, normalised with ImageNet mean/std;
                "labels" (B,) int64 (from .cls), or (B, K) float32 multi-hot when data.num_labels = K > 0
    videos      "videos" (B, 3, F, S, S) float32, normalised like images; "labels" (B,) int64 when the
                clips carry .cls; "text_embeddings" (B, L, D) float32 when they carry emb.npy
    shard readers also give "sample_ids" (B,) int64 = shard_index << 32 | index in shard, and
                "epochs" (B,) int64: provenance, for deduplication checks and debugging
    mixture     the chosen source's keys, plus "source" (B,) int64 = index of the source in data.mixture

Stats (cumulative since step 0, summed over workers): "samples" read and delivered, "skipped_samples"
(refused: undecodable, missing field, wrong shape, unsafe member), one "skipped_<kind>" per kind,
"lost_samples" (listed in a shard's index but unreadable: past the cut of a truncated tar, or in a
missing shard). DALI adds "skipped_batches" (a decode failure fails its whole batch: dropped, and
its B samples counted as skipped). When (skipped + lost) / (samples + skipped + lost) exceeds
data.max_skip_fraction, after at least data.skip_check_after samples, `next_batch` raises DataError.

Readers are registered by name with the dotted path of their builder, imported only when used, so
importing the trainer imports no reader. A builder is `build(cfg, split, dp_rank, dp_size) -> Loader`
with `cfg` the whole recipe (`Config`) and split "train" or "eval".
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Protocol

import torch


class DataError(RuntimeError):
    """Too much bad data: `str(err)` is a complete one-line message for the user (no traceback needed)."""


class Loader(Protocol):
    def next_batch(self) -> dict[str, torch.Tensor]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    def stats(self) -> dict[str, float]: ...


FORMATS: dict[str, str | Callable] = {
    "tokens": "gigatron.data_pipeline.sampler:build_token_loader",
    "webdataset": "gigatron.data_pipeline.shard_loader:build_webdataset_loader",
    "mds": "gigatron.data_pipeline.mds:build_mds_loader",
    "dali": "gigatron.data_pipeline.dali_loader:build_dali_loader",
    "mixture": "gigatron.data_pipeline.mixture:build_mixture_loader",
}


def register_format(name: str, builder: str | Callable) -> None:
    """Add a reader: `builder` is a callable or a "module:function" path imported on first use."""
    FORMATS[name] = builder


def _resolve(builder: str | Callable) -> Callable:
    if callable(builder):
        return builder
    module, _, attr = builder.partition(":")
    return getattr(importlib.import_module(module), attr)


def check_skip_fraction(stats: dict[str, float], max_fraction: float, check_after: int, where: str) -> None:
    """Raise DataError when the bad share of the samples read so far exceeds `max_fraction`.

    fraction = (skipped + lost) / (delivered + skipped + lost), checked once that total >= check_after."""
    bad = stats.get("skipped_samples", 0) + stats.get("lost_samples", 0)
    total = stats.get("samples", 0) + bad
    if total >= max(1, check_after) and bad > max_fraction * total:
        kinds = ", ".join(f"{k[8:]}={int(v)}" for k, v in sorted(stats.items()) if k.startswith("skipped_") and k != "skipped_samples" and v)
        raise DataError(
            f"{where}: {int(bad)} of {int(total)} samples were bad ({bad / total:.2%} > data.max_skip_fraction="
            f"{max_fraction:.2%}; lost={int(stats.get('lost_samples', 0))}{', ' + kinds if kinds else ''}); "
            f"check the shards (prepare-images / prepare-videos validate them) or raise data.max_skip_fraction")


def build_loader(cfg: Any, split: str, dp_rank: int, dp_size: int) -> Loader:
    if cfg.data.format not in FORMATS:
        from gigatron.core.config_loader import ConfigError

        raise ConfigError("data.format", f"unknown reader {cfg.data.format!r}; choose one of {', '.join(FORMATS)}")
    return _resolve(FORMATS[cfg.data.format])(cfg, split, dp_rank, dp_size)
