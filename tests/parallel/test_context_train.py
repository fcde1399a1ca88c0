"""Context parallelism end to end: the real trainer (tests/parallel/harness.py, the small fp32 debug
Llama on byte tokens, seq_len 64) for 3 steps must give the single-process losses and gradient
norms before clipping within 1e-5 relative (fp32; only reduction orders differ): cp2 (all-gather, Llama 3 layout) and cp2 in ring mode on 2 processes; cp2 composed with
tp2, with pp2 and with dp2 on 4 processes; and the full 4-D layout tp2 cp2 pp2 dp2 on 16 processes
(~2 min of the CI run on 2 cores).

Also: CP with selective activation checkpointing, CP with HSDP, ring CP with TP, torch.compile of the
blocks (dp2), and unequal loss-term counts: labels partly ignored (-100) so that dp ranks and cp
ranks hold different numbers of loss terms, where the global mean must still be exact."""


import pytest

from tests.distributed import run_distributed
from tests.parallel.harness import train_run

STEPS = 3
REL = 1e-5
CP2 = ["parallel.cp=2", "parallel.dp=1"]
MASKED = ["data.format=tokens_masked"]
RUNS_2 = {"cp2": CP2, "cp2_ring": CP2 + ["parallel.cp_mode=ring"],
          "cp2_selective_ac": CP2 + ["parallel.activation_checkpoint=selective"],
          "dp2_compile": ["parallel.dp=2", "train.compile=true"],
          "masked:cp2": CP2 + MASKED, "masked:dp2": ["parallel.dp=2"] + MASKED,
          # the vocabulary-parallel cross-entropy honours ignored labels exactly as the tp=1 path
          "masked:tp2": ["parallel.tp=2", "parallel.dp=1"] + MASKED}
RUNS_4 = {"tp2_cp2": ["parallel.tp=2", "parallel.cp=2", "parallel.dp=1"],
          "tp2_cp2_ring": ["parallel.tp=2", "parallel.cp=2", "parallel.dp=1", "parallel.cp_mode=ring"],
          "cp2_pp2": ["parallel.cp=2", "parallel.pp=2", "parallel.dp=1"],
          "cp2_dp2": ["parallel.cp=2", "parallel.dp=2"],
          "cp2_hsdp_2x1": ["parallel.cp=2", "parallel.dp=2", "parallel.dp_replicate=2"]}
RUNS_16 = {"tp2_cp2_pp2_dp2": ["parallel.tp=2", "parallel.cp=2", "parallel.pp=2", "parallel.dp=2",
                               "parallel.sequence_parallel=true", "train.micro_batch_size=1"]}


def _runs(rank, world_size, runs: dict, data_dir: str) -> dict:
    """Several layouts in one launch; per layout the losses followed by the gradient norms, and this
    rank's loss-term counts under "<name>/counts"."""
    out = {}
    for name, overrides in runs.items():
        result = train_run(rank, world_size, overrides, data_dir, steps=STEPS)
        out[name] = result["losses"] + result["grad_norms"]
        out[name + "/counts"] = result["counts"]
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cp_train"))


@pytest.fixture(scope="module")
def references(data_dir):
    out = run_distributed(_runs, 1, {"single": ["parallel.dp=1"], "masked": ["parallel.dp=1"] + MASKED}, data_dir)[0]
    return {"": out["single"], "masked": out["masked"]}


@pytest.fixture(scope="module")
def reference(references):
    return references[""]


def _reference_of(references, name):
    return references["masked"] if name.startswith("masked:") else references[""]


def _assert_close(reference, losses, name):
    assert len(losses) == len(reference) == 2 * STEPS  # losses, then gradient norms
    print(f"{name}: max relative loss / grad-norm difference {max(abs(a - b) / abs(a) for a, b in zip(reference, losses)):.1e}")
    for step, (a, b) in enumerate(zip(reference, losses)):
        assert abs(a - b) <= REL * abs(a), (name, step, a, b, abs(a - b) / abs(a))


def test_cp2_matches_single_process(references, data_dir):
    ranks = run_distributed(_runs, 2, RUNS_2, data_dir)
    for name in RUNS_2:
        _assert_close(_reference_of(references, name), ranks[0][name], name)
    # the masked runs really hold unequal counts on the two ranks (cp: different chunks, dp: rows)
    for name in ("masked:cp2", "masked:dp2"):
        assert ranks[0][name + "/counts"] != ranks[1][name + "/counts"], name


def test_cp2_composes_with_tp_pp_dp(references, data_dir):
    results = run_distributed(_runs, 4, RUNS_4, data_dir)[0]
    for name in RUNS_4:
        _assert_close(_reference_of(references, name), results[name], name)


def test_4d_tp2_cp2_pp2_dp2(reference, data_dir):
    results = run_distributed(_runs, 16, RUNS_16, data_dir)
    losses = next(r for r in results if r)  # the last pipeline stage's ranks all report the reduced loss
    _assert_close(reference, losses["tp2_cp2_pp2_dp2"], "tp2_cp2_pp2_dp2")
