"""The planner's sharded state per rank against a real run, exactly; parameter counts against the
real model built on the meta device.

One launch of 4 gloo processes trains one step of the tiny debug model (tests/parallel/harness.py)
under four layouts (tp 2 x dp 2; tp 4 with replicated K/V heads; pp 2 x dp 2; HSDP 2 x 2). Each
rank counts the elements of its parameter shards, gradient shards (kept by skipping the step's
zero_grad) and AdamW moments, norms included, and reports its mesh coordinates; the planner's
formula (cluster/planner/memory.py) must give the same number for each rank, to the element."""

from __future__ import annotations

import os

import pytest

from gigatron.cluster.planner.layout import Layout
from gigatron.cluster.planner.memory import estimate_memory, held_elements
from gigatron.cluster.planner.model_shape import ModelShape, model_shape
from tests.distributed import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAYOUTS = [["parallel.tp=2"], ["parallel.tp=4"], ["parallel.pp=2", "parallel.dp=2", "train.micro_batch_size=1"],
           ["parallel.dp_replicate=2", "train.micro_batch_size=1"]]


def _held(rank: int, world_size: int, runs: list[list[str]], data_dir: str) -> list[dict]:
    from tests.parallel.harness import build_trainer

    out = []
    for overrides in runs:
        trainer = build_trainer(world_size, overrides, data_dir)
        trainer.optimizer.zero_grad = lambda *a, **k: None  # keep this step's gradients to count them
        trainer.train_step()
        local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
        held = {"params": 0, "grads": 0, "optim": 0}
        for p in trainer.model.parameters():
            held["params"] += local(p).numel()
            held["grads"] += local(p.grad).numel() if p.grad is not None else 0
            state = trainer.optimizer.state[p]
            held["optim"] += sum(local(state[k]).numel() for k in ("exp_avg", "exp_avg_sq"))
        mesh, cfg = trainer.mesh, trainer.cfg
        coordinate = lambda name: mesh[name].get_local_rank() if name in mesh.mesh_dim_names else 0  # noqa: E731
        out.append({"held": held, "tp": coordinate("tp"), "pp": coordinate("pp"),
                    "shard": mesh["fsdp_shard"].get_local_rank(), "shape": _shape(cfg),
                    "layout": _layout(cfg)})
    return out


def _shape(cfg) -> ModelShape:
    return model_shape(cfg)


def _layout(cfg) -> Layout:
    from gigatron.cluster.planner.layout import layout_from_config

    return layout_from_config(cfg)


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("planner_memory"))
    return run_distributed(_held, 4, LAYOUTS, data_dir)


def test_sharded_state_per_rank_is_exact(measured):
    lines = []
    for job, overrides in enumerate(LAYOUTS):
        for rank, results in enumerate(measured):
            r = results[job]
            planned = held_elements(r["shape"], r["layout"], pp_rank=r["pp"], tp_rank=r["tp"], shard_rank=r["shard"])
            lines.append(f"{' '.join(overrides):<32} rank {rank}: measured {r['held']}, planned {planned} "
                         f"params, {planned} grads, {2 * planned} moments")
            assert r["held"] == {"params": planned, "grads": planned, "optim": 2 * planned}, lines[-1]
    print("\n".join(lines))


def test_estimate_reports_the_peak_rank_in_bytes(measured):
    """The estimate describes the pipeline rank with the highest total, at tp rank 0 and shard 0
    (which hold the largest torch.chunk pieces): its fp32 parameter, gradient and AdamW bytes are
    4, 4 and 8 per element that this rank measured."""
    for job in range(len(LAYOUTS)):
        estimate = estimate_memory(measured[0][job]["shape"], measured[0][job]["layout"])
        ranks = [res[job] for res in measured if (res[job]["pp"], res[job]["tp"], res[job]["shard"]) ==
                 (estimate.pp_rank, 0, 0)]
        assert ranks, (job, estimate.pp_rank)
        held = ranks[0]["held"]
        assert estimate.detail["parameters_sharded"] == 4 * held["params"]
        assert estimate.detail["gradients_sharded"] == 4 * held["grads"]
        assert estimate.detail["optimizer_sharded"] == 4 * held["optim"]


@pytest.mark.parametrize("recipe", ["llama3_debug", "llama3_8b", "llama3_70b", "llama3_405b"])
def test_parameter_count_matches_the_model(recipe):
    from gigatron.core.config import load_config
    from gigatron.core.models.llama import count_parameters

    cfg = load_config(os.path.join(ROOT, "recipes", f"{recipe}.yaml"))
    assert model_shape(cfg).parameters() == count_parameters(cfg.model)
