"""Emu Video end to end on real clips (benchmarks/bench_emu_video.py is the long run): prepare-videos
-> the three-stage debug recipe, shortened (image model 10 steps, video model 4 frames 10 steps,
8 frames 5 steps), each stage starting from the last one's checkpoint, in one process through
`gigatron train`'s entry -> `gigatron sample RUN --prompt ...`: the image stage's checkpoint makes the
first frame, the video stage's continues it, into a PNG and an H.264 clip. The image stage's loss
falls; the video stage starts from the trained image model (its first loss is far below the image
model's first loss, which started from a zero head)."""

import json
import os

import numpy as np
import pytest
import yaml

from gigatron.core.cli import main as cli
from tests.distributed import run_distributed
from tests.emu_video.harness import RECIPE

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _train(rank, world_size, args):
    from gigatron.core.train import main

    return main(args)


def test_three_stages_on_real_clips_then_the_two_step_sample(emu_clip_shards, tmp_path):
    recipe = yaml.safe_load(open(RECIPE))
    recipe["train"].update(steps=25, warmup_steps=2)
    recipe["stages"][0]["until_step"], recipe["stages"][1]["until_step"] = 10, 20
    recipe["checkpoint"]["interval"] = 5
    path, run = tmp_path / "recipe.yaml", str(tmp_path / "run")
    path.write_text(yaml.safe_dump(recipe))
    sets = [f"data.path={emu_clip_shards['path']}", f"run.dir={run}", "run.progress=false", "data.shuffle_buffer=8"]
    assert run_distributed(_train, 1, [str(path), *sum((["--set", s] for s in sets), [])]) == [0]
    records = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    by_stage = {}
    for r in records:
        by_stage.setdefault(r["stage"], []).append(r["loss"])
    assert {k: len(v) for k, v in by_stage.items()} == {"image": 10, "video": 10, "video_long": 5}
    image, video = by_stage["image"], by_stage["video"]
    assert np.mean(image[-3:]) < 0.9 * np.mean(image[:3]), image  # measured 0.83
    assert video[0] < 0.8 * image[0], (image, video)
    for stage in ("image", "video", "video_long"):
        assert os.path.exists(os.path.join(run, "checkpoints", stage, "latest"))
    out = tmp_path / "samples"
    assert cli(["sample", run, "--prompt", "big buck bunny", "--prompt", "a bunny", "--steps", "4", "--frames", "8",
                "--height", "16", "--width", "16", "--out", str(out)]) == 0
    from PIL import Image

    assert Image.open(out / "samples.png").size[1] > 2 * 16  # two rows: first frame | gap | 8 frames
    import av

    with av.open(str(out / "sample_1.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 8 and frames[0].shape == (16, 16, 3)
    image_ckpt = os.path.join(run, "checkpoints", "image", "step_00000010")
    assert cli(["sample", image_ckpt, "--prompt", "x", "--out", str(out)]) == 2  # one line: not a video model
