"""What the trainer measures about its own steps beyond the metrics: per-rank compute time for
straggler detection, and on-demand profiling. `StepMonitor.begin(step)` / `end(step)` bracket
each step (core/train.py); neither changes what the step computes.

Stragglers (every `run.straggler_every` steps; 0: never). The step runs under torch.profiler and
each rank's COMPUTE time is taken from it:
- on a GPU, the union of the step's device kernels other than NCCL's: a kernel runs only while
  the GPU works, and a compute stream waiting for an NCCL event runs none;
- on CPU (gloo), the step's wall time minus the union of the main thread's communication spans
  (c10d and functional collectives and their waits, FSDP's all-gather / reduce-scatter waits):
  gloo collectives block the calling thread, so waiting for a slow peer shows as time inside them.
Not the step's wall time: a synchronous collective makes every rank's step as slow as the
slowest. Not the time to the step's first blocking collective either: FSDP all-gathers before the
first layer, so that would measure data loading alone. The times, with each rank's pipeline stage,
are all-gathered as one device tensor; ranks are compared with the peers of their own stage (the
same work) by `cluster.monitor.stragglers.find_stragglers` at `run.straggler_threshold`, the rule
`gigatron status` applies too. Metrics: `compute_time_per_rank` (s), `pipeline_stage_per_rank`,
`stragglers` (flagged global ranks), `straggler_count`, `straggler_ratio` ({"rank_R": time /
stage median}; TensorBoard train/straggler_ratio/rank_R); rank 0 logs a warning naming them.

Profiling on demand: a `profile_request` file in the run folder (like `checkpoint_request`),
seen by rank 0 and agreed by every rank in the trainer's end-of-step flags, makes every rank record
the next `run.profile_steps` steps: a torch profiler trace (Chrome/Perfetto JSON) and a memory
snapshot under run_dir/profiles/steps_<first>-<last>/. On a GPU the snapshot is the CUDA caching
allocator's (torch.cuda.memory._snapshot with the allocation history of the window, the pickle
that pytorch.org/memory_viz reads). On CPU torch keeps no allocator history: the snapshot is a
JSON file of the profiler's per-operator CPU memory (allocated and freed bytes, top 50) and the
process's peak RSS. The request file is removed when the window starts. Straggler timing pauses
inside a window (one profiler at a time); a window cut short by a requeue writes nothing.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import resource
from statistics import median

import torch
import torch.distributed as dist

from gigatron.cluster.monitor.stragglers import find_stragglers_in_groups
from gigatron.parallel.comm import all_gather_flat

log = logging.getLogger("gigatron")
PROFILE_REQUEST = "profile_request"
STEP_MARKER = "gigatron::step"
# Profiler events that are communication (matched in lower case; FSDP's copy-in/out are compute)
COMM_MARKERS = ("c10d", "nccl", "gloo", "fsdp::all_gather", "fsdp::post_backward_reduce", "fsdp::post_backward_rs_wait",
                "record_param_comms", "wait_tensor")


def _merge(spans) -> list[tuple[float, float]]:
    """Disjoint, sorted spans covering the same points as `spans`."""
    out: list[list[float]] = []
    for start, end in sorted(s for s in spans if s[1] > s[0]):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(a, b) for a, b in out]


def _length(spans) -> float:
    return sum(b - a for a, b in _merge(spans))


def _intersect(a, b) -> list[tuple[float, float]]:
    a, b, out, i, j = _merge(a), _merge(b), [], 0, 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if hi > lo:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def is_communication(name: str) -> bool:
    n = name.lower()
    return any(k in n for k in COMM_MARKERS) and "copy" not in n


def compute_seconds(events) -> float:
    """This rank's compute time in a profiled step (module docstring), from the profiler's events.
    CPU: the main thread waits for a collective either inside a recorded communication op (FSDP's
    waits, c10d ops, functional waits) or, after a plain `dist.all_reduce`, in the unrecorded
    `work.wait()`: idle on the main thread while gloo runs the collective on its worker thread.
    Both are subtracted from the step's wall time."""
    marker = next((e for e in events if e.name == STEP_MARKER), None)
    if marker is None:
        return float("nan")
    lo, hi = marker.time_range.start, marker.time_range.end
    clip = lambda e: (max(lo, e.time_range.start), min(hi, e.time_range.end))  # noqa: E731
    kernels = [clip(e) for e in events
               if e.device_type == torch.autograd.DeviceType.CUDA and "nccl" not in e.name.lower()]
    if kernels:
        return _length(kernels) / 1e6
    main = [e for e in events if e.thread == marker.thread and e is not marker]
    waiting = [clip(e) for e in main if is_communication(e.name)]
    busy = _merge(clip(e) for e in main)
    idle = [(a, b) for a, b in zip([lo] + [end for _, end in busy], [start for start, _ in busy] + [hi])]
    running = [clip(e) for e in events if e.thread != marker.thread and is_communication(e.name)]
    waiting += _intersect(idle, running)
    return max(0.0, (hi - lo) - _length(waiting)) / 1e6


def _profiler(**options):
    """torch's kineto profiler (CPU events; CUDA kernels too on a GPU), through
    torch.autograd.profiler.profile: torch.profiler.profile wraps the same profiler but its start
    imports torch._inductor (a `hasattr(torch, "_inductor")` check), seconds the first time."""
    cuda = "cuda" if torch.cuda.is_available() else None
    return torch.autograd.profiler.profile(use_kineto=True, use_cpu=True, use_device=cuda, **options)


class StepMonitor:
    """Straggler timing and on-demand profiling for one Trainer (see the module docstring)."""

    def __init__(self, cfg, mesh, device: torch.device):
        self.run, self.device = cfg.run, device
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.pp_rank = mesh["pp"].get_local_rank() if "pp" in (mesh.mesh_dim_names or ()) else 0
        self.request_file = os.path.join(cfg.run.dir, PROFILE_REQUEST)
        self.profile_pending = False     # agreed at the end of a step: profile from the next one
        self.window: tuple[int, int] | None = None  # (first, last) step being profiled
        self._profiler = None
        self._marker = None
        self._timing = False
        # kineto prints "profiler_start" / "profiler_stop" lines on every session unless told not to:
        # they would land in every rank's log every straggler_every steps (an explicit setting wins)
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")

    # -- the profiling request: rank 0 looks, the trainer's flags all-reduce agrees ----------------
    def request_seen(self) -> bool:
        return self.rank == 0 and self.window is None and os.path.exists(self.request_file)

    def request_agreed(self, flag: float) -> None:
        if flag and self.window is None:
            self.profile_pending = True

    # -- around each step ---------------------------------------------------------------------------
    def begin(self, step: int) -> None:
        """Before step `step` (1-based: the step about to run)."""
        if self.profile_pending:
            self.profile_pending = False
            self.window = (step, step + self.run.profile_steps - 1)
            if self.rank == 0 and os.path.exists(self.request_file):
                os.remove(self.request_file)
                log.info("profiling requested: steps %d-%d on every rank", *self.window)
            if torch.cuda.is_available():
                torch.cuda.memory._record_memory_history(max_entries=100_000)
            self._profiler = _profiler(record_shapes=True, profile_memory=True)
            self._profiler.__enter__()
        elif self.window is None and self.run.straggler_every and step % self.run.straggler_every == 0:
            self._timing = True
            self._profiler = _profiler()
            self._profiler.__enter__()
        if self._profiler is not None:
            self._marker = torch.autograd.profiler.record_function(STEP_MARKER)
            self._marker.__enter__()

    def end(self, step: int) -> dict:
        """After step `step`: the straggler metrics of a timed step ({} otherwise); closes a
        finished profiling window."""
        if self._marker is not None:
            self._marker.__exit__(None, None, None)
            self._marker = None
        if self._timing:
            self._timing = False
            profiler, self._profiler = self._profiler, None
            profiler.__exit__(None, None, None)
            return self.gather(step, compute_seconds(profiler.function_events))
        if self.window is not None and step >= self.window[1]:
            self._write_profile()
        return {}

    def close(self) -> None:
        """At the end of training: write a window still open (the run ended inside it)."""
        if self._marker is not None:
            self._marker.__exit__(None, None, None)
            self._marker = None
        if self.window is not None and self._profiler is not None:
            self._write_profile()

    # -- stragglers ---------------------------------------------------------------------------------
    def gather(self, step: int, seconds: float) -> dict:
        """All-gather (compute seconds, pipeline stage) of every rank; flag the slow ones."""
        mine = torch.tensor([seconds, float(self.pp_rank)], device=self.device, dtype=torch.float64)
        every = torch.empty(self.world * 2, device=self.device, dtype=torch.float64)
        all_gather_flat(every, mine)  # over the whole job (parallel/comm.py: the name on every torch)
        pairs = every.view(self.world, 2).tolist()
        times, stages = [t for t, _ in pairs], [int(p) for _, p in pairs]
        flagged = find_stragglers_in_groups(times, stages, self.run.straggler_threshold)
        peers = lambda r: [t for t, s in zip(times, stages) if s == stages[r] and math.isfinite(t)]  # noqa: E731
        ratios = {f"rank_{r}": times[r] / median(peers(r)) for r in flagged}
        if flagged and self.rank == 0:
            log.warning("stragglers at step %d: %s (compute time over the median of their pipeline stage; "
                        "threshold +%.0f%%)", step, ", ".join(f"rank {k[5:]} {v:.2f}x" for k, v in ratios.items()),
                        100 * self.run.straggler_threshold)
        return {"compute_time_per_rank": times, "pipeline_stage_per_rank": stages, "stragglers": flagged,
                "straggler_count": len(flagged), "straggler_ratio": ratios}

    # -- profiling ----------------------------------------------------------------------------------
    def _write_profile(self) -> None:
        first, last = self.window
        profiler, self._profiler, self.window = self._profiler, None, None
        profiler.__exit__(None, None, None)
        folder = os.path.join(self.run.dir, "profiles", f"steps_{first}-{last}")
        os.makedirs(folder, exist_ok=True)
        profiler.export_chrome_trace(os.path.join(folder, f"rank{self.rank}.trace.json"))
        if torch.cuda.is_available():
            snapshot = torch.cuda.memory._snapshot()
            torch.cuda.memory._record_memory_history(enabled=None)
            with open(os.path.join(folder, f"rank{self.rank}.memory_snapshot.pickle"), "wb") as f:
                pickle.dump(snapshot, f)
        else:
            ops = sorted(profiler.key_averages(), key=lambda e: -abs(e.self_cpu_memory_usage))[:50]
            memory = {"device": "cpu", "steps": [first, last],
                      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "note": "CPU: torch keeps no allocator history; per-operator CPU memory from the profiler",
                      "operators": [{"name": e.key, "calls": e.count, "self_cpu_memory_bytes": e.self_cpu_memory_usage,
                                     "cpu_memory_bytes": e.cpu_memory_usage} for e in ops]}
            with open(os.path.join(folder, f"rank{self.rank}.memory.json"), "w") as f:
                json.dump(memory, f, indent=1)
        if self.rank == 0:
            log.info("profiled steps %d-%d: %s", first, last, folder)
