"""The Vision Transformer (Dosovitskiy et al. 2021) of MAWS and SWAG, as plain single-device PyTorch.

Pre-norm blocks (LayerNorm with bias, bidirectional multi-head attention with separate q/k/v
projections, a GELU MLP), learned absolute positions, a class token or average pooling, and one of
two stems: the patchify stem (the shared `PatchEmbed`, core/models/patch_embed.py) or the
convolutional stem (core/models/conv_stem.py; one transformer block fewer, as its paper does).

Images and videos go through one backbone: spatio-temporal patches (pt x p x p; an image becomes a
clip of pt repeated frames). A token's position is spatial[y, x] + temporal[t] (the temporal table
exists only when the model takes clips longer than one patch in time), so an image model's positions
are exactly a Hugging Face / timm ViT's `position_embeddings` (class-token row first).

Heads, by `objective`: "classification" -> `head` (dim -> num_classes logits) on the normalised class
token, or on the normalised mean of the patch tokens (timm's fc_norm; MAE's fine-tuning), "mae" -> `decoder`
(core/models/mae_decoder.py), "none" -> the normalised tokens. The MAE encoder sees only the visible
patches: `ids_keep` (B, n_keep) selects them after the positions are added (as MAE and HF ViTMAE do).

For the engine (as core/models/llama.py): no torch.distributed here; blocks in an index-keyed
ModuleDict; `embed`, `norm`, `head`, `decoder` may be None on a pipeline stage; head counts are read
from projection outputs (tensor parallel holds H/tp heads).

Shapes: B batch, N patch tokens (gt*gh*gw), T = N (+1 with a class token) tokens, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from gigatron.core.models.attention import AttentionCore
from gigatron.core.models.conv_stem import ConvStem
from gigatron.core.models.patch_embed import PatchEmbed


@dataclass
class ViTConfig:
    """The `model:` section of a vit recipe. Defaults are ViT-H/14 at 224 px (SWAG)."""

    name: Literal["vit"] = "vit"           # the model family (core/family.py)
    dim: int = 1280                        # width
    depth: int = 32                        # transformer blocks (the conv stem uses depth - 1)
    heads: int = 16                        # attention heads
    mlp_dim: int = 5120                    # MLP hidden width
    patch: int = 14                        # patch side p in pixels
    patch_frames: int = 1                  # pt: frames per spatio-temporal patch (OmniMAE: 2)
    image_size: int = 224                  # side of the square input (data.image_size)
    max_frames: int = 1                    # longest clip (frames) the temporal position table covers
    channels: int = 3                      # input channels
    pool: Literal["cls", "avg"] = "cls"    # class token, or the mean of the patch tokens
    stem: Literal["patchify", "conv"] = "patchify"
    stem_widths: list[int] = field(default_factory=list)   # conv stem channels; empty: 48, 96, ... (pycls 4 GF)
    stem_strides: list[int] = field(default_factory=list)  # conv stem strides, product = patch; empty: all 2
    objective: Literal["classification", "mae", "none"] = "classification"
    num_classes: int = 1000                # classifier width (SWAG: the hashtag vocabulary)
    mask_ratio: float = 0.75               # MAE: share of image patches masked (MAE, MAWS: 0.75)
    video_mask_ratio: float = 0.9          # MAE: share of video patches masked (OmniMAE: 0.9)
    decoder_dim: int = 512                 # MAE decoder width (MAE: 512; OmniMAE: 384)
    decoder_depth: int = 8                 # MAE decoder blocks (MAE: 8; OmniMAE: 4)
    decoder_heads: int = 16
    decoder_mlp_dim: int = 2048
    norm_pix_loss: bool = True             # MAE: target = pixels normalised per patch (mean 0, var 1)
    norm_eps: float = 1e-6                 # LayerNorm epsilon (timm / MAE)
    qkv_bias: bool = True
    attention_backend: Literal["auto", "sdpa", "torch", "triton"] = "auto"
    init_std: float = 0.02

    @property
    def blocks(self) -> int:
        return self.depth - 1 if self.stem == "conv" else self.depth

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return self.patch_frames, self.patch, self.patch

    @property
    def grid(self) -> tuple[int, int, int]:
        """(gt, gh, gw) of the longest clip (an image: gt = 1)."""
        side = self.image_size // self.patch
        return max(1, self.max_frames // self.patch_frames), side, side

    @property
    def n_cls(self) -> int:
        return 1 if self.pool == "cls" else 0

    def conv_widths(self) -> list[int]:
        return list(self.stem_widths) or [48 * 2 ** i for i in range(len(self.conv_strides()))]

    def conv_strides(self) -> list[int]:
        if self.stem_strides:
            return list(self.stem_strides)
        n = self.patch.bit_length() - 1
        return [2] * n if 2 ** n == self.patch else []  # a patch that is no power of 2 needs stem_strides


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool, backend: str):
        super().__init__()
        self.head_dim = dim // heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.core = AttentionCore(causal=False, backend=backend)

    def forward(self, x):
        B, T, D = x.shape[0], x.shape[1], self.head_dim
        q, k, v = (f(x).unflatten(-1, (-1, D)).transpose(1, 2) for f in (self.q, self.k, self.v))  # (B, H, T, D)
        positions = torch.arange(T, device=x.device)
        out = self.core(q, k, v, positions, None)  # (B, H, T, D)
        return self.proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int, eps: float, qkv_bias: bool = True, backend: str = "auto"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, qkv_bias, backend)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, mlp_dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def positions(spatial: torch.Tensor, temporal: torch.Tensor | None, gt: int) -> torch.Tensor:
    """(1, gt*S, dim) position of every patch token: spatial (1, S, dim) + temporal[t] (1, Gt, dim)."""
    if temporal is None:
        if gt != 1:
            raise ValueError(f"a clip of {gt} temporal patches needs model.max_frames >= {gt} x patch_frames")
        return spatial
    if gt > temporal.shape[1]:
        raise ValueError(f"a clip of {gt} temporal patches exceeds model.max_frames / patch_frames = {temporal.shape[1]}")
    return (temporal[:, :gt, None, :] + spatial[:, None]).flatten(1, 2)


class Embed(nn.Module):
    """Stem + positions (+ visible-patch selection for MAE) + class token: the first pipeline stage."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.n_cls = cfg.n_cls
        if cfg.stem == "conv":
            self.stem = ConvStem(cfg.channels, cfg.dim, cfg.conv_widths(), cfg.conv_strides())
        else:
            self.stem = PatchEmbed(cfg.channels, cfg.dim, cfg.patch_size)
        gt, gh, gw = cfg.grid
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim)) if cfg.n_cls else None
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.n_cls + gh * gw, cfg.dim))  # class-token row first
        self.time_embed = nn.Parameter(torch.zeros(1, gt, cfg.dim)) if gt > 1 else None

    def forward(self, x: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        gt = self.stem.grid(x)[0]
        tokens = self.stem(x)  # (B, N, dim)
        tokens = tokens + positions(self.pos_embed[:, self.n_cls:], self.time_embed, gt)
        if ids_keep is not None:  # MAE: the visible patches only
            tokens = tokens.gather(1, ids_keep[..., None].expand(-1, -1, tokens.shape[-1]))
        if self.cls_token is not None:
            cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
            tokens = torch.cat([cls, tokens], dim=1)
        return tokens  # (B, T, dim)


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        from gigatron.core.models.mae_decoder import MAEDecoder

        self.cfg = cfg
        self.embed = Embed(cfg)
        self.blocks = nn.ModuleDict({str(i): Block(cfg.dim, cfg.heads, cfg.mlp_dim, cfg.norm_eps, cfg.qkv_bias,
                                                   cfg.attention_backend) for i in range(cfg.blocks)})
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.num_classes) if cfg.objective == "classification" else None
        self.decoder = MAEDecoder(cfg) if cfg.objective == "mae" else None

    def forward(self, x: torch.Tensor, ids_keep: torch.Tensor | None = None,
                ids_restore: torch.Tensor | None = None) -> torch.Tensor:
        """x: images (B, C, H, W) / clips (B, C, F, H, W) on the first stage, tokens (B, T, dim) after.
        ids_keep (B, n_keep), ids_restore (B, N): the MAE mask (core/objectives/mae.py).
        Returns logits (B, num_classes), MAE predictions (B, N, C*pt*p*p), or tokens (B, T, dim)."""
        h = self.embed(x, ids_keep) if self.embed is not None else x
        for block in self.blocks.values():
            h = block(h)
        if self.norm is None:
            return h
        if self.head is not None:  # the class token's output, or the normalised mean token (timm's fc_norm)
            return self.head(self.norm(h[:, 0]) if self.cfg.n_cls else self.norm(h.mean(dim=1)))
        h = self.norm(h)
        return self.decoder(h, ids_restore) if self.decoder is not None else h


def encoder_parameters(cfg: ViTConfig) -> int:
    """Parameters of the backbone (stem, positions, blocks, final norm): heads excluded, as published."""
    with torch.device("meta"):
        model = ViT(cfg)
    return sum(p.numel() for name, p in model.named_parameters() if not name.startswith(("head.", "decoder.")))
