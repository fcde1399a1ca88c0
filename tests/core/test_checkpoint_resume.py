"""Fault tolerance end to end, with real gloo processes:

- exact resume: a 10-step run, versus a run SIGKILLed right after its step-5 checkpoint and then
  auto-resumed from `latest` (and a run stopped by SIGUSR1 -> exit 42, then resumed): the final
  parameters and AdamW state are bitwise identical;
- resharding: the step-5 checkpoint of a tp2*pp2*dp2 run (8 processes) continues under 1 process,
  dp=2 and dp=4 with the same losses (<= 1e-6 relative) as the run that never changed layout.

Exact resume runs on dp2 and tp2*pp2 (4 processes); the signal and async-save variants on dp2."""

import json
import os
import signal
import threading
import time

import pytest
import torch

from gigatron.core.checkpoint import latest, verify
from gigatron.core.checkpoint.reader import CheckpointReader
from gigatron.core.train import main as train_main
from tests.distributed import run_distributed, train_until_then_kill

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPE = os.path.join(ROOT, "recipes/llama3_debug.yaml")
SMALL = ["data.tokenizer=bytes", "model.vocab_size=258", "model.dim=64", "model.n_layers=2", "model.n_heads=4",
         "model.n_kv_heads=2", "model.ffn_dim=128", "train.seq_len=64", "train.global_batch_size=12",
         "train.micro_batch_size=1", "train.warmup_steps=2", "train.steps=10", "checkpoint.interval=5",
         "run.tensorboard=false", "run.progress=false", "train.dtype=float32", "data.max_mb=0.3"]
DP2 = pytest.param((2, ["parallel.dp=2"]), id="dp2")
TP2PP2 = pytest.param((4, ["parallel.tp=2", "parallel.pp=2", "parallel.dp=1"]), id="tp2pp2")
TP2PP2DP2 = pytest.param((8, ["parallel.tp=2", "parallel.pp=2", "parallel.dp=2"]), id="tp2pp2dp2")
# CI time on 2 cores decides the split: exact resume on dp2 and tp2pp2 (the acceptance layouts), the
# signal and async variants on dp2, resharding from the 8-process tp2pp2dp2 layout.


def _args(run_dir, overrides):
    return [RECIPE, "--set", f"run.dir={run_dir}", *sum((["--set", o] for o in overrides), [])]


def _train(rank, world_size, run_dir, overrides):
    return train_main(_args(run_dir, overrides))


def _train_until_signal(rank, world_size, run_dir, overrides):
    """Rank 0 sends itself SIGUSR1 once step 2 is logged; all ranks must stop with 42 together."""
    if rank == 0:
        def poke():
            path = os.path.join(run_dir, "metrics.jsonl")
            while not (os.path.exists(path) and len(open(path).readlines()) >= 2):
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGUSR1)
        threading.Thread(target=poke, daemon=True).start()
    return train_main(_args(run_dir, overrides))


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _assert_bitwise_equal(a, b):
    ra, rb = CheckpointReader(a), CheckpointReader(b)
    keys = [k for k in ra.keys() if k.startswith(("model.", "optim."))]
    assert keys and set(keys) == {k for k in rb.keys() if k.startswith(("model.", "optim."))}
    for key in keys:
        assert torch.equal(ra.read(key), rb.read(key)), key


def _kill_after_first_checkpoint(run_dir, overrides, nproc):
    pointer = os.path.join(run_dir, "checkpoints", "latest")
    train_until_then_kill(_args(run_dir, overrides), pointer, nproc, ROOT)  # mid-step 6
    return open(pointer).read().strip()


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    nproc, layout = request.param
    tmp = tmp_path_factory.mktemp("resume")
    overrides = SMALL + layout + [f"data.path={tmp}/data/bytes"]
    assert run_distributed(_train, nproc, str(tmp / "ref"), overrides) == [0] * nproc
    return tmp, nproc, overrides


@pytest.mark.parametrize("runs", [DP2, TP2PP2], indirect=True)
def test_sigkill_then_auto_resume_is_bitwise_exact(runs):
    tmp, nproc, overrides = runs
    assert _kill_after_first_checkpoint(str(tmp / "killed"), overrides, nproc) == "step_00000005"
    assert not os.path.exists(tmp / "killed" / "checkpoints" / "step_00000010")
    assert run_distributed(_train, nproc, str(tmp / "killed"), overrides) == [0] * nproc
    steps = [m["step"] for m in _metrics(str(tmp / "killed"))]
    assert steps[-5:] == [6, 7, 8, 9, 10]
    _assert_bitwise_equal(str(tmp / "ref" / "checkpoints" / "step_00000010"),
                          str(tmp / "killed" / "checkpoints" / "step_00000010"))


@pytest.mark.parametrize("runs", [DP2], indirect=True)
def test_signal_requeue_then_resume_is_bitwise_exact(runs):
    tmp, nproc, overrides = runs
    run_dir = str(tmp / "signalled")
    assert run_distributed(_train_until_signal, nproc, run_dir, overrides) == [42] * nproc
    stopped = latest(os.path.join(run_dir, "checkpoints"))
    verify(stopped)
    assert 2 <= int(os.path.basename(stopped)[5:]) < 10
    assert run_distributed(_train, nproc, run_dir, overrides) == [0] * nproc
    _assert_bitwise_equal(str(tmp / "ref" / "checkpoints" / "step_00000010"),
                          os.path.join(run_dir, "checkpoints", "step_00000010"))


@pytest.mark.parametrize("runs", [DP2], indirect=True)
def test_async_save_gives_the_same_checkpoints(runs):
    tmp, nproc, overrides = runs
    run_dir = str(tmp / "async")
    assert run_distributed(_train, nproc, run_dir, overrides + ["checkpoint.async_save=true"]) == [0] * nproc
    for step in ("step_00000005", "step_00000010"):
        verify(os.path.join(run_dir, "checkpoints", step))
        _assert_bitwise_equal(str(tmp / "ref" / "checkpoints" / step), os.path.join(run_dir, "checkpoints", step))
    assert latest(os.path.join(run_dir, "checkpoints")).endswith("step_00000010")


@pytest.mark.parametrize("runs", [TP2PP2DP2], indirect=True)
@pytest.mark.parametrize("dp", [1, 2, 4])
def test_reshard_continues_with_the_same_losses(runs, dp):
    tmp, nproc, overrides = runs
    ref = {m["step"]: m["loss"] for m in _metrics(str(tmp / "ref"))}
    start = tmp / "ref" / "checkpoints" / "step_00000005"
    new = [o for o in overrides if not o.startswith("parallel.")] + [f"parallel.dp={dp}", f"checkpoint.load={start}"]
    run_dir = str(tmp / f"reshard_dp{dp}")
    assert run_distributed(_train, dp, run_dir, new) == [0] * dp
    got = {m["step"]: m["loss"] for m in _metrics(run_dir)}
    assert sorted(got) == [6, 7, 8, 9, 10]
    worst = max(abs(got[s] - ref[s]) / abs(ref[s]) for s in got)
    layout = ",".join(o for o in overrides if o.startswith("parallel."))
    print(f"{layout} -> dp={dp}: worst relative loss difference over steps 6-10: {worst:.2e}")
    assert worst <= 1e-6, (got, ref)
