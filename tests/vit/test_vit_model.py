"""The ViT model, its stems, masks and rules, in one process (no process group).

- `gigatron plan` reports the published parameter counts, heads excluded, within 1%: B/16 86M,
  L/16 304M (303.3M without the head), H/14 632M, 2B/14 1.9B, 6.5B/14 6.44B.
- The conv stem (stride-2 3x3 conv + BatchNorm + ReLU, then a 1x1) gives the patchify stem's token
  grid and costs one transformer block; images and spatio-temporal clips share one backbone.
- The MAE mask is a pure function of (seed, sample index): the same for a sample in any batch.
- Bad layouts and shapes are refused with the key to fix.
"""

import contextlib
import io
import os

import pytest
import torch

from gigatron.core.config import ConfigError, load_config
from gigatron.core.models.vit import ViT, ViTConfig
from gigatron.core.objectives.mae import mae_noise, mask_from_noise

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
H14 = os.path.join(ROOT, "recipes/swag_vit_h14.yaml")
PUBLISHED = {"B/16": (768, 12, 12, 3072, 16, 86e6), "L/16": (1024, 24, 16, 4096, 16, 303.3e6),
             "H/14": (1280, 32, 16, 5120, 14, 632e6), "2B/14": (2560, 24, 32, 10240, 14, 1.9e9),
             "6.5B/14": (4096, 32, 32, 16384, 14, 6.44e9)}
TINY = dict(dim=32, depth=3, heads=4, mlp_dim=64, patch=4, image_size=16, num_classes=10, stem_widths=[8, 16])


@pytest.mark.parametrize("size", list(PUBLISHED))
def test_plan_reports_published_parameter_counts(size):
    from gigatron.core.cli import main

    dim, depth, heads, mlp, patch, published = PUBLISHED[size]
    sets = [f"model.dim={dim}", f"model.depth={depth}", f"model.heads={heads}", f"model.mlp_dim={mlp}",
            f"model.patch={patch}", "parallel.tp=1", "parallel.dp=8"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["plan", H14, "--gpus", "8", *sum((["--set", s] for s in sets), [])]) == 0
    line = next(line for line in out.getvalue().splitlines() if line.startswith("model"))
    count = int(line.split(":")[1].split("parameters")[0].replace(",", ""))
    print(f"{size}: {line}")
    assert abs(count - published) <= 0.01 * published, (size, count, published)


def test_conv_stem_keeps_the_token_grid_and_costs_one_block():
    patchify, conv = ViT(ViTConfig(**TINY)), ViT(ViTConfig(**TINY, stem="conv"))
    assert len(patchify.blocks) == 3 and len(conv.blocks) == 2
    x = torch.randn(2, 3, 16, 16)
    assert patchify.embed(x).shape == conv.embed(x).shape == (2, 17, 32)
    kinds = [type(m).__name__ for m in conv.embed.stem.convs]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU"] * 2 and conv.embed.stem.proj.kernel_size == (1, 1)
    assert [m.stride for m in conv.embed.stem.convs if isinstance(m, torch.nn.Conv2d)] == [(2, 2), (2, 2)]
    avg = ViT(ViTConfig(**TINY, pool="avg"))
    assert avg.embed.cls_token is None and avg(x).shape == (2, 10)


def test_images_and_clips_share_one_backbone():
    m = ViT(ViTConfig(**TINY, patch_frames=2, max_frames=4, objective="none"))
    image, clip = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 4, 16, 16)
    assert m(image).shape == (2, 1 + 16, 32) and m(clip).shape == (2, 1 + 32, 32)
    # an image is a clip of repeated frames: the same tokens as that clip's first temporal slice
    repeated = image[:, :, None].expand(-1, -1, 2, -1, -1)
    assert torch.allclose(m.embed(image), m.embed(repeated))


def test_mae_mask_is_keyed_by_sample():
    g = torch.tensor([5, 9, 1000003])
    whole = mae_noise(g, 64, seed=0)
    alone = torch.cat([mae_noise(g[i:i + 1], 64, seed=0) for i in range(3)])
    assert torch.equal(whole, alone) and not torch.equal(whole[0], whole[1])
    keep, restore, mask = mask_from_noise(whole, 0.75)
    assert keep.shape == (3, 16) and mask.sum(1).tolist() == [48.0] * 3
    assert torch.equal(mask.gather(1, keep), torch.zeros(3, 16))  # kept patches are the unmasked ones
    assert not torch.equal(mae_noise(g, 64, seed=1), whole)


@pytest.mark.parametrize("sets, key", [
    (["parallel.cp=2", "parallel.dp=128"], "parallel.cp"),
    (["parallel.sequence_parallel=true"], "parallel.sequence_parallel"),
    (["model.stem=conv"], "model.stem_strides"),                       # 14 is no power of 2
    (["model.stem=conv", "model.stem_strides=[2,7]", "model.stem_widths=[32]"], "model.stem_widths"),
    (["model.heads=12"], "model.heads"),
    (["model.image_size=220", "data.image_size=220"], "model.image_size"),
    (["data.image_size=256"], "data.image_size"),
    (["data.num_labels=100"], "data.num_labels"),
])
def test_bad_settings_are_refused_with_the_key(sets, key):
    with pytest.raises(ConfigError) as err:
        load_config(H14, sets)
    assert err.value.key == key, str(err.value)


def test_conv_stem_with_strides_for_patch_14_is_accepted():
    cfg = load_config(H14, ["model.stem=conv", "model.stem_strides=[2,7]", "model.stem_widths=[64,128]"])
    assert cfg.model.blocks == 31
