"""The supervisor: rerun a failed job from its latest verified checkpoint, within a failure budget.

cluster/launch.sh runs one attempt of the job (torchrun on this machine, or srun over the SLURM
allocation) under this loop:

    python -m gigatron.cluster.supervisor --run-dir D --session S --started-at T --world-size W
        [--slurm --hosts "n1 n2" --procs-per-node P] RECIPE [--set key=value ...] -- COMMAND ...

Each attempt runs COMMAND with GIGATRON_ATTEMPT (numbered across the run folder's life),
GIGATRON_EXIT_DIR (where every rank's shim writes its exit status, host and time), GIGATRON_LOG_DIR and
GIGATRON_RUN_START (the session's start, for effective training time). torchrun already tears one
node down when a worker dies, and `srun --kill-on-bad-exit` the other nodes; the trainer resumes by
itself from `latest`. What neither gives, and this file adds: restarts across nodes with the static
rendezvous the launcher needs for bitwise reproducibility (torchrun's --max-restarts restarts one
agent's workers only, and has no rate limit or record of causes), the budget
(`cluster.max_restarts` restarts per session, and at most `cluster.max_restarts_per_hour`), the
cause of each failure (the first rank to fail by its exit time: rank, host, exit status or signal; a
rank stuck in a hang as core/heartbeat.py named it; ranks that left no status: process or node lost),
and under SLURM the exclusion of the failing node (`cluster.exclude_failed_nodes`: requeue without it).

Everything is appended to RUN_DIR/supervisor.jsonl (session, attempt, restart, gave_up events), which
cluster/monitor/restarts.py turns into `gigatron status` lines, and in short to events.jsonl (the
monitor's start/restart/requeue/crash events). A session is one launch.sh run, or one
SLURM job across its requeues. Exit status: 0 finished; 42 a rank checkpointed on request; 75 requeue
the job without the nodes in RUN_DIR/exclude_nodes; 2 or 3 the trainer's own verdict (bad recipe or
data, non-finite loss: restarting cannot help); 1 the budget is spent.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

REQUEUE_EXIT, GAVE_UP_EXIT = 75, 1
FINAL_STATUSES = {2: "bad recipe or data", 3: "too many non-finite steps"}


def say(message: str, log_file: str | None = None) -> None:
    line = f"gigatron-supervisor: {message}"
    print(line, file=sys.stderr, flush=True)
    if log_file:
        with open(log_file, "a") as f:
            f.write(f"{time.strftime('%F %T')} {line}\n")


def read_events(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def signal_name(status: int) -> str | None:
    if status > 128:
        try:
            return signal.Signals(status - 128).name
        except ValueError:
            return None
    return None


def rank_records(exit_dir: str) -> dict[int, dict]:
    """{rank: {"status", "host", "time"}} from the shims' files <exit_dir>/rank-<R> (exit status) and
    <exit_dir>.hosts/rank-<R> ("host time-of-exit")."""
    out = {}
    if os.path.isdir(exit_dir):
        for name in os.listdir(exit_dir):
            if name.startswith("rank-"):
                status = open(os.path.join(exit_dir, name)).read().split()
                meta_path = os.path.join(exit_dir + ".hosts", name)
                meta = open(meta_path).read().split() if os.path.exists(meta_path) else []
                if status:
                    out[int(name[5:])] = {"status": int(status[0]), "host": meta[0] if meta else "?",
                                          "time": float(meta[1]) if len(meta) > 1 else 0.0}
    return out


def failure_cause(records: dict[int, dict], world: int, hang: dict | None, host_of) -> dict:
    """The failure of one attempt: a hang the watchdog named, else the first rank to exit non-zero,
    else the ranks that left no exit status."""
    if hang:
        rank = hang["stuck_ranks"][0]
        step = hang["step"].get(str(rank), hang["step"].get(rank))
        phase = hang["phase"].get(str(rank), hang["phase"].get(rank))
        waited = max(hang["no_progress_s"].values())
        return {"kind": "hang", "rank": rank, "ranks": hang["stuck_ranks"],
                "host": hang["hosts"].get(str(rank), hang["hosts"].get(rank)), "exit_status": 43, "signal": None,
                "cause": f"hang: rank {','.join(map(str, hang['stuck_ranks']))} stuck in phase '{phase}' at step "
                         f"{step} (no progress for {waited:.1f} s; {hang['how']})"}
    failed = sorted((r for r, rec in records.items() if rec["status"] != 0), key=lambda r: records[r]["time"])
    if failed:
        rank = failed[0]
        rec = records[rank]
        sig = signal_name(rec["status"])
        what = f"killed by {sig}" if sig else f"exit status {rec['status']}"
        return {"kind": "crash", "rank": rank, "ranks": [rank], "host": rec["host"], "exit_status": rec["status"],
                "signal": sig, "cause": f"rank {rank} on {rec['host']} {what}"}
    missing = [r for r in range(world) if r not in records]
    if missing:
        hosts = sorted({host_of(r) for r in missing})
        return {"kind": "lost", "rank": missing[0], "ranks": missing, "host": hosts[0], "exit_status": None,
                "signal": None, "cause": f"ranks {','.join(map(str, missing))} on {','.join(hosts)} left no exit "
                                         f"status (process or node lost)"}
    return {"kind": "unknown", "rank": None, "ranks": [], "host": None, "exit_status": None, "signal": None,
            "cause": "the launcher failed before any rank reported"}


def latest_step(run_dir: str) -> int | None:
    root = os.path.join(run_dir, "checkpoints")
    found = []
    for folder, _, files in os.walk(root):
        if "latest" in files:
            name = open(os.path.join(folder, "latest")).read().strip()
            if name.startswith("step_"):
                found.append(int(name[5:]))
    return max(found) if found else None


class Supervisor:
    def __init__(self, args: argparse.Namespace, cluster, world: int):
        self.args, self.c, self.world = args, cluster, world
        self.run_dir = args.run_dir
        self.events_path = os.path.join(self.run_dir, "supervisor.jsonl")
        self.log_file = os.path.join(self.run_dir, "launcher.log")
        self.stopping: str | None = None
        self.hosts = args.hosts.split()

    def event(self, **record) -> dict:
        record = {"session": self.args.session, "time": time.time(), **record}
        with open(self.events_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        # the monitor's short form (cluster/monitor/run_dir.py: events.jsonl, kind start|restart|requeue|crash)
        kind = {"attempt": "start", "gave_up": "crash"}.get(record["event"])
        if record["event"] == "end" and record.get("outcome") == "failed":
            kind = "crash"
        elif record["event"] == "restart":
            kind = "restart" if record.get("action") == "restart" else "requeue"
        if kind:
            short = {"time": record["time"], "kind": kind, "attempt": record.get("attempt"),
                     "detail": record.get("cause") or record.get("message") or ""}
            with open(os.path.join(self.run_dir, "events.jsonl"), "a") as f:
                f.write(json.dumps(short) + "\n")
        return record

    def host_of(self, rank: int) -> str:
        if self.hosts and self.args.procs_per_node:
            return self.hosts[min(rank // self.args.procs_per_node, len(self.hosts) - 1)]
        return os.uname().nodename

    def _on_signal(self, signum, frame) -> None:
        self.stopping = signal.Signals(signum).name  # no new attempt; the child gets the signal itself

    def run_attempt(self, attempt: int, start: float) -> int:
        exit_dir = os.path.join(self.run_dir, ".exit", f"attempt-{attempt}")
        for folder in (exit_dir, exit_dir + ".hosts"):
            os.makedirs(folder, exist_ok=True)
            for name in os.listdir(folder):
                os.remove(os.path.join(folder, name))
        env = dict(os.environ, GIGATRON_ATTEMPT=str(attempt), GIGATRON_EXIT_DIR=exit_dir,
                   GIGATRON_LOG_DIR=os.path.join(self.run_dir, "logs", f"attempt-{attempt}"),
                   GIGATRON_RUN_START=repr(start))
        self.event(event="attempt", attempt=attempt, hosts=self.hosts or [os.uname().nodename])
        proc = subprocess.Popen(self.args.command, env=env)
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:
                self.stopping = "SIGINT"

    def run(self) -> int:
        events = read_events(self.events_path)
        mine = [e for e in events if e.get("session") == self.args.session]
        starts = [e for e in mine if e["event"] == "session"]
        start = starts[0]["started_at"] if starts else self.args.started_at
        if not starts:
            self.event(event="session", started_at=start, max_restarts=self.c.max_restarts,
                       slurm_job=os.environ.get("SLURM_JOB_ID"))
        else:
            self.event(event="requeued", restart_count=os.environ.get("SLURM_RESTART_COUNT"))
        attempt = sum(1 for e in events if e["event"] == "attempt")
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # launch.sh's trap turns it into a checkpoint request
        while True:
            status = self.run_attempt(attempt, start)
            records = rank_records(os.path.join(self.run_dir, ".exit", f"attempt-{attempt}"))
            statuses = {rec["status"] for rec in records.values()}
            if status == 0:
                self.event(event="end", attempt=attempt, outcome="finished")
                return 0
            if 42 in statuses:
                self.event(event="end", attempt=attempt, outcome="checkpointed")
                return 42
            hangs = [h for h in read_events(os.path.join(self.run_dir, "hangs.jsonl")) if h["attempt"] == attempt]
            cause = failure_cause(records, self.world, hangs[-1] if hangs else None, self.host_of)
            self.event(event="end", attempt=attempt, outcome="failed", status=status, **cause)
            if cause["exit_status"] in FINAL_STATUSES:
                say(f"not restarting: {cause['cause']} ({FINAL_STATUSES[cause['exit_status']]}; restarting cannot "
                    f"help)", self.log_file)
                return cause["exit_status"]
            if self.stopping:
                say(f"{self.stopping} received: not restarting after {cause['cause']}", self.log_file)
                return status or 1
            decision = self.decide(cause, attempt)
            if decision is not None:
                return decision
            attempt += 1

    def decide(self, cause: dict, attempt: int) -> int | None:
        """Restart (None), requeue without a node (75) or give up (1) after a failed attempt."""
        events = [e for e in read_events(self.events_path) if e.get("session") == self.args.session]
        restarts = [e for e in events if e["event"] == "restart"]
        now = time.time()
        step = latest_step(self.run_dir)
        resume = f"step {step}" if step is not None else "the start (no checkpoint yet)"
        relaunch = f"then relaunch with --set run.dir={self.run_dir} to resume from {resume}"
        if len(restarts) >= self.c.max_restarts:
            message = (f"giving up after {len(restarts)} restart(s) (cluster.max_restarts={self.c.max_restarts}); "
                       f"last failure: {cause['cause']}. Fix the cause (logs under {self.run_dir}/logs), {relaunch}, "
                       f"or raise cluster.max_restarts")
            self.event(event="gave_up", attempt=attempt, reason="max_restarts", message=message)
            say(message, self.log_file)
            return GAVE_UP_EXIT
        recent = [e for e in restarts if now - e["time"] < 3600]
        if len(recent) >= self.c.max_restarts_per_hour:
            message = (f"giving up: {len(recent)} restarts in the last hour (cluster.max_restarts_per_hour="
                       f"{self.c.max_restarts_per_hour}), the job is crash-looping; last failure: {cause['cause']}. "
                       f"Fix the cause (logs under {self.run_dir}/logs), {relaunch}")
            self.event(event="gave_up", attempt=attempt, reason="rate", message=message)
            say(message, self.log_file)
            return GAVE_UP_EXIT
        excluded = [n for e in events for n in e.get("excluded", [])]
        if (self.args.slurm and cause["host"] and cause["host"] in self.hosts and
                len(excluded) < self.c.exclude_failed_nodes):
            excluded.append(cause["host"])
            self.event(event="restart", attempt=attempt, action="requeue", excluded=[cause["host"]],
                       resume_step=step, **cause)
            with open(os.path.join(self.run_dir, "exclude_nodes"), "w") as f:
                f.write(",".join(excluded) + "\n")
            say(f"restart {len(restarts) + 1}/{self.c.max_restarts}: {cause['cause']}; requeueing without "
                f"{','.join(excluded)} (cluster.exclude_failed_nodes={self.c.exclude_failed_nodes}), resuming from "
                f"{resume}", self.log_file)
            return REQUEUE_EXIT
        self.event(event="restart", attempt=attempt, action="restart", excluded=[], resume_step=step, **cause)
        say(f"restart {len(restarts) + 1}/{self.c.max_restarts}: {cause['cause']}; resuming from {resume}",
            self.log_file)
        return None


def parse_args(argv: list[str]) -> argparse.Namespace:
    if "--" not in argv:
        raise SystemExit("gigatron-supervisor: usage: ... RECIPE [--set k=v ...] -- COMMAND ...")
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="gigatron.cluster.supervisor")
    parser.add_argument("recipe")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--session", required=True)
    parser.add_argument("--started-at", type=float, default=None)
    parser.add_argument("--slurm", action="store_true")
    parser.add_argument("--hosts", default="")
    parser.add_argument("--procs-per-node", type=int, default=0)
    parser.add_argument("--world-size", type=int, default=1)
    args = parser.parse_args(argv[:split])
    args.command = argv[split + 1:]
    args.started_at = args.started_at or time.time()
    return args


def cluster_config(recipe: str, overrides: list[str]):
    """The recipe's `cluster` section only: launch.sh has validated the whole recipe already
    (`gigatron layout`), and this avoids importing torch and the model families (seconds)."""
    from gigatron.core.config import ClusterConfig
    from gigatron.core.config_loader import apply_overrides, build, load_yaml

    data = apply_overrides(load_yaml(recipe), overrides)
    return build(ClusterConfig, data.get("cluster") or {}, prefix="cluster.")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from gigatron.core.config_loader import ConfigError

    try:
        cluster = cluster_config(args.recipe, args.overrides)
    except ConfigError as err:
        say(str(err))
        return 2
    os.makedirs(args.run_dir, exist_ok=True)
    return Supervisor(args, cluster, args.world_size).run()


if __name__ == "__main__":
    sys.exit(main())
