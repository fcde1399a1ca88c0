"""Pixels (or latents) to tokens and back: the one patch embedding of every vision and video family.

A patch is pt x ph x pw voxels of C channels. `patchify` cuts an image (B, C, H, W) or a clip
(B, C, F, H, W) into patches, flattened in (C, pt, ph, pw) order: the layout of a Conv3d weight
(dim, C, pt, ph, pw), so a patchify stem is exactly a Conv3d with stride = kernel, and a Conv2d one
(pt = 1) converts to and from Hugging Face / timm by a reshape. Tokens run time-major, then rows,
then columns: token n sits at grid position (n // (gh * gw), (n // gw) % gh, n % gw).

An image fed to a spatio-temporal embedding (pt > 1) becomes a clip of pt repeated frames, as
OmniMAE does, so one backbone takes images and videos. `unpatchify` inverts `patchify`: the MAE
target and Movie Gen's output head use it.

`PatchEmbed` is a Linear over flattened patches (a matmul, which tensor parallelism can shard like
any projection). Used by the ViT family (core/models/vit.py), Movie Gen (core/models/moviegen.py)
and the families built on them.
"""

from __future__ import annotations

import torch
from torch import nn


def as_clip(x: torch.Tensor, frames_per_patch: int = 1) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, pt, H, W) by repeating the image pt times; a clip passes unchanged."""
    if x.dim() == 5:
        return x
    if x.dim() != 4:
        raise ValueError(f"expected an image (B, C, H, W) or a clip (B, C, F, H, W), got shape {tuple(x.shape)}")
    return x.unsqueeze(2).expand(-1, -1, frames_per_patch, -1, -1)


def grid_of(shape: tuple[int, ...], patch: tuple[int, int, int]) -> tuple[int, int, int]:
    """Patch grid (gt, gh, gw) of a clip of shape (..., F, H, W)."""
    (f, h, w), (pt, ph, pw) = shape[-3:], patch
    if f % pt or h % ph or w % pw:
        raise ValueError(f"clip of {f}x{h}x{w} (frames x height x width) is not divisible by the patch {pt}x{ph}x{pw}")
    return f // pt, h // ph, w // pw


def patchify(x: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """(B, C, F, H, W) (or an image, repeated to pt frames) -> (B, gt*gh*gw, C*pt*ph*pw)."""
    pt, ph, pw = patch
    x = as_clip(x, pt)
    b, c = x.shape[:2]
    gt, gh, gw = grid_of(x.shape, patch)
    x = x.reshape(b, c, gt, pt, gh, ph, gw, pw)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)  # (B, gt, gh, gw, C, pt, ph, pw)
    return x.reshape(b, gt * gh * gw, c * pt * ph * pw)


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int],
               channels: int) -> torch.Tensor:
    """(B, gt*gh*gw, C*pt*ph*pw) -> (B, C, gt*pt, gh*ph, gw*pw): the inverse of `patchify`."""
    (gt, gh, gw), (pt, ph, pw) = grid, patch
    b = tokens.shape[0]
    x = tokens.reshape(b, gt, gh, gw, channels, pt, ph, pw)
    x = x.permute(0, 4, 1, 5, 2, 6, 3, 7)  # (B, C, gt, pt, gh, ph, gw, pw)
    return x.reshape(b, channels, gt * pt, gh * ph, gw * pw)


class PatchEmbed(nn.Module):
    """Images or clips -> (B, N, dim) tokens through one linear map of each flattened patch."""

    def __init__(self, in_channels: int, dim: int, patch: tuple[int, int, int], bias: bool = True):
        super().__init__()
        self.in_channels, self.patch = in_channels, tuple(patch)
        self.proj = nn.Linear(in_channels * self.patch[0] * self.patch[1] * self.patch[2], dim, bias=bias)

    def grid(self, x: torch.Tensor) -> tuple[int, int, int]:
        return grid_of(as_clip(x, self.patch[0]).shape, self.patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(patchify(x, self.patch))

    # -- the convolution view (checkpoint converters) ----------------------------------------------
    def conv_weight(self) -> torch.Tensor:
        """The weight as a Conv3d's (dim, C, pt, ph, pw); squeeze dim 2 for a Conv2d when pt == 1."""
        return self.proj.weight.reshape(self.proj.out_features, self.in_channels, *self.patch)

    @staticmethod
    def linear_weight(conv_weight: torch.Tensor) -> torch.Tensor:
        """A Conv2d (dim, C, ph, pw) or Conv3d (dim, C, pt, ph, pw) weight -> our (dim, C*pt*ph*pw)."""
        return conv_weight.reshape(conv_weight.shape[0], -1)
