"""`gigatron plan RECIPE`: what a run will be, computed without allocating the model.

The model is built on the meta device (shapes only), so the 405B recipe is counted in a second on a
laptop. A later planner adds memory and throughput estimates at full scale.
"""

from __future__ import annotations

import json

from gigatron.core.config import Config
from gigatron.core.family import get_family, parameter_count, pipeline_costs
from gigatron.parallel.pipeline_split import describe, format_rows, theoretical_bubble


def plan(cfg: Config) -> dict:
    m, p, t = cfg.model, cfg.parallel, cfg.train
    family = get_family(m.name)
    n_params = parameter_count(family, m)
    embedding = getattr(m, "vocab_size", 0) * getattr(m, "dim", 0)
    first, last = family.plan.first_stage, family.plan.last_stage
    return {
        "model": m.name,
        "parameters": n_params,
        "parameters_billions": round(n_params / 1e9, 3),
        "non_embedding_parameters": n_params - 2 * embedding,
        "layers": family.n_blocks(m),
        "layout": {"tp": p.tp, "cp": p.cp, "pp": p.pp, "dp": p.dp, "world_size": p.world_size,
                   "virtual_stages": p.pp_virtual_stages, "schedule": p.pp_schedule},
        "tokens_per_step": t.tokens_per_step,
        "micro_batches_per_step": t.global_batch_size // (t.micro_batch_size * p.dp),
        "parameters_per_rank": n_params // p.world_size,
        # which layers each (pp rank, virtual stage) holds, and its cost in layers (parallel/pipeline_split.py)
        "pipeline": {"chunks": describe(pipeline_costs(family, cfg), family.n_blocks(m), p.pp, p.pp_virtual_stages,
                                        p.pp_first_last_fewer_layers, "+".join(first) and "embedding",
                                        "output+loss"),
                     "bubble_theory": theoretical_bubble(p.pp, p.pp_virtual_stages,
                                                         t.global_batch_size // (t.micro_batch_size * p.dp))},
    }


def format_plan(info: dict) -> str:
    lay = info["layout"]
    return "\n".join([
        f"model        {info['model']}: {info['parameters']:,} parameters ({info['parameters_billions']} B), "
        f"{info['layers']} layers",
        f"layout       tp={lay['tp']} cp={lay['cp']} pp={lay['pp']} dp={lay['dp']} -> {lay['world_size']:,} ranks "
        f"({lay['schedule']}, {lay['virtual_stages']} virtual stages)",
        f"batch        {info['tokens_per_step']:,} tokens per step, {info['micro_batches_per_step']} micro-batches "
        f"per data-parallel rank",
        f"per rank     ~{info['parameters_per_rank']:,} parameters",
        f"pipeline     {len(info['pipeline']['chunks'])} chunks, bubble (p-1)/(v*m+p-1) = "
        f"{info['pipeline']['bubble_theory']:.1%}",
        *format_rows(info["pipeline"]["chunks"]),
    ])


def to_json(info: dict) -> str:
    return json.dumps(info, indent=2)
