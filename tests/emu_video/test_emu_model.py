"""Emu Video's model (core/models/emu_video.py): the conditioning tokens' layout, the video model
starting as the image model it is initialised from (zero-initialised conditioning projection, loaded
by parameter name as the multi-stage trainer does), the conditioning read once it is trained, and
the recipe rules (every stage validated; a video model needs frames to continue)."""

from types import SimpleNamespace

import pytest
import torch

from gigatron.core.config import ConfigError, load_config
from gigatron.core.family import get_family, parameter_count
from gigatron.core.models.emu_video import EmuVideo, EmuVideoConfig, condition_tokens
from gigatron.core.models.patch_embed import patchify
from gigatron.parallel.parallelize import init_weights
from tests.emu_video.harness import RECIPE

TINY = dict(dim=32, n_layers=2, n_heads=4, ffn_dim=64, latent_channels=3, text_dim=16, time_dim=32,
            max_latent_frames=4, max_latent_height=4, max_latent_width=4)


def _model(**kw) -> EmuVideo:
    m = EmuVideoConfig(**TINY, **kw)
    model = EmuVideo(m)
    init_weights(model, get_family("emu_video"), SimpleNamespace(model=m), seed=0)
    return model


def test_condition_tokens_are_the_first_frame_and_a_mask_concatenated_on_channels():
    image = torch.randn(2, 3, 1, 8, 8)
    tokens = condition_tokens(image, 3, (1, 2, 2))
    clip = torch.zeros(2, 4, 3, 8, 8)
    clip[:, :3, :1], clip[:, 3, :1] = image, 1.0
    assert torch.equal(tokens, patchify(clip, (1, 2, 2)))  # (B, 3 x 4 x 4 tokens, 4 channels x 1x2x2)
    assert tokens.shape == (2, 48, 16) and tokens[:, 16:].abs().sum() == 0  # frames 1, 2: nothing, mask 0


def test_the_video_model_starts_as_the_image_model():
    image, video = _model(zero_init=False), _model(zero_init=True, image_conditioning=True)
    assert video.embed.condition.weight.abs().sum() == 0  # InitRule zeros
    missing, unexpected = video.load_state_dict(image.state_dict(), strict=False)  # by name, as a stage starts
    assert missing == ["embed.condition.weight"] and not unexpected  # the only new parameter; no shape changed
    g = torch.Generator().manual_seed(0)
    x, cond = torch.randn(2, 48, 12, generator=g), condition_tokens(torch.randn(2, 3, 1, 8, 8, generator=g), 3, (1, 2, 2))
    thw = torch.stack(torch.meshgrid(torch.arange(3), torch.arange(4), torch.arange(4), indexing="ij"), -1).view(1, 48, 3)
    args = (torch.rand(2, generator=g), thw.expand(2, -1, -1), torch.randn(2, 3, 16, generator=g), torch.tensor([3, 1]))
    out = image(x, *args)
    assert torch.equal(video(torch.cat([x, cond], -1), *args), out)  # the image model applied to the clip
    torch.nn.init.normal_(video.embed.condition.weight, std=0.1)  # once trained, the first frame matters
    assert not torch.allclose(video(torch.cat([x, cond], -1), *args), out, atol=1e-3)
    assert parameter_count(get_family("emu_video"), video.cfg) == sum(p.numel() for p in video.parameters())


def test_recipe_stages_and_rules():
    cfg = load_config(RECIPE)
    assert [s.name for s in cfg.stages] == ["image", "video", "video_long"]
    image, video, long = cfg.resolved_stages
    assert not image.model.image_conditioning and video.model.image_conditioning and long.data.num_frames == 8
    assert cfg.stages[1].fresh_optimizer and {s.model.objective for s in cfg.resolved_stages} == {"diffusion"}
    with pytest.raises(ConfigError, match="data.num_frames"):
        load_config(RECIPE, ["model.image_conditioning=true", "data.num_frames=1"])
    with pytest.raises(ConfigError, match="model.objective"):
        load_config(RECIPE, ["model.objective=ddpm"])
    assert get_family("emu_video").objective(load_config(RECIPE, ["model.objective=flow"]), None).__class__.__name__ \
        == "FlowMatchingObjective"
