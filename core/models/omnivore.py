"""Omnivore (Girdhar et al. 2022): one ViT that classifies images, videos and single-view RGB-D with
the same parameters, as plain single-device PyTorch on top of core/models/vit.py.

What it adds to the ViT:
- RGB-D: a separate depth patch embedding (the shared `PatchEmbed` with `depth_channels` = 1) whose
  tokens are summed with the RGB tokens. An RGB-D input is one (B, 3 + 1, ...) tensor: the stem
  embeds channels 0..2 with the RGB projection and the rest with the depth one; a plain RGB input
  (B, 3, ...) runs the RGB projection alone. The RGB projection keeps the ViT's name
  (`embed.stem.proj`), so an image / video ViT checkpoint (an OmniMAE stage) loads by name and only
  the depth projection (`embed.stem.depth.proj`) starts fresh.
- one linear head per dataset (`classes`: the width of each, in data.mixture order), stored as one
  `head` of width sum(classes): column block i is dataset i's head. The objective
  (core/objectives/omnivore.py) restricts each row's softmax to its dataset's block, so this is
  exactly separate heads, but every rank's every micro-batch touches the same parameters (what
  FSDP's reduce-scatters and tensor parallelism's column split of the head need), and the ViT's
  vocabulary-parallel head plan applies unchanged.

Images and videos share the backbone through spatio-temporal patches (an image is a clip of
patch_frames repeated frames, core/models/patch_embed.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from gigatron.core.models.patch_embed import PatchEmbed
from gigatron.core.models.vit import ViT, ViTConfig


@dataclass
class OmnivoreConfig(ViTConfig):
    """The `model:` section of an omnivore recipe: a ViT's fields plus the heads and the depth stem.
    Defaults: ViT-B with 2x16x16 patches at 224 px, heads for ImageNet-1k, Kinetics-400, SUN RGB-D."""

    name: Literal["omnivore"] = "omnivore"
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    patch: int = 16
    patch_frames: int = 2
    max_frames: int = 16
    classes: list[int] = field(default_factory=lambda: [1000, 400, 19])  # one head per dataset (data.mixture order)
    datasets: list[str] = field(default_factory=list)  # names of the heads, for the metrics; empty: 0, 1, ...
    depth_channels: int = 1                # channels of the depth input (1: depth or disparity)
    num_classes: int = field(default=0, init=False)  # sum(classes): the width of the joined head (derived)

    def __post_init__(self):
        self.num_classes = sum(self.classes)

    def offsets(self) -> list[int]:
        """First column of each dataset's head in the joined head."""
        out, start = [], 0
        for k in self.classes:
            out.append(start)
            start += k
        return out

    def head_names(self) -> list[str]:
        return list(self.datasets) or [str(i) for i in range(len(self.classes))]


class RGBDPatchEmbed(PatchEmbed):
    """RGB patches through `proj` (the ViT's stem), plus depth patches through `depth` when the input
    carries depth channels after the colour ones: tokens = proj(rgb) + depth.proj(depth)."""

    def __init__(self, rgb_channels: int, depth_channels: int, dim: int, patch: tuple[int, int, int]):
        super().__init__(rgb_channels, dim, patch)
        self.depth = PatchEmbed(depth_channels, dim, patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.in_channels
        if x.shape[1] == c:
            return super().forward(x)
        if x.shape[1] != c + self.depth.in_channels:
            raise ValueError(f"expected {c} (RGB) or {c + self.depth.in_channels} (RGB-D) channels, got {x.shape[1]}")
        return super().forward(x[:, :c]) + self.depth(x[:, c:])  # (B, N, dim)


class Omnivore(ViT):
    """The ViT with the RGB-D stem. forward(x): images (B, C, H, W), clips (B, C, F, H, W) or RGB-D
    images (B, C + depth_channels, H, W) -> the joined logits (B, sum(classes))."""

    def __init__(self, cfg: OmnivoreConfig):
        if cfg.stem != "patchify":
            raise ValueError("omnivore takes the patchify stem (its depth embedding is a patch embedding)")
        super().__init__(cfg)
        self.embed.stem = RGBDPatchEmbed(cfg.channels, cfg.depth_channels, cfg.dim, cfg.patch_size)


def backbone_parameters(cfg: OmnivoreConfig) -> int:
    """Parameters without the heads (as published counts are): the ViT backbone and the depth stem."""
    with torch.device("meta"):
        model = Omnivore(cfg)
    return sum(p.numel() for name, p in model.named_parameters() if not name.startswith("head."))
