"""A picture of one pipeline step, and its measured bubble.

Recording. For one chosen step (`parallel.pp_timeline_step`), every pipeline rank timestamps each
action it runs: forward (F), loss (L), full backward (B), or input / weight backward (I / W, zero
bubble), by wrapping its stages' `forward_one_chunk` / `backward_one_chunk` /
`backward_weight_one_chunk` and the schedule's loss call, plus every wait on a P2P send/recv (P), by
wrapping `torch.distributed.pipelining.schedules._wait_batch_p2p` while the step runs. Wall times
come from `time.perf_counter` (CLOCK_MONOTONIC, comparable across processes on one machine), and
each compute span also records the CPU time of its thread (`time.thread_time`). The records are
gathered to global rank 0 (`gather_object`), which writes `run_dir/pipeline_timeline.{png,json}`.

Two bubble figures (idle / total, per rank, averaged over the pp ranks):
- wall: total = first compute start to last compute end over all ranks; busy = the rank's compute
  spans. Honest on one device per rank. On a CPU host with fewer cores than ranks it is distorted:
  in the steady state every rank competes for a core, so compute spans stretch, while in warm-up and
  cool-down fewer ranks run and each runs faster; the wall bubble then reads low.
- replay: the same recorded action order of every rank, re-timed with each action's *CPU* time
  (what it costs with a core to itself), each action starting when its rank is free and its input
  has arrived (F(s, m) after F(s-1, m); B(s, m) after B(s+1, m)); P2P is taken as free. This is the
  timeline the run would have with one core per rank, measured durations and the real order.
- replay_median: the same, each action timed by the median CPU time of its (stage, kind) in the
  step. On a shared, overloaded host single actions' CPU times still scatter by +-30% (SMT, cache,
  frequency), and a pipeline turns every slow action into idle time downstream; the median keeps
  real differences between stages (the last one carries the loss) and drops that noise. It cannot
  remove a rank that runs slower for the whole step (a busy sibling hyper-thread): that shows as
  stage imbalance, i.e. extra bubble. `benchmarks/bench_pipeline.py` compares replay_median with the
  theory (p - 1) / (v m + p - 1).
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager

import torch.distributed as dist
import torch.distributed.pipelining.schedules as schedules

from gigatron.parallel.pipeline_split import theoretical_bubble

COMPUTE = ("F", "L", "B", "I", "W")
COLORS = {"F": "#4c72b0", "L": "#dd8452", "B": "#55a868", "I": "#8fd19e", "W": "#2a7f62", "P": "#bbbbbb"}


class TimelineRecorder:
    """Wraps this rank's stages and schedule; records only inside `record(enabled=True)`."""

    def __init__(self, stages, schedule):
        self.stages, self.events, self.active = stages, [], False
        self.group = stages[0].group
        for stage in stages:
            stage.forward_one_chunk = self._timed(stage.forward_one_chunk, "F", stage.stage_index)
            stage.backward_one_chunk = self._timed_backward(stage.backward_one_chunk, stage.stage_index)
            stage.backward_weight_one_chunk = self._timed(stage.backward_weight_one_chunk, "W", stage.stage_index)
        last = [s.stage_index for s in stages if s.is_last]
        if last:
            compute_loss = schedule._compute_loss
            schedule._compute_loss = lambda *a, **k: self._span("L", last[0], None, compute_loss, a, k)

    def _span(self, kind, stage, mb, fn, args, kwargs):
        if not self.active:
            return fn(*args, **kwargs)
        start, cpu = time.perf_counter(), time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            self.events.append({"kind": kind, "stage": stage, "mb": mb, "start": start,
                                "end": time.perf_counter(), "cpu": time.thread_time() - cpu})

    def _timed(self, fn, kind, stage):
        return lambda mb, *a, **k: self._span(kind, stage, mb, fn, (mb, *a), k)

    def _timed_backward(self, fn, stage):
        def backward(mb, *a, **k):
            full = k.get("full_backward", a[1] if len(a) > 1 else True)
            return self._span("B" if full else "I", stage, mb, fn, (mb, *a), k)
        return backward

    @contextmanager
    def record(self, enabled: bool):
        if not enabled:
            yield
            return
        dist.barrier(group=self.group)  # a common start, so ranks' clocks line up in the picture
        wait = schedules._wait_batch_p2p
        schedules._wait_batch_p2p = lambda work: self._span("P", None, None, wait, (work,), {})
        self.events, self.active = [], True
        try:
            yield
        finally:
            self.active = False
            schedules._wait_batch_p2p = wait

    def gather_and_save(self, run_dir: str, info: dict) -> dict | None:
        """Gather every rank's events to global rank 0; it keeps its own pipeline group's, writes
        the JSON and the PNG, and returns the stats (None elsewhere)."""
        record = {"group": dist.get_process_group_ranks(self.group), "pp_rank": dist.get_rank(self.group),
                  "events": self.events}
        gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(record, gathered, dst=0)
        if dist.get_rank() != 0:
            return None
        mine = sorted((r for r in gathered if r["group"] == record["group"]), key=lambda r: r["pp_rank"])
        per_rank = [r["events"] for r in mine]
        stats = {**info, **bubble_stats(per_rank, info["pp"] * info["virtual_stages"], info)}
        if run_dir:
            os.makedirs(run_dir, exist_ok=True)
            with open(os.path.join(run_dir, "pipeline_timeline.json"), "w") as f:
                json.dump({"stats": stats, "events": per_rank}, f)
            save_png(os.path.join(run_dir, "pipeline_timeline.png"), per_rank, stats)
        return stats


def replay(per_rank: list[list[dict]], n_stages: int, typical: str = "") -> list[list[dict]]:
    """Re-time each rank's compute actions, in their recorded order, with their CPU durations (or,
    with typical="median" / "min", that statistic of the CPU times of the same (stage, kind) in this
    step: a stage's cost without the per-action noise of a shared host); an action starts when its
    rank is free and its input (previous stage's F, next stage's B) is done."""
    queues = [[e for e in events if e["kind"] in COMPUTE] for events in per_rank]
    if typical:
        groups: dict[tuple, list[float]] = {}
        for e in (e for queue in queues for e in queue):
            groups.setdefault((e["kind"], e["stage"]), []).append(e["cpu"])
        pick = {"median": lambda v: sorted(v)[len(v) // 2], "min": min}[typical]
        typical = {key: pick(v) for key, v in groups.items()}
        queues = [[{**e, "cpu": typical[(e["kind"], e["stage"])]} for e in queue] for queue in queues]
    out = [[] for _ in queues]
    done: dict[tuple, float] = {}
    clock, pos = [0.0] * len(queues), [0] * len(queues)
    progress = True
    while progress:
        progress = False
        for r, queue in enumerate(queues):
            while pos[r] < len(queue):
                e = queue[pos[r]]
                kind, s, mb = e["kind"], e["stage"], e["mb"]
                if kind == "F" and s > 0:
                    need = ("F", s - 1, mb)
                elif kind in ("B", "I") and s < n_stages - 1:
                    need = ("B", s + 1, mb)
                else:
                    need = None
                if need is not None and need not in done:
                    break
                start = max(clock[r], done.get(need, 0.0))
                clock[r] = start + e["cpu"]
                done[("B" if kind == "I" else kind, s, mb)] = clock[r]
                out[r].append({**e, "start": start, "end": clock[r]})
                pos[r] += 1
                progress = True
    if any(p < len(q) for p, q in zip(pos, queues)):
        raise RuntimeError("replay stalled: the recorded actions do not form a pipeline schedule")
    return out


def _bubble(per_rank: list[list[dict]]) -> tuple[float, list[float]]:
    compute = [[e for e in events if e["kind"] in COMPUTE] for events in per_rank]
    begin = min(e["start"] for events in compute for e in events)
    span = max(e["end"] for events in compute for e in events) - begin
    idle = [1 - sum(e["end"] - e["start"] for e in events) / span for events in compute]
    return sum(idle) / len(idle), idle


def bubble_stats(per_rank: list[list[dict]], n_stages: int, info: dict) -> dict:
    wall, wall_per_rank = _bubble(per_rank)
    replayed, replay_per_rank = _bubble(replay(per_rank, n_stages))
    replayed_median, _ = _bubble(replay(per_rank, n_stages, typical="median"))
    p2p = [sum(e["end"] - e["start"] for e in events if e["kind"] == "P") for events in per_rank]
    return {"bubble_wall": wall, "bubble_wall_per_rank": wall_per_rank, "bubble_replay": replayed,
            "bubble_replay_per_rank": replay_per_rank, "bubble_replay_median": replayed_median,
            "p2p_wait_s_per_rank": p2p,
            "bubble_theory": theoretical_bubble(info["pp"], info["virtual_stages"], info["micro_batches"])}


def save_png(path: str, per_rank: list[list[dict]], stats: dict) -> None:
    """Two panels: the wall-clock record (P2P waits in grey) and the CPU-time replay."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    panels = [("wall clock (as recorded)", per_rank, stats["bubble_wall"]),
              ("replay with per-action CPU time (one core per rank)", replay(per_rank, stats["pp"] *
               stats["virtual_stages"]), stats["bubble_replay"])]
    fig, axes = plt.subplots(2, 1, figsize=(14, 1.2 + 1.1 * len(per_rank) * 2), squeeze=False)
    for ax, (title, ranks, bubble) in zip(axes[:, 0], panels):
        t0 = min(e["start"] for events in ranks for e in events)
        for r, events in enumerate(ranks):
            for e in events:
                x, w = (e["start"] - t0) * 1e3, (e["end"] - e["start"]) * 1e3
                ax.barh(r, w, left=x, height=0.8, color=COLORS[e["kind"]], edgecolor="black", linewidth=0.3)
                if e["kind"] in ("F", "B", "I", "W"):
                    ax.text(x + w / 2, r, f"{e['stage']}.{e['mb']}", ha="center", va="center", fontsize=6)
        ax.set_yticks(range(len(ranks)), [f"pp rank {r}" for r in range(len(ranks))])
        ax.invert_yaxis()
        ax.set_xlabel("ms")
        ax.set_title(f"{title}: bubble {bubble:.1%} (theory {stats['bubble_theory']:.1%}); labels stage.micro-batch",
                     fontsize=9)
    fig.legend(handles=[Patch(color=c, label=k) for k, c in COLORS.items()], loc="upper right", ncol=6, fontsize=8)
    fig.suptitle(f"{stats['schedule']}: pp={stats['pp']} v={stats['virtual_stages']} "
                 f"m={stats['micro_batches']}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
