"""cluster/local_slurm.sh: three idle nodes, real multi-node jobs, exit codes, and a clean stop."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

DAEMONS = {"munged", "slurmctld", "slurmd", "slurmstepd"}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _slurm_processes() -> list[tuple[int, str]]:
    """(pid, program) of every running SLURM or munge daemon on this machine (read from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                program = os.path.basename(os.readlink(entry / "exe"))
            except OSError:
                continue
            if program.removesuffix("-wlm") in DAEMONS:  # Debian: /usr/sbin/slurmd -> slurmd-wlm
                found.append((int(entry.name), program))
    return found


def test_cluster_has_three_idle_nodes_and_started_within_a_minute(slurm):
    assert slurm.node_states() == {"n1": "idle", "n2": "idle", "n3": "idle"}
    assert slurm.start_seconds < 60, f"start took {slurm.start_seconds:.1f} s"
    # start is idempotent: a second call finds everything running and returns at once
    t0 = time.monotonic()
    again = slurm.local_slurm("start")
    assert again.returncode == 0, again.stdout
    assert "already running" in again.stdout
    assert time.monotonic() - t0 < 10


def test_two_node_job_runs_on_both_nodes(slurm, tmp_path):
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\nsrun bash -c 'echo \"node=$SLURMD_NODENAME id=$SLURM_NODEID\"'\n")
    out = tmp_path / "job.out"
    proc = slurm.run("sbatch", "--wait", "--nodes=2", "--ntasks-per-node=1", f"--output={out}", script)
    assert proc.returncode == 0, proc.stdout
    lines = set(out.read_text().split("\n"))
    assert {"node=n1 id=0", "node=n2 id=1"} <= lines, out.read_text()


def test_sbatch_wait_returns_the_job_exit_code(slurm, tmp_path):
    # A job that outlives sbatch's first polls: with a too-small MinJobAge the job is purged before
    # sbatch looks and `sbatch --wait` exits 0 whatever the job did.
    proc = slurm.run("sbatch", "--wait", f"--output={tmp_path / 'out'}", "--wrap", "sleep 7; exit 3")
    assert proc.returncode == 3, proc.stdout
    assert "exit code not found" not in proc.stdout


def test_stop_leaves_no_daemon_and_start_comes_back(slurm, tmp_path):
    # A running job must not survive the stop either (its slurmstepd is not a child of slurmd).
    job = slurm.run("sbatch", "--parsable", f"--output={tmp_path / 'out'}", "--wrap", "sleep 300")
    assert job.returncode == 0, job.stdout
    deadline = time.monotonic() + 30
    while "R" not in slurm.run("squeue", "-h", "-o", "%t").stdout.split():
        assert time.monotonic() < deadline, "the sleep job never started"
        time.sleep(0.5)
    pids = {name: int(path.read_text()) for name, path in slurm.pid_files().items()}
    assert all(_alive(pid) for pid in pids.values()), pids

    stop = slurm.local_slurm("stop")
    assert stop.returncode == 0, stop.stdout
    assert not [name for name, pid in pids.items() if _alive(pid)], stop.stdout
    assert _slurm_processes() == [], stop.stdout
    assert not any(path.exists() for path in slurm.pid_files().values())
    assert slurm.local_slurm("stop").returncode == 0  # stopping a stopped cluster is fine

    # ... and it comes back (packages installed now: the daemons alone take a few seconds)
    seconds = slurm.start()
    assert seconds < 60
    assert slurm.node_states() == {"n1": "idle", "n2": "idle", "n3": "idle"}


def test_stop_never_kills_a_process_named_by_a_stale_pid_file(tmp_path):
    """A PID file left behind after a crash may name a PID the kernel has given to someone else."""
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        run = tmp_path / "run"
        run.mkdir()
        for name in ("slurmctld", "slurmd-n1", "slurmd-n2", "slurmd-n3", "munged"):
            (run / f"{name}.pid").write_text(f"{stranger.pid}\n")
        env = dict(os.environ, GIGATRON_SLURM_DIR=str(tmp_path))
        repo = Path(__file__).resolve().parents[2]
        stop = subprocess.run([str(repo / "cluster" / "local_slurm.sh"), "stop"], env=env, timeout=60,
                              capture_output=True, text=True)
        assert stop.returncode == 0, stop.stderr
        assert stranger.poll() is None, "stop killed an unrelated process"
    finally:
        stranger.kill()
        stranger.wait()
