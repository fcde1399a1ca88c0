"""cluster/launch.sh on this machine and on the local two-node SLURM cluster, with the real trainer.

Training runs use recipes/llama3_debug.yaml shrunk further through overrides (byte tokenizer, so a
258-token vocabulary; dp=4, one sequence per rank) so a step takes well under a second on 2 cores.
The recipe is always launched from a copy whose path holds spaces, quotes, `$`, `;`, `&` and
backticks, so every test also checks that the launcher never lets the shell reinterpret it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "cluster" / "launch.sh"
DEBUG_RECIPE = REPO / "recipes" / "llama3_debug.yaml"
STEPS = 20
WEIRD_STEM = "llama3 debug;$x"  # file name of the recipe copy; its run folders use "llama3_debug__x"
SAFE_STEM = "llama3_debug__x"


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict[str, Path]:
    """Shared folders: the recipe copy at a hostile path, the token data, a runs folder with a space."""
    base = tmp_path_factory.mktemp("launch")
    recipe_dir = base / "my recipes; it's $HOME & `x`"
    recipe_dir.mkdir()
    recipe = recipe_dir / f"{WEIRD_STEM}.yaml"
    if DEBUG_RECIPE.exists():
        shutil.copy(DEBUG_RECIPE, recipe)
    return {"base": base, "recipe": recipe, "data": base / "data" / "bytes"}


def tiny(work: dict[str, Path], steps: int = STEPS) -> list[str]:
    """--set arguments that make the debug recipe fast on CPU (same data for every run)."""
    overrides = ["parallel.dp=4", "train.micro_batch_size=1", f"train.steps={steps}",
                 "data.tokenizer=bytes", "model.vocab_size=258", f"data.path={work['data']}",
                 "data.max_mb=0.5", "run.progress=false"]
    return [arg for kv in overrides for arg in ("--set", kv)]


def launcher_env(base_env: dict[str, str], runs: Path) -> dict[str, str]:
    env = dict(base_env)
    env.update(GIGATRON_PROCS_PER_NODE="2", GIGATRON_RUNS_DIR=str(runs), GIGATRON_PYTHON=sys.executable)
    return env


def run(cmd: list, env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], env=env, cwd=REPO, timeout=timeout,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def final_checkpoint(run_dir: Path) -> Path:
    root = run_dir / "checkpoints"
    if (root / "latest").exists():
        return root / (root / "latest").read_text().strip()
    return max(p for p in root.glob("step_*") if not p.name.endswith(".tmp"))


def rank_logs(run_dir: Path, attempt: int) -> dict[int, str]:
    """{global rank: node} read from the first line of every per-rank stdout log of one attempt."""
    found = {}
    for log in (run_dir / "logs" / f"attempt-{attempt}").glob("*/*/attempt_0/*/stdout.log"):
        first = log.read_text().splitlines()[0]  # "gigatron-launch: rank R/W local_rank L node N"
        words = first.split()
        rank, node = int(words[2].split("/")[0]), words[-1]
        assert log.parts[-5] == node, (log, first)  # logs/attempt-A/<node>/<torchrun dir>/attempt_0/<L>
        found[rank] = node
    return found


def rank_logs_local(run_dir: Path) -> list[int]:
    """Global ranks found in the per-rank logs of a run outside SLURM."""
    return [int(log.read_text().split()[2].split("/")[0])
            for log in (run_dir / "logs" / "local").glob("*/attempt_0/*/stdout.log")]


# --- no cluster needed -------------------------------------------------------------------------------


def test_missing_recipe_and_bad_arguments_fail_at_once(tmp_path):
    env = launcher_env(os.environ, tmp_path / "runs")
    missing = run([LAUNCH, tmp_path / "nope.yaml"], env, timeout=30)
    assert missing.returncode == 2 and "not found" in missing.stdout, missing.stdout
    unknown = run([LAUNCH, DEBUG_RECIPE, "--frobnicate"], env, timeout=30)
    assert unknown.returncode == 2 and "unknown option '--frobnicate'" in unknown.stdout, unknown.stdout
    assert not (tmp_path / "runs").exists()


def test_invalid_recipe_is_rejected_before_anything_starts(work, tmp_path):
    env = launcher_env(os.environ, tmp_path / "runs")
    proc = run([LAUNCH, work["recipe"], "--set", "train.no_such_field=1"], env, timeout=60)
    assert proc.returncode == 2, proc.stdout
    assert "no_such_field" in proc.stdout and "nothing was started" in proc.stdout
    assert not (tmp_path / "runs").exists()


def test_local_run_without_slurm(work, tmp_path):
    """`cluster/launch.sh RECIPE` outside SLURM: torchrun --standalone with world_size ranks."""
    env = launcher_env(os.environ, tmp_path / "runs dir")
    env.pop("SLURM_JOB_ID", None)
    overrides = [*tiny(work, steps=4), "--set", "parallel.dp=2", "--set", "train.warmup_steps=1"]
    proc = run([LAUNCH, work["recipe"], *overrides], env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "world_size=2" in proc.stdout
    (run_dir,) = (tmp_path / "runs dir").glob(f"{SAFE_STEM}-*")
    assert [m["step"] for m in metrics(run_dir)] == list(range(1, 5))
    assert sorted(rank_logs_local(run_dir)) == [0, 1]


# --- on the local SLURM cluster ----------------------------------------------------------------------


def test_layout_mismatch_fails_before_srun(slurm, work, tmp_path):
    runs = tmp_path / "runs"
    env = launcher_env(slurm.env, runs)
    out = tmp_path / "job.out"
    t0 = time.monotonic()
    # world_size 4 (dp=4) on 1 node x 2 processes
    proc = run(["sbatch", "--wait", "--nodes=1", f"--output={out}", LAUNCH, work["recipe"], *tiny(work)],
               env, timeout=120)
    elapsed = time.monotonic() - t0
    text = out.read_text()
    assert proc.returncode == 2, proc.stdout + text
    assert "layout mismatch" in text and "world_size=4" in text and "--nodes=2" in text, text
    assert str(work["recipe"]) in text  # the hostile path came through intact
    assert elapsed < 30, f"took {elapsed:.1f} s"
    assert "srun" not in text and "gigatron-launch: rank" not in text
    assert not runs.exists()


@pytest.fixture(scope="module")
def reference_run(slurm, work):
    """An uninterrupted 2-node run: 4 ranks, 2 per node, STEPS steps."""
    runs = work["base"] / "runs dir"
    env = launcher_env(slurm.env, runs)
    out = work["base"] / "reference.out"
    proc = run(["sbatch", "--wait", "--parsable", "--nodes=2", f"--output={out}", "cluster/launch.sh",
                work["recipe"], *tiny(work)], env, timeout=600)
    job = proc.stdout.split()[0]
    return {"returncode": proc.returncode, "sbatch": proc.stdout, "out": out.read_text(),
            "job": job, "run_dir": runs / f"{SAFE_STEM}-{job}"}


def test_train_on_two_nodes(reference_run):
    ref = reference_run
    assert ref["returncode"] == 0, ref["sbatch"] + ref["out"][-4000:]
    assert "gigatron-launch: training finished" in ref["out"]
    run_dir = ref["run_dir"]
    assert run_dir.is_dir(), f"expected run dir {run_dir}"
    steps = metrics(run_dir)
    assert [m["step"] for m in steps] == list(range(1, STEPS + 1))
    first, last = steps[0]["loss"], sum(m["loss"] for m in steps[-5:]) / 5
    assert last < 0.8 * first, f"loss did not fall: {first:.3f} -> {last:.3f}"
    # 4 ranks, a block of 2 per node, rank 0 on the first node
    assert rank_logs(run_dir, attempt=0) == {0: "n1", 1: "n1", 2: "n2", 3: "n2"}
    exits = {p.name: p.read_text().strip() for p in (run_dir / ".exit" / "attempt-0").iterdir()}
    assert exits == {f"rank-{r}": "0" for r in range(4)}


def _load_checkpoint(path: Path, tmp: Path) -> dict:
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"{path.parent.parent.name}.pt"
    dcp_to_torch_save(str(path), str(out))
    return torch.load(out, weights_only=False)


def _assert_same(a, b, where: str = "") -> None:
    import torch

    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where}: max diff {(a.float() - b.float()).abs().max().item():.3g}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_preempted_job_checkpoints_requeues_resumes_and_matches(slurm, work, reference_run, tmp_path):
    """SIGUSR1 to the batch script (what --signal=B:USR1@300 sends before the time limit) ->
    checkpoint, exit 42, `scontrol requeue`, restart with the same run folder, resume, finish with
    exactly the parameters of the uninterrupted run."""
    assert reference_run["returncode"] == 0, "the reference run failed (see test_train_on_two_nodes)"
    runs = tmp_path / "runs"
    env = launcher_env(slurm.env, runs)
    out = tmp_path / "job.out"
    sbatch = subprocess.Popen(["sbatch", "--wait", "--parsable", "--nodes=2", f"--output={out}",
                               str(LAUNCH), str(work["recipe"]), *tiny(work)],
                              env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        job = sbatch.stdout.readline().strip()
        assert job.isdigit(), job
        run_dir = runs / f"{SAFE_STEM}-{job}"
        deadline = time.monotonic() + 300
        while not ((run_dir / "metrics.jsonl").exists() and len(metrics(run_dir)) >= 3):
            assert sbatch.poll() is None, f"job ended early:\n{out.read_text()[-4000:]}"
            assert time.monotonic() < deadline, "training never reached step 3"
            time.sleep(0.3)
        signal = subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=env, capture_output=True, text=True)
        assert signal.returncode == 0, signal.stderr
        rest, _ = sbatch.communicate(timeout=600)
    finally:
        if sbatch.poll() is None:
            sbatch.kill()
    text = out.read_text()
    assert sbatch.returncode == 0, rest + text[-4000:]

    launcher_log = (run_dir / "launcher.log").read_text()
    for expected in ("restart 0 (SLURM_RESTART_COUNT=0)", "received SIGUSR1", "trainer checkpointed (exit 42)",
                     "restart 1 (SLURM_RESTART_COUNT=1)", "training finished"):
        assert expected in launcher_log, f"{expected!r} missing from launcher.log:\n{launcher_log}"
    # the first attempt stopped early at a checkpoint, the second resumed from it
    interrupted = [int(p.read_text()) for p in (run_dir / ".exit" / "attempt-0").iterdir()]
    assert 42 in interrupted, interrupted
    steps = [m["step"] for m in metrics(run_dir)]
    assert steps == list(range(1, STEPS + 1)), steps  # resumed where it stopped: no gap, no repeat
    assert rank_logs(run_dir, attempt=1) == {0: "n1", 1: "n1", 2: "n2", 3: "n2"}

    mine = _load_checkpoint(final_checkpoint(run_dir), tmp_path)
    reference = _load_checkpoint(final_checkpoint(reference_run["run_dir"]), tmp_path)
    for key in ("model", "optim"):
        _assert_same(mine[key], reference[key], key)
