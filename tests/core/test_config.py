"""Recipes are validated before any process starts: each mistake gives its own message naming the
key and the fix, and no traceback."""

import os
import subprocess
import sys

import pytest

from gigatron.core.config import ConfigError, load_config

DEBUG = "recipes/llama3_debug.yaml"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (overrides, world size, key named in the error, words the message must contain)
INVALID = [
    (["train.lrr=0.1"], None, "train.lrr", "did you mean 'train.lr'"),
    (["modle.dim=64"], None, "modle", "did you mean 'model'"),
    (["model.dim=abc"], None, "model.dim", "expected int"),
    (["train.steps=1.5"], None, "train.steps", "expected int"),
    (["parallel.sequence_parallel=maybe"], None, "parallel.sequence_parallel", "expected bool"),
    (["parallel.pp_schedule=magic"], None, "parallel.pp_schedule", "choose one of"),
    (["parallel.tp=2", "parallel.dp=1"], 3, "parallel.dp", "multiple of tp*cp*pp=2"),
    ([], 4, "parallel.dp", "set parallel.dp=4"),
    (["parallel.tp=3", "parallel.dp=1"], 3, "parallel.tp", "not divisible by tp=3"),
    (["parallel.tp=4", "parallel.dp=1", "model.n_heads=6", "model.dim=192"], 4, "parallel.tp",
     "model.n_heads=6 is not divisible by tp=4"),
    (["parallel.tp=2", "parallel.dp=1", "model.n_heads=12", "model.n_kv_heads=3", "model.dim=192"], 2,
     "parallel.tp", "one must divide the other"),
    (["model.n_kv_heads=3"], None, "model.n_kv_heads", "must divide model.n_heads"),
    (["parallel.cp=2", "parallel.dp=1", "train.seq_len=250"], 2, "train.seq_len", "2*cp=4"),
    (["parallel.cp=2", "parallel.dp=1", "model.attention_backend=sdpa"], 2, "model.attention_backend",
     "needs; set model.attention_backend=auto"),
    (["parallel.pp=2", "parallel.dp=1", "model.n_layers=1"], 2, "parallel.pp", "cannot fill"),
    (["parallel.pp=2", "parallel.dp=1", "parallel.pp_virtual_stages=2"], 2, "parallel.pp_schedule",
     "use interleaved_1f1b"),
    (["train.global_batch_size=7"], 2, "train.global_batch_size", "multiple of 4"),
    (["train.warmup_steps=500"], None, "train.warmup_steps", "must lie in [0, train.steps=60]"),
    (["train.min_lr=1.0"], None, "train.min_lr", "must lie in [0, train.lr"),
    (["train.lr=5"], None, "train.lr", "not a sensible peak learning rate"),
    (["train.seq_len=16384"], None, "train.seq_len", "exceeds model.max_seq_len"),
    # the family seam: family rules, evaluation, stages
    (["model.name=gpt9"], None, "model.name", "unknown model family 'gpt9'"),
    (["model.tie_embeddings=true", "parallel.pp=2", "parallel.dp=1"], 2, "model.tie_embeddings", "untie it"),
    (["train.eval_every=5", "data.eval_fraction=0"], None, "data.eval_fraction", "held-out split"),
    (["train.eval_every=5", "parallel.pp=2", "parallel.dp=1"], 2, "train.eval_every", "pipeline parallelism"),
    (["parallel.grad_sync=sometimes"], None, "parallel.grad_sync", "choose one of"),
    (["parallel.tp=4", "parallel.dp=1", "train.seq_len=254"], 4, "train.seq_len", "divisible by tp=4"),
    # pipeline layouts (parallel/pipeline.py)
    (["parallel.pp=4", "parallel.dp=1", "train.global_batch_size=4", "train.micro_batch_size=2"], 4,
     "train.global_batch_size", "need at least 4"),
    (["parallel.pp=2", "parallel.dp=1", "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=2",
      "train.global_batch_size=5", "train.micro_batch_size=1"], 2, "train.global_batch_size", "equal rounds"),
    (["parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=2"], None, "parallel.pp_virtual_stages",
     "set parallel.pp > 1"),
    (["parallel.pp=2", "parallel.dp=1", "parallel.pp_first_last_fewer_layers=-1"], 2,
     "parallel.pp_first_last_fewer_layers", "must be >= 0"),
    (["parallel.pp=4", "parallel.dp=1", "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=4",
      "model.n_layers=8", "train.global_batch_size=4", "train.micro_batch_size=1"], 4, "parallel.pp", "cannot fill"),
    (["parallel.pp_timeline_step=-1"], None, "parallel.pp_timeline_step", "must be >= 0"),
    (["parallel.tp=4", "parallel.dp=1", "model.vocab_size=5"], 4, "model.vocab_size", "leave a rank without vocabulary"),
]


@pytest.mark.parametrize("overrides,world_size,key,words", INVALID, ids=[case[2] + ":" + case[3] for case in INVALID])
def test_invalid_recipe_names_key_and_fix(overrides, world_size, key, words):
    with pytest.raises(ConfigError) as err:
        load_config(os.path.join(ROOT, DEBUG), overrides, world_size=world_size)
    assert err.value.key == key
    assert words in str(err.value)


def test_messages_are_distinct():
    messages = set()
    for overrides, world_size, _, _ in INVALID:
        with pytest.raises(ConfigError) as err:
            load_config(os.path.join(ROOT, DEBUG), overrides, world_size=world_size)
        messages.add(str(err.value))
    assert len(messages) == len(INVALID)


def test_trainer_refuses_before_any_process_group(tmp_path):
    """WORLD_SIZE=3 with only rank 0 alive: init_process_group would block waiting for ranks 1-2, so
    this returns quickly only if the recipe is refused before any group is created."""
    env = dict(os.environ, WORLD_SIZE="3", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29599")
    proc = subprocess.run([sys.executable, "-m", "gigatron.core.train", DEBUG, "--set", "parallel.tp=3", "--set", "parallel.dp=1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "parallel.tp" in proc.stderr and "pick tp among" in proc.stderr


def test_cli_validate_prints_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "gigatron.core.cli", "validate", DEBUG, "--set", "train.lrr=1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "did you mean 'train.lr'" in proc.stderr


def test_valid_recipes_load_with_published_layouts():
    cfg = load_config(os.path.join(ROOT, "recipes/llama3_405b.yaml"), world_size=16384)
    p, t = cfg.parallel, cfg.train
    assert (p.tp, p.cp, p.pp, p.dp) == (8, 1, 16, 128)
    assert t.seq_len == 8192 and t.tokens_per_step == 16 * 2**20
    assert (t.lr, t.min_lr, t.warmup_steps, t.warmup_steps + t.decay_steps) == (8e-5, 8e-7, 8000, 1_200_000)


def test_override_types_and_nesting():
    cfg = load_config(os.path.join(ROOT, DEBUG), ["train.lr=1e-3", "data.sources=[a, b]", "model.dim=256"])
    assert cfg.train.lr == 1e-3 and cfg.data.sources == ["a", "b"] and cfg.model.dim == 256
