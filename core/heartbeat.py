"""Hang detection: a heartbeat per rank through the rendezvous store, and a watchdog that names the stuck rank.

Every rank runs one daemon thread. Each `cluster.heartbeat_s` it writes `hb/<rank>` (step, phase,
time of the last progress) to its own client of the job's TCPStore (torchrun's agent store, or rank
0's), never to the shared filesystem. The training thread only sets attributes: `progress(step)`
after each step, `phase(name)` around slow work. Rank 0's thread reads every heartbeat; a rank
without progress for `cluster.hang_timeout_s` (steps) or `cluster.slow_phase_timeout_s` (start-up,
the first step of an attempt, where torch.compile runs, checkpoint saves, evaluation, shutdown) is
stuck. The process groups' collective timeout follows the phase too (`_set_pg_timeout`: the
watchdog's timeout plus its reaction time), much shorter than torch's default 10 or 30 minutes
during steps, and it never fires before the watchdog. Rank 0 then sets `abort` in the store;
every rank's thread answers with its last collectives from torch's flight recorder
(TORCH_FR_BUFFER_SIZE: NCCL, and gloo in torch 2.13, record every collective in a ring buffer,
cheap enough to stay on: no measurable cost per gloo all-reduce here) and exits with
HANG_EXIT_CODE, which tears the job down (torchrun stops the other ranks, srun the other nodes) and
lets the supervisor restart it.

The stuck rank is the one behind: in some process group it has entered fewer collectives than a
peer (the peers wait for it there), the fewest steps and collectives of those. Rank 0 writes the
finding to RUN_DIR/hangs.jsonl and the log: stuck ranks, hosts, phase, step, seconds without
progress, and the last collectives of every rank.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import sys
import threading
import time

import torch
import torch.distributed as dist

log = logging.getLogger("gigatron")
HANG_EXIT_CODE = 43
SLOW_PHASES = ("startup", "first_step", "checkpoint", "eval", "shutdown")
LAST_COLLECTIVES = 4  # per process group, in the report


def last_collectives(k: int = LAST_COLLECTIVES) -> dict | None:
    """This rank's last k collectives per process group from the flight recorder; None if it is off."""
    c10d = torch._C._distributed_c10d
    # NCCL keeps its own recorder (CUDA events); gloo the generic one
    dumps = [getattr(c10d, name) for name in ("_dump_nccl_trace_json", "_dump_fr_trace_json") if hasattr(c10d, name)]
    if dist.is_initialized() and dist.get_backend() != "nccl":
        dumps.reverse()
    dump = {}
    for fn in dumps:
        try:
            dump = json.loads(fn(True, False))
        except Exception:  # noqa: BLE001 - no recorder in this build/backend
            continue
        if dump.get("entries"):
            break
    entries = dump.get("entries") or []
    if not entries:
        return None
    config = dump.get("pg_config") or {}
    groups: dict[str, list] = {}
    for e in entries:
        pg = e.get("process_group") or ["?", "?"]
        ranks = (config.get(pg[0]) or {}).get("ranks", "")
        groups.setdefault(f"{pg[1]} {ranks}".strip(), []).append(e)
    out = {}
    for key, items in groups.items():  # p2p (pipeline sends/receives) count apart: collectives only
        items = [e for e in items if not e.get("is_p2p")] or items
        out[key] = [{"seq": e.get("collective_seq_id"), "op": e.get("profiling_name"),
                     "sizes": e.get("input_sizes"), "state": e.get("state")} for e in items[-k:]]
    return {"groups": out, "total": max(e.get("record_id", 0) for e in entries) + 1}


def name_stuck(beats: dict[int, dict], records: dict[int, dict | None], stale: list[int]) -> tuple[list[int], str]:
    """The stuck ranks and how they were found: behind in a group's collectives (flight recorder),
    else the stale ranks with the fewest steps."""
    behind: set[int] = set()
    seqs: dict[str, dict[int, int]] = {}
    for rank, rec in records.items():
        for group, items in ((rec or {}).get("groups") or {}).items():
            if items:
                seqs.setdefault(group, {})[rank] = items[-1]["seq"] or 0
    for per_rank in seqs.values():
        top = max(per_rank.values())
        behind |= {r for r, s in per_rank.items() if s < top}
    # a rank that never entered a group's newest collective is behind too; so are peers waiting on it
    # in other groups, hence the tie-break: fewest steps, then fewest collectives overall
    pool, how = (sorted(behind), "behind its peers in the flight recorder") if behind else (stale, "no progress")
    key = {r: (beats.get(r, {}).get("step", -1), (records.get(r) or {}).get("total", 0)) for r in pool}
    low = min(key.values())
    return [r for r in pool if key[r] == low], how


def collective_timeout(cluster, phase_timeout_s: float) -> datetime.timedelta:
    """The groups' collective timeout for a phase: the watchdog's, plus its check period, the time it
    takes to collect the flight records and a margin, so that the watchdog always fires first."""
    return datetime.timedelta(seconds=phase_timeout_s + 3 * cluster.heartbeat_s + 5.0)


class Watchdog:
    """The heartbeat/watchdog thread of one rank (see the module docstring)."""

    def __init__(self, cluster, run_dir: str, rank: int, world: int, attempt: int, groups: list | None = None):
        self.c, self.run_dir, self.rank, self.world, self.attempt = cluster, run_dir, rank, world, attempt
        self.groups = groups or []  # process groups whose collective timeout follows the phase
        self.host = os.environ.get("SLURMD_NODENAME", socket.gethostname())
        self.step, self.phase_name = 0, "startup"
        self.progress_time = self.started = time.time()
        self.stopped = threading.Event()
        # a client of its own: the training thread may block in the default store's waits (group creation)
        timeout = datetime.timedelta(seconds=min(60.0, cluster.slow_phase_timeout_s))
        client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                               timeout=timeout)
        self.store = dist.PrefixStore(f"gigatron/watchdog/{attempt}/", client)
        self.thread = threading.Thread(target=self._run, name="gigatron-watchdog", daemon=True)
        self.thread.start()

    # -- the training thread's side: attribute writes only ----------------------------------------
    def progress(self, step: int) -> None:
        self.step, self.progress_time = step, time.time()
        if self.phase_name == "first_step":
            self.set_phase("step")

    def set_phase(self, name: str) -> None:
        slow_before = self.phase_name in SLOW_PHASES
        self.phase_name, self.progress_time = name, time.time()
        if (name in SLOW_PHASES) != slow_before and name != "done":
            self._follow_phase()

    def _follow_phase(self) -> None:
        seconds = collective_timeout(self.c, self.timeout(self.phase_name))
        for group in self.groups:  # takes effect for the collectives issued from now on
            with contextlib.suppress(Exception):
                dist.distributed_c10d._set_pg_timeout(seconds, group)

    @contextlib.contextmanager
    def phase(self, name: str):
        previous = self.phase_name
        self.set_phase(name)
        try:
            yield
        finally:
            self.set_phase(previous)

    def stop(self) -> None:
        self.set_phase("done")
        self.stopped.set()
        self.thread.join(timeout=2 * self.c.heartbeat_s)
        with contextlib.suppress(Exception):
            self._beat()

    # -- the watchdog thread --------------------------------------------------------------------
    def timeout(self, phase: str) -> float:
        return self.c.slow_phase_timeout_s if phase in SLOW_PHASES else self.c.hang_timeout_s

    def _beat(self) -> None:
        self.store.set(f"hb/{self.rank}", json.dumps({"step": self.step, "phase": self.phase_name,
                                                     "progress_time": self.progress_time, "host": self.host}))

    def _run(self) -> None:
        last_ok = time.time()
        while not self.stopped.wait(self.c.heartbeat_s):
            try:
                self._beat()
                if self.store.check(["abort"]):
                    self._answer_abort()
                if self.rank == 0:
                    self._detect()
                last_ok = time.time()
            except Exception as err:  # noqa: BLE001 - the store is gone: the job is broken
                if time.time() - last_ok > self.c.hang_timeout_s:
                    self._exit(f"watchdog: rendezvous store unreachable for {time.time() - last_ok:.0f} s ({err})")

    def _exit(self, message: str) -> None:
        log.error(message)
        for handler in logging.getLogger().handlers + log.handlers:
            handler.flush()
        sys.stderr.flush()
        os._exit(HANG_EXIT_CODE)

    def _answer_abort(self) -> None:
        self.store.set(f"fr/{self.rank}", json.dumps(last_collectives()))
        if self.rank != 0:
            self._exit(f"watchdog: rank 0 found a stuck rank (see hangs.jsonl); rank {self.rank} exits "
                       f"at step {self.step} in phase {self.phase_name}")

    def _heartbeats(self) -> dict[int, dict]:
        keys = [f"hb/{r}" for r in range(self.world)]
        if self.store.check(keys):
            return {r: json.loads(v) for r, v in enumerate(self.store.multi_get(keys))}
        return {r: json.loads(self.store.get(k)) for r, k in enumerate(keys) if self.store.check([k])}

    def _detect(self) -> None:
        now = time.time()
        beats = self._heartbeats()
        default = {"step": 0, "phase": "startup", "progress_time": self.started, "host": "?"}
        beats = {r: beats.get(r, default) for r in range(self.world)}
        stale = [r for r, b in beats.items() if b["phase"] != "done"
                 and now - b["progress_time"] > self.timeout(b["phase"])]
        if not stale:
            return
        self.store.set("abort", json.dumps({"by": self.rank, "time": now}))
        self.store.set(f"fr/{self.rank}", json.dumps(last_collectives()))
        deadline = time.time() + max(3.0, 2 * self.c.heartbeat_s)
        keys = [f"fr/{r}" for r in range(self.world)]
        while not self.store.check(keys) and time.time() < deadline:
            time.sleep(0.05)
        records = {r: json.loads(self.store.get(k)) for r, k in enumerate(keys) if self.store.check([k])}
        stuck, how = name_stuck(beats, records, stale)
        report = {"attempt": self.attempt, "time": now, "stuck_ranks": stuck, "how": how,
                  "hosts": {r: beats[r]["host"] for r in stuck}, "phase": {r: beats[r]["phase"] for r in stuck},
                  "step": {r: beats[r]["step"] for r in stuck},
                  "no_progress_s": {r: round(now - beats[r]["progress_time"], 2) for r in stale},
                  "timeout_s": {r: self.timeout(beats[r]["phase"]) for r in stale}, "last_collectives": records}
        with open(os.path.join(self.run_dir, "hangs.jsonl"), "a") as f:
            f.write(json.dumps(report) + "\n")
        for r in stuck:
            log.error("watchdog: rank %d on %s is stuck: no progress for %.1f s in phase '%s' at step %d "
                      "(timeout %.0f s; %s)", r, beats[r]["host"], now - beats[r]["progress_time"],
                      beats[r]["phase"], beats[r]["step"], self.timeout(beats[r]["phase"]), how)
        for r, rec in sorted(records.items()):
            for group, items in ((rec or {}).get("groups") or {}).items():
                log.error("watchdog: rank %d last collectives in %s: %s", r, group,
                          ", ".join(f"#{i['seq']} {i['op']}" for i in items))
        self._exit(f"watchdog: tearing the job down (exit {HANG_EXIT_CODE}) for a restart")


_active: Watchdog | None = None


def start(cluster, run_dir: str, groups: list | None = None) -> Watchdog | None:
    """Start this rank's watchdog (needs the process group's MASTER_ADDR/PORT). `groups`: the
    process groups whose collective timeout follows the phase (ParallelDims.groups())."""
    global _active
    stop()  # one left by an earlier run in this process (in-process tests)
    if dist.is_initialized() and "MASTER_ADDR" in os.environ:
        try:
            _active = Watchdog(cluster, run_dir, dist.get_rank(), dist.get_world_size(),
                               int(os.environ.get("GIGATRON_ATTEMPT", "0")), groups)
        except (RuntimeError, ValueError) as err:  # no store at MASTER_ADDR:MASTER_PORT
            log.warning("hang detection off: cannot reach the rendezvous store (%s)", err)
    return _active


def stop() -> None:
    global _active
    if _active is not None:
        _active.stop()
        _active = None


def progress(step: int) -> None:
    if _active is not None:
        _active.progress(step)


def set_phase(name: str) -> None:
    if _active is not None:
        _active.set_phase(name)


@contextlib.contextmanager
def phase(name: str):
    if _active is None:
        yield
    else:
        with _active.phase(name):
            yield
