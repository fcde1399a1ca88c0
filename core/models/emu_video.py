"""Emu Video ("Emu Video: Factorizing text-to-video generation by explicit image conditioning", Girdhar
et al. 2023) on Movie Gen's diffusion transformer: OUR ADAPTATION. Emu Video itself is a latent U-Net
(a frozen text-to-image U-Net plus temporal layers); here both of its steps are the transformer of
core/models/moviegen.py (adaLN-single, cross-attention to the prompt, factorized t/h/w positions):

- the image model (stage 1, `image_conditioning: false`): text -> image, the transformer on one-frame
  clips (pos_t row 0);
- the video model (stage 2, `image_conditioning: true`): text + image -> video. The conditioning image's
  latent is placed at frame 0 of an otherwise zero clip and concatenated on channels with a binary
  mask channel (1 on the conditioning frame), as Emu Video does; each token then carries
  [x_t patch (P), conditioning patch (C pt ph pw), mask patch (pt ph pw)] (`condition_tokens`).

How the weights carry from the image model to the video model: the conditioning channels get their
own projection, `embed.condition` (Linear(P_cond, d), no bias, zero-initialised), added to the patch
projection of x_t. That is exactly the input projection over the concatenated channels with new,
zero-initialised columns, but as a separate parameter, so no saved parameter changes shape: the
multi-stage loader (core/train.py, matched by name) fills the image model's parameters and the new
module starts at 0, so the video model starts as the image model applied frame by frame. The position
tables are sized by the recipe's largest clip (model.max_latent_*) in every stage, so stages that grow
the resolution or the number of frames change no shape either.

Nothing here imports torch.distributed; module names are Movie Gen's, so its TP tables and CP swap
apply unchanged (parallel/plans/moviegen.py); `embed` (with `condition`) is replicated over tp.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from gigatron.core.models.moviegen import Embed, MovieGen, MovieGenConfig
from gigatron.core.models.patch_embed import patchify


@dataclass
class EmuVideoConfig(MovieGenConfig):
    """The `model:` section of an emu_video recipe: Movie Gen's fields plus the objective and the
    image conditioning. Defaults: the Movie Gen shape; the recipes set theirs."""

    name: Literal["emu_video"] = "emu_video"  # the model family (core/family.py)
    objective: Literal["flow", "diffusion"] = "diffusion"  # diffusion: zero-terminal-SNR, v-prediction (Emu Video); flow: Movie Gen's
    image_conditioning: bool = False      # false: the image model (text -> image); true: the video model (text + first frame -> video)
    diffusion_steps: int = 1000           # T: diffusion steps of the schedule (core/objectives/diffusion.py)
    beta_start: float = 0.00085           # scaled-linear betas (Stable Diffusion's), before the rescale
    beta_end: float = 0.012
    zero_terminal_snr: bool = True        # rescale sqrt(alpha_bar) so that the last step's is exactly 0 (Lin et al.)

    @property
    def condition_features(self) -> int:
        """Features per token of the conditioning latent and its mask channel."""
        return (self.latent_channels + 1) * self.patch_t * self.patch_hw ** 2


def condition_tokens(image: torch.Tensor, frames: int, patch: tuple[int, int, int]) -> torch.Tensor:
    """The conditioning of a clip of `frames` latent frames: `image` (B, C, 1, H, W) (the first frame's
    latent) at frame 0, zeros after it, and the mask channel (1 on frame 0) -> (B, N, (C + 1) pt ph pw)
    tokens in patchify's order, to concatenate after the x_t patch features."""
    B, C, _, H, W = image.shape
    cond = image.new_zeros(B, C + 1, frames, H, W)
    cond[:, :C, :1] = image
    cond[:, C, :1] = 1.0
    return patchify(cond, patch)


class ConditionedEmbed(Embed):
    """Movie Gen's embedding of x_t patches plus, for the video model, the zero-initialised projection
    of the conditioning features that follow them in each token."""

    def __init__(self, cfg: EmuVideoConfig):
        super().__init__(cfg)
        self.features = cfg.patch_features
        self.condition = nn.Linear(cfg.condition_features, cfg.dim, bias=False) if cfg.image_conditioning else None

    def forward(self, tokens, grid_positions):
        """tokens (B, N, P) or, with image conditioning, (B, N, P + P_cond) -> (B, N, d)."""
        h = super().forward(tokens[..., :self.features], grid_positions)
        if self.condition is not None:
            h = h + self.condition(tokens[..., self.features:])
        return h


class EmuVideo(MovieGen):
    """Movie Gen's transformer with the conditioned embedding; forward as MovieGen.forward."""

    def __init__(self, cfg: EmuVideoConfig):
        super().__init__(cfg)
        self.embed = ConditionedEmbed(cfg)


def count_parameters(cfg: EmuVideoConfig) -> int:
    """Movie Gen's count plus the conditioning projection."""
    from gigatron.core.models.moviegen import count_parameters as moviegen_count

    base = MovieGenConfig(**{k: getattr(cfg, k) for k in MovieGenConfig.__dataclass_fields__ if k != "name"})
    return moviegen_count(base) + (cfg.condition_features * cfg.dim if cfg.image_conditioning else 0)
