"""A real three-node SLURM cluster for the tests in this folder, from `cluster/local_slurm.sh`.

The session fixture `slurm` starts the cluster once (on a fresh machine this installs Debian's SLURM
and munge, ~15 s) and stops it when the session ends, unless it was already running before the
session (then it belongs to someone else and stays up). It skips only where the cluster cannot exist
at all: not root, or SLURM missing with no apt-get to install it. If `start` itself fails, the tests
fail: in CI we are root on Debian and the cluster must come up.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LOCAL_SLURM = REPO / "cluster" / "local_slurm.sh"
SLURM_DIR = Path(os.environ.get("GIGATRON_SLURM_DIR", "/tmp/gigatron-slurm"))
NODES = ("n1", "n2", "n3")  # cluster/local_slurm.sh's emulated nodes (a 2-node job has a spare)


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root: cluster/local_slurm.sh installs packages and starts the SLURM daemons"
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        return "SLURM is not installed and there is no apt-get to install it"
    return None


@dataclass
class Slurm:
    """Handle on the running cluster: its state folder and an environment pointing the clients at it."""

    dir: Path
    env: dict[str, str]
    start_seconds: float  # time `local_slurm.sh start` took in this session (installation included)

    def run(self, *cmd: str | os.PathLike, timeout: float = 60, env: dict | None = None,
            cwd: Path = REPO) -> subprocess.CompletedProcess:
        """Run a command with the cluster's environment; stdout and stderr merged into .stdout."""
        return subprocess.run([str(c) for c in cmd], env=env or self.env, cwd=cwd, timeout=timeout,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def pid_files(self) -> dict[str, Path]:
        run = self.dir / "run"
        return {"munged": run / "munged.pid", "slurmctld": run / "slurmctld.pid",
                **{f"slurmd-{n}": run / f"slurmd-{n}.pid" for n in NODES}}

    def start(self) -> float:
        """`local_slurm.sh start`; returns the seconds it took, fails the test with its output otherwise."""
        return start_cluster(self.env)

    def local_slurm(self, command: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return self.run(LOCAL_SLURM, command, timeout=timeout)

    def node_states(self) -> dict[str, str]:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t").stdout
        return dict(line.split() for line in out.splitlines() if line.strip())


def start_cluster(env: dict[str, str]) -> float:
    """`local_slurm.sh start`; returns the seconds it took, fails the test with its output otherwise."""
    t0 = time.monotonic()
    proc = subprocess.run([str(LOCAL_SLURM), "start"], env=env, timeout=300,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    elapsed = time.monotonic() - t0
    if proc.returncode != 0:
        pytest.fail(f"cluster/local_slurm.sh start failed (exit {proc.returncode}):\n{proc.stdout}")
    assert f"export SLURM_CONF={SLURM_DIR / 'slurm.conf'}" in proc.stdout, proc.stdout
    return elapsed


@pytest.fixture(scope="session")
def slurm():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    env = dict(os.environ)
    env["SLURM_CONF"] = str(SLURM_DIR / "slurm.conf")
    # Jobs inherit this environment: make them use this interpreter (the venv with gigatron and torch).
    env["GIGATRON_PYTHON"] = sys.executable
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    status = subprocess.run([str(LOCAL_SLURM), "status"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    was_running = status.returncode == 0
    cluster = Slurm(dir=SLURM_DIR, env=env, start_seconds=start_cluster(env))
    try:
        yield cluster
    finally:
        if not was_running:
            subprocess.run([str(LOCAL_SLURM), "stop"], env=env, timeout=120)
