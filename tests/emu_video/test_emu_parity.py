"""Emu Video parity: 3 fp32 steps of the video model (stage 2: the image-conditioned transformer,
zero-terminal-SNR v-prediction diffusion) under tp2 (sequence parallel) and under cp2 (ring attention,
bidirectional), and of the image model (stage 1) under tp2, give the loss and the gradient norm
before clipping of one process on the same seed and data, with real gloo processes. Two launches
(1 and 2 processes) serve every assertion.

Tolerance 1e-5 relative: fp32 with a different reduction order (ring / LSE merges, reduce-scatters,
split sums) moves the loss and norm by ~1e-7 relative; conditioning features split from their
tokens, a wrong count or a missing gradient reduction moves them by >= 1e-3 (the last test shows
that the loss depends on the conditioning and changes from step to step by far more than 1e-5)."""

import pytest

from tests.distributed import run_distributed
from tests.emu_video.harness import parity_many

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
VIDEO = ["model.image_conditioning=true", "data.num_frames=3", "data.image_size=16", "train.seq_len=48"]  # 3x4x4 tokens
IMAGE = ["data.num_frames=1", "data.image_size=16", "train.seq_len=16"]
UNCONDITIONED = ["data.num_frames=3", "data.image_size=16", "train.seq_len=48"]  # same clips, no first frame given
TOL = 1e-5
LAYOUTS = {"video tp2": (VIDEO, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
           "video cp2": (VIDEO, ["parallel.cp=2", "parallel.cp_mode=ring"]),
           "image tp2": (IMAGE, ["parallel.tp=2", "parallel.sequence_parallel=true"])}


def _rel(a, b):
    return max(abs(x - y) / abs(x) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("emu_video_parity"))
    video, image, unconditioned = run_distributed(parity_many, 1, [VIDEO, IMAGE, UNCONDITIONED], tmp)[0]
    runs = run_distributed(parity_many, 2, [base + layout for base, layout in LAYOUTS.values()], tmp)[0]
    return {"video": video, "image": image, "unconditioned": unconditioned}, dict(zip(LAYOUTS, runs))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_one_process(results, layout):
    refs, runs = results
    ref, got = refs[layout.split()[0]], runs[layout]
    print(layout, ref, got)
    assert _rel(ref["losses"], got["losses"]) < TOL, (layout, ref["losses"], got["losses"])
    assert _rel(ref["grad_norms"], got["grad_norms"]) < TOL, (layout, ref["grad_norms"], got["grad_norms"])


def test_the_check_can_fail(results):
    """The conditioning changes the loss (the same clips without their first frame given), and the
    loss changes from step to step: a layout that dropped or misplaced the conditioning, or trained on
    other data, would differ by far more than TOL."""
    refs, _ = results
    assert _rel(refs["video"]["losses"], refs["unconditioned"]["losses"]) > 1e-3
    assert _rel(refs["video"]["losses"][:1], refs["video"]["losses"][2:]) > 1e-4
