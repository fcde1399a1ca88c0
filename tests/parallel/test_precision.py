"""The mixed-precision policy is the same in every layout (parallel/parallelize.py): FP32 master
weights and optimizer state, compute in train.dtype, gradients reduced in FP32. A tp2-only layout
(dp x cp = 1, no data-parallel sharding) asked for bf16 runs its matmuls in bf16, as dp2 does; an
fp32 run stays fp32. Checked by dtype, on CPU: the input and output of a projection, the master
parameters, and the policy line logged at start-up."""

import logging

import pytest

from tests.distributed import run_distributed


def _dtypes(rank, world_size, runs, data_dir):
    from tests.parallel.harness import build_trainer

    out = {}
    for name, overrides in runs.items():
        records = []
        handler = logging.Handler()
        handler.emit = lambda record: records.append(record.getMessage())
        logging.getLogger("gigatron").addHandler(handler)
        logging.getLogger("gigatron").setLevel(logging.INFO)
        trainer = build_trainer(world_size, overrides, data_dir)
        logging.getLogger("gigatron").removeHandler(handler)
        seen = []
        wq = dict(trainer.model.named_modules())["layers.0.attention.wq"]
        wq.register_forward_hook(lambda m, i, o: seen.append((str(i[0].dtype), str(o.dtype))))
        trainer.train_step()
        out[name] = {"matmul": sorted(set(seen)), "master": sorted({str(p.dtype) for p in trainer.model.parameters()}),
                     "policy": [r for r in records if r.startswith("precision:")]}
    return out


@pytest.fixture(scope="module")
def dtypes(tmp_path_factory):
    runs = {"tp2 bf16": ["parallel.tp=2", "train.dtype=bfloat16"], "dp2 bf16": ["parallel.dp=2", "train.dtype=bfloat16"],
            "tp2 fp32": ["parallel.tp=2", "train.dtype=float32"]}
    return run_distributed(_dtypes, 2, runs, str(tmp_path_factory.mktemp("precision")))[0]


@pytest.mark.parametrize("name", ["tp2 bf16", "dp2 bf16"])
def test_bf16_compute_in_every_layout(dtypes, name):
    got = dtypes[name]
    assert got["matmul"] == [("torch.bfloat16", "torch.bfloat16")], got
    assert got["master"] == ["torch.float32"]
    assert got["policy"] and "compute bfloat16" in got["policy"][0] and "reduced and accumulated in float32" in got["policy"][0]


def test_fp32_stays_fp32(dtypes):
    got = dtypes["tp2 fp32"]
    assert got["matmul"] == [("torch.float32", "torch.float32")] and got["master"] == ["torch.float32"]
    assert "compute float32" in got["policy"][0]
