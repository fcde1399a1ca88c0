"""Evaluation on a held-out split (train.eval_every, train.eval_batches, data.eval_fraction).

- The token reader's eval split never shares a window with its train split.
- The signal family (tests/families/signal.py) logs its held-out loss and its own metric
  (abs_error) every 2 steps, and dp2 gives the single-process figures (1e-5 relative: fp32 sums).
"""

import json

import numpy as np

from tests.distributed import run_distributed
from tests.parallel.harness import SIGNAL_RECIPE


def test_token_eval_split_is_disjoint(tmp_path):
    from gigatron.data_pipeline.sampler import TokenLoader
    from gigatron.data_pipeline.token_shards import TokenShards, TokenShardWriter

    prefix = str(tmp_path / "toy")
    with TokenShardWriter(prefix, "bytes", 258) as writer:
        for d in range(40):
            writer.add_document(np.arange(100) % 250 + d % 3)
    shards = TokenShards(prefix)
    train = TokenLoader(shards, 16, 4, 0, 1, seed=0, split="train", eval_fraction=0.2)
    held = TokenLoader(shards, 16, 4, 0, 1, seed=0, split="eval", eval_fraction=0.2)
    train_windows = {train.window_index(g) for g in range(train.num_samples)}
    eval_windows = {held.window_index(g) for g in range(held.num_samples)}
    assert train_windows.isdisjoint(eval_windows)
    assert len(train_windows | eval_windows) == (shards.num_tokens - 1) // 16
    assert held.num_samples == int(0.2 * ((shards.num_tokens - 1) // 16))


def _train(rank, world_size, run_dir, overrides):
    import tests.families.signal  # noqa: F401
    from gigatron.core.train import main

    return main([SIGNAL_RECIPE, "--set", f"run.dir={run_dir}", *sum((["--set", o] for o in overrides), [])])


def test_held_out_loss_and_family_metric_are_logged_and_layout_invariant(tmp_path):
    common = ["train.eval_every=2", "train.eval_batches=2", "train.steps=4"]
    assert run_distributed(_train, 1, str(tmp_path / "one"), common + ["parallel.dp=1"]) == [0]
    assert run_distributed(_train, 2, str(tmp_path / "two"), common + ["parallel.dp=2",
                                                                        "train.eval_batches=1"]) == [0, 0]
    rows = {}
    for name in ("one", "two"):
        with open(tmp_path / name / "metrics.jsonl") as f:
            rows[name] = [json.loads(line) for line in f]
        evals = [r for r in rows[name] if "eval_loss" in r]
        assert [r["step"] for r in evals] == [2, 4] and all("eval_abs_error" in r for r in evals)
    for a, b in zip(rows["one"], rows["two"]):  # dp2 x 1 eval batch = 1 process x 2: the same samples
        for key in ("loss", "grad_norm", "eval_loss", "eval_abs_error"):
            if key in a:
                assert abs(a[key] - b[key]) <= 1e-5 * abs(a[key]), (key, a, b)
