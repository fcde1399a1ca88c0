"""ViT interop (core/convert/hf_vit.py) with real transformers, on real images (scikit-image's
astronaut and coffee photos, and scikit-learn's sample photos), fp32.

- ViTForImageClassification / ViTModel / ViTMAEForPreTraining exports load with no missing,
  unexpected or mismatched keys; logits / hidden states equal ours within 1e-4.
- The MAE export, given our `noise` (core/objectives/mae.py), masks the same patches and reproduces
  our normalised-pixel reconstruction loss within 1e-5 relative.
- from-hf brings the weights back bit-exactly (both directions), and the timm mapping round-trips;
  it is checked against timm itself only where timm imports (not beside the pinned CPU torch).
"""

import json
import os

import numpy as np
import pytest
import torch

from gigatron.core.convert import hf_vit
from gigatron.core.models.vit import ViT, ViTConfig
from gigatron.core.objectives.mae import MAEObjective

TINY = dict(dim=48, depth=2, heads=4, mlp_dim=96, patch=8, image_size=32, num_classes=7, decoder_dim=32,
            decoder_depth=1, decoder_heads=4, decoder_mlp_dim=64)


def real_images() -> torch.Tensor:
    """(4, 3, 32, 32) real photos, centre-cropped and resized, normalised with ImageNet statistics."""
    from PIL import Image
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    out = []
    for p in photos:
        s = min(p.shape[:2])
        img = Image.fromarray(p[:s, :s]).resize((32, 32), Image.BICUBIC)
        out.append(np.asarray(img, dtype=np.float32) / 255.0)
    x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    return ((x - mean[:, None, None]) / std[:, None, None]).contiguous()


def trained_like(m: ViTConfig) -> ViT:
    """A model with every parameter random (not the zero init of biases / tokens), so a swapped or
    transposed tensor shows."""
    torch.manual_seed(0)
    model = ViT(m)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.dim() == 1 and p.shape[0] == m.dim else 0.0))
    return model.eval()


def export(tmp_path, m: ViTConfig, model: ViT) -> str:
    from safetensors.torch import save_file

    out = str(tmp_path / f"hf_{m.objective}")
    os.makedirs(out)
    save_file(hf_vit.hf_state_dict(m, model.state_dict()), os.path.join(out, "model.safetensors"))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(hf_vit.hf_config(m), f)
    return out


def load(cls, path, **kw):
    model, info = cls.from_pretrained(path, output_loading_info=True, dtype=torch.float32, **kw)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def test_classification_and_backbone_exports_match_on_real_images(tmp_path):
    from transformers import ViTForImageClassification, ViTModel

    x = real_images()
    m = ViTConfig(**TINY)
    ours = trained_like(m)
    hf = load(ViTForImageClassification, export(tmp_path, m, ours))
    with torch.no_grad():
        diff = (hf(pixel_values=x).logits - ours(x)).abs().max().item()
    assert diff <= 1e-4, diff
    # the bare backbone: ViTModel's last hidden state is our normalised tokens
    mb = ViTConfig(**{**TINY, "objective": "none"})
    backbone = ViT(mb).eval()
    backbone.load_state_dict({k: v for k, v in ours.state_dict().items() if not k.startswith("head.")})
    hfb = load(ViTModel, export(tmp_path, mb, backbone), add_pooling_layer=False)
    with torch.no_grad():
        diff = (hfb(pixel_values=x).last_hidden_state - backbone(x)).abs().max().item()
    assert diff <= 1e-4, diff


def test_mae_export_reproduces_our_reconstruction_loss(tmp_path):
    from transformers import ViTMAEForPreTraining

    x = real_images()
    m = ViTConfig(**{**TINY, "objective": "mae"})
    ours = trained_like(m)
    objective = MAEObjective(m, seed=3)
    batch = objective.prepare({"images": x, "sample_index": torch.arange(40, 44)})
    with torch.no_grad():
        pred = ours(*objective.inputs(batch)[0], **objective.inputs(batch)[1])
        our_loss = (objective.loss(pred, batch) / objective.count(batch)).item()
    hf = load(ViTMAEForPreTraining, export(tmp_path, m, ours))
    with torch.no_grad():
        out = hf(pixel_values=x, noise=batch["noise"])
    assert torch.equal(out.mask, batch["mask"])  # the same noise masks the same patches
    assert abs(out.loss.item() - our_loss) <= 1e-5 * our_loss, (out.loss.item(), our_loss)
    # a different mask gives a different loss: the check can fail
    other = hf(pixel_values=x, noise=torch.rand_like(batch["noise"])).loss.item()
    assert abs(other - our_loss) > 1e-3 * our_loss


@pytest.mark.parametrize("objective", ["classification", "mae"])
def test_from_hf_is_the_inverse(tmp_path, objective):
    from safetensors.torch import load_file

    m = ViTConfig(**{**TINY, "objective": objective})
    ours = trained_like(m).state_dict()
    path = export(tmp_path, m, trained_like(m))
    back = hf_vit.from_hf_state_dict(hf_vit.model_config_from_hf(json.load(open(os.path.join(path, "config.json")))),
                                     load_file(os.path.join(path, "model.safetensors")))
    assert set(back) == set(ours) and all(torch.equal(back[k], ours[k]) for k in ours)
    # transformers 5 renames on save (layers.<i>.attention.q_proj): those names read back too
    from transformers import ViTForImageClassification, ViTMAEForPreTraining

    cls = ViTMAEForPreTraining if objective == "mae" else ViTForImageClassification
    saved = str(tmp_path / "resaved")
    load(cls, path).save_pretrained(saved)
    back = hf_vit.from_hf_state_dict(m, load_file(os.path.join(saved, "model.safetensors")))
    assert all(torch.equal(back[k], ours[k]) for k in ours)


@pytest.mark.parametrize("pool", ["cls", "avg"])
def test_timm_mapping_round_trips(pool):
    m = ViTConfig(**{**TINY, "pool": pool})
    ours = trained_like(m).state_dict()
    timm_sd = hf_vit.timm_state_dict(m, ours)
    assert timm_sd["blocks.0.attn.qkv.weight"].shape == (3 * 48, 48)
    assert ("cls_token" in timm_sd) == (pool == "cls") and ("fc_norm.weight" in timm_sd) == (pool == "avg")
    back = hf_vit.from_timm_state_dict(m, timm_sd)
    assert set(back) == set(ours) and all(torch.equal(back[k], ours[k]) for k in ours)


def test_timm_mapping_against_timm():
    try:
        import timm
    except Exception as err:  # noqa: BLE001 - timm imports torchvision, whose C ops need a CUDA torch here
        pytest.skip(f"timm does not import beside this torch ({type(err).__name__}); the round trip is tested above")
    for pool in ("cls", "avg"):
        m = ViTConfig(**{**TINY, "pool": pool})
        ours = trained_like(m)
        ref = timm.models.vision_transformer.VisionTransformer(
            img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, mlp_ratio=2.0, num_classes=7,
            class_token=pool == "cls", global_pool="token" if pool == "cls" else "avg", qkv_bias=True).eval()
        missing, unexpected = ref.load_state_dict(hf_vit.timm_state_dict(m, ours.state_dict()), strict=True)
        x = real_images()
        with torch.no_grad():
            assert (ref(x) - ours(x)).abs().max().item() <= 1e-4


def test_refuses_what_hf_cannot_hold():
    with pytest.raises(ValueError, match="conv"):
        hf_vit.hf_config(ViTConfig(**{**TINY, "stem": "conv"}))
