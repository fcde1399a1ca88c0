"""Read a run directory as the trainer and cluster/launch.sh write it, tolerating every state a
live, crashed or half-written run can be in. Nothing here raises on bad content: a missing file is
empty, an unparsable line is counted and skipped, a truncated last line (being written) is ignored.

    metrics.jsonl            one JSON object per step (core/metrics.py)
    events.jsonl             {"time", "kind": start|restart|requeue|crash, "attempt", "detail"}
    checkpoints/latest       the newest step folder's name; step_XXXXXXXX/ folders, committed ones
                             holding .complete and manifest.json, and the recipe in config.json
    logs/.../{stdout,stderr}.log   per-rank logs, first line "gigatron-launch: rank R/W ..."
    .exit/attempt-N/rank-R   each rank's exit status per attempt (42: checkpointed on request)
    pipeline_timeline.json   {"stats", "events": per rank [{"kind", "stage", "mb", "start", "end"}]}
    tb/                      TensorBoard event files (train/<key> scalars)
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

CHECKPOINTED = 42  # launch.sh: "42 on any rank" means "checkpointed on request"


@dataclass
class JsonLines:
    records: list[dict] = field(default_factory=list)
    bad_lines: int = 0        # unparsable complete lines
    partial_tail: bool = False  # the last line had no newline yet (being written)
    from_tensorboard: bool = False  # records rebuilt from run_dir/tb (no metrics.jsonl)


def read_jsonl(path: str) -> JsonLines:
    out = JsonLines()
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return out
    lines = data.split(b"\n")
    tail = lines.pop()  # after the last newline: empty, or a line still being written (ignored)
    out.partial_tail = bool(tail.strip())
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            out.bad_lines += 1
            continue
        if isinstance(record, dict):
            out.records.append(record)
        else:
            out.bad_lines += 1
    return out


def metrics(run_dir: str) -> JsonLines:
    """Step records by step, keeping the last record of each step (a restarted run re-logs the
    steps after its checkpoint). Without a readable metrics.jsonl, the TensorBoard scalars
    (train/<key>) stand in, with `from_tensorboard` set."""
    raw = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    by_step: dict[int, dict] = {}
    for r in raw.records:
        step = r.get("step")
        if isinstance(step, (int, float)) and not isinstance(step, bool):
            by_step[int(step)] = r
    if not by_step:
        for tag, points in tensorboard_scalars(run_dir).items():
            key = tag.split("/", 1)[-1]
            for step, value in points:
                by_step.setdefault(int(step), {"step": int(step)})[key] = float(value)
        raw.from_tensorboard = bool(by_step)
    raw.records = [by_step[s] for s in sorted(by_step)]
    return raw


def events(run_dir: str) -> list[dict]:
    return read_jsonl(os.path.join(run_dir, "events.jsonl")).records


@dataclass
class Checkpoint:
    name: str
    step: int
    committed: bool
    mtime: float


def checkpoints(run_dir: str) -> tuple[list[Checkpoint], str | None]:
    """(step folders, oldest first; the name `checkpoints/latest` points at, if readable)."""
    root = os.path.join(run_dir, "checkpoints")
    found = []
    try:
        names = os.listdir(root)
    except OSError:
        names = []
    for name in names:
        match = re.fullmatch(r"step_(\d+)", name)
        path = os.path.join(root, name)
        if not match or not os.path.isdir(path):
            continue
        committed = os.path.exists(os.path.join(path, ".complete")) and os.path.exists(os.path.join(path, "manifest.json"))
        try:
            mtime = os.path.getmtime(path)
        except OSError:
            mtime = 0.0
        found.append(Checkpoint(name, int(match.group(1)), committed, mtime))
    found.sort(key=lambda c: c.step)
    latest = None
    try:
        with open(os.path.join(root, "latest")) as f:
            latest = f.read().strip() or None
    except OSError:
        pass
    return found, latest


def last_good_checkpoint(run_dir: str) -> Checkpoint | None:
    """The newest committed checkpoint (the `latest` pointer may name one still being written)."""
    committed = [c for c in checkpoints(run_dir)[0] if c.committed]
    return committed[-1] if committed else None


def recipe(run_dir: str) -> dict | None:
    """The recipe of the newest checkpoint that has a readable config.json."""
    for c in reversed(checkpoints(run_dir)[0]):
        try:
            with open(os.path.join(run_dir, "checkpoints", c.name, "config.json")) as f:
                data = json.load(f)
            if isinstance(data, dict):
                return data
        except (OSError, ValueError):
            continue
    return None


def exit_statuses(run_dir: str) -> dict[int, dict[int, int]]:
    """attempt -> rank -> exit status, from launch.sh's .exit/attempt-N/rank-R files."""
    root = os.path.join(run_dir, ".exit")
    out: dict[int, dict[int, int]] = {}
    try:
        attempts = os.listdir(root)
    except OSError:
        return out
    for attempt in attempts:
        match = re.fullmatch(r"attempt-(\d+)", attempt)
        if not match:
            continue
        ranks = out.setdefault(int(match.group(1)), {})
        try:
            files = os.listdir(os.path.join(root, attempt))
        except OSError:
            continue
        for name in files:
            rank = re.fullmatch(r"rank-(\d+)", name)
            if not rank:
                continue
            try:
                with open(os.path.join(root, attempt, name)) as f:
                    ranks[int(rank.group(1))] = int(f.read().strip() or -1)
            except (OSError, ValueError):
                continue
    return out


@dataclass
class RankLog:
    rank: int
    path: str
    last_line: str
    error: str  # the last line that looks like an error (Traceback tail, "Error", "error:"), or ""


_ERROR = re.compile(r"(Error|Exception|error:|Traceback|Killed|SIGKILL|SIGSEGV|NCCL WARN)")


def rank_logs(run_dir: str, max_bytes: int = 65536) -> list[RankLog]:
    """Per-rank log files under logs/ (any depth): the rank from the launch shim's first line or a
    rankN in the path; the last line and last error-looking line of each (read from the tail)."""
    root = os.path.join(run_dir, "logs")
    out: dict[tuple[int, str], RankLog] = {}
    for directory, _, files in os.walk(root):
        for name in files:
            if not name.endswith(".log"):
                continue
            path = os.path.join(directory, name)
            try:
                with open(path, "rb") as f:
                    head = f.readline(4096).decode("utf-8", "replace")
                    f.seek(0, os.SEEK_END)
                    size = f.tell()
                    f.seek(max(0, size - max_bytes))
                    tail = f.read().decode("utf-8", "replace").splitlines()
            except OSError:
                continue
            match = re.search(r"gigatron-launch: rank (\d+)/", head) or re.search(r"rank[_-]?(\d+)", path)
            if not match:
                continue
            rank = int(match.group(1))
            lines = [ln for ln in tail if ln.strip()]
            errors = [ln for ln in lines if _ERROR.search(ln)]
            out[(rank, name)] = RankLog(rank, path, lines[-1] if lines else "", errors[-1] if errors else "")
    return sorted(out.values(), key=lambda r: (r.rank, r.path))


def pipeline_timeline(run_dir: str) -> dict | None:
    try:
        with open(os.path.join(run_dir, "pipeline_timeline.json")) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def tensorboard_scalars(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] from the TensorBoard event files in run_dir/tb (empty if none, or if
    the tensorboard package is not installed)."""
    root = os.path.join(run_dir, "tb")
    if not os.path.isdir(root):
        return {}
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return {}
    try:
        accumulator = EventAccumulator(root, size_guidance={"scalars": 0})
        accumulator.Reload()
        return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}
    except Exception:  # noqa: BLE001 - a half-written event file must not break status
        return {}
