"""ImageBind through the real trainer (core/families/imagebind.py): both stages of the recipe, 3 steps,
fp32, dp2 (FSDP2, negatives all-gathered with gradients) against one process over the same global
batch: loss and gradient norm before clipping within 1e-5 relative. Only the order of fp32 reductions
differs (~1e-7); negatives gathered without gradients, a rank offset off by one in the targets, or a
count that forgets the other rank's rows move them by percent (tests/imagebind/test_contrastive.py
shows the no-gradient gather failing this bound). The binding stage also checks that the frozen
encoders stay bit-identical while the audio encoder moves, and the temperature only learns where
the image-text pair trains. One 1-process and one 2-process launch serve every assertion.
"""

import pytest

from tests.distributed import run_distributed
from tests.imagebind.harness import imagebind_many, write_digits
from tests.vit.harness import relative_errors

REL = 1e-5
STAGES = {"image_text": ["model.pairs=[[image,text]]"],
          "audio": ["model.pairs=[[image,audio]]", "model.frozen=[image,text]"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagebind")
    write_digits(str(root / "digits.npz"))
    one = [s + ["parallel.dp=1", "train.micro_batch_size=8"] for s in STAGES.values()]
    two = [s + ["parallel.dp=2", "train.micro_batch_size=4"] for s in STAGES.values()]
    ref = run_distributed(imagebind_many, 1, one, str(root))[0]
    got = run_distributed(imagebind_many, 2, two, str(root))[0]
    return dict(zip(STAGES, ref)), dict(zip(STAGES, got))


@pytest.mark.parametrize("stage", list(STAGES))
def test_dp2_gathered_negatives_match_one_process(runs, stage):
    ref, got = runs
    loss, norm = relative_errors(ref[stage], got[stage])
    print(f"imagebind {stage} dp2: loss rel {loss:.1e}, grad norm rel {norm:.1e}")
    assert loss <= REL and norm <= REL, (stage, loss, norm, ref[stage], got[stage])


def test_binding_stage_trains_only_the_audio_encoder(runs):
    ref, got = runs
    for run in (ref["audio"], got["audio"]):
        assert run["moved"]["image"] == 0.0 and run["moved"]["text"] == 0.0, run["moved"]
        assert run["moved"]["audio"] > 0.0 and run["logit_scale_moved"] == 0.0, run
    for run in (ref["image_text"], got["image_text"]):
        assert run["moved"]["image"] > 0 and run["moved"]["text"] > 0 and run["moved"]["audio"] == 0.0, run["moved"]
        assert run["logit_scale_moved"] > 0.0  # the learnable image-text temperature
