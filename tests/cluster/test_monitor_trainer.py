"""The trainer's own monitoring (core/monitoring.py), in one launch of 3 gloo processes training the
tiny debug model for 8 steps with the real Trainer.train loop:

- profiling on demand: rank 0's driver drops a `profile_request` file before the run; rank 0 sees
  it in step 1, every rank agrees and records steps 2-3 (run.profile_steps=2): a Chrome trace and,
  on CPU, the memory JSON.
- stragglers: compute times are gathered every 2 steps (step 2 lies in the profiling window: not
  timed); in steps 5 and 6 the test driver makes rank 1 slow (a sleep before each micro-batch's
  forward, monkeypatched onto that rank's trainer: test-only by construction, no recipe or
  environment can switch it on). Every rank waits for rank 1 inside the step's collectives, so
  their wall times are equal: only the compute time (collective waits excluded) tells rank 1
  apart. Steps 4 and 8 flag nothing, step 6 flags rank 1, in metrics.jsonl, in TensorBoard
  (train/straggler_ratio/rank_1), in rank 0's log and in `gigatron status`.
- the terminal: rank 0's stdout/stderr are not terminals here (as under torchrun's tee): the
  progress is plain lines every 2 steps, never a carriage-return redraw.

Threshold 2.0 (flagged above 3x the median): the injected sleep (0.5 s) is ~5-10x the tiny model's
compute, while scheduling noise on a shared 2-core machine stays well below 3x."""

from __future__ import annotations

import json
import os

import pytest

from tests.distributed import run_distributed

SLEEP_S = 0.5
SLOW_STEPS = (5, 6)  # 1-based steps during which rank 1 is slow
OVERRIDES = ["parallel.dp=3", "train.global_batch_size=6", "train.steps=8", "run.straggler_every=2",
             "run.straggler_threshold=2.0", "run.profile_steps=2", "run.progress=true", "run.progress_every=2",
             "run.tensorboard=true"]


def _train(rank: int, world_size: int, data_dir: str) -> dict:
    import contextlib
    import io
    import time

    from tests.parallel.harness import build_trainer

    trainer = build_trainer(world_size, OVERRIDES, data_dir)
    plain = trainer.forward_backward

    def driven(batch, scale):  # trainer.step is the number of finished steps
        if rank == 1 and trainer.step + 1 in SLOW_STEPS:
            time.sleep(SLEEP_S)  # the test-only slow rank: time outside every collective
        return plain(batch, scale)

    trainer.forward_backward = driven
    if rank == 0:
        os.makedirs(trainer.cfg.run.dir, exist_ok=True)
        open(os.path.join(trainer.cfg.run.dir, "profile_request"), "w").close()
    out, err = io.StringIO(), io.StringIO()  # not terminals, as under torchrun's tee or in SLURM logs
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = trainer.train()
    return {"code": code, "run_dir": trainer.cfg.run.dir, "stdout": out.getvalue(), "stderr": err.getvalue()}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    results = run_distributed(_train, 3, str(tmp_path_factory.mktemp("monitor_trainer")))
    assert [r["code"] for r in results] == [0, 0, 0]
    return results


def _records(run_dir: str) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, open(os.path.join(run_dir, "metrics.jsonl")))}


def test_slow_rank_is_named_in_metrics_and_status(run):
    from gigatron.cluster.monitor.run_dir import tensorboard_scalars
    from gigatron.cluster.monitor.status import build_status, format_status

    run_dir = run[0]["run_dir"]
    records = _records(run_dir)
    for step in (4, 6, 8):
        print(f"step {step}: compute {[round(t, 3) for t in records[step]['compute_time_per_rank']]} s, "
              f"wall {records[step]['step_time_s']:.3f} s, stragglers {records[step]['stragglers']}")
    for step in (4, 8):  # no slow rank: nothing flagged
        assert records[step]["stragglers"] == [] and records[step]["straggler_count"] == 0
        assert len(records[step]["compute_time_per_rank"]) == 3
    slow = records[6]
    assert slow["stragglers"] == [1] and slow["straggler_ratio"]["rank_1"] > 3, slow
    # every rank's wall time includes rank 1's sleep (they wait in the collectives); compute does not
    assert slow["step_time_s"] > SLEEP_S
    assert max(slow["compute_time_per_rank"][r] for r in (0, 2)) < SLEEP_S / 2
    assert all("compute_time_per_rank" not in records[s] for s in (1, 2, 3, 5, 7))
    scalars = tensorboard_scalars(run_dir)
    assert [int(s) for s, _ in scalars["train/straggler_ratio/rank_1"]] == [6]
    assert [(int(s), v) for s, v in scalars["train/straggler_count"]] == [(4, 0), (6, 1), (8, 0)]
    # status names rank 1 while step 6 is the latest timed step, and keeps it in the history after
    cut = os.path.join(os.path.dirname(run_dir), "until_step_6")
    os.makedirs(cut, exist_ok=True)
    with open(os.path.join(cut, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(records[s]) + "\n" for s in sorted(records) if s <= 6)
    live = build_status(cut, threshold=2.0)
    assert live["stragglers"]["flagged"] == [1]
    text = format_status(live)
    print(text)
    assert "rank 1 (" in text and "Traceback" not in text
    finished = build_status(run_dir)  # the recipe's run.straggler_threshold (2.0) is the default
    assert finished["stragglers"]["threshold"] == 2.0 and finished["stragglers"]["flagged"] == []
    assert finished["stragglers"]["history"] == {1: 1} and "rank 1 x1" in format_status(finished)
    assert "stragglers at step 6: rank 1 " in run[0]["stderr"]  # rank 0's log warning


def test_profile_request_records_every_rank(run):
    run_dir = run[0]["run_dir"]
    folder = os.path.join(run_dir, "profiles", "steps_2-3")
    assert not os.path.exists(os.path.join(run_dir, "profile_request"))  # consumed
    for rank in range(3):
        trace = json.load(open(os.path.join(folder, f"rank{rank}.trace.json")))
        names = {e.get("name") for e in trace["traceEvents"]}
        assert "gigatron::step" in names and any("aten::" in str(n) for n in names)
        memory = json.load(open(os.path.join(folder, f"rank{rank}.memory.json")))
        assert memory["device"] == "cpu" and memory["steps"] == [2, 3] and memory["peak_rss_bytes"] > 0
        assert memory["operators"] and any(op["cpu_memory_bytes"] for op in memory["operators"])
    records = _records(run_dir)
    assert "compute_time_per_rank" not in records[2]  # straggler timing pauses inside the window


def test_terminal_without_a_tty_has_no_redraws(run):
    out, err = run[0]["stdout"], run[0]["stderr"]
    assert "\r" not in out + err
    progress = [line for line in out.splitlines() if line.startswith("train step ")]
    assert [line.split()[2] for line in progress] == ["2/8", "4/8", "6/8", "8/8"], out
    assert sum(1 for line in out.splitlines() if line.startswith("step ")) == 8  # run.log_every=1
    assert run[1]["stdout"] == "" and run[2]["stdout"] == ""  # only rank 0 writes the terminal


def test_progress_lines_without_a_terminal():
    """Progress on a stream that is not a terminal: a plain line every `every` steps and at the
    last, log lines in between, no carriage return; disabled (ranks > 0): only the log lines."""
    import io

    from gigatron.core.metrics import Progress

    err, out = io.StringIO(), io.StringIO()
    progress = Progress(total=7, initial=0, enabled=True, desc="train", every=3, stream=err, out=out)
    for step in range(1, 8):
        progress.update(step, {"loss": 10.0 / step})
        progress.write(f"log {step}")
    progress.close()
    lines = out.getvalue().splitlines()
    assert [line.split()[2] for line in lines if line.startswith("train step")] == ["3/7", "6/7", "7/7"]
    assert [line for line in lines if line.startswith("log")] == [f"log {s}" for s in range(1, 8)]
    assert "\r" not in out.getvalue() + err.getvalue()
    quiet = io.StringIO()
    off = Progress(total=7, initial=0, enabled=False, desc="train", every=3, stream=quiet, out=quiet)
    off.update(3, {"loss": 1.0})
    assert quiet.getvalue() == ""


def test_monitoring_config_is_validated():
    from gigatron.core.config import load_config
    from gigatron.core.config_loader import ConfigError

    recipe = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                          "recipes", "llama3_debug.yaml")
    for key, value in (("run.straggler_every", "-1"), ("run.straggler_threshold", "-0.5"),
                       ("run.profile_steps", "0"), ("run.progress_every", "0")):
        with pytest.raises(ConfigError) as err:
            load_config(recipe, [f"{key}={value}"])
        assert key in str(err.value)
