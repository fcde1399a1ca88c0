"""`gigatron status RUN_DIR`: one screen on a run, live, finished or crashed.

Reads only files (cluster/monitor/run_dir.py), so it works from a login node on a run that is
being written. Sections: state and progress with ETA; the loss trend; throughput against the
planner's projection for the run's recipe; stragglers; restarts and requeues; the last good
checkpoint; warnings (unparsable lines, errors in rank logs).

ETA = (total steps - step) x the median step time of the last 20 steps. Loss trend: the mean of
the last 10 losses against the 10 before, and a least-squares slope over the last 50 steps.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from statistics import median

from gigatron.cluster.monitor import run_dir as rd
from gigatron.cluster.monitor.restarts import format_restarts, restart_summary
from gigatron.cluster.monitor.stragglers import find_stragglers_in_groups, per_rank_times, straggler_counts

SPARK = "▁▂▃▄▅▆▇█"


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def series(records: list[dict], key: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), v) for r in records if (v := _number(r.get(key))) is not None]


def sparkline(values: list[float], width: int = 48) -> str:
    if not values:
        return ""
    if len(values) > width:  # mean of equal buckets
        size = len(values) / width
        values = [sum(values[int(i * size):max(int(i * size) + 1, int((i + 1) * size))]) /
                  max(1, len(values[int(i * size):max(int(i * size) + 1, int((i + 1) * size))])) for i in range(width)]
    low, high = min(values), max(values)
    span = high - low or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int((v - low) / span * len(SPARK)))] for v in values)


def slope(points: list[tuple[int, float]]) -> float | None:
    """Least-squares d(value)/d(step)."""
    if len(points) < 3:
        return None
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    var = sum((p[0] - mx) ** 2 for p in points)
    return None if var == 0 else sum((p[0] - mx) * (p[1] - my) for p in points) / var


def planner_projection(recipe: dict | None, gpu_name: str) -> dict:
    """The planner's projection for the run's recipe (from its checkpoint's config.json)."""
    if not recipe:
        return {"error": "no recipe yet (written with the first checkpoint)"}
    try:
        from gigatron.cluster.planner.hardware import gpu
        from gigatron.cluster.planner.layout import layout_from_config
        from gigatron.cluster.planner.memory import estimate_memory
        from gigatron.cluster.planner.model_shape import model_shape
        from gigatron.cluster.planner.throughput import project
        from gigatron.core.config import load_config

        data = {k: v for k, v in recipe.items() if k != "resolved_stages"}
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(data, f)
        try:
            cfg = load_config(f.name)
        finally:
            os.unlink(f.name)
        device = gpu(gpu_name)
        shape, layout = model_shape(cfg), layout_from_config(cfg)
        projection = project(shape, layout, device)
        memory = estimate_memory(shape, layout)
        return {"gpu": device.name, "tflops_per_gpu": projection.tflops_per_gpu, "mfu": projection.mfu,
                "tokens_per_s_per_gpu": projection.tokens_per_s_per_gpu, "step_time_s": projection.step_time_s,
                "memory_gb": memory.total / 1e9, "world_size": layout.world_size, "steps": cfg.train.steps}
    except Exception as err:  # noqa: BLE001 - status never fails on a recipe it cannot project
        return {"error": f"no projection: {err}"}


def build_status(run_dir: str, now: float | None = None, gpu: str = "h100-sxm", threshold: float | None = None) -> dict:
    """Everything `format_status` prints, as plain data (also `gigatron status --json`)."""
    now = time.time() if now is None else now
    out: dict = {"run_dir": run_dir, "now": now, "warnings": []}
    if not os.path.isdir(run_dir):
        out.update(state="missing", warnings=[f"{run_dir} is not a directory"])
        return out
    m = rd.metrics(run_dir)
    records = m.records
    if m.bad_lines:
        out["warnings"].append(f"metrics.jsonl: {m.bad_lines} unparsable line(s) skipped")
    out["partial_tail"] = m.partial_tail
    if m.from_tensorboard:
        out["warnings"].append("no metrics.jsonl: read from the TensorBoard events in tb/")
    recipe = rd.recipe(run_dir)
    steps_total = None
    if recipe:
        steps_total = _number((recipe.get("train") or {}).get("steps"))
        steps_total = int(steps_total) if steps_total else None
    last = records[-1] if records else {}
    step = int(last.get("step", 0)) if records else 0
    step_times = [v for _, v in series(records[-20:], "step_time_s")]
    typical = median(step_times) if step_times else None
    last_time = _number(last.get("time"))
    out["progress"] = {"step": step, "total": steps_total,
                       "fraction": step / steps_total if steps_total else None,
                       "step_time_s": typical,
                       "eta_s": (steps_total - step) * typical if steps_total and typical else None,
                       "last_update_age_s": now - last_time if last_time else None,
                       "elapsed_s": (last_time - _number(records[0].get("time")))
                       if last_time and _number(records[0].get("time")) else None}

    losses = series(records, "loss")
    trend: dict = {"last": losses[-1][1] if losses else None, "spark": sparkline([v for _, v in losses[-96:]])}
    if len(losses) >= 20:
        recent = [v for _, v in losses[-10:]]
        before = [v for _, v in losses[-20:-10]]
        trend["change"] = sum(recent) / 10 / (sum(before) / 10) - 1 if sum(before) else None
    trend["slope_per_100_steps"] = (s * 100) if (s := slope(losses[-50:])) is not None else None
    trend["non_finite"] = sum(1 for r in records if isinstance(r.get("loss"), float) and not math.isfinite(r["loss"]))
    out["loss"] = trend

    recent = records[-20:]
    measured = {key: median(vals) if (vals := [v for _, v in series(recent, key)]) else None
                for key in ("tokens_per_s", "tflops_per_device", "mfu", "data_wait_fraction", "peak_memory_gb")}
    out["throughput"] = measured
    out["projection"] = planner_projection(recipe, gpu)
    projection = out["projection"]
    if "error" not in projection and measured["tflops_per_device"] and measured["mfu"] is not None:
        out["throughput"]["vs_projection"] = measured["tflops_per_device"] / projection["tflops_per_gpu"]
    out["skipped"] = {"steps": last.get("skipped_steps"), "samples": last.get("skipped_samples")}

    if threshold is None:  # the run's own rule (run.straggler_threshold), as the trainer applied it
        threshold = _number((recipe or {}).get("run", {}).get("straggler_threshold")) if isinstance(
            (recipe or {}).get("run"), dict) else None
        threshold = 0.10 if threshold is None else threshold
    latest_times = next((r for r in reversed(records) if per_rank_times(r) is not None), None)
    straggle: dict = {"threshold": threshold, "history": straggler_counts(records, threshold)}
    if latest_times:
        all_times, groups = per_rank_times(latest_times)
        flagged = find_stragglers_in_groups(all_times, groups, threshold)
        times = [t for t in all_times if _number(t) is not None]
        middle = median(times) if times else None
        straggle.update(step=latest_times.get("step"), flagged=flagged, median_s=middle,
                        slowest=[(r, all_times[r] / middle) for r in flagged] if middle else [])
    elif records and isinstance(records[-1].get("stragglers"), list):
        straggle.update(step=step, flagged=records[-1]["stragglers"])
    out["stragglers"] = straggle

    evs = rd.events(run_dir)
    kinds: dict[str, int] = {}
    for e in evs:
        kinds[str(e.get("kind"))] = kinds.get(str(e.get("kind")), 0) + 1
    exits = rd.exit_statuses(run_dir)
    failed_attempts = {a: {r: s for r, s in ranks.items() if s not in (0, rd.CHECKPOINTED)} for a, ranks in exits.items()}
    failed_attempts = {a: r for a, r in failed_attempts.items() if r}
    out["restarts"] = {"events": kinds, "last_event": evs[-1] if evs else None, "attempts": len(exits),
                       "failed_attempts": failed_attempts}

    out["recovery"] = restart_summary(run_dir, now)  # supervisor restarts, effective time (restarts.py)

    ckpts, latest_name = rd.checkpoints(run_dir)
    good = rd.last_good_checkpoint(run_dir)
    out["checkpoint"] = {"last_good": good.name if good else None, "step": good.step if good else None,
                         "age_s": now - good.mtime if good else None, "latest_pointer": latest_name,
                         "uncommitted": [c.name for c in ckpts if not c.committed]}
    if latest_name and good and latest_name != good.name:
        out["warnings"].append(f"checkpoints/latest names {latest_name}, but the last committed one is {good.name}")

    logs = rd.rank_logs(run_dir)
    out["log_errors"] = [{"rank": lg.rank, "line": lg.error[-200:]} for lg in logs if lg.error][:8]

    # state
    last_event = evs[-1] if evs else {}
    crashed = (last_event.get("kind") == "crash" and (not last_time or _number(last_event.get("time")) is None
                                                       or last_time <= _number(last_event.get("time"))))
    if exits:
        newest = max(exits)
        crashed = crashed or bool(failed_attempts.get(newest))
    age = out["progress"]["last_update_age_s"]
    if steps_total and step >= steps_total:
        state = "finished"
    elif crashed:
        state = "crashed"
    elif not records:
        state = "starting"
    elif age is not None and age > max(120.0, 10 * (typical or 0)):
        state = "stalled"
    else:
        state = "running"
    out["state"] = state
    return out


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def format_status(s: dict) -> str:
    if s.get("state") == "missing":
        return f"{s['run_dir']}: no such run directory"
    p, loss, t, proj = s["progress"], s["loss"], s["throughput"], s["projection"]
    total = f"/{p['total']:,}" if p["total"] else ""
    percent = f" ({p['fraction']:.1%})" if p["fraction"] is not None else ""
    lines = [f"run        {s['run_dir']}",
             f"state      {s['state'].upper()}  step {p['step']:,}{total}{percent}, "
             f"{_fmt(p['step_time_s'], '.2f')} s/step, ETA {_duration(p['eta_s'])}, "
             f"last update {_duration(p['last_update_age_s'])} ago, elapsed {_duration(p['elapsed_s'])}"]
    change = f", last 10 vs previous 10: {loss['change']:+.1%}" if loss.get("change") is not None else ""
    slope_text = f", slope {loss['slope_per_100_steps']:+.4f}/100 steps" if loss.get("slope_per_100_steps") is not None else ""
    lines.append(f"loss       {_fmt(loss['last'], '.4f')}{change}{slope_text}")
    if loss["spark"]:
        lines.append(f"           {loss['spark']}")
    if loss.get("non_finite"):
        lines.append(f"           {loss['non_finite']} non-finite loss(es)")
    mfu = f", MFU {t['mfu']:.1%}" if t.get("mfu") is not None else ", MFU n/a (CPU)"
    lines.append(f"throughput {_fmt(t['tokens_per_s'], ',.0f')} tokens/s, {_fmt(t['tflops_per_device'], '.3f')} "
                 f"TFLOP/s per device{mfu}, data wait {_fmt(t['data_wait_fraction'], '.1%')}")
    if "error" in proj:
        lines.append(f"planner    {proj['error']}")
    else:
        ratio = t.get("vs_projection")
        verdict = f": measured {ratio:.0%} of projected" if ratio is not None else " (no comparison: not a GPU run)"
        lines.append(f"planner    {proj['tflops_per_gpu']:.0f} TFLOP/s per GPU, MFU {proj['mfu']:.1%}, "
                     f"{proj['tokens_per_s_per_gpu']:,.0f} tokens/s per GPU on {proj['world_size']} x {proj['gpu']}"
                     f"{verdict}; memory {proj['memory_gb']:.1f} GB projected"
                     + (f", {t['peak_memory_gb']:.1f} GB peak measured" if t.get("peak_memory_gb") else ""))
    st = s["stragglers"]
    if st.get("flagged"):
        slow = ", ".join(f"rank {r} ({ratio:.2f}x median)" for r, ratio in st.get("slowest", [])) or \
            ", ".join(f"rank {r}" for r in st["flagged"])
        lines.append(f"stragglers step {st.get('step')}: {slow} (> median + {st['threshold']:.0%})")
    elif "step" in st:
        lines.append(f"stragglers none at step {st['step']} (threshold median + {st['threshold']:.0%})")
    else:
        lines.append("stragglers no per-rank times logged yet")
    if st["history"]:
        worst = sorted(st["history"].items(), key=lambda kv: -kv[1])[:5]
        lines.append("           flagged most often: " + ", ".join(f"rank {r} x{n}" for r, n in worst))
    r = s["restarts"]
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(r["events"].items())) or "no events"
    last_event = r["last_event"]
    detail = ""
    if last_event:
        detail = (f"; last: {last_event.get('kind')} (attempt {last_event.get('attempt')}) "
                  f"{_duration(s['now'] - last_event['time']) + ' ago' if _number(last_event.get('time')) else ''}"
                  f" {str(last_event.get('detail') or '')[:80]}")
    lines.append(f"restarts   {kinds}; {r['attempts']} launch attempt(s){detail}")
    for attempt, ranks in sorted(r["failed_attempts"].items()):
        codes = ", ".join(f"rank {k}: {v}" for k, v in sorted(ranks.items())[:8])
        lines.append(f"           attempt {attempt} failed: {codes}")
    lines += format_restarts(s.get("recovery"))
    c = s["checkpoint"]
    if c["last_good"]:
        lines.append(f"checkpoint {c['last_good']} (step {c['step']:,}), {_duration(c['age_s'])} ago"
                     + (f"; not committed: {', '.join(c['uncommitted'])}" if c["uncommitted"] else ""))
    else:
        lines.append("checkpoint none committed yet")
    for e in s["log_errors"]:
        lines.append(f"log        rank {e['rank']}: {e['line']}")
    if s.get("partial_tail"):
        lines.append("note       metrics.jsonl ends in a line being written (ignored)")
    for w in s["warnings"]:
        lines.append(f"warning    {w}")
    return "\n".join(lines)
