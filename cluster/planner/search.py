"""`--search`: the fastest layouts that fit in memory, for a model, a GPU count and a batch.

Enumerated (gigatron's own rules, core/config.py validate()):
    tp   divides the heads and the widths, at most one node (NVLink)
    cp   1, 2, 4, ... with seq_len divisible by 2 cp (and by tp cp under sequence parallelism)
    pp   1, 2, 4, 8, ... ; virtual stages v with at least one layer per interior chunk; the
         interleaved schedule when v > 1, 1F1B otherwise
    dp   the rest: gpus / (tp cp pp), which must divide the global batch with the micro-batch
    micro-batch 1, 2, 4 samples; at least pp micro-batches with a pipeline
    activation checkpointing none / selective / full, each but full also mixed with full recompute
    on every K-th block of a rank (K in FULL_RECOMPUTE_EVERY); reshard_after_forward false / true;
    gradient sync per step or per micro-batch (parallel.grad_sync; pipelines always per step)
Each candidate gets the memory estimate and the projected step; those that fit are ranked by
projected step time (equivalently tokens/s per GPU; the batch is fixed). A layout (degrees,
virtual stages, micro-batching) is listed once, with its fastest recompute/resharding choice.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from gigatron.cluster.planner.hardware import COST_MODEL, GPU, CostModel
from gigatron.cluster.planner.layout import Layout
from gigatron.cluster.planner.memory import MemoryEstimate, estimate_memory
from gigatron.cluster.planner.model_shape import ModelShape
from gigatron.cluster.planner.throughput import Projection, project


@dataclass
class Candidate:
    layout: Layout
    memory: MemoryEstimate
    projection: Projection

    def fits(self, gpu: GPU) -> bool:
        return self.memory.total <= gpu.memory_bytes


# Layer-wise mixed recompute: full recompute on every K-th block of a rank (parallel.full_recompute_every),
# K in this small set (0 = off: one policy for every block). 8, 4, 2 make 1/8, 1/4, 1/2 of the blocks
# full, the steps between selective and full that matter at Llama 3 405B's 8 blocks per rank.
FULL_RECOMPUTE_EVERY = (0, 8, 4, 2)
# (activation_checkpoint, full_recompute_every) pairs searched; "full" everywhere needs no K.
RECOMPUTE_POLICIES = tuple((ac, k) for ac in ("none", "selective", "full") for k in FULL_RECOMPUTE_EVERY
                           if not (ac == "full" and k))


def powers_of_two(limit: int) -> list[int]:
    out, k = [], 1
    while k <= limit:
        out.append(k)
        k *= 2
    return out


def candidate_layouts(shape: ModelShape, gpus: int, global_batch: int, gpu: GPU, fewer: int = 1,
                      max_pp: int = 32, max_cp: int = 32) -> list[Layout]:
    out = []
    for tp in powers_of_two(gpu.gpus_per_node):
        if shape.n_heads % tp or shape.dim % tp or shape.ffn_dim % tp:
            continue
        if not (shape.n_kv_heads % tp == 0 or tp % shape.n_kv_heads == 0):
            continue
        for cp in powers_of_two(max_cp):
            if shape.seq_len % (2 * cp) and cp > 1:
                continue
            if tp > 1 and (shape.seq_len // cp) % tp:
                continue
            for pp in powers_of_two(max_pp):
                if gpus % (tp * cp * pp):
                    continue
                dp = gpus // (tp * cp * pp)
                for v in ([1] if pp == 1 else powers_of_two(16)):
                    if pp > 1 and max(pp * v - 2 * fewer, pp) > shape.n_layers:
                        continue
                    for micro_batch in (1, 2, 4):
                        if global_batch % (dp * micro_batch):
                            continue
                        m = global_batch // (dp * micro_batch)
                        if pp > 1 and m < pp:
                            continue
                        syncs = ("step",) if pp > 1 or m == 1 else ("step", "micro_batch")
                        for (ac, every), reshard, sync in itertools.product(RECOMPUTE_POLICIES, (False, True),
                                                                            syncs):
                            out.append(Layout(tp=tp, cp=cp, pp=pp, dp=dp, sequence_parallel=tp > 1,
                                              pp_virtual_stages=v,
                                              pp_schedule="interleaved_1f1b" if v > 1 else "1f1b",
                                              pp_first_last_fewer_layers=fewer if pp > 1 else 0,
                                              micro_batch=micro_batch, micro_batches=m,
                                              activation_checkpoint=ac, full_recompute_every=every,
                                              reshard_after_forward=reshard,
                                              grad_sync=sync))
    return out


def search(shape: ModelShape, gpus: int, global_batch: int, gpu: GPU, top: int = 10, fewer: int = 1,
           constants: CostModel = COST_MODEL) -> tuple[list[Candidate], int]:
    """(the `top` fastest candidates that fit, how many candidates fit in all)."""
    fitting = []
    for layout in candidate_layouts(shape, gpus, global_batch, gpu, fewer):
        memory = estimate_memory(shape, layout, constants)
        if memory.total > gpu.memory_bytes:
            continue
        fitting.append(Candidate(layout, memory, project(shape, layout, gpu, constants)))
    # one entry per distinct layout (degrees, virtual stages, micro-batching): its fastest
    # recompute / resharding choice, and of equals the one needing the least memory
    fitting.sort(key=lambda c: (round(c.projection.step_time_s, 9), c.memory.total))
    best: dict[tuple, Candidate] = {}
    for c in fitting:
        best.setdefault(layout_key(c.layout), c)
    distinct = list(best.values())
    return distinct[:top], len(distinct)


def layout_key(layout: Layout) -> tuple:
    return (layout.tp, layout.cp, layout.pp, layout.dp, layout.pp_virtual_stages, layout.micro_batch)


def rank_of(layout: Layout, shape: ModelShape, gpus: int, global_batch: int, gpu: GPU, fewer: int = 1,
            constants: CostModel = COST_MODEL) -> int | None:
    """1-based rank of `layout` among all fitting candidates (None if it does not fit)."""
    ranked, _ = search(shape, gpus, global_batch, gpu, top=10 ** 9, fewer=fewer, constants=constants)
    for i, c in enumerate(ranked):
        if layout_key(c.layout) == layout_key(layout):
            return i + 1
    return None
