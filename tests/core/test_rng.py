"""The layout-invariant generator (core/rng.py) and the shard-only initialisation built on it.

- A box of a virtual tensor equals the same slice of the whole tensor, bit for bit.
- The streams look like what they claim (moments of 10^6 draws; no correlation between neighbours
  or between keys). Bounds are ~5 standard errors of each estimate at n = 10^6.
- Under a tp2 x dp4 layout (a fake 8-rank group, rank 3), every parameter shard holds exactly the
  single-process initial values of its box, and the rank draws exactly as many numbers as its shards
  hold: no rank ever draws a full tensor.
"""

import os

import torch

from gigatron.core import rng
from tests.distributed import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
N = 10**6


def test_box_equals_slice_of_the_whole():
    key = rng.stream_key("init", 0, "w")
    whole = rng.normal_box(key, (37, 11, 5), (0, 0, 0), (37, 11, 5))
    for offset, shape in [((3, 2, 1), (7, 4, 3)), ((36, 10, 4), (1, 1, 1)), ((0, 0, 0), (37, 11, 5)),
                          ((5, 0, 0), (0, 11, 5))]:
        box = rng.normal_box(key, (37, 11, 5), offset, shape)
        sl = tuple(slice(o, o + n) for o, n in zip(offset, shape))
        assert torch.equal(box, whole[sl]), (offset, shape)


def test_moments_and_independence():
    counter = torch.arange(N)
    z = rng.normal(rng.stream_key("a"), counter)
    u = rng.uniform(rng.stream_key("b"), counter)
    se = N ** -0.5
    assert abs(z.mean()) < 5 * se and abs(z.var() - 1) < 5 * 2**0.5 * se
    assert abs((z ** 4).mean() - 3) < 5 * 96**0.5 * se  # kurtosis of a normal
    assert abs(u.mean() - 0.5) < 5 * se * 12**-0.5 and abs(u.var() - 1 / 12) < 0.002
    assert 0 < u.min() and u.max() < 1
    assert abs((z[1:] * z[:-1]).mean()) < 5 * se  # Box-Muller pairs are independent
    z2 = rng.normal(rng.stream_key("a2"), counter)
    assert abs((z * z2).mean()) < 5 * se  # different keys: unrelated streams
    big = rng.normal(rng.stream_key("a"), counter + 2**40)  # counters past 2**32 mix the high word
    assert abs((z * big).mean()) < 5 * se


def _sharded_init(rank, world_size):
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from gigatron.core import rng as rng_module
    from gigatron.core.config import load_config
    from gigatron.core.family import get_family
    from gigatron.parallel.mesh import ParallelDims
    from gigatron.parallel.parallelize import init_weights, parallelize

    small = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=96",
             "model.vocab_size=301", "train.seq_len=64", "train.global_batch_size=8", "train.micro_batch_size=1",
             "parallel.sequence_parallel=true", "model.max_seq_len=64"]
    cfg1 = load_config(os.path.join(ROOT, "recipes/llama3_debug.yaml"), small + ["parallel.dp=1"], world_size=1)
    family = get_family("llama3")
    reference = family.build(cfg1.model)
    init_weights(reference, family, cfg1, seed=7)
    expected = dict(reference.named_parameters())

    dist.init_process_group("fake", store=FakeStore(), rank=3, world_size=8)
    cfg = load_config(os.path.join(ROOT, "recipes/llama3_debug.yaml"), small + ["parallel.tp=2", "parallel.dp=4"],
                      world_size=8)
    dims = ParallelDims.from_config(cfg.parallel)
    dims.build_mesh("cpu")
    with torch.device("meta"):
        model = family.build(cfg.model)
    parallelize(model, dims, cfg, family, torch.float32)
    model.to_empty(device="cpu")
    drawn = [0]
    normal = rng_module.normal

    def counting(key, counter):
        drawn[0] += counter.numel()
        return normal(key, counter)

    rng_module.normal = counting
    init_weights(model, family, cfg, seed=7)
    rng_module.normal = normal
    mismatched, held_normal = [], 0
    for name, param in model.named_parameters():
        assert isinstance(param, DTensor), name
        shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        box = expected[name].detach()[tuple(slice(o, o + n) for o, n in zip(offset, shape))]
        if not torch.equal(param.to_local(), box):
            mismatched.append(name)
        if family.init(cfg.model, name).kind == "normal":
            held_normal += param.to_local().numel()
    total = sum(p.numel() for p in reference.parameters())
    return {"mismatched": mismatched, "drawn": drawn[0], "held_normal": held_normal, "total": total}


def test_each_rank_draws_only_its_shard_and_gets_the_single_process_values():
    out = run_distributed(_sharded_init, 1)[0]
    assert out["mismatched"] == []
    assert out["drawn"] == out["held_normal"] > 0
    assert out["drawn"] < out["total"] / 4  # tp2 x fsdp4: about 1/8 of the model (replicated kv/norms aside)
