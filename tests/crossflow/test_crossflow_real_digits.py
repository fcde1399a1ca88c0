"""CrossFlow end to end on real captioned digits (benchmarks/bench_crossflow.py is the long run, scored
by a digit classifier): prepare-images with captions -> the debug recipe, shrunk, 40 steps in one
process through `gigatron train`'s entry -> `gigatron sample RUN --prompt ... --prompt ...`: a grid
of samples per caption and the interpolation between the first two captions' latents, as PNGs. The
loss falls; the samples of two captions differ (the flow starts from each caption's own latent)."""

import json
import os

import numpy as np
import pytest

from gigatron.core.cli import main as cli
from tests.crossflow.harness import RECIPE
from tests.distributed import run_distributed

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _train(rank, world_size, args):
    from gigatron.core.train import main

    return main(args)


def test_train_then_sample_and_interpolate(digit_shards, tmp_path):
    from PIL import Image

    run = str(tmp_path / "run")
    sets = [f"data.path={digit_shards['path']}", f"run.dir={run}", "run.progress=false", "data.shuffle_buffer=32",
            "model.dim=32", "model.n_layers=2", "model.text_layers=1", "model.text_dim=16", "model.time_dim=32",
            "model.ffn_dim=64", "train.steps=40", "train.warmup_steps=5", "train.global_batch_size=16",
            "train.micro_batch_size=16", "train.lr=3e-3", "checkpoint.interval=40", "train.ema_decay=0"]
    assert run_distributed(_train, 1, [RECIPE, *sum((["--set", s] for s in sets), [])]) == [0]
    losses = [json.loads(line)["loss"] for line in open(os.path.join(run, "metrics.jsonl"))]
    assert len(losses) == 40
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses  # measured ~0.1x
    out = tmp_path / "samples"
    args = ["sample", run, "--prompt", "a handwritten one", "--prompt", "a handwritten seven", "--steps", "8",
            "--text-encoder", "llama-bytes:16", "--guidance", "2", "--out", str(out)]
    assert cli(args) == 0
    grid = np.asarray(Image.open(out / "samples.png").convert("L")).astype(float)
    assert grid.shape[0] == 2 * (32 * 4 + 2)  # two rows of 32 px samples, 4x nearest, 2 px gaps
    half = grid.shape[0] // 2
    assert np.abs(grid[:half - 2] - grid[half:-2]).mean() > 1.0  # the two captions' rows differ
    strip = np.asarray(Image.open(out / "interpolation.png").convert("L"))
    assert strip.shape[0] == 32 * 4 + 2 and strip.std() > 5  # one row of 8 mixes, not blank
    assert cli(["sample", run, "--prompt", "x", "--text-encoder", "llama-bytes:8", "--out", str(out)]) == 2  # wrong width
