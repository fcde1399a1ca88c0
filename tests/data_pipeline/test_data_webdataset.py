"""The WebDataset reader: per-rank state, exact resume with 2 workers, dp2 -> dp3, corrupt data, memory."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import make_cfg

from gigatron.data_pipeline.loader import DataError, build_loader
from gigatron.data_pipeline.shard_writer import TarShardWriter


def ids_of(loader, n):
    return [loader.next_batch()["sample_ids"].tolist() for _ in range(n)]


def test_batches_are_normalised_images_with_labels(digit_shards):
    loader = build_loader(make_cfg(digit_shards["path"], num_workers=0), "train", 0, 1)
    batch = loader.next_batch()
    assert batch["images"].shape == (4, 3, 16, 16) and batch["images"].dtype == torch.float32
    assert batch["labels"].dtype == torch.int64 and batch["labels"].shape == (4,)
    # normalised with ImageNet statistics: the digits' black background maps to -mean/std
    assert batch["images"].min() < -1.5 and batch["images"].max() > 1.5
    assert loader.stats()["samples"] == 4 and loader.stats()["skipped_samples"] == 0


def test_two_ranks_resume_each_at_its_own_position(digit_shards):
    cfg = make_cfg(digit_shards["path"], num_workers=2)
    ranks = [build_loader(cfg, "train", r, 2) for r in range(2)]
    reference = [ids_of(build_loader(cfg, "train", r, 2), 9) for r in range(2)]
    steps = [2, 5]  # the ranks stop at different positions
    states = []
    for rank, loader in enumerate(ranks):
        assert ids_of(loader, steps[rank]) == reference[rank][: steps[rank]]
        states.append(loader.state_dict())
    assert states[0]["dp_rank"] == 0 and states[1]["batches"] == 5 and states[0] != states[1]
    json.dumps(states)  # plain python values only
    for rank in range(2):
        resumed = build_loader(cfg, "train", rank, 2)
        resumed.load_state_dict(states[rank])
        assert ids_of(resumed, 9 - steps[rank]) == reference[rank][steps[rank]:]


@pytest.mark.parametrize("stop", [3, 7, 13])  # mid-epoch, mid-shard, and across the epoch boundary
def test_resume_with_two_workers_is_exact(digit_shards, stop):
    cfg = make_cfg(digit_shards["path"], num_workers=2, B=3)
    uninterrupted = ids_of(build_loader(cfg, "train", 0, 1), 40)
    assert len({i for b in uninterrupted[:32] for i in b}) == 96  # first epoch: every sample once
    first = build_loader(cfg, "train", 0, 1)
    head = ids_of(first, stop)
    resumed = build_loader(cfg, "train", 0, 1)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert head + ids_of(resumed, 40 - stop) == uninterrupted
    other_seed = ids_of(build_loader(make_cfg(digit_shards["path"], num_workers=2, B=3, seed=8), "train", 0, 1), 3)
    assert other_seed != uninterrupted[:3]


def test_dp2_to_dp3_mid_epoch_sees_each_sample_once(digit_shards):
    cfg = make_cfg(digit_shards["path"], num_workers=2, B=2)
    seen = []
    old = [build_loader(cfg, "train", r, 2) for r in range(2)]
    for rank, loader in enumerate(old):
        for _ in range(5 + 2 * rank):  # mid-epoch, mid-shard, different positions per rank
            batch = loader.next_batch()
            seen += [(e, i) for e, i in zip(batch["epochs"].tolist(), batch["sample_ids"].tolist())]
    states = [loader.state_dict() for loader in old]
    new = [build_loader(cfg, "train", r, 3) for r in range(3)]
    for loader in new:
        loader.resume_from_layout(states)
    for loader in new:
        for _ in range(40):
            batch = loader.next_batch()
            seen += [(e, i) for e, i in zip(batch["epochs"].tolist(), batch["sample_ids"].tolist())]
    epoch0 = [i for e, i in seen if e == 0]
    assert len(epoch0) == 96 and len(set(epoch0)) == 96  # exactly once across the change
    assert sum(loader.stats()["samples"] for loader in new) == len(seen)  # old counters carried over
    epoch1 = [i for e, i in seen if e == 1]
    assert len(set(epoch1)) == len(epoch1)  # the next epoch, in the new layout, repeats nothing either


def _jpeg(array):
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(array).save(out, format="JPEG", quality=90)
    return out.getvalue()


@pytest.fixture(scope="module")
def corrupt_shards(digits_npz, tmp_path_factory):
    """10 shards x 10 real digits; one undecodable JPEG, one missing label, one pickle member, one cut tar."""
    with np.load(digits_npz) as arrays:
        images, labels = arrays["images"], arrays["labels"]
    out = str(tmp_path_factory.mktemp("corrupt"))
    bad = {13: "decode", 47: "missing", 71: "unsafe"}
    with TarShardWriter(out, "train", 10) as writer:
        for i in range(100):
            members = {"jpg": _jpeg(images[i % 96]), "cls": str(int(labels[i % 96])).encode()}
            if bad.get(i) == "decode":
                members["jpg"] = members["jpg"][:40] + b"\x00" * 30  # a JPEG header, then garbage
            elif bad.get(i) == "missing":
                del members["cls"]
            elif bad.get(i) == "unsafe":
                members["pyd"] = b"\x80\x04K\x01."  # a pickle: must never be loaded
            writer.write(f"s{i:05d}", members)
    shard = writer.shards[8]  # samples 80..89: cut inside the data of sample 86's jpg
    index = open(shard + ".idx").read().split("\n")[1:]
    fields = index[6].split()
    jpg_offset = int(fields[fields.index("jpg") + 1])
    with open(shard, "r+b") as f:
        f.truncate(jpg_offset + 100)
    good = {(s << 32) | k for s in range(10) for k in range(10) if (s * 10 + k) not in bad and not (s == 8 and k >= 6)}
    return writer.pattern, good


def test_corrupt_samples_are_skipped_and_counted(corrupt_shards):
    pattern, good = corrupt_shards
    cfg = make_cfg(pattern, num_workers=2, B=4, max_skip_fraction=0.5)
    loader = build_loader(cfg, "train", 0, 1)
    loader.epochs = 1  # one finite pass
    delivered = []
    while True:
        try:
            delivered += loader.next_batch()["sample_ids"].tolist()
        except StopIteration:
            break
    assert sorted(delivered) == sorted(good)  # every good sample exactly once, no good sample lost
    stats = loader.stats()
    assert stats["skipped_decode"] == 1 and stats["skipped_missing"] == 1 and stats["skipped_unsafe"] == 1
    assert stats["skipped_samples"] == 3 and stats["lost_samples"] == 4  # 86..89 past the cut
    assert stats["samples"] == len(good) == 93


def test_too_many_bad_samples_stop_with_a_clear_error(corrupt_shards):
    pattern, _ = corrupt_shards
    loader = build_loader(make_cfg(pattern, num_workers=0, B=4, max_skip_fraction=0.01, skip_check_after=10),
                          "train", 0, 1)
    with pytest.raises(DataError, match=r"samples were bad .* > data.max_skip_fraction=1\.00%; lost="):
        for _ in range(100):
            loader.next_batch()


def test_memory_and_open_shards_do_not_grow_with_the_shard_count(digit_shards, tmp_path):
    """Peak RSS of a reader over 10 shards vs 10,000 shard names (< 50 MB apart); <= 2 W shards opened early."""
    script = r"""
import os, resource, sys, builtins
sys.path.insert(0, {tests!r})
from conftest import make_cfg
from gigatron.data_pipeline.loader import build_loader
opened = []
real_open = builtins.open
log = {log!r}
def logging_open(path, *args, **kwargs):
    if isinstance(path, str) and path.endswith(".tar"):
        with real_open(log, "a") as f:
            f.write(path + "\n")
    return real_open(path, *args, **kwargs)
builtins.open = logging_open
loader = build_loader(make_cfg(sys.argv[1], num_workers=2, B=4, shuffle_buffer=4, max_skip_fraction=1.0), "train", 0, 1)
batch = loader.next_batch()
opened = len(real_open(log).read().split())
for _ in range(10):
    loader.next_batch()
loader.close()  # the workers exit, so RUSAGE_CHILDREN holds their peak RSS
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024, opened)
"""
    folder = os.path.dirname(digit_shards["path"])
    small = os.path.join(folder, "train-{000000..000009}.tar")
    large = os.path.join(tmp_path, "train-{000000..009999}.tar")  # 10,000 names
    for i in range(10000):  # 10 real shards repeated under 10,000 names (symlinks: no data copied)
        os.symlink(os.path.join(folder, f"train-{i % 12:06d}.tar"), os.path.join(tmp_path, f"train-{i:06d}.tar"))
    results = []
    for pattern in (small, large):
        log = str(tmp_path / f"open-{len(results)}.log")
        code = script.format(tests=os.path.dirname(__file__), log=log)
        out = subprocess.run([sys.executable, "-c", code, pattern], capture_output=True, text=True, check=True)
        results.append([int(x) for x in out.stdout.split()])
    (main_small, workers_small, opened_small), (main_large, workers_large, opened_large) = results
    assert abs(main_large - main_small) < 50 and abs(workers_large - workers_small) < 50, results
    assert workers_small > 0 and main_small > 0, results  # both were measured
    assert opened_small <= 4 and opened_large <= 4, results  # 2 x num_workers


def test_eval_split_holds_out_the_last_shards(digit_shards):
    cfg = make_cfg(digit_shards["path"], num_workers=0, eval_fraction=0.25)
    train = {i >> 32 for b in ids_of(build_loader(cfg, "train", 0, 1), 30) for i in b}
    held_out = {i >> 32 for b in ids_of(build_loader(cfg, "eval", 0, 1), 10) for i in b}
    assert train == set(range(9)) and held_out == {0, 1, 2}  # shard ids are local to the split (9, 10, 11)
    assert build_loader(cfg, "eval", 0, 1).shard_url(0).endswith("train-000009.tar")


def test_missing_and_empty_shards_lose_their_indexed_samples(digit_shards, tmp_path):
    from gigatron.data_pipeline.tar_reader import ShardEnd, read_tar_shard

    folder = os.path.dirname(digit_shards["path"])
    for name, make in (("empty", lambda p: open(p, "wb").close()), ("missing", lambda p: None)):
        path = str(tmp_path / f"{name}.tar")
        make(path)
        with open(os.path.join(folder, "train-000000.tar.idx")) as src, open(path + ".idx", "w") as dst:
            dst.write(src.read())  # its index lists 8 samples
        (end,) = list(read_tar_shard(path))
        assert isinstance(end, ShardEnd) and end.parsed == 0 and end.lost == 8 and end.error


def test_a_lane_with_no_readable_shard_stops_with_a_one_line_error(tmp_path):
    pattern = str(tmp_path / "none-{000000..000003}.tar")  # no such files
    loader = build_loader(make_cfg(pattern, num_workers=2, max_skip_fraction=1.0), "train", 0, 1)
    with pytest.raises(DataError) as err:
        loader.next_batch()
    assert "read no usable sample" in str(err.value) and "\n" not in str(err.value)


def test_changing_num_workers_keeps_exactly_once(digit_shards):
    two = build_loader(make_cfg(digit_shards["path"], num_workers=2, B=4), "train", 0, 1)
    seen = [(e, i) for b in (two.next_batch() for _ in range(7)) for e, i in zip(b["epochs"].tolist(), b["sample_ids"].tolist())]
    one = build_loader(make_cfg(digit_shards["path"], num_workers=1, B=4), "train", 0, 1)
    with pytest.raises(ValueError, match="resume_from_layout"):
        one.load_state_dict(two.state_dict())
    one.resume_from_layout([two.state_dict()])
    seen += [(e, i) for b in (one.next_batch() for _ in range(30)) for e, i in zip(b["epochs"].tolist(), b["sample_ids"].tolist())]
    epoch0 = [i for e, i in seen if e == 0]
    assert len(epoch0) == 96 == len(set(epoch0))
    same = build_loader(make_cfg(digit_shards["path"], num_workers=2, B=4), "train", 0, 1)
    same.resume_from_layout([two.state_dict()])  # unchanged layout: the same as load_state_dict
    again = build_loader(make_cfg(digit_shards["path"], num_workers=2, B=4), "train", 0, 1)
    again.load_state_dict(two.state_dict())
    assert [same.next_batch()["sample_ids"].tolist() for _ in range(3)] == [again.next_batch()["sample_ids"].tolist() for _ in range(3)]


def test_shards_stream_through_webdataset_gopen_urls(digit_shards):
    folder = os.path.dirname(digit_shards["path"])
    urls = ",".join(f"pipe:cat {folder}/train-{i:06d}.tar" for i in range(12))  # an object-store stand-in: a pipe
    local = build_loader(make_cfg(digit_shards["path"], num_workers=0), "train", 0, 1)
    piped = build_loader(make_cfg(urls, num_workers=0), "train", 0, 1)
    for _ in range(5):
        a, b = local.next_batch(), piped.next_batch()
        assert torch.equal(a["sample_ids"], b["sample_ids"]) and torch.equal(a["images"], b["images"])
