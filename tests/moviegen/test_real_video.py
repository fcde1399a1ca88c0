"""The real-video path end to end, short (benchmarks/bench_moviegen_video.py is the long run): real
clips through prepare-videos (text embeddings precomputed) and the streaming webdataset reader,
the debug recipe trained 12 steps with the EMA on, then `gigatron sample` from the checkpoint:
the loss falls, and the sampler writes a PNG grid and an H.264 file of the requested size."""

import json
import os

import numpy as np
import pytest

from gigatron.core.cli import main as cli
from tests.distributed import run_distributed
from tests.moviegen.harness import RECIPE

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _train(rank, world_size, args):
    from gigatron.core.train import main

    return main(args)


def test_train_on_real_clips_then_sample(clip_shards, tmp_path):
    run = tmp_path / "run"
    sets = [f"data.path={clip_shards['path']}", f"run.dir={run}", "train.steps=12", "train.warmup_steps=2",
            "run.progress=false", "data.shuffle_buffer=16"]
    assert run_distributed(_train, 1, [RECIPE, *sum((["--set", s] for s in sets), [])]) == [0]
    losses = [json.loads(line)["loss"] for line in open(run / "metrics.jsonl")]
    # 12 noisy single-batch losses: the last 3 average ~0.8 of the first 3 (zero-initialised output, lr 2e-3)
    assert len(losses) == 12 and np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3]), losses
    out = tmp_path / "samples"
    assert cli(["sample", str(run), "--prompt", "big buck bunny", "--prompt", "bunny square", "--steps", "3",
                "--frames", "4", "--height", "16", "--width", "24", "--out", str(out)]) == 0
    from PIL import Image

    assert Image.open(out / "samples.png").size[1] > 2 * 16
    import av

    with av.open(str(out / "sample_1.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 4 and frames[0].shape == (16, 24, 3)
    assert cli(["sample", str(tmp_path / "nowhere"), "--prompt", "x"]) == 2  # one line, no traceback
