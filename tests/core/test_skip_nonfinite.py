"""A non-finite loss or gradient norm skips the optimizer step (gradients dropped, parameters and
AdamW state untouched), is counted in the `skipped_steps` metric, and too many in a row stop the
run with exit code 3 and a message naming train.max_skipped_steps."""

import json
import os

import pytest
import torch

from tests.distributed import run_distributed

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPE = os.path.join(ROOT, "recipes/llama3_debug.yaml")
SMALL = ["data.tokenizer=bytes", "model.vocab_size=258", "model.dim=32", "model.n_layers=1", "model.n_heads=2",
         "model.n_kv_heads=1", "model.ffn_dim=64", "train.seq_len=32", "train.global_batch_size=2",
         "train.micro_batch_size=1", "train.warmup_steps=1", "run.tensorboard=false", "run.progress=false",
         "parallel.dp=1", "train.dtype=float32", "data.max_mb=0.05"]


def _poisoned_trainer(run_dir, data, overrides, poison):
    from gigatron.core.config import load_config
    from gigatron.core.train import Trainer
    from gigatron.parallel.mesh import init_distributed

    cfg = load_config(RECIPE, SMALL + [f"run.dir={run_dir}", f"data.path={data}", *overrides], world_size=1)
    trainer = Trainer(cfg, init_distributed(cfg.parallel))
    forward_backward = trainer.forward_backward

    def poisoned(batch, scale):  # NaN gradients on the chosen (1-based) steps
        loss = forward_backward(batch, scale)
        if poison(trainer.step + 1):
            next(trainer.model.parameters()).grad.fill_(float("nan"))
        return loss

    trainer.forward_backward = poisoned
    return trainer


def _run(rank, world_size, tmp):
    data = f"{tmp}/data/bytes"
    trainer = _poisoned_trainer(f"{tmp}/a", data, ["train.steps=5"], lambda step: step in (2, 3))
    snapshots, train_step = [], trainer.train_step

    def recording():
        values = train_step()
        snapshots.append([p.detach().clone() for p in trainer.model.parameters()])
        return values

    trainer.train_step = recording
    assert trainer.train() == 0
    unchanged = [all(torch.equal(a, b) for a, b in zip(snapshots[i], snapshots[i + 1])) for i in range(4)]
    assert unchanged == [True, True, False, False]  # steps 2 and 3 left the parameters alone
    stopped = _poisoned_trainer(f"{tmp}/b", data, ["train.steps=10", "train.max_skipped_steps=3"], lambda step: step > 1)
    assert stopped.train() == 3
    return stopped.step


def test_nonfinite_steps_are_skipped_counted_and_bounded(tmp_path, capfd):
    assert run_distributed(_run, 1, str(tmp_path)) == [4]  # 1 good step, then 3 skipped in a row
    with open(tmp_path / "a" / "metrics.jsonl") as f:
        assert [json.loads(line)["skipped_steps"] for line in f] == [0, 1, 2, 2, 2]
    assert "train.max_skipped_steps=3" in capfd.readouterr().err
