"""Shape buckets on real clips (tests/moviegen/conftest.py: three shapes through prepare-videos): assignment, one shape per
micro-batch, the same batches for every reader of one dp rank (the ranks of a TP/CP group), and an
exact resume with clips still waiting in the queues."""

import numpy as np
import torch

from gigatron.data_pipeline.buckets import Bucket, BucketDecoder, BucketedLoader, assign, fit, make_buckets


def test_assign_and_fit():
    buckets = make_buckets(8, 32, 8)
    assert Bucket(8, 32, 32) in buckets and Bucket(4, 24, 40) in buckets and Bucket(8, 40, 24) in buckets
    assert assign(10, 90, 160, buckets) == Bucket(8, 24, 40)   # landscape, long enough for 8 frames
    assert assign(5, 160, 90, buckets) == Bucket(4, 40, 24)    # portrait, only 4 frames
    assert assign(3, 32, 32, buckets) is None
    clip = np.random.default_rng(0).integers(0, 255, (10, 90, 160, 3), dtype=np.uint8)
    out = fit(clip, Bucket(8, 24, 40))
    assert out.shape == (8, 24, 40, 3) and out.dtype == np.uint8
    assert abs(float(out.mean()) - float(clip[:8].mean())) < 3  # a resize, not garbage


def _loader(summary, seed=0):
    from gigatron.data_pipeline.shard_loader import ShardLoader
    from gigatron.data_pipeline.shards import ShardList
    from gigatron.data_pipeline.tar_reader import read_tar_shard

    shards = ShardList(summary["path"])
    decoder = BucketDecoder(make_buckets(4, 16, 4), label_key="")
    inner = ShardLoader(lambda i: shards[i], len(shards), read_tar_shard, decoder, 1, 0, 1, 0, seed, 8)
    return BucketedLoader(inner, 2)


def test_batches_have_one_shape_and_resume_exactly(clip_shards):
    a, b = _loader(clip_shards), _loader(clip_shards)
    shapes = set()
    for i in range(12):
        if i >= 3 and any(q for q in a.queues.values()):
            break
        x, y = a.next_batch(), b.next_batch()
        assert torch.equal(x["videos"], y["videos"])  # every reader of the dp rank: the same batch
        shapes.add(tuple(x["videos"].shape))
        assert x["videos"].shape[0] == 2
    assert len(shapes) >= 2, shapes  # several buckets in play
    assert any(q for q in a.queues.values()), "the resume below must start with clips waiting"
    state = a.state_dict()
    expected = [a.next_batch() for _ in range(4)]
    c = _loader(clip_shards)
    c.load_state_dict(state)
    for want in expected:
        got = c.next_batch()
        assert torch.equal(want["sample_ids"], got["sample_ids"]) and torch.equal(want["videos"], got["videos"])
