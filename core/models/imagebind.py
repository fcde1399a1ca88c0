"""ImageBind (Girdhar et al. 2023): one embedding space for several modalities, as plain single-device
PyTorch on top of the ViT blocks (core/models/vit.py).

Encoders, one per modality in `modalities`, each ending in a LayerNorm, a bias-free linear projection
to `embed_dim` and an L2 normalisation (the paper's heads and post-processors):
- image: the ViT itself (patchify stem, class token, learned positions). Its parameters keep the ViT's
  names (`embed.*`, `blocks.0..`, `norm.*`), so a MAWS / SWAG ViT checkpoint, or an image-text stage,
  loads by name.
- text: byte tokens (data_pipeline/tokenizer.py) -> a token embedding + learned positions -> causal
  transformer blocks -> the hidden state of the last real token (CLIP's and ImageBind's EOT pooling;
  causal attention means the padding after it changes nothing).
- audio: a log-mel spectrogram (B, 1, n_mels, frames) as a one-channel image through the shared
  `PatchEmbed` (non-overlapping patches; the paper's overlapping 16x16 with stride 10 is not used),
  a class token, learned positions, transformer blocks.

For the engine: every encoder's blocks live in one index-keyed ModuleDict `blocks` (image first,
then text, then audio; `block_ranges`), so FSDP units, activation checkpointing and the block count
come through the seam unchanged. `frozen` modalities have requires_grad=False and run under
no_grad: ImageBind's second stage binds new modalities to a frozen image (and text) encoder.

forward(images=..., text_tokens=..., text_lengths=..., audio=...) embeds the modalities it is given
and returns {modality: (B, embed_dim) unit vectors, "logit_scale": the learnable log inverse
temperature of the image-text pair}. Every data-parallel rank passes the same modalities in every
micro-batch (core/objectives/contrastive.py), so FSDP's collectives line up.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from gigatron.core.models.attention import AttentionCore
from gigatron.core.models.patch_embed import PatchEmbed
from gigatron.core.models.vit import Block, Embed, ViTConfig

MODALITIES = ("image", "text", "audio")


@dataclass
class ImageBindConfig(ViTConfig):
    """The `model:` section of an imagebind recipe: the image ViT's fields (ViT-H/14 by default, as
    the paper's frozen OpenCLIP image encoder) plus the text and audio encoders and the pairs."""

    name: Literal["imagebind"] = "imagebind"
    objective: Literal["none"] = "none"       # the image ViT carries no head of its own
    pool: Literal["cls"] = "cls"
    embed_dim: int = 1024                      # the joint space (ViT-H ImageBind: 1024)
    modalities: list[str] = field(default_factory=lambda: ["image", "text"])  # encoders built
    frozen: list[str] = field(default_factory=list)        # encoders with requires_grad=False
    pairs: list[list[str]] = field(default_factory=lambda: [["image", "text"]])  # InfoNCE pairs
    text_dim: int = 1024                       # OpenCLIP ViT-H text tower: 24 layers, width 1024
    text_depth: int = 24
    text_heads: int = 16
    text_mlp_dim: int = 4096
    text_tokens: int = 77                      # context length (data.text_tokens)
    vocab_size: int = 258                      # byte tokenizer: 256 bytes + BOS + EOS
    audio_dim: int = 768                       # ImageBind's audio ViT-B: 12 layers, width 768
    audio_depth: int = 12
    audio_heads: int = 12
    audio_mlp_dim: int = 3072
    audio_patch: int = 16
    n_mels: int = 128
    audio_frames: int = 208
    init_temperature: float = 0.07             # image-text: learnable, from CLIP's 0.07
    max_logit_scale: float = 100.0             # CLIP's clamp of exp(logit_scale)
    fixed_temperature: float = 0.05            # every other pair (ImageBind: 0.05 for audio)

    def block_ranges(self) -> dict[str, range]:
        """Indices of each built encoder's blocks in `blocks` (image, then text, then audio)."""
        depth = {"image": self.blocks, "text": self.text_depth, "audio": self.audio_depth}
        out, start = {}, 0
        for name in MODALITIES:
            if name in self.modalities:
                out[name] = range(start, start + depth[name])
                start += depth[name]
        return out

    @property
    def total_blocks(self) -> int:
        return sum(len(r) for r in self.block_ranges().values())


class Projection(nn.Module):
    """LayerNorm -> bias-free linear -> L2 normalisation (ImageBind's head and post-processor)."""

    def __init__(self, dim: int, embed_dim: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.proj = nn.Linear(dim, embed_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(self.norm(x)), dim=-1)


class TextEmbed(nn.Module):
    def __init__(self, cfg: ImageBindConfig):
        super().__init__()
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.text_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.text_tokens, cfg.text_dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tokens(tokens) + self.pos_embed[:, :tokens.shape[1]]


class AudioEmbed(nn.Module):
    """A spectrogram as a one-channel image: patches + class token + learned positions."""

    def __init__(self, cfg: ImageBindConfig):
        super().__init__()
        p = cfg.audio_patch
        self.stem = PatchEmbed(1, cfg.audio_dim, (1, p, p))
        n = (cfg.n_mels // p) * (cfg.audio_frames // p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.audio_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + n, cfg.audio_dim))

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        tokens = self.stem(mel)  # (B, N, dim)
        if tokens.shape[1] + 1 != self.pos_embed.shape[1]:
            raise ValueError(f"a spectrogram of {tuple(mel.shape[-2:])} gives {tokens.shape[1]} patches; the model "
                             f"takes {self.pos_embed.shape[1] - 1} (model.n_mels x model.audio_frames)")
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1) + self.pos_embed


class ImageBind(nn.Module):
    def __init__(self, cfg: ImageBindConfig):
        super().__init__()
        self.cfg = cfg
        ranges, eps, backend = cfg.block_ranges(), cfg.norm_eps, cfg.attention_backend
        widths = {"image": (cfg.dim, cfg.heads, cfg.mlp_dim), "text": (cfg.text_dim, cfg.text_heads, cfg.text_mlp_dim),
                  "audio": (cfg.audio_dim, cfg.audio_heads, cfg.audio_mlp_dim)}
        blocks = {}
        for name, indices in ranges.items():
            dim, heads, mlp = widths[name]
            for i in indices:
                blocks[str(i)] = Block(dim, heads, mlp, eps, cfg.qkv_bias, backend)
                if name == "text":
                    blocks[str(i)].attn.core = AttentionCore(causal=True, backend=backend)
        self.blocks = nn.ModuleDict(blocks)
        self.embed = Embed(cfg) if "image" in ranges else None
        self.norm = nn.LayerNorm(cfg.dim, eps=eps) if "image" in ranges else None  # the ViT's final norm
        self.image_head = Projection(cfg.dim, cfg.embed_dim, eps) if "image" in ranges else None
        self.text_embed = TextEmbed(cfg) if "text" in ranges else None
        self.text_head = Projection(cfg.text_dim, cfg.embed_dim, eps) if "text" in ranges else None
        self.audio_embed = AudioEmbed(cfg) if "audio" in ranges else None
        self.audio_head = Projection(cfg.audio_dim, cfg.embed_dim, eps) if "audio" in ranges else None
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / cfg.init_temperature)))  # 1-D: FSDP2 shards no scalars
        for name in cfg.frozen:
            for param in self.encoder_parameters(name):
                param.requires_grad_(False)

    def encoder_parameters(self, modality: str):
        """The parameters of one modality's encoder (embedding, blocks, head)."""
        if modality == "image":
            modules = [self.embed, self.norm, self.image_head]
        else:
            modules = [getattr(self, f"{modality}_embed"), getattr(self, f"{modality}_head")]
        modules += [self.blocks[str(i)] for i in self.cfg.block_ranges()[modality]]
        return [p for m in modules for p in m.parameters()]

    def _run_blocks(self, modality: str, h: torch.Tensor) -> torch.Tensor:
        for i in self.cfg.block_ranges()[modality]:
            h = self.blocks[str(i)](h)
        return h

    def _encode(self, modality: str, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        frozen = modality in self.cfg.frozen
        with torch.no_grad() if frozen else contextlib.nullcontext():
            if modality == "image":
                h = self._run_blocks("image", self.embed(x))
                return self.image_head(self.norm(h)[:, 0])
            if modality == "text":
                h = self._run_blocks("text", self.text_embed(x))
                last = (lengths.long() - 1).clamp(min=0).to(h.device)  # the last real token (EOS)
                return self.text_head(h[torch.arange(h.shape[0], device=h.device), last])
            h = self._run_blocks("audio", self.audio_embed(x))
            return self.audio_head(h[:, 0])

    def forward(self, images: torch.Tensor | None = None, text_tokens: torch.Tensor | None = None,
                text_lengths: torch.Tensor | None = None, audio: torch.Tensor | None = None) -> dict:
        out = {}
        if images is not None:
            out["image"] = self._encode("image", images)
        if text_tokens is not None:
            out["text"] = self._encode("text", text_tokens, text_lengths)
        if audio is not None:
            out["audio"] = self._encode("audio", audio)
        out["logit_scale"] = self.logit_scale.clamp(max=math.log(self.cfg.max_logit_scale))
        return out


def encoder_parameters(cfg: ImageBindConfig) -> int:
    """Parameters of every built encoder with its projection (the logit scale excluded)."""
    with torch.device("meta"):
        model = ImageBind(cfg)
    return sum(p.numel() for name, p in model.named_parameters() if name != "logit_scale")
