"""Fault injection for tests and drills: kill or hang a rank at a step, fail a checkpoint write.

Off unless BOTH environment variables are set, so no recipe, override or stray variable turns it on:

    GIGATRON_FAULT_INJECTION="kill:rank=1:step=3:attempt=0,hang:rank=0:step=7:attempt=1,ckpt_fail:step=4"
    GIGATRON_FAULT_INJECTION_CONFIRM=inject-faults-into-this-run

A spec alone is ignored with a warning. Each fault is `kind:key=value:...` with kind `kill` (SIGKILL
this process), `hang` (block the training thread forever, as a rank stuck outside any collective)
or `ckpt_fail` (raise OSError while committing the checkpoint of that step); `rank` (default 0),
`step` (kill/hang: when `step` steps are done; ckpt_fail: the checkpoint of that step) and
`attempt` (the supervisor's attempt number, GIGATRON_ATTEMPT; default: every attempt). Every fault
that fires first appends a line to RUN_DIR/faults.jsonl (rank, host, step, attempt, time).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import time

from gigatron.core.config_loader import ConfigError

log = logging.getLogger("gigatron")
SPEC_ENV, CONFIRM_ENV, CONFIRM_VALUE = "GIGATRON_FAULT_INJECTION", "GIGATRON_FAULT_INJECTION_CONFIRM", \
    "inject-faults-into-this-run"
KINDS = ("kill", "hang", "ckpt_fail")


def parse(spec: str) -> list[dict]:
    """'kill:rank=1:step=3,...' -> [{"kind": "kill", "rank": 1, "step": 3, "attempt": None}, ...]."""
    faults = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        kind, *fields = item.split(":")
        if kind not in KINDS:
            raise ConfigError(SPEC_ENV, f"unknown fault '{kind}' in {item!r}; choose one of {', '.join(KINDS)}")
        fault = {"kind": kind, "rank": 0, "step": None, "attempt": None}
        for field in fields:
            key, _, value = field.partition("=")
            if key not in ("rank", "step", "attempt") or not value.isdigit():
                raise ConfigError(SPEC_ENV, f"bad field {field!r} in {item!r}; use rank=R, step=S, attempt=A")
            fault[key] = int(value)
        if fault["step"] is None:
            raise ConfigError(SPEC_ENV, f"{item!r} needs step=S")
        faults.append(fault)
    return faults


class Faults:
    """The faults of this process (rank), read once from the environment."""

    def __init__(self, run_dir: str, rank: int):
        self.run_dir, self.rank = run_dir, rank
        self.attempt = int(os.environ.get("GIGATRON_ATTEMPT", "0"))
        spec = os.environ.get(SPEC_ENV, "")
        self.faults: list[dict] = []
        if spec and os.environ.get(CONFIRM_ENV) != CONFIRM_VALUE:
            if rank == 0:
                log.warning("ignoring %s: fault injection also needs %s=%s", SPEC_ENV, CONFIRM_ENV, CONFIRM_VALUE)
        elif spec:
            self.faults = [f for f in parse(spec) if f["rank"] == rank and f["attempt"] in (None, self.attempt)]

    def _fire(self, fault: dict, step: int) -> None:
        record = {**fault, "step": step, "attempt": self.attempt, "host": os.environ.get("SLURMD_NODENAME",
                  socket.gethostname()), "time": time.time()}
        with open(os.path.join(self.run_dir, "faults.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        log.warning("fault injection: %s on rank %d at step %d (attempt %d)", fault["kind"], self.rank, step,
                    self.attempt)

    def at_step(self, step: int) -> None:
        """Called by the trainer when `step` steps are done."""
        for fault in self.faults:
            if fault["step"] == step and fault["kind"] in ("kill", "hang"):
                self._fire(fault, step)
                if fault["kind"] == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                while True:  # a hang: only the watchdog (core/heartbeat.py) ends this process
                    time.sleep(3600)

    def at_checkpoint_write(self, step: int) -> None:
        """Called by every rank before it commits the checkpoint of `step`."""
        for fault in self.faults:
            if fault["step"] == step and fault["kind"] == "ckpt_fail":
                self._fire(fault, step)
                raise OSError(f"injected checkpoint write failure at step {step} on rank {self.rank}")


_active: Faults | None = None


def install(run_dir: str, rank: int) -> Faults:
    global _active
    _active = Faults(run_dir, rank)
    return _active


def at_step(step: int) -> None:
    if _active is not None and _active.faults:
        _active.at_step(step)


def at_checkpoint_write(step: int) -> None:
    if _active is not None and _active.faults:
        _active.at_checkpoint_write(step)
