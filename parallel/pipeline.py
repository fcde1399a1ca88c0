"""Pipeline parallelism over mesh["pp"], with Llama 3's schedule (Llama 3 paper, section 3.3.2).

Split. `pipeline_split.assign_layers` cuts the family's blocks (ParallelPlan.blocks) into C = pp * v
chunks; rank r runs chunks r, r + pp, ... (interleaved). Each chunk is a *stage module*: a shallow
view of the family's model that holds only its own blocks (keyed by their global index) and has the
plan's first-stage modules (Llama: the embedding) and last-stage modules (norm, output) set to None
where it does not own them. Parameter names are therefore those of the full model
("layers.17.attention.wq.weight"), and checkpoints do not depend on the split. The rank's stage
modules share their submodules with one *rank model* (the same pruned model holding every block of
the rank): the optimizer, grad clipping and checkpoints see that rank model, so one rank's
parameters appear once, under their full names.

Per stage module, `parallelize` applies TP/SP -> CP -> activation checkpointing -> compile -> FSDP
(parallel/parallelize.py), so FSDP shards each stage over the dp mesh and TP splits each block
inside it. Weights are initialised after sharding from the layout-invariant generator
(`parallelize.init_weights`), so every layout starts from the same model.

Schedules come from `torch.distributed.pipelining`; we write none of our own, because the library
already has what Llama 3 needs and is verified here on gloo (shared/notes/platform.md):
- "1f1b" (Schedule1F1B): one stage per rank; warm-up of pp - r forwards, then one forward / one
  backward, then cool-down. Bubble (p - 1) / (m + p - 1), at most p micro-batches of activations.
- "interleaved_1f1b" (ScheduleInterleaved1F1B): v stages per rank, depth-first; bubble
  (p - 1) / (v m + p - 1). The library's "flexible" variant runs any micro-batch count m with
  m % max(1, m // p) == 0 (pp 2 with 3, pp 4 with 6 or 3), which is Llama 3's tunable N.
- "gpipe" (ScheduleGPipe): all forwards, then all backwards; the simplest, for reference.
- "zero_bubble" (ScheduleInterleavedZeroBubble): splits backward into input and weight gradients
  and fills the bubble with weight gradients (Qi et al. 2024).

Inputs. The objective (core/family.py) turns each micro-batch into (args, kwargs): the first stage
gets the args (Llama: token ids); every stage gets the kwargs, split along the batch (Llama:
`document_ids`), except `positions` (T,) which goes whole (replicated) to every micro-batch: under
sequence parallelism a later stage receives (B, T/tp, dim) and could not infer T (context
parallelism passes its chunks' positions). The last stage computes the objective's loss sum of
micro-batch i (the schedule's target is the micro-batch index, so a loss may read any field of its
batch) times the step's gradient scale (dp*cp / global count), with scale_grads off: exactly the
single-process loss, so gradients match. Gradients accumulate across micro-batches
in FP32: FSDP2 keeps an FP32 accumulated gradient when reduce_dtype is FP32 and param_dtype bf16, and
reduce-scatters once, after the last micro-batch (the stage defers the gradient sync).

Communication (forward / backward): activations go stage s -> s + 1 and their gradients s + 1 -> s
by P2P send/recv on mesh["pp"]; the step's loss sum is all-reduced over mesh["pp"] (only the last
stage holds it); the gradient norm squares are summed over mesh["pp"] (`clip_grad_norm_`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B,
                                          ScheduleInterleavedZeroBubble)
from torch.distributed.pipelining.microbatch import TensorChunkSpec, _Replicate
from torch.distributed.pipelining.schedules import PipelineScheduleSingle
from torch.distributed.tensor import DTensor

from gigatron.core.family import ModelFamily, ParallelPlan, blocks_of
from gigatron.parallel.comm import all_reduce
from gigatron.parallel.mesh import ParallelDims
from gigatron.parallel.pipeline_split import assign_layers, rank_chunks
from gigatron.parallel.pipeline_timeline import TimelineRecorder

SCHEDULES = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe, "interleaved_1f1b": ScheduleInterleaved1F1B,
             "zero_bubble": ScheduleInterleavedZeroBubble}
REPLICATED_INPUTS = ("positions",)  # per-token, identical for every row: never split along the batch


def _view(model: nn.Module) -> nn.Module:
    """A shallow copy of `model` with its own module/parameter/buffer/hook tables (so that changing
    or wrapping the view, e.g. FSDP's hooks, leaves the original and the other views alone)."""
    view = type(model).__new__(type(model))
    view.__dict__ = {k: type(v)(v) if isinstance(v, (dict, set)) else v for k, v in model.__dict__.items()}
    return view


def split_model(model: nn.Module, plan: ParallelPlan, assignment: list[list[int]],
                chunks: list[int]) -> tuple[nn.Module, list[nn.Module]]:
    """Prune `model` (on meta) in place to this rank's chunks, and return it with one stage module
    per chunk: views that share the rank model's blocks and first/last-stage modules."""
    last = len(assignment) - 1
    blocks = blocks_of(model, plan)
    owned = {str(i) for c in chunks for i in assignment[c]}
    for key in [k for k in blocks if k not in owned]:
        del blocks[key]
    for names, keep in ((plan.first_stage, 0 in chunks), (plan.last_stage, last in chunks)):
        if not keep:
            for name in names:
                setattr(model, name, None)
    stages = []
    for c in chunks:
        stage = _view(model)
        setattr(stage, plan.blocks, nn.ModuleDict({str(i): blocks[str(i)] for i in assignment[c]}))
        for name in plan.first_stage:
            setattr(stage, name, getattr(model, name) if c == 0 else None)
        for name in plan.last_stage:
            setattr(stage, name, getattr(model, name) if c == last else None)
        stages.append(stage)
    return model, stages


class Pipeline:
    """This rank's stages and the schedule that drives them; `step(batches, scale)` is one
    forward/backward of every micro-batch and returns the step's loss sum (same on all pp ranks)."""

    def __init__(self, cfg, dims: ParallelDims, objective, stage_modules: list[nn.Module], chunks: list[int],
                 device: torch.device, n_micro: int):
        p = cfg.parallel
        self.cfg, self.device, self.n_micro, self.objective = cfg, device, n_micro, objective
        self.mesh, self.pp_mesh = dims.mesh, dims.mesh["pp"]
        n_chunks = p.pp * p.pp_virtual_stages
        self.stages = [PipelineStage(module, c, n_chunks, device, group=self.pp_mesh.get_group())
                       for module, c in zip(stage_modules, chunks)]
        self.has_first, self.has_last = 0 in chunks, n_chunks - 1 in chunks
        self.schedule = None  # built at the first step, when the objective's keyword inputs are known
        self._batches: list[dict] = []
        self._sums: list[torch.Tensor] = []
        self._scale = 1.0
        self.steps_done = 0
        self.recorder = None
        self.timeline: dict | None = None  # set on global rank 0 once the recorded step ran

    def _build_schedule(self, kwargs: dict) -> None:
        p = self.cfg.parallel
        cls = SCHEDULES[p.pp_schedule]
        stages = self.stages[0] if issubclass(cls, PipelineScheduleSingle) else self.stages
        spec = {k: _Replicate() if k in REPLICATED_INPUTS else TensorChunkSpec(0) for k in kwargs}
        self.schedule = cls(stages, n_microbatches=self.n_micro, loss_fn=self._loss, kwargs_chunk_spec=spec,
                            scale_grads=False)
        self.recorder = TimelineRecorder(self.stages, self.schedule)

    def _loss(self, output, index: torch.Tensor) -> torch.Tensor:
        batch = self._batches[int(index.reshape(-1)[0])]  # the target is the micro-batch index (on CPU)
        loss_sum = self.objective.loss(output, batch, self.stages[-1].submod)
        self._sums.append(loss_sum.detach())
        return loss_sum * self._scale  # this micro-batch's share of the global mean

    def step(self, batches: list[dict], scale: float, run_dir: str = "") -> torch.Tensor:
        """`batches`: this rank's micro-batches, prepared and split over cp; `scale`: dp*cp / N."""
        self._batches, self._sums, self._scale = batches, [], scale
        inputs = [self.objective.inputs(b) for b in batches]
        n_args = len(inputs[0][0])
        args = tuple(torch.cat([a[i] for a, _ in inputs]).to(self.device) for i in range(n_args))
        kwargs = {k: (v if k in REPLICATED_INPUTS else torch.cat([kw[k] for _, kw in inputs])).to(self.device)
                  for k, v in inputs[0][1].items()}  # (n_micro*B, ...) each; positions (T,)
        if self.schedule is None:
            self._build_schedule(kwargs)
        target = torch.arange(self.n_micro) if self.has_last else None  # micro-batch i -> its index
        self.steps_done += 1
        record = self.steps_done == self.cfg.parallel.pp_timeline_step
        with self.recorder.record(enabled=record):
            self.schedule.step(*(args if self.has_first else ()), target=target, return_outputs=False, **kwargs)
        if record:
            self.timeline = self.recorder.gather_and_save(run_dir, self.describe())
        # the last n_micro calls: on the first step the stage's shape inference also calls the loss once
        sums = self._sums[-self.n_micro:]
        loss_sum = torch.stack(sums).sum() if sums else torch.zeros((), device=self.device)
        return all_reduce(loss_sum, self.mesh, "pp")  # only the last stage holds it

    def describe(self) -> dict:
        p = self.cfg.parallel
        return {"pp": p.pp, "virtual_stages": p.pp_virtual_stages, "micro_batches": self.n_micro,
                "schedule": p.pp_schedule}


def build_pipeline(cfg, dims: ParallelDims, device: torch.device, family: ModelFamily, objective, parallelize,
                   init_weights, n_micro: int) -> tuple[nn.Module, Pipeline]:
    """Meta model -> this rank's stage modules -> parallelize each (TP before FSDP) -> allocate and
    init this rank's shards. Returns the rank model (for the optimizer and checkpoints) and the pipeline."""
    p = cfg.parallel
    with torch.device("meta"):
        model = family.build(cfg.model)
    assignment = assign_layers(family.n_blocks(cfg.model), p.pp, p.pp_virtual_stages, p.pp_first_last_fewer_layers)
    chunks = rank_chunks(dims.mesh["pp"].get_local_rank(), p.pp, p.pp_virtual_stages)
    model, stage_modules = split_model(model, family.plan, assignment, chunks)
    stage_modules = [parallelize(stage) for stage in stage_modules]
    for stage in stage_modules:
        stage.to_empty(device=device)
        init_weights(stage)
    for name, buffer in stage_modules[0].named_buffers(recurse=False):  # the rank model never runs forward
        setattr(model, name, buffer)
    return model, Pipeline(cfg, dims, objective, stage_modules, chunks, device, n_micro)


def clip_grad_norm_(parameters, max_norm: float, mesh=None) -> torch.Tensor:
    """Clip to a global L2 norm over every rank's gradients: DTensor shards (FSDP, TP) are reduced by
    `full_tensor`, and pipeline stages by summing squared norms over mesh["pp"]. Returns the norm."""
    params = [q for q in parameters if q.grad is not None]
    total = torch.nn.utils.get_total_norm([q.grad for q in params], norm_type=2.0, foreach=True)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    if mesh is not None and mesh["pp"].size() > 1:
        total = all_reduce(total.pow(2), mesh, "pp").sqrt()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
    return total
