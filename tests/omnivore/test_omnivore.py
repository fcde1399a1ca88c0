"""Omnivore (core/models/omnivore.py, core/objectives/omnivore.py, core/families/omnivore.py).

- the RGB-D stem: an RGB input runs the ViT's patch embedding alone; an RGB-D input adds the depth
  patch embedding's tokens (checked against the two PatchEmbeds by hand);
- the per-dataset heads: the masked joint softmax equals each dataset's own log-softmax, and the
  other heads get exactly zero gradient;
- the engine: a mixture of real digit images, clips of real digits and digits with SYNTHETIC depth,
  3 steps, fp32, under tp2·dp2 and dp4 against one process: loss and gradient norm before clipping
  within 1e-5 relative. Only the order of fp32 reductions differs (~1e-7 per step); a depth
  projection that some rank skipped, a head mask cut at the wrong columns under tp, or a dataset
  choice that differs between ranks moves the loss far more (or hangs FSDP). One 1-process and one
  4-process launch serve every layout.
"""

import pytest
import torch

from tests.distributed import run_distributed
from tests.omnivore.harness import omnivore_many, write_digits
from tests.vit.harness import relative_errors

REL = 1e-5
# The mixture picks a source per micro-batch index on each rank (data_pipeline/mixture.py), so layouts
# compared must run the same number of micro-batches per rank (2): micro_batch_size = 8 / (dp * 2).
LAYOUTS = {"tp2 dp2": ["parallel.tp=2", "parallel.dp=2", "train.micro_batch_size=2"],
           "dp4": ["parallel.dp=4", "train.micro_batch_size=1"]}


def tiny():
    from gigatron.core.models.omnivore import Omnivore, OmnivoreConfig

    cfg = OmnivoreConfig(dim=16, depth=1, heads=2, mlp_dim=32, patch=4, patch_frames=2, image_size=8, max_frames=4,
                         classes=[3, 2])
    torch.manual_seed(0)
    model = Omnivore(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return cfg, model


def test_depth_tokens_are_summed_with_rgb_tokens():
    from gigatron.core.models.patch_embed import patchify

    cfg, model = tiny()
    stem = model.embed.stem
    rgb, depth = torch.randn(2, 3, 8, 8), torch.randn(2, 1, 8, 8)
    by_hand = stem.proj(patchify(rgb, cfg.patch_size)) + stem.depth.proj(patchify(depth, cfg.patch_size))
    assert torch.allclose(stem(torch.cat([rgb, depth], 1)), by_hand, atol=1e-6)
    assert torch.allclose(stem(rgb), stem.proj(patchify(rgb, cfg.patch_size)), atol=1e-6)
    assert not torch.allclose(model(torch.cat([rgb, depth], 1)), model(rgb))  # depth changes the logits
    assert model(torch.randn(2, 3, 4, 8, 8)).shape == (2, 5)  # clips through the same backbone
    with pytest.raises(ValueError):
        stem(torch.randn(2, 5, 8, 8))


def test_masked_heads_are_separate_heads():
    from gigatron.core.objectives.omnivore import OmnivoreObjective

    obj = OmnivoreObjective(None, [3, 2], ["a", "b"])
    batch = obj.prepare({"labels": torch.tensor([2, 1, 0]), "source": torch.tensor([0, 1, 1])})
    logits = torch.randn(3, 5, requires_grad=True)
    loss = obj.loss(logits, batch)
    ref = -(logits[0, :3].log_softmax(-1)[2] + logits[1, 3:].log_softmax(-1)[1] + logits[2, 3:].log_softmax(-1)[0])
    assert torch.allclose(loss, ref, rtol=1e-6)
    loss.backward()
    assert (logits.grad[0, 3:] == 0).all() and (logits.grad[1:, :3] == 0).all()  # other heads: exactly zero
    m = obj.metrics(logits.detach(), batch)
    assert m["accuracy_a"][1] == 1 and m["accuracy_b"][1] == 2 and m["accuracy"][1] == 3


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("omnivore")
    write_digits(str(root / "digits.npz"))
    ref = run_distributed(omnivore_many, 1, [["parallel.dp=1", "train.micro_batch_size=4"]], str(root))[0][0]
    got = run_distributed(omnivore_many, 4, list(LAYOUTS.values()), str(root))[0]
    return ref, dict(zip(LAYOUTS, got))


def test_every_source_and_the_depth_path_train(runs):
    ref, _ = runs
    assert set(ref["sources"]) == {0, 1, 2}, ref["sources"]  # images, clips and RGB-D in the 6 micro-batches
    assert ref["depth_weight_sum"] > 0 and all(x == x for x in ref["losses"])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_omnivore_matches_one_process(runs, layout):
    ref, got = runs
    assert got[layout]["sources"] == ref["sources"]  # the same dataset per micro-batch on every rank
    loss, norm = relative_errors(ref, got[layout])
    print(f"omnivore {layout}: loss rel {loss:.1e}, grad norm rel {norm:.1e}")
    assert loss <= REL and norm <= REL, (layout, loss, norm, ref, got[layout])
