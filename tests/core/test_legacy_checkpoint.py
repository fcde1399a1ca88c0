"""A checkpoint written by the code before the family seam (tests/core/data/legacy_llama: 1 process,
the small debug Llama on byte tokens, step 2 of 4, with the losses and gradient norms of all 4 steps
recorded by that code) still loads and resumes: the resumed steps 3 and 4 reproduce the recorded
losses and gradient norms (1e-6 relative: the computation is the same; only the summation order
of fp32 reductions could differ, and it is measured as bit-identical here)."""

import json
import os
import shutil

from tests.distributed import run_distributed

HERE = os.path.dirname(os.path.abspath(__file__))
LEGACY = os.path.join(HERE, "data", "legacy_llama")


def _resume(rank, world_size, run_dir, data_dir):
    from tests.parallel.harness import RECIPE

    from gigatron.core.config import load_config
    from gigatron.core.train import Trainer
    from gigatron.parallel.mesh import init_distributed

    with open(os.path.join(LEGACY, "expected.json")) as f:
        expected = json.load(f)
    overrides = expected["overrides"] + [f"data.path={data_dir}/bytes", "parallel.dp=1", "data.eval_fraction=0",
                                         f"checkpoint.load={run_dir}/step_00000002"]
    cfg = load_config(RECIPE, overrides, world_size=1)
    cfg.run.dir = os.path.join(run_dir, "run")
    trainer = Trainer(cfg, init_distributed(cfg.parallel))
    trainer.maybe_resume()
    start = trainer.step
    values = [trainer.train_step() for _ in range(2)]
    return {"start": start, "losses": [v["loss"] for v in values], "grad_norms": [v["grad_norm"] for v in values],
            "expected": expected}


def test_pre_seam_checkpoint_loads_and_resumes(tmp_path):
    shutil.copytree(os.path.join(LEGACY, "step_00000002"), tmp_path / "step_00000002")
    out = run_distributed(_resume, 1, str(tmp_path), str(tmp_path / "data"))[0]
    assert out["start"] == 2
    for got, want in zip(out["losses"] + out["grad_norms"],
                         out["expected"]["losses"][2:] + out["expected"]["grad_norms"][2:]):
        assert abs(got - want) <= 1e-6 * abs(want), (out["losses"], out["grad_norms"], out["expected"])
