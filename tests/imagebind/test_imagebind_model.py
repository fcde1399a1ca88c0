"""The ImageBind encoders (core/models/imagebind.py), single process: unit-norm embeddings in one space,
text pooling that padding cannot reach (causal blocks, last real token), frozen encoders without
gradients, the image encoder loadable from a plain ViT by name, and config errors naming the key."""

import os

import pytest
import torch

from gigatron.core.models.imagebind import ImageBind, ImageBindConfig


def tiny(**kw) -> ImageBindConfig:
    fields = dict(dim=16, depth=2, heads=2, mlp_dim=32, patch=4, image_size=8, embed_dim=8,
                  modalities=["image", "text", "audio"], text_dim=16, text_depth=2, text_heads=2, text_mlp_dim=32,
                  text_tokens=12, audio_dim=16, audio_depth=1, audio_heads=2, audio_mlp_dim=32, audio_patch=4,
                  n_mels=8, audio_frames=8)
    fields.update(kw)
    return ImageBindConfig(**fields)


def test_embeddings_are_unit_vectors_of_one_space():
    torch.manual_seed(0)
    model = ImageBind(tiny())
    out = model(images=torch.randn(3, 3, 8, 8), text_tokens=torch.randint(0, 258, (3, 12)),
                text_lengths=torch.tensor([3, 5, 12]), audio=torch.randn(3, 1, 8, 8))
    for m in ("image", "text", "audio"):
        assert out[m].shape == (3, 8) and torch.allclose(out[m].norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(out["logit_scale"].exp(), torch.tensor([1 / 0.07]), rtol=1e-5)
    with pytest.raises(ValueError, match="n_mels"):
        model(audio=torch.randn(1, 1, 8, 12))


def test_text_padding_changes_nothing():
    torch.manual_seed(0)
    model = ImageBind(tiny())
    tokens = torch.randint(0, 258, (2, 12))
    lengths = torch.tensor([4, 7])
    other = tokens.clone()
    other[0, 4:], other[1, 7:] = 0, 99  # different padding after the real tokens
    a = model(text_tokens=tokens, text_lengths=lengths)["text"]
    b = model(text_tokens=other, text_lengths=lengths)["text"]
    assert torch.allclose(a, b, atol=1e-6)
    other[0, 2] = (tokens[0, 2] + 1) % 258  # a real token does change it
    assert not torch.allclose(a[0], model(text_tokens=other, text_lengths=lengths)["text"][0])


def test_frozen_encoders_get_no_gradient():
    model = ImageBind(tiny(frozen=["image", "text"], pairs=[["image", "audio"]]))
    out = model(images=torch.randn(2, 3, 8, 8), audio=torch.randn(2, 1, 8, 8))
    (out["image"] * out["audio"]).sum().backward()
    assert all(p.grad is None and not p.requires_grad for p in model.encoder_parameters("image"))
    assert all(p.grad is not None for p in model.encoder_parameters("audio"))
    assert not out["image"].requires_grad


def test_image_encoder_keeps_the_vit_names():
    from gigatron.core.models.vit import ViT, ViTConfig

    cfg = tiny()
    vit = ViT(ViTConfig(dim=16, depth=2, heads=2, mlp_dim=32, patch=4, image_size=8, objective="none"))
    ours = {k: v.shape for k, v in ImageBind(cfg).state_dict().items()}
    theirs = {k: v.shape for k, v in vit.state_dict().items()}
    assert all(ours.get(k) == s for k, s in theirs.items()), set(theirs) - set(ours)
    assert list(cfg.block_ranges().values()) == [range(0, 2), range(2, 4), range(4, 5)]


def test_config_errors_name_the_key(tmp_path):
    from gigatron.core.config import load_config
    from gigatron.core.config_loader import ConfigError

    recipe = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                          "recipes/imagebind_debug.yaml")
    for override, key in (("model.pairs=[[image,depth]]", "model.pairs"),
                          ("model.frozen=[audio]", "model.frozen"),
                          ("parallel.tp=2", "parallel.tp"),
                          ("data.format=webdataset", "data.format")):
        with pytest.raises(ConfigError) as err:
            load_config(recipe, [override, "parallel.dp=1"], world_size=1 if key != "parallel.tp" else 2)
        assert err.value.key == key, (override, err.value)
