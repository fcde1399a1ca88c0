"""`gigatron status RUN_DIR` on a real finished run, a generated 16-rank run with a straggler and a
requeue, a live run being appended to (with a truncated last line), a crashed run, and broken or
half-written run directories: never a traceback."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from gigatron.cluster.monitor.cli import main
from gigatron.cluster.monitor.status import build_status, format_status
from tests.cluster.monitor_fixtures import metric_record, real_run, simulated_run


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("real") / "run")
    done = real_run(path, str(tmp_path_factory.mktemp("data")))
    assert done.returncode == 0, done.stderr[-3000:]
    return path


def test_real_finished_run(real, capsys):
    assert main(["status", real]) == 0
    text = capsys.readouterr().out
    print(text)
    records = [json.loads(line) for line in open(os.path.join(real, "metrics.jsonl"))]
    s = build_status(real)
    assert s["state"] == "finished" and s["progress"]["step"] == records[-1]["step"] == s["progress"]["total"]
    assert s["loss"]["last"] == pytest.approx(records[-1]["loss"])
    assert s["checkpoint"]["last_good"] == open(os.path.join(real, "checkpoints", "latest")).read().strip()
    assert "FINISHED" in text and "planner" in text and "Traceback" not in text


def test_tensorboard_events_stand_in_for_metrics(real, tmp_path):
    """The same real run without metrics.jsonl: status reads the TensorBoard event files."""
    import shutil

    copy = str(tmp_path / "tb_only")
    shutil.copytree(real, copy)
    records = [json.loads(line) for line in open(os.path.join(copy, "metrics.jsonl"))]
    os.remove(os.path.join(copy, "metrics.jsonl"))
    s = build_status(copy)
    assert s["progress"]["step"] == records[-1]["step"]
    assert s["loss"]["last"] == pytest.approx(records[-1]["loss"], rel=1e-6)  # TensorBoard stores float32
    assert any("TensorBoard" in w for w in s["warnings"])


def test_simulated_run_with_straggler_and_requeue(tmp_path):
    run = str(tmp_path / "sim")
    params = simulated_run(run, steps=70)  # rank 5 is slow from step 60: still slow at the last per-rank record
    s = build_status(run, now=params["end_time"] + 5)
    text = format_status(s)
    print(text)
    assert s["state"] == "running"
    assert s["progress"]["total"] == params["total_steps"] and s["progress"]["step"] == params["steps"]
    eta = (params["total_steps"] - params["steps"]) * s["progress"]["step_time_s"]
    assert s["progress"]["eta_s"] == pytest.approx(eta)
    assert s["stragglers"]["flagged"] == [params["slow_rank"]]
    ratio = dict(s["stragglers"]["slowest"])[params["slow_rank"]]
    assert ratio == pytest.approx(params["slow_factor"], rel=0.05)
    assert s["restarts"]["events"] == {"start": 1, "requeue": 1, "restart": 1}
    assert s["checkpoint"]["last_good"] == params["last_good"]
    assert s["checkpoint"]["uncommitted"] == [params["uncommitted"]]
    assert "error" not in s["projection"], s["projection"]  # the 405B recipe projects
    assert 0.5 < s["throughput"]["vs_projection"] < 1.5
    assert f"rank {params['slow_rank']}" in text and "requeue 1" in text


def test_live_run_being_written(tmp_path):
    """A writer appends a step every few ms, sometimes leaving half a line; status is read
    concurrently: always a result, steps never go backwards, and the final state is right."""
    run = str(tmp_path / "live")
    simulated_run(run, steps=10)
    path = os.path.join(run, "metrics.jsonl")
    import random

    rng = random.Random(3)
    stop = threading.Event()

    def writer():
        t = time.time()
        for step in range(11, 200):
            line = json.dumps(metric_record(step, t, 16, None, 1.0, rng, with_ranks=True)) + "\n"
            cut = rng.randrange(1, len(line))
            with open(path, "a") as f:  # the line arrives in two writes: readers see a truncated tail
                f.write(line[:cut])
                f.flush()
                time.sleep(0.001)
                f.write(line[cut:])
            t += 1.0
            if stop.is_set():
                break
        stop.set()

    thread = threading.Thread(target=writer)
    thread.start()
    seen = []
    while not stop.is_set():
        s = build_status(run)
        format_status(s)
        seen.append(s["progress"]["step"])
    thread.join()
    assert seen == sorted(seen) and len(seen) >= 2
    with open(path, "a") as f:
        f.write('{"step": 999, "loss": 1.')  # a torn last line stays ignored
    s = build_status(run)
    assert s["progress"]["step"] == 199 and s["partial_tail"]


def test_crashed_run(tmp_path, capsys):
    run = str(tmp_path / "crashed")
    simulated_run(run, steps=40, crash=True)
    assert main(["status", run]) == 0
    text = capsys.readouterr().out
    print(text)
    s = build_status(run)
    assert s["state"] == "crashed"
    assert s["restarts"]["failed_attempts"] == {1: {3: 1}}
    assert any("CUDA error" in e["line"] and e["rank"] == 3 for e in s["log_errors"])
    assert "CRASHED" in text and "crash 1" in text


@pytest.mark.parametrize("layout", ["empty", "garbage", "pointer_only", "bad_config", "not_a_dir", "missing"])
def test_broken_run_dirs_never_traceback(tmp_path, capsys, layout):
    run = tmp_path / "run"
    if layout != "missing":
        run.mkdir()
    if layout == "garbage":
        (run / "metrics.jsonl").write_bytes(b"\x00\xff{not json\n[1, 2]\n" + json.dumps({"step": "x"}).encode() + b"\n")
        (run / "events.jsonl").write_text("{}\n42\n")
    if layout == "pointer_only":
        (run / "checkpoints").mkdir()
        (run / "checkpoints" / "latest").write_text("step_00000200")
    if layout == "bad_config":
        folder = run / "checkpoints" / "step_00000010"
        folder.mkdir(parents=True)
        (folder / "config.json").write_text('{"model": {"name": "nope"}, "train": {"steps": "many"}}')
        (folder / ".complete").write_text("")
        (folder / "manifest.json").write_text("{")
        (run / "metrics.jsonl").write_text(json.dumps({"step": 3, "loss": float("nan"), "time": 1.0}) + "\n")
    if layout == "not_a_dir":
        run.rmdir()
        run.write_text("a file")
    rc = main(["status", str(run)])
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    assert rc in (0, 2)
    assert main(["status", str(run), "--json"]) in (0, 2)
    capsys.readouterr()
