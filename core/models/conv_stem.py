"""The convolutional stem of "Early convolutions help transformers see better" (Xiao et al. 2021).

Stacked 3x3 convolutions, each followed by BatchNorm and ReLU, whose strides multiply to the patch
size, then a 1x1 convolution (with bias) to the model width: (B, C, H, W) -> (B, gh*gw, dim), the
same token order as the patchify stem (rows, then columns; core/models/patch_embed.py). The reference
(facebookresearch/pycls, ViTStemConv) uses four stride-2 convolutions for patch 16 with widths
24-48-96-192 (1 GF) or 48-96-192-384 (4 GF); the paper removes one transformer block to pay for it
(core/models/vit.py does so). Images only: a clip is embedded frame by frame only by the patchify stem.
"""

from __future__ import annotations

import torch
from torch import nn


class ConvStem(nn.Module):
    def __init__(self, in_channels: int, dim: int, widths: list[int], strides: list[int]):
        super().__init__()
        if len(widths) != len(strides):
            raise ValueError(f"conv stem: {len(widths)} widths but {len(strides)} strides")
        layers, channels = [], in_channels
        for width, stride in zip(widths, strides):
            layers += [nn.Conv2d(channels, width, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU()]
            channels = width
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Conv2d(channels, dim, 1)  # the final 1x1 convolution, with bias
        self.stride = 1
        for s in strides:
            self.stride *= s

    def grid(self, x: torch.Tensor) -> tuple[int, int, int]:
        h, w = x.shape[-2:]
        if x.dim() != 4 or h % self.stride or w % self.stride:
            raise ValueError(f"the conv stem takes images (B, C, H, W) with sides divisible by {self.stride}, "
                             f"got {tuple(x.shape)}")
        return 1, h // self.stride, w // self.stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.grid(x)
        return self.proj(self.convs(x)).flatten(2).transpose(1, 2).contiguous()  # (B, gh*gw, dim), token-major

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """BatchNorm running statistics after `to_empty` (they are buffers, not initialised parameters)."""
        for module in self.convs:
            if isinstance(module, nn.BatchNorm2d):
                module.reset_running_stats()
