"""`gigatron status` lines for automatic recovery: the restarts with their causes, effective training time.

Reads RUN_DIR/supervisor.jsonl (cluster/supervisor.py) and metrics.jsonl, files only. The figures
are those of the newest supervisor session (one launch, or one SLURM job across its requeues):
effective training time = productive step time (the surviving record of each step written in the
session, core/goodput.py) / wall time from the session's start to its end (or now, while it runs);
lost steps = step records the session wrote that a restart later re-did.
"""

from __future__ import annotations

import os
import time

from gigatron.core.goodput import read_records, survivors


def restart_summary(run_dir: str, now: float | None = None) -> dict | None:
    """The newest session's recovery figures, or None for a run the supervisor never ran."""
    events = read_records(os.path.join(run_dir, "supervisor.jsonl"))
    if not events:
        return None
    session = events[-1]["session"]
    mine = [e for e in events if e.get("session") == session]
    start = next((e["started_at"] for e in mine if e["event"] == "session"), mine[0]["time"])
    done = [e for e in mine if e["event"] in ("gave_up",) or (e["event"] == "end" and e["outcome"] != "failed")]
    running = mine[-1]["event"] in ("attempt", "restart", "session", "requeued") and not done
    end = (now or time.time()) if running else mine[-1]["time"]
    last, lost = survivors(read_records(os.path.join(run_dir, "metrics.jsonl")), since=start)
    productive = sum(last.values())
    wall = max(end - start, 1e-9)
    restarts = [{k: e.get(k) for k in ("attempt", "time", "rank", "host", "exit_status", "signal", "kind", "cause",
                                       "action", "excluded", "resume_step")} for e in mine if e["event"] == "restart"]
    gave_up = next((e["message"] for e in mine if e["event"] == "gave_up"), None)
    max_restarts = next((e.get("max_restarts") for e in mine if e["event"] == "session"), None)
    return {"session": session, "attempts": sum(1 for e in mine if e["event"] == "attempt"),
            "restarts": restarts, "max_restarts": max_restarts, "gave_up": gave_up, "running": running,
            "wall_s": wall, "productive_s": productive, "effective_time_fraction": min(productive / wall, 1.0),
            "lost_steps": lost, "excluded_nodes": [n for r in restarts for n in (r["excluded"] or [])]}


def format_restarts(summary: dict | None) -> list[str]:
    if summary is None:
        return []
    s = summary
    budget = f" of cluster.max_restarts={s['max_restarts']}" if s["max_restarts"] is not None else ""
    lines = [f"recovery   {len(s['restarts'])} automatic restart(s){budget} in {s['attempts']} attempt(s); "
             f"effective training time {s['effective_time_fraction']:.1%} ({s['productive_s']:.0f} s of steps in "
             f"{s['wall_s']:.0f} s wall); {s['lost_steps']} step(s) lost and re-done"
             + (f"; excluded node(s) {', '.join(s['excluded_nodes'])}" if s["excluded_nodes"] else "")]
    for r in s["restarts"]:
        what = "requeued without " + ",".join(r["excluded"]) if r["action"] == "requeue" else "restarted"
        resume = f"from step {r['resume_step']}" if r["resume_step"] is not None else "from the start"
        lines.append(f"           attempt {r['attempt']}: {r['cause']}; {what} {resume}")
    if s["gave_up"]:
        lines.append(f"           GAVE UP: {s['gave_up']}")
    return lines
