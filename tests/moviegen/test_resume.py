"""Exact resume of a tiny Movie Gen run (cp2 ring, EMA on), with real processes: a 6-step run versus
a run SIGKILLed (torchrun and every rank) right after its step-3 checkpoint and auto-resumed from
`latest`. The step-6 weights, AdamW state and EMA are bitwise equal: the flow-matching noise, t and
text dropout are keyed by the global sample index (core/rng.py), the reader's position and the EMA
are in the checkpoint. Same pattern as tests/core/test_checkpoint_resume.py."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from gigatron.core.checkpoint.reader import CheckpointReader
from tests.distributed import run_distributed
from tests.moviegen.harness import RECIPE, ROOT, SMALL

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
ENTRY = os.path.join(ROOT, "tests/moviegen/train_entry.py")
RUN = SMALL + ["data.num_frames=3", "data.image_size=16", "train.seq_len=48", "parallel.cp=2", "train.steps=6",
               "checkpoint.interval=3", "train.ema_decay=0.9", "model.zero_init=true"]


def _args(run_dir):
    return [RECIPE, "--set", f"run.dir={run_dir}", *sum((["--set", o] for o in RUN), [])]


def _train(rank, world_size, run_dir):
    import tests.moviegen.synthetic  # noqa: F401
    from gigatron.core.train import main

    return main(_args(run_dir))


def _kill_after_first_checkpoint(run_dir):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", ENTRY, *_args(run_dir)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pointer = os.path.join(run_dir, "checkpoints", "latest")
    deadline = time.time() + 300
    while not os.path.exists(pointer) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)  # mid-step 4
    proc.wait()
    return open(pointer).read().strip()


def test_sigkill_then_resume_is_bitwise_exact(tmp_path):
    assert run_distributed(_train, 2, str(tmp_path / "ref")) == [0, 0]
    assert _kill_after_first_checkpoint(str(tmp_path / "killed")) == "step_00000003"
    assert not os.path.exists(tmp_path / "killed" / "checkpoints" / "step_00000006")
    assert run_distributed(_train, 2, str(tmp_path / "killed")) == [0, 0]
    a = CheckpointReader(str(tmp_path / "ref" / "checkpoints" / "step_00000006"))
    b = CheckpointReader(str(tmp_path / "killed" / "checkpoints" / "step_00000006"))
    keys = [k for k in a.keys() if k.startswith(("model.", "optim.", "extra.ema."))]
    assert any(k.startswith("extra.ema.") for k in keys) and any(k.startswith("optim.") for k in keys)
    assert set(keys) == {k for k in b.keys() if k.startswith(("model.", "optim.", "extra.ema."))}
    for key in keys:
        assert torch.equal(a.read(key), b.read(key)), key
    # the EMA lags the weights (it is not a copy of them)
    name = next(k for k in keys if k.startswith("model.") and k.endswith("wq.weight"))
    assert not torch.equal(a.read(name), a.read("extra.ema." + name[len("model."):]))
