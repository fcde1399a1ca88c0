"""The planner's sharded state per rank against a real run, exactly; parameter counts against the
real model built on the meta device.

One launch of 4 gloo processes trains one step of the tiny debug model (tests/parallel/harness.py)
under four layouts (tp 2 x dp 2; tp 4 with replicated K/V heads; pp 2 x dp 2; HSDP 2 x 2). Each
rank counts the elements of its parameter shards, gradient shards (kept by skipping the step's
zero_grad) and AdamW moments, norms included, and reports its mesh coordinates; the planner's
formula (cluster/planner/memory.py) must give the same number for each rank, to the element.

The pipeline peak: the order of forwards and backwards the planner walks is torch's own
(ScheduleInterleaved1F1B's, rank by rank), and at Llama 3 405B's layout the walk finds the peak where
the schedule puts it (all chunk micro-batches in flight, one chunk's FP32 accumulation live)."""

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


def _torch_interleaved_order(pp: int, v: int, m: int, rank: int) -> list[tuple[bool, int]]:
    """torch's own ScheduleInterleaved1F1B order of rank `rank` (its _calculate_single_rank_operations,
    which reads only these four attributes of the schedule), as (is_backward, local chunk)."""
    from types import SimpleNamespace

    from torch.distributed.pipelining.schedules import ScheduleInterleaved1F1B, _ComputationType

    rounds = max(1, m // pp)
    schedule = SimpleNamespace(n_local_stages=v, microbatches_per_round=m // rounds, pp_group_size=pp,
                               _n_microbatches=m)
    ops = ScheduleInterleaved1F1B._calculate_single_rank_operations(schedule, rank)
    return [(op.computation_type == _ComputationType.FULL_BACKWARD, op.stage_index // pp) for op in ops
            if op is not None]


@pytest.mark.parametrize("pp,v,m", [(4, 2, 4), (4, 2, 8), (4, 3, 6), (2, 4, 3), (16, 8, 16), (8, 2, 32)])
def test_schedule_order_is_torchs(pp, v, m):
    """The order the planner walks for its pipeline peak is the one torch computes, rank by rank."""
    from gigatron.cluster.planner.memory import schedule_order

    for rank in range(pp):
        assert list(schedule_order("interleaved_1f1b", pp, v, m, rank)) == _torch_interleaved_order(pp, v, m, rank), rank


def test_pipeline_peak_of_llama3_layout():
    """Llama 3 405B's layout (pp 16 x 8, m = 16, one block per chunk): rank 1 forwards all 128 chunk
    micro-batches before its first backward, so its peak comes in its second backward, with 127 in
    flight and the FP32 accumulation of one chunk only (the one the first backward touched), not of
    all eight; its stages hold receive buffers for 16 micro-batches each way (it owns neither end).
    Without a pipeline and with a deferred sync, the whole model's accumulation is live at the peak."""
    from gigatron.cluster.planner.published import LLAMA3_405B

    run = LLAMA3_405B[1]
    layout = run.layout.with_(activation_checkpoint="selective", full_recompute_every=4)
    estimate = estimate_memory(run.shape, layout)
    d = estimate.detail
    assert estimate.pp_rank == 1 and d["in_flight_chunk_micro_batches"] == 127
    assert d["gradient_accumulation"] == pytest.approx(d["gradient_accumulation_all_chunks"] / 8)
    boundary = 2 * 8192 * run.shape.dim / 8  # bf16 (8192 / tp tokens, d) under sequence parallelism
    assert d["receive_buffers"] == pytest.approx(2 * 16 * 8 * boundary)
    assert d["full_recompute_blocks"] == 2 and d["layers"] == 8

    flat = Layout(tp=8, dp=4, micro_batches=4, grad_sync="step", activation_checkpoint="selective")
    d = estimate_memory(run.shape, flat).detail
    assert d["gradient_accumulation"] == d["gradient_accumulation_all_chunks"] == 4.0 * d["tp_local_elements"]


def _receive_buffers(rank: int, world_size: int, overrides: list[str], data_dir: str) -> dict:
    """One step of the real pipeline; the bytes of every receive buffer this rank's stages hold
    (torch allocates them at the first step, for all micro-batches, and keeps them)."""
    from tests.parallel.harness import build_trainer

    trainer = build_trainer(world_size, overrides, data_dir)
    trainer.train_step()
    buffers = {}
    for stage in trainer.pipeline.stages:
        for infos in list(stage.args_recv_info.values()) + list(stage.grad_recv_info.values()):
            for info in infos:
                if getattr(info, "buffer", None) is not None:
                    buffers[id(info.buffer)] = info.buffer.numel() * info.buffer.element_size()
    mesh = trainer.mesh
    return {"bytes": sum(buffers.values()), "pp": mesh["pp"].get_local_rank(), "shape": _shape(trainer.cfg),
            "layout": _layout(trainer.cfg)}


def test_receive_buffers_match_the_pipeline():
    """The stages' receive buffers, counted on a real pp 2 x 2 virtual-stage run with 4 micro-batches
    (fp32, so 4-byte elements in the planner too): m activation buffers for every chunk but the
    model's first, m gradient buffers for every chunk but its last, exactly."""
    import tempfile

    from gigatron.cluster.planner.hardware import with_constants
    from gigatron.cluster.planner.memory import rank_memory

    overrides = ["model.n_layers=6", "parallel.pp=2", "parallel.dp=1", "parallel.pp_schedule=interleaved_1f1b",
                 "parallel.pp_virtual_stages=2", "train.micro_batch_size=1", "parallel.pp_timeline_step=0"]
    with tempfile.TemporaryDirectory() as data_dir:
        results = run_distributed(_receive_buffers, 2, overrides, data_dir)
    fp32 = with_constants(activation_bytes=4)
    for r in results:
        planned = rank_memory(r["shape"], r["layout"], r["pp"], fp32).detail["receive_buffers"]
        assert r["bytes"] > 0 and planned == r["bytes"], (r["pp"], planned, r["bytes"])
