"""The 405B model builds and parallelizes on the meta device for its full job size (16,384 ranks,
a fake process group): the TP plan, activation checkpointing and FSDP all apply, parameters come
out as (_StridedShard, Shard) DTensors with the right local shapes, and no parameter memory is
allocated. Runs in a child process so the fake group never touches the test process."""

import os

from tests.distributed import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _build_405b(rank, world_size):
    import resource

    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from gigatron.core.config import load_config
    from gigatron.core.family import get_family
    from gigatron.parallel.mesh import ParallelDims
    from gigatron.parallel.parallelize import parallelize

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=16384)
    # Llama 3's TP=8 inside a node; pipeline stages are parallel/pipeline.py's, so dp takes pp's share
    cfg = load_config(os.path.join(ROOT, "recipes/llama3_405b.yaml"),
                      ["stages=[]", "parallel.pp=1", "parallel.pp_virtual_stages=1", "parallel.pp_schedule=1f1b",
                       "parallel.dp=2048", "parallel.activation_checkpoint=selective"], world_size=16384)
    dims = ParallelDims.from_config(cfg.parallel)
    dims.build_mesh("cpu")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    family = get_family("llama3")
    with torch.device("meta"):
        model = family.build(cfg.model)
    parallelize(model, dims, cfg, family, torch.bfloat16)
    rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    params = dict(model.named_parameters())
    wq, wo = params["layers.0.attention.wq.weight"], params["layers.0.attention.wo.weight"]
    return {"n_params": sum(p.numel() for p in params.values()),
            "all_meta_dtensors": all(isinstance(p, DTensor) and p.device.type == "meta" for p in params.values()),
            "wq": (str(wq.placements), tuple(wq.to_local().shape)),
            "wo_tp": wo.placements[-1] == Shard(1),
            "wk": tuple(params["layers.0.attention.wk.weight"].to_local().shape),
            "rss_growth": rss_growth}


def test_405b_parallelizes_on_meta_for_16384_ranks():
    out = run_distributed(_build_405b, 1)[0]
    assert 405.8e9 < out["n_params"] < 406.0e9  # released: 405.9B
    assert out["all_meta_dtensors"]
    # wq (16384, 16384): tp=8 -> 2048 rows, then FSDP over 2048 ranks -> 1 row each
    assert out["wq"] == ("(_StridedShard(dim=0, sf=8), Shard(dim=0))", (1, 16384)), out["wq"]
    assert out["wo_tp"]  # row-parallel: the tp shard is on the input dim
    assert out["wk"] == (1, 16384)  # 8 KV heads over tp=8: one head (128 rows) per rank, 2048-way FSDP
    # bf16 405B would be ~811 GB; python objects for 126 blocks stay far below 2 GB
    assert out["rss_growth"] < 2 * 2**30, out["rss_growth"]
