"""Mixtures: weighted per-batch choice of sources (images + tokens), deterministic, exact resume, dp change."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import make_cfg

from gigatron.data_pipeline.config import SourceConfig
from gigatron.data_pipeline.loader import build_loader
from gigatron.data_pipeline.token_shards import TokenShardWriter


@pytest.fixture(scope="module")
def token_prefix(tmp_path_factory):
    rng = np.random.default_rng(0)
    prefix = str(tmp_path_factory.mktemp("tokens") / "data")
    with TokenShardWriter(prefix, "bytes", 258) as writer:
        for _ in range(60):
            writer.add_document([256, *rng.integers(0, 256, size=int(rng.integers(1, 40))).tolist(), 257])
    return prefix


def mixture_cfg(digit_shards, token_prefix, weights=(0.5, 0.3, 0.2), **data):
    folder = os.path.dirname(digit_shards["path"])
    sources = [SourceConfig("webdataset", os.path.join(folder, "train-{000000..000005}.tar"), weights[0]),
               SourceConfig("webdataset", os.path.join(folder, "train-{000006..000011}.tar"), weights[1]),
               SourceConfig("tokens", token_prefix, weights[2])]
    return make_cfg("", format="mixture", mixture=sources, **data)


def signature(batch):
    return (int(batch["source"][0]), (batch["sample_ids"] if "sample_ids" in batch else batch["input_ids"][:, 0]).tolist())


def test_mixture_follows_the_weights_and_resumes_exactly(digit_shards, token_prefix):
    cfg = mixture_cfg(digit_shards, token_prefix, num_workers=2)
    reference = [signature(b) for b in (lambda l: [l.next_batch() for _ in range(30)])(build_loader(cfg, "train", 0, 1))]
    counts = np.bincount([s for s, _ in reference], minlength=3)
    assert all(counts > 0) and counts[0] > counts[2]  # 0.5 vs 0.2 over 30 batches (expected 15 vs 6)
    first = build_loader(cfg, "train", 0, 1)
    head = [signature(first.next_batch()) for _ in range(11)]
    resumed = build_loader(cfg, "train", 0, 1)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert head + [signature(resumed.next_batch()) for _ in range(19)] == reference
    stats = resumed.stats()
    assert stats["batches_0_webdataset"] + stats["batches_1_webdataset"] + stats["batches_2_tokens"] == 30


def test_mixture_choice_is_a_fair_weighted_draw():
    from gigatron.data_pipeline.mixture import MixtureLoader

    mixture = MixtureLoader([object()] * 3, [0.6, 0.3, 0.1], seed=1, dp_rank=0, names=["a", "b", "c"])
    share = np.bincount([mixture.choose(k) for k in range(20000)], minlength=3) / 20000
    assert np.allclose(share, [0.6, 0.3, 0.1], atol=0.015)  # 20k draws: std ~0.0035


def test_mixture_dp2_to_dp3_sees_each_image_once(digit_shards, token_prefix):
    cfg = mixture_cfg(digit_shards, token_prefix, weights=(0.5, 0.5, 0.0), num_workers=1, B=2)
    seen = []
    old = [build_loader(cfg, "train", r, 2) for r in range(2)]
    for loader in old:
        for _ in range(6):
            b = loader.next_batch()
            seen += [(int(b["source"][0]), e, i) for e, i in zip(b["epochs"].tolist(), b["sample_ids"].tolist())]
    new = [build_loader(cfg, "train", r, 3) for r in range(3)]
    for loader in new:
        loader.resume_from_layout([l.state_dict() for l in old])
        for _ in range(30):
            b = loader.next_batch()
            seen += [(int(b["source"][0]), e, i) for e, i in zip(b["epochs"].tolist(), b["sample_ids"].tolist())]
    for source in (0, 1):
        epoch0 = [i for s, e, i in seen if s == source and e == 0]
        assert sorted(epoch0) == sorted(set(epoch0)) and len(epoch0) == 48


def test_every_rank_draws_the_same_source_per_step(digit_shards, token_prefix):
    cfg = mixture_cfg(digit_shards, token_prefix, num_workers=0)
    ranks = [build_loader(cfg, "train", r, 2) for r in range(2)]
    sources = [[int(l.next_batch()["source"][0]) for _ in range(12)] for l in ranks]
    assert sources[0] == sources[1] and len(set(sources[0])) == 3
