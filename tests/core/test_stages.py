"""Multi-stage recipes (core/config.py `stages:`, core/train.py `run_stages`).

- Every stage is validated at load: an error inside a stage names `stages[i].set.<key>`.
- Llama 3's first two pre-training stages scaled to the debug model (recipes/llama3_debug_stages.yaml:
  128-token then 256-token sequences, 512 then 1,024 tokens per step) run as one recipe, each
  stage in its own checkpoint folder, the second starting from the first's last checkpoint.
- A run SIGKILLed right after the stage boundary resumes in stage two and ends bitwise equal (model
  and AdamW state) to the uninterrupted run.
"""

import json
import os

import pytest
import torch

from gigatron.core.checkpoint.reader import CheckpointReader
from gigatron.core.config import ConfigError, load_config
from gigatron.core.train import main as train_main
from tests.distributed import run_distributed, train_until_then_kill

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPE = os.path.join(ROOT, "recipes/llama3_debug_stages.yaml")
SMALL = ["data.tokenizer=bytes", "model.vocab_size=258", "model.dim=64", "model.n_layers=2", "model.n_heads=4",
         "model.n_kv_heads=2", "model.ffn_dim=128", "train.steps=8", "train.warmup_steps=2", "checkpoint.interval=2",
         "run.tensorboard=false", "run.progress=false", "train.dtype=float32", "data.max_mb=0.3",
         "train.micro_batch_size=1"]
FIRST, SECOND = "seq128_bs512", "seq256_bs1k"


def test_stages_are_validated_at_load():
    cfg = load_config(RECIPE, ["parallel.dp=1"], world_size=1)
    assert [s.until_step for s in cfg.stages] == [20, 40]
    assert [c.train.seq_len for c in cfg.resolved_stages] == [128, 256]
    with pytest.raises(ConfigError) as err:
        load_config(RECIPE, ["parallel.dp=1", "train.steps=10"], world_size=1)
    assert err.value.key == "stages[0].until_step"
    bad = RECIPE + ".bad.yaml"
    with open(RECIPE) as f, open(bad, "w") as g:
        g.write(f.read().replace("train.seq_len: 256", "train.seq_len: 250"))
    try:
        with pytest.raises(ConfigError) as err:
            load_config(bad, ["parallel.cp=2", "parallel.dp=1", "model.attention_backend=torch"], world_size=2)
        assert err.value.key == "stages[1].set.train.seq_len" and "2*cp" in str(err.value)
    finally:
        os.remove(bad)


def test_two_stage_schedule_resumes_bitwise_across_the_boundary(tmp_path):
    overrides = SMALL + [f"data.path={tmp_path}/data/bytes"]
    # stages are a list: the boundary is moved by editing a copy of the recipe instead of --set
    recipe = str(tmp_path / "stages.yaml")
    with open(RECIPE) as f, open(recipe, "w") as g:
        g.write(f.read().replace("until_step: 20", "until_step: 4"))
    ref, killed = str(tmp_path / "ref"), str(tmp_path / "killed")
    args = lambda run_dir: [recipe, "--set", f"run.dir={run_dir}", *sum((["--set", o] for o in overrides), [])]  # noqa: E731
    assert run_distributed(_train_recipe, 2, args(ref)) == [0, 0]
    metrics = [json.loads(line) for line in open(os.path.join(ref, "metrics.jsonl"))]
    assert [m["stage"] for m in metrics] == [FIRST] * 4 + [SECOND] * 4
    assert os.path.isdir(os.path.join(ref, "checkpoints", FIRST, "step_00000004"))
    assert os.path.isdir(os.path.join(ref, "checkpoints", SECOND, "step_00000008"))
    _kill_after_args(args(killed), os.path.join(killed, "checkpoints", FIRST, "latest"))
    assert not os.path.exists(os.path.join(killed, "checkpoints", SECOND, "step_00000008"))
    assert run_distributed(_train_recipe, 2, args(killed)) == [0, 0]
    steps = [json.loads(line)["step"] for line in open(os.path.join(killed, "metrics.jsonl"))]
    assert steps[-4:] == [5, 6, 7, 8]
    a = CheckpointReader(os.path.join(ref, "checkpoints", SECOND, "step_00000008"))
    b = CheckpointReader(os.path.join(killed, "checkpoints", SECOND, "step_00000008"))
    keys = [k for k in a.keys() if k.startswith(("model.", "optim."))]
    assert keys and set(keys) == {k for k in b.keys() if k.startswith(("model.", "optim."))}
    for key in keys:
        assert torch.equal(a.read(key), b.read(key)), key


def _train_recipe(rank, world_size, args):
    return train_main(args)


def _kill_after_args(args, pointer):
    train_until_then_kill(args, pointer, 2, ROOT)  # right after stage one's last commit
