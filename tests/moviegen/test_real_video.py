"""The real-video path end to end, with exact resume (benchmarks/bench_moviegen_video.py is the long
run): real clips (tests/moviegen/conftest.py) through prepare-videos, text embeddings precomputed,
read by the streaming webdataset reader; the debug recipe under cp2 (ring attention, FSDP over cp)
with the EMA on, trained 10 steps, versus the same run SIGKILLed (torchrun and every rank) right
after its step-5 checkpoint and auto-resumed from `latest`: the step-10 weights, AdamW state and EMA
are bitwise equal (noise, t and text dropout are keyed by the clips' ids, core/rng.py; the reader's
position and the EMA are in the checkpoint; same pattern as tests/core/test_checkpoint_resume.py).
The loss falls, and `gigatron sample` on the checkpoint writes a PNG grid and an H.264 file."""

import json
import os

import numpy as np
import pytest
import torch

from gigatron.core.checkpoint.reader import CheckpointReader
from gigatron.core.cli import main as cli
from tests.distributed import run_distributed, train_until_then_kill
from tests.moviegen.harness import RECIPE, ROOT

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _args(run_dir, data_path):
    sets = [f"data.path={data_path}", f"run.dir={run_dir}", "train.steps=10", "checkpoint.interval=5",
            "train.warmup_steps=2", "parallel.cp=2", "run.progress=false", "data.shuffle_buffer=16"]
    return [RECIPE, *sum((["--set", s] for s in sets), [])]


def _train(rank, world_size, args):
    from gigatron.core.train import main

    return main(args)


def _kill_after_first_checkpoint(args, run_dir):
    pointer = os.path.join(run_dir, "checkpoints", "latest")
    train_until_then_kill(args, pointer, 2, ROOT)  # mid-step 6
    return open(pointer).read().strip()


def test_real_clips_train_resume_exactly_and_sample(clip_shards, tmp_path):
    ref, killed = str(tmp_path / "ref"), str(tmp_path / "killed")
    assert run_distributed(_train, 2, _args(ref, clip_shards["path"])) == [0, 0]
    assert _kill_after_first_checkpoint(_args(killed, clip_shards["path"]), killed) == "step_00000005"
    assert not os.path.exists(os.path.join(killed, "checkpoints", "step_00000010"))
    assert run_distributed(_train, 2, _args(killed, clip_shards["path"])) == [0, 0]
    a = CheckpointReader(os.path.join(ref, "checkpoints", "step_00000010"))
    b = CheckpointReader(os.path.join(killed, "checkpoints", "step_00000010"))
    keys = [k for k in a.keys() if k.startswith(("model.", "optim.", "extra.ema."))]
    assert any(k.startswith("extra.ema.") for k in keys) and any(k.startswith("optim.") for k in keys)
    assert set(keys) == {k for k in b.keys() if k.startswith(("model.", "optim.", "extra.ema."))}
    for key in keys:
        assert torch.equal(a.read(key), b.read(key)), key
    name = next(k for k in keys if k.startswith("model.") and k.endswith("attention.wq.weight"))
    assert not torch.equal(a.read(name), a.read("extra.ema." + name[len("model."):]))  # the EMA lags
    # 10 noisy single-batch losses: the last 3 average ~0.8 of the first 3 (zero-initialised head, lr 2e-3)
    losses = [json.loads(line)["loss"] for line in open(os.path.join(ref, "metrics.jsonl"))]
    assert len(losses) == 10 and np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3]), losses
    out = tmp_path / "samples"
    assert cli(["sample", ref, "--prompt", "big buck bunny", "--prompt", "bunny square", "--steps", "3",
                "--frames", "4", "--height", "16", "--width", "24", "--out", str(out)]) == 0
    from PIL import Image

    assert Image.open(out / "samples.png").size[1] > 2 * 16
    import av

    with av.open(str(out / "sample_1.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 4 and frames[0].shape == (16, 24, 3)
    assert cli(["sample", str(tmp_path / "nowhere"), "--prompt", "x"]) == 2  # one line, no traceback
