"""Runs that heal themselves: cluster/launch.sh + cluster/supervisor.py with injected faults (core/faults.py).

- local drill (one launch, 5 attempts): three crashes (SIGKILL) at seeded random ranks and steps,
  then a hang; the run finishes alone, bitwise equal to an uninterrupted run (weights and AdamW
  state), every restart listed in `gigatron status` with its cause, the hang found within the
  timeout with the stuck rank named and every rank's last collectives, effective training time
  within 5% of the harness's own figure, the lost steps counted exactly;
- SLURM drill (one job on the 3-node local cluster, 2 nodes x 1 rank): three crashes; the first
  requeues the job without the failing node (cluster.exclude_failed_nodes=1), the others restart
  inside the allocation; bitwise equal to the same reference;
- failure budget: a checkpoint write failing on every attempt stops after cluster.max_restarts;
- the rate limit, the fault spec's opt-in and the Young/Daly interval (no processes).

The reference is the same recipe run once without faults (tests/distributed.py, 2 gloo processes),
with checkpoint.interval=auto: it is also the test of the Young/Daly interval."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gigatron.cluster.monitor.restarts import restart_summary
from gigatron.cluster.monitor.status import build_status, format_status
from gigatron.core.checkpoint.reader import CheckpointReader
from gigatron.core.goodput import young_daly_interval
from gigatron.core.train import main as train_main
from tests.distributed import run_distributed

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "cluster" / "launch.sh"
RECIPE = REPO / "recipes" / "llama3_debug.yaml"
STEPS, INTERVAL, HANG_TIMEOUT, HEARTBEAT = 12, 2, 5.0, 1.0
SMALL = ["data.tokenizer=bytes", "model.vocab_size=258", "model.dim=64", "model.n_layers=2", "model.n_heads=4",
         "model.n_kv_heads=2", "model.ffn_dim=128", "train.seq_len=64", "train.global_batch_size=4",
         "train.micro_batch_size=1", "train.warmup_steps=2", f"train.steps={STEPS}",
         f"checkpoint.interval={INTERVAL}", "run.tensorboard=false", "run.progress=false", "train.dtype=float32",
         "data.max_mb=0.3", "parallel.dp=2", f"cluster.heartbeat_s={HEARTBEAT}",
         f"cluster.hang_timeout_s={HANG_TIMEOUT}", "cluster.slow_phase_timeout_s=120", "cluster.max_restarts=4"]
CONFIRM = {"GIGATRON_FAULT_INJECTION_CONFIRM": "inject-faults-into-this-run"}


def _train(rank, world_size, run_dir, overrides):
    return train_main([str(RECIPE), "--set", f"run.dir={run_dir}", *sum((["--set", o] for o in overrides), [])])


def _sets(overrides: list[str]) -> list[str]:
    return [arg for kv in overrides for arg in ("--set", kv)]


def _drill_faults(seed: int, world: int, crashes: int, hang: bool) -> list[dict]:
    """Seeded random ranks and strictly increasing steps, fault i firing in attempt i (so every
    attempt gets past the previous one's step before its own fault)."""
    rng = random.Random(seed)
    steps = sorted(rng.sample(range(1, STEPS), crashes + hang))
    return [{"kind": "hang" if hang and i == crashes else "kill", "rank": rng.randrange(world), "step": s,
             "attempt": i} for i, s in enumerate(steps)]


def _spec(faults: list[dict]) -> str:
    return ",".join(f"{f['kind']}:rank={f['rank']}:step={f['step']}:attempt={f['attempt']}" for f in faults)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _assert_bitwise_equal(a: Path, b: Path) -> int:
    ra, rb = CheckpointReader(str(a)), CheckpointReader(str(b))
    keys = [k for k in ra.keys() if k.startswith(("model.", "optim."))]
    assert keys and set(keys) == {k for k in rb.keys() if k.startswith(("model.", "optim."))}
    for key in keys:
        assert torch.equal(ra.read(key), rb.read(key)), key
    return len(keys)


def _harness_effective(run_dir: Path, t0: float, t1: float) -> float:
    """The test's own effective training time: the surviving (last) record of each step, over the
    harness's wall clock around the launch."""
    last = {}
    for r in _jsonl(run_dir / "metrics.jsonl"):
        last[r["step"]] = r["step_time_s"]
    return sum(last.values()) / (t1 - t0)


# The reference run also serves the checkpoint.interval=auto test: where checkpoints are saved does not
# change the training state (the drills save every 2 steps and must still match it bitwise). MTBF 2 s
# gives an interval of a few steps for ~0.1-1 s saves and ~0.05-0.3 s steps on this machine.
MTBF_S = 2.0
AUTO = ["checkpoint.interval=auto", f"cluster.mtbf_hours={MTBF_S / 3600}", "checkpoint.keep_last=0"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    base = tmp_path_factory.mktemp("resilience")
    overrides = SMALL + [f"data.path={base}/data/bytes"]
    assert run_distributed(_train, 2, str(base / "ref"), overrides + AUTO) == [0, 0]
    return {"base": base, "overrides": overrides, "ref": base / "ref" / "checkpoints" / f"step_{STEPS:08d}"}


def _check_restarts(run_dir: Path, faults: list[dict], world: int) -> dict:
    """Every fault became one restart, in order, with its cause; and `gigatron status` lists them."""
    summary = restart_summary(str(run_dir))
    assert [r["attempt"] for r in summary["restarts"]] == [f["attempt"] for f in faults]
    for r, f in zip(summary["restarts"], faults):
        if f["kind"] == "kill":
            assert (r["kind"], r["rank"], r["signal"]) == ("crash", f["rank"], "SIGKILL"), r
        else:
            assert (r["kind"], r["rank"]) == ("hang", f["rank"]), r
        # resumed from the newest checkpoint at or before the fault's step
        assert r["resume_step"] == (f["step"] // INTERVAL * INTERVAL or None), r
    assert summary["attempts"] == len(faults) + 1 and not summary["gave_up"]
    # lost work: the steps done after each fault's last checkpoint, done again
    assert summary["lost_steps"] == sum(f["step"] % INTERVAL for f in faults), summary
    text = format_status(build_status(str(run_dir)))
    print(text)
    for r in summary["restarts"]:
        assert f"attempt {r['attempt']}: {r['cause']}" in text
    assert f"{len(faults)} automatic restart(s)" in text
    return summary


def test_local_drill_three_crashes_and_a_hang(work, tmp_path):
    faults = _drill_faults(seed=17, world=2, crashes=3, hang=True)
    run_dir = tmp_path / "drill"
    env = dict(os.environ, GIGATRON_FAULT_INJECTION=_spec(faults), GIGATRON_PYTHON=sys.executable, **CONFIRM)
    t0 = time.time()
    proc = subprocess.run([str(LAUNCH), str(RECIPE), *_sets(work["overrides"]), "--set", f"run.dir={run_dir}"],
                          env=env, cwd=REPO, timeout=600, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t1 = time.time()
    assert proc.returncode == 0, proc.stdout[-6000:]
    fired = _jsonl(run_dir / "faults.jsonl")
    assert [(f["kind"], f["rank"], f["step"], f["attempt"]) for f in fired] == \
        [(f["kind"], f["rank"], f["step"], f["attempt"]) for f in faults]
    n = _assert_bitwise_equal(work["ref"], run_dir / "checkpoints" / f"step_{STEPS:08d}")
    summary = _check_restarts(run_dir, faults, world=2)

    # the hang: found within the timeout (plus one heartbeat, the check's period, and one of slack
    # for a loaded machine), the stuck rank named, every rank's last collectives in the report
    (hang,) = _jsonl(run_dir / "hangs.jsonl")
    stuck = faults[-1]["rank"]
    assert hang["stuck_ranks"] == [stuck] and hang["how"] == "behind its peers in the flight recorder", hang
    found_after = hang["time"] - fired[-1]["time"]
    assert HANG_TIMEOUT <= found_after <= HANG_TIMEOUT + 2 * HEARTBEAT, found_after
    for rank in ("0", "1"):
        groups = hang["last_collectives"][rank]["groups"]
        assert any("all_reduce" in c["op"] for items in groups.values() for c in items), groups

    # effective training time: the status figure against the harness's own clock (5%)
    ours, theirs = summary["effective_time_fraction"], _harness_effective(run_dir, t0, t1)
    print(f"local drill: {len(faults)} faults, {summary['attempts']} attempts, {n} tensors bitwise equal, "
          f"hang found after {found_after:.1f} s (timeout {HANG_TIMEOUT} s), effective time {ours:.2%} "
          f"(harness {theirs:.2%}), lost steps {summary['lost_steps']}, wall {t1 - t0:.1f} s")
    assert abs(ours - theirs) <= 0.05 * theirs
    final = _jsonl(run_dir / "metrics.jsonl")[-1]  # the trainer's own running figures, in the metrics
    assert final["lost_steps"] == summary["lost_steps"] and 0 < final["effective_time_fraction"] <= 1


def test_slurm_drill_three_crashes_excludes_the_first_failing_node(slurm, work, tmp_path):
    faults = _drill_faults(seed=4, world=2, crashes=3, hang=False)
    run_dir = tmp_path / "slurm_drill"
    env = dict(slurm.env, GIGATRON_FAULT_INJECTION=_spec(faults), GIGATRON_PROCS_PER_NODE="1", **CONFIRM)
    overrides = work["overrides"] + ["cluster.exclude_failed_nodes=1"]
    t0 = time.time()
    proc = slurm.run("sbatch", "--wait", "--nodes=2", f"--output={tmp_path}/job.out",
                     LAUNCH, RECIPE, *_sets(overrides), "--set", f"run.dir={run_dir}", timeout=600, env=env)
    t1 = time.time()
    out = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
    assert proc.returncode == 0, proc.stdout + out[-6000:]
    n = _assert_bitwise_equal(work["ref"], run_dir / "checkpoints" / f"step_{STEPS:08d}")
    summary = _check_restarts(run_dir, faults, world=2)
    first = summary["restarts"][0]
    assert first["action"] == "requeue" and first["excluded"] == [first["host"]]
    assert [r["action"] for r in summary["restarts"][1:]] == ["restart", "restart"]
    attempts = [e for e in _jsonl(run_dir / "supervisor.jsonl") if e["event"] == "attempt"]
    assert all(first["host"] not in a["hosts"] for a in attempts[1:]), attempts  # the new allocation
    assert f"requeued without {first['host']}" in format_status(build_status(str(run_dir)))
    ours, theirs = summary["effective_time_fraction"], _harness_effective(run_dir, t0, t1)
    print(f"SLURM drill: {n} tensors bitwise equal; excluded {first['host']}; effective time {ours:.2%} "
          f"(harness {theirs:.2%}, includes SLURM's requeue delay); wall {t1 - t0:.1f} s")
    # the harness's clock starts before sbatch (submission, scheduling): the same 5%
    assert abs(ours - theirs) <= 0.05 * theirs


def test_failure_budget_stops_after_max_restarts(work, tmp_path):
    """A checkpoint write failing on every attempt: 1 + cluster.max_restarts attempts, then a clear stop."""
    run_dir = tmp_path / "budget"
    overrides = [o for o in work["overrides"] if not o.startswith(("parallel.dp", "cluster.max_restarts"))]
    overrides += ["parallel.dp=1", "cluster.max_restarts=1", "train.steps=4"]
    env = dict(os.environ, GIGATRON_FAULT_INJECTION="ckpt_fail:rank=0:step=2", GIGATRON_PYTHON=sys.executable,
               **CONFIRM)
    proc = subprocess.run([str(LAUNCH), str(RECIPE), *_sets(overrides), "--set", f"run.dir={run_dir}"],
                          env=env, cwd=REPO, timeout=300, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.returncode == 1, proc.stdout[-4000:]
    assert "giving up after 1 restart(s) (cluster.max_restarts=1)" in proc.stdout
    assert "injected checkpoint write failure at step 2" in proc.stdout
    assert "resume from the start (no checkpoint yet)" in proc.stdout
    events = _jsonl(run_dir / "supervisor.jsonl")
    assert [e["event"] for e in events if e["event"] in ("attempt", "restart", "gave_up")] == \
        ["attempt", "restart", "attempt", "gave_up"]
    assert not (run_dir / "checkpoints" / "latest").exists()  # the failed write was never committed
    assert "GAVE UP: giving up after 1 restart(s)" in format_status(build_status(str(run_dir)))


def test_rate_limit_and_fault_opt_in(tmp_path, monkeypatch):
    """A run failing faster than cluster.max_restarts_per_hour stops; a fault spec alone does nothing."""
    from gigatron.cluster.supervisor import Supervisor, parse_args
    from gigatron.core import faults
    from gigatron.core.config import ClusterConfig

    run_dir = tmp_path / "rate"
    run_dir.mkdir()
    now = time.time()
    with open(run_dir / "supervisor.jsonl", "w") as f:
        for i in range(3):
            f.write(json.dumps({"session": "s", "time": now - 60 * i, "event": "restart", "attempt": i}) + "\n")
    args = parse_args([str(RECIPE), "--run-dir", str(run_dir), "--session", "s", "--", "true"])
    cause = {"cause": "rank 0 on vm killed by SIGKILL", "host": "vm"}
    limited = Supervisor(args, ClusterConfig(max_restarts=10, max_restarts_per_hour=3), world=1)
    assert limited.decide(cause, attempt=3) == 1
    assert "3 restarts in the last hour (cluster.max_restarts_per_hour=3)" in (run_dir / "launcher.log").read_text()
    assert Supervisor(args, ClusterConfig(max_restarts=10, max_restarts_per_hour=4), world=1).decide(cause, 3) is None

    monkeypatch.setenv("GIGATRON_FAULT_INJECTION", "kill:rank=0:step=1")
    assert faults.Faults(str(tmp_path), rank=0).faults == []  # no opt-in: ignored
    monkeypatch.setenv("GIGATRON_FAULT_INJECTION_CONFIRM", "yes")
    assert faults.Faults(str(tmp_path), rank=0).faults == []  # a wrong opt-in: ignored
    monkeypatch.setenv("GIGATRON_FAULT_INJECTION_CONFIRM", CONFIRM["GIGATRON_FAULT_INJECTION_CONFIRM"])
    assert faults.Faults(str(tmp_path), rank=0).faults == [{"kind": "kill", "rank": 0, "step": 1, "attempt": None}]
    assert faults.Faults(str(tmp_path), rank=1).faults == []
    with pytest.raises(faults.ConfigError, match="unknown fault 'explode'"):
        faults.parse("explode:rank=0:step=1")


def test_young_daly_interval():
    # Young's first-order sqrt(2 d M) is the limit for d << M; Daly's correction lowers it by ~d
    d, m = 60.0, 3 * 3600.0
    young = (2 * d * m) ** 0.5
    assert young - d <= young_daly_interval(d, m) <= young  # 1,099 s against Young's 1,138 s
    assert abs(young_daly_interval(1e-3, m) - (2e-3 * m) ** 0.5) < 1e-3
    assert young_daly_interval(1e-3, m) < young_daly_interval(d, m) < young_daly_interval(600, m)
    assert young_daly_interval(3 * m, m) == m  # saving takes longer than failures allow: checkpoint once per MTBF


def test_checkpoint_interval_auto_follows_young_daly(work):
    """checkpoint.interval=auto (the reference run, dp2): a save after step 1 measures the save time,
    then every save comes the number of steps the trainer chose (Young/Daly on the slowest rank's
    measurements) later."""
    run_dir = work["base"] / "ref"
    saves = sorted(int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step_*") if p.name[5:].isdigit())
    records = _jsonl(run_dir / "metrics.jsonl")
    chosen = {r["step"]: r["checkpoint_interval"] for r in records}
    assert saves[0] == 1 and chosen[1] == 1 and saves[-1] == STEPS
    for a, b in zip(saves, saves[1:-1]):  # the last save is the end of the run, not the interval's
        assert b - a == chosen[a + 1], (saves, chosen)
    derived = [r for r in records if r.get("checkpoint_save_s") is not None]
    assert derived and derived[0]["step"] == 2  # derived after the first save, at step 1
    for r in derived:  # the Young/Daly rule on the measured save and step times
        tau = young_daly_interval(r["checkpoint_save_s"], MTBF_S)
        assert r["checkpoint_interval"] == max(1, round(tau / r["checkpoint_step_s"])), r
    print(f"auto interval: saves at {saves}, chosen intervals {sorted(set(chosen.values()))}")
