"""DALI's CPU pipeline (device_id=None) for real: normalised batches, exact resume with 2 threads, bad JPEGs."""

from __future__ import annotations

import json
import os

import torch
from conftest import make_cfg

import nvidia.dali  # noqa: F401  (a real dependency of the tests: CI must install it, see the README)

from gigatron.data_pipeline.loader import build_loader


def run(loader, n):
    return [loader.next_batch() for _ in range(n)]


def test_dali_cpu_batches_and_exact_resume(digit_shards):
    cfg = make_cfg(digit_shards["path"], format="dali", num_workers=2, B=4)
    reference = run(build_loader(cfg, "train", 0, 1), 10)
    batch = reference[0]
    assert batch["images"].shape == (4, 3, 16, 16) and batch["images"].dtype == torch.float32
    assert batch["images"].device.type == "cpu" and batch["labels"].dtype == torch.int64
    assert batch["labels"].min() >= 0 and batch["labels"].max() <= 9
    first_epoch = {i for b in reference[:6] for i in b["sample_ids"].tolist()}
    assert len(first_epoch) >= 20  # shuffled samples from many shards (24 drawn)
    first = build_loader(cfg, "train", 0, 1)
    run(first, 4)
    resumed = build_loader(cfg, "train", 0, 1)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for expected, got in zip(reference[4:], run(resumed, 6)):
        assert torch.equal(expected["sample_ids"], got["sample_ids"])
        assert torch.equal(expected["images"], got["images"])  # same crops: the random ops resume too


def test_dali_two_ranks_read_disjoint_halves(digit_shards):
    cfg = make_cfg(digit_shards["path"], format="dali", num_workers=1, B=4, shuffle_buffer=1)
    halves = [{i for b in run(build_loader(cfg, "train", r, 2), 12) for i in b["sample_ids"].tolist()} for r in range(2)]
    assert not halves[0] & halves[1] and len(halves[0]) == len(halves[1]) == 48


def test_dali_drops_and_counts_a_batch_that_fails_to_decode(tmp_path, digit_shards):
    import tarfile

    from gigatron.data_pipeline.shard_writer import TarShardWriter

    src = os.path.dirname(digit_shards["path"])
    writer = TarShardWriter(str(tmp_path), "train", 8)
    for shard in range(4):
        with tarfile.open(os.path.join(src, f"train-{shard:06d}.tar")) as tar:
            members = {}
            for m in tar:
                key, ext = m.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(m).read()
        for n, (key, sample) in enumerate(members.items()):
            if shard == 2 and n == 5:
                sample = {**sample, "jpg": sample["jpg"][:40] + b"\x00" * 30}
            writer.write(key, sample)
    writer.close()
    cfg = make_cfg(writer.pattern, format="dali", num_workers=2, B=4, max_skip_fraction=0.5)
    loader = build_loader(cfg, "train", 0, 1)
    batches = run(loader, 8)  # 32 samples = one epoch of 8 batches, one of which failed
    stats = loader.stats()
    assert stats["skipped_batches"] == 1 and stats["skipped_samples"] == 4 and stats["samples"] == 32
    assert all(torch.isfinite(b["images"]).all() for b in batches)
