"""Pipeline parallelism over mesh["pp"], with Llama 3's schedule (Llama 3 paper, section 3.3.2).

Split. `pipeline_split.assign_layers` cuts the layers into C = pp * v chunks; rank r runs chunks
r, r + pp, ... (interleaved). Each chunk is a *stage module*: a `Llama` that holds only its own
blocks in `layers` (keyed by their global index) and has `tok_embeddings` / `norm` / `output` set to
None where it does not own them. Parameter names are therefore those of the full model
("layers.17.attention.wq.weight"), and checkpoints do not depend on the split. The rank's stage
modules share their submodules with one *rank model* (the same pruned Llama holding every layer of
the rank): the optimizer, grad clipping and checkpoints see that rank model, so one rank's
parameters appear once, under their full names.

Per stage module, `parallelize` applies TP/SP -> CP -> activation checkpointing -> compile -> FSDP
(parallel/parallelize.py), so FSDP shards each stage over the dp mesh and TP splits each block
inside it. Weights are initialised after sharding, by name (`Llama.init_weights`), so every layout
starts from the same model.

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

Inputs. The first stage gets the token ids; every stage gets `document_ids` as a keyword (split
along the batch like the tokens), so each block masks across documents, and `positions` (T,), whole
(replicated) to every micro-batch: under sequence parallelism a later stage receives (B, T/tp, dim)
and could not infer T (context parallelism shards each batch over cp in `step` and passes its chunks' positions here). The last stage computes the
loss: summed cross-entropy divided by the rank's token count of the whole step, with scale_grads
off, exactly the single-process loss, so gradients match. Gradients accumulate across micro-batches
in FP32: FSDP2 keeps an FP32 accumulated gradient when reduce_dtype is FP32 and param_dtype bf16, and
reduce-scatters once, after the last micro-batch (the stage defers the gradient sync).

Communication (forward / backward): activations go stage s -> s + 1 and their gradients s + 1 -> s
by P2P send/recv on mesh["pp"]; the step's loss sum is all-reduced over mesh["pp"] (only the last
stage holds it); the gradient norm squares are summed over mesh["pp"] (`clip_grad_norm_`).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B,
                                          ScheduleInterleavedZeroBubble)
from torch.distributed.pipelining.microbatch import TensorChunkSpec, _Replicate
from torch.distributed.pipelining.schedules import PipelineScheduleSingle
from torch.distributed.tensor import DTensor

from gigatron.core.config import Config
from gigatron.core.models.llama import Llama
from gigatron.parallel.comm import all_reduce
from gigatron.parallel.context import cp_shard_batch
from gigatron.parallel.mesh import ParallelDims
from gigatron.parallel.pipeline_split import assign_layers, rank_chunks
from gigatron.parallel.pipeline_timeline import TimelineRecorder

SCHEDULES = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe, "interleaved_1f1b": ScheduleInterleaved1F1B,
             "zero_bubble": ScheduleInterleavedZeroBubble}


def split_model(model: Llama, assignment: list[list[int]], chunks: list[int]) -> tuple[Llama, list[Llama]]:
    """Prune `model` (on meta) in place to this rank's chunks, and return it with one stage module
    per chunk. Stage modules are Llamas built without __init__ that share the rank model's blocks."""
    last = len(assignment) - 1
    owned = {str(i) for c in chunks for i in assignment[c]}
    for key in [k for k in model.layers if k not in owned]:
        del model.layers[key]
    if 0 not in chunks:
        model.tok_embeddings = None
    if last not in chunks:
        model.norm, model.output = None, None
    stages = []
    for c in chunks:
        stage = Llama.__new__(Llama)
        nn.Module.__init__(stage)
        stage.cfg = model.cfg
        stage.tok_embeddings = model.tok_embeddings if c == 0 else None  # registration order as in Llama
        stage.layers = nn.ModuleDict({str(i): model.layers[str(i)] for i in assignment[c]})
        stage.norm = model.norm if c == last else None
        stage.output = model.output if c == last else None
        stage.register_buffer("rope_inv_freq", torch.empty_like(model.rope_inv_freq), persistent=False)
        stages.append(stage)
    return model, stages


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum")


class Pipeline:
    """This rank's stages and the schedule that drives them; `step(batches)` is one forward/backward
    of every micro-batch and returns the step's summed cross-entropy (same value on all pp ranks)."""

    def __init__(self, cfg: Config, dims: ParallelDims, stage_modules: list[Llama], chunks: list[int],
                 device: torch.device, n_micro: int, loss_sum: Callable = cross_entropy_sum):
        p = cfg.parallel
        self.cfg, self.device, self.n_micro, self.loss_sum = cfg, device, n_micro, loss_sum
        self.pp_mesh = dims.mesh["pp"]
        self.mesh = dims.mesh  # context parallel shards each batch over mesh["cp"] in step()
        n_chunks = p.pp * p.pp_virtual_stages
        self.stages = [PipelineStage(module, c, n_chunks, device, group=self.pp_mesh.get_group())
                       for module, c in zip(stage_modules, chunks)]
        self.has_first, self.has_last = 0 in chunks, n_chunks - 1 in chunks
        cls = SCHEDULES[p.pp_schedule]
        stages = self.stages[0] if issubclass(cls, PipelineScheduleSingle) else self.stages
        # document_ids are split along the batch like the tokens; positions (T,) go whole to every stage
        spec = {"document_ids": TensorChunkSpec(0), "positions": _Replicate()}
        self.schedule = cls(stages, n_microbatches=n_micro, loss_fn=self._loss, kwargs_chunk_spec=spec,
                            scale_grads=False)
        self._sums: list[torch.Tensor] = []
        self._tokens = 0
        self.steps_done = 0
        self.recorder = TimelineRecorder(self.stages, self.schedule)
        self.timeline: dict | None = None  # set on global rank 0 once the recorded step ran

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss_sum = self.loss_sum(logits, labels)
        self._sums.append(loss_sum.detach())
        return loss_sum / self._tokens  # this micro-batch's share of the mean over the step

    def step(self, batches: list[dict], run_dir: str = "") -> torch.Tensor:
        # context parallel: this rank's 2 of the 2*cp chunks of each row (T/cp tokens), with "positions"
        batches = [cp_shard_batch(b, self.mesh) for b in batches]  # unchanged when cp == 1
        tokens = torch.cat([b["input_ids"] for b in batches]).to(self.device)  # (n_micro*B, T)
        labels = torch.cat([b["labels"] for b in batches]).to(self.device)  # (n_micro*B, T)
        documents = torch.cat([b["document_ids"] for b in batches]).to(self.device)  # (n_micro*B, T)
        # global positions: a later stage's input may hold T/tp tokens (sequence parallel), RoPE needs all T
        positions = torch.arange(tokens.shape[1], device=self.device)  # (T,)
        if "positions" in batches[0]:  # context parallel: the global positions of the local tokens
            positions = batches[0]["positions"].to(self.device)  # (T/cp,)
        self._sums, self._tokens = [], labels.numel()
        args = (tokens,) if self.has_first else ()
        target = labels if self.has_last else None
        self.steps_done += 1
        record = self.steps_done == self.cfg.parallel.pp_timeline_step
        with self.recorder.record(enabled=record):
            self.schedule.step(*args, target=target, return_outputs=False, document_ids=documents, positions=positions)
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


def build_pipeline(cfg: Config, dims: ParallelDims, device: torch.device, parallelize: Callable,
                   place: Callable, n_micro: int, loss_sum: Callable = cross_entropy_sum) -> tuple[Llama, Pipeline]:
    """Meta model -> this rank's stage modules -> parallelize each (TP before FSDP) -> allocate and
    init by name. Returns the rank model (for the optimizer and checkpoints) and the pipeline."""
    p = cfg.parallel
    with torch.device("meta"):
        model = Llama(cfg.model)
    assignment = assign_layers(cfg.model.n_layers, p.pp, p.pp_virtual_stages, p.pp_first_last_fewer_layers)
    chunks = rank_chunks(dims.mesh["pp"].get_local_rank(), p.pp, p.pp_virtual_stages)
    model, stage_modules = split_model(model, assignment, chunks)
    for i, stage in enumerate(stage_modules):
        stage_modules[i] = parallelize(stage)
    for stage in stage_modules:
        stage.to_empty(device=device)
        stage.init_weights(cfg.train.seed, place=place)
    model.rope_inv_freq = stage_modules[0].rope_inv_freq  # the rank model never runs forward
    return model, Pipeline(cfg, dims, stage_modules, chunks, device, n_micro, loss_sum)


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
