"""Movie Gen Video ("Movie Gen: A Cast of Media Foundation Models", Meta 2024), as plain single-device PyTorch.

A diffusion transformer over the patch tokens of video latents, trained by flow matching
(core/objectives/flow_matching.py):
- Llama-3-style blocks: RMSNorm, SwiGLU (core/models/llama.py's), full bidirectional self-attention
  over all video tokens (no GQA, no RoPE), then cross-attention to the text embeddings;
- adaLN-single (PixArt-alpha, Chen et al. 2023): ONE shared MLP maps the time embedding to 6 d
  modulations (shift, scale, gate for self-attention and for the FFN) and each block adds its own
  small learnable (6, d) table. A per-block Linear(d, 6d) would cost 48 x 226M = 11B parameters at the
  30B shape; this costs 226M once plus 48 x 37K. The gates start at zero (each block starts as the
  identity) and so does the output projection (DiT), unless `zero_init` is off (parity tests);
- learnable factorized position embeddings: pos_t[t] + pos_h[h] + pos_w[w] for the token at latent
  grid position (t, h, w), so every bucket shape (duration, aspect ratio) reads the same tables;
- the patch embedding is the shared one (core/models/patch_embed.py, 1x2x2 over C latent channels):
  the objective patchifies before context parallelism splits the tokens, and the model projects them
  with `patch_embed.proj`; the output head predicts a velocity per patch, unpatchified by the sampler.

Nothing here imports torch.distributed. Under tensor parallelism heads are read from projection
outputs; `to_blocks` / `from_blocks` are identities where sequence parallelism scatters / gathers
the residual stream (parallel/plans/moviegen.py); `SelfAttention.core` is what context parallelism
swaps; cross-attention stays local (every cp rank holds the whole prompt).

Shapes: B batch, N video tokens (local), P = C*pt*ph*pw features per patch, L text tokens, d width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from gigatron.core.models.attention import AttentionCore
from gigatron.core.models.llama import FeedForward, RMSNorm
from gigatron.core.models.patch_embed import PatchEmbed

MODULATIONS = 6  # shift, scale, gate (self-attention) and shift, scale, gate (FFN)


@dataclass
class MovieGenConfig:
    """The `model:` section of a moviegen recipe. Defaults are Movie Gen Video 30B."""

    name: Literal["moviegen"] = "moviegen"  # the model family (core/family.py)
    dim: int = 6144                       # model width d
    n_layers: int = 48                    # transformer blocks
    n_heads: int = 48                     # attention heads (self and cross); no GQA
    ffn_dim: int = 16384                  # SwiGLU hidden width
    latent_channels: int = 16             # C: channels of the latents (TAE: 16; the pixel stand-in: 3)
    patch_t: int = 1                      # pt: latent frames per token
    patch_hw: int = 2                     # ph = pw: latent rows / columns per token (1x2x2 patches)
    pixel_downsample: int = 1             # latent stand-in: average-pool pixels by this factor in H and W
    max_latent_frames: int = 32           # rows of pos_t: latent frames / pt (16 s at 16 fps, TAE 8x: 32)
    max_latent_height: int = 64           # rows of pos_h: latent height / ph (768 px, TAE 8x, ph 2: 48; 64 for portrait buckets)
    max_latent_width: int = 64            # rows of pos_w
    text_dim: int = 4096                  # width of the (frozen, precomputed) text embeddings
    text_tokens: int = 256                # prompt tokens counted in FLOPs and plans (Movie Gen: up to 256)
    time_dim: int = 256                   # sinusoidal time-embedding width (DiT)
    norm_eps: float = 1e-5                # RMSNorm epsilon
    attention_backend: Literal["auto", "sdpa", "triton", "torch"] = "auto"  # self-attention kernels
    init_std: float = 0.02                # std of the normal init of projections
    zero_init: bool = True                # adaLN gates and the output projection start at 0 (DiT); off: all paths live at step 0
    text_dropout: float = 0.1             # training: share of samples whose prompt is dropped (classifier-free guidance)
    sigma_min: float = 1e-5               # flow matching: x_t = t x1 + (1 - (1 - sigma_min) t) x0
    t_logit_mean: float = 0.0             # flow matching: t = sigmoid(mean + std * n), n ~ N(0, 1) (logit-normal)
    t_logit_std: float = 1.0

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def patch(self) -> tuple[int, int, int]:
        return (self.patch_t, self.patch_hw, self.patch_hw)

    @property
    def patch_features(self) -> int:
        return self.latent_channels * self.patch_t * self.patch_hw ** 2


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """t (B,) in [0, 1] -> (B, dim) sinusoidal features of 1000 t (DiT's convention for integer steps)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = 1000.0 * t.float()[:, None] * freqs[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)  # (B, dim)


class TimeEmbedding(nn.Module):
    """Sinusoidal features (B, time_dim) -> MLP -> (B, d): the time embedding shared by every block."""

    def __init__(self, cfg: MovieGenConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.time_dim, cfg.dim)
        self.fc2 = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, features):
        return self.fc2(F.silu(self.fc1(features)))


class AdaLNSingle(nn.Module):
    """The shared modulation MLP of adaLN-single: SiLU, Linear(d, 6 d), evaluated once per sample."""

    def __init__(self, cfg: MovieGenConfig):
        super().__init__()
        self.linear = nn.Linear(cfg.dim, MODULATIONS * cfg.dim)

    def forward(self, time):
        return self.linear(F.silu(time)).unflatten(-1, (MODULATIONS, -1))  # (B, 6, d)


class ModulationTable(nn.Module):
    """A block's own (6, d) table, added to the shared modulation (PixArt-alpha's scale_shift_table)."""

    def __init__(self, cfg: MovieGenConfig, rows: int = MODULATIONS):
        super().__init__()
        self.table = nn.Parameter(torch.zeros(rows, cfg.dim))

    def forward(self, shared):
        return shared + self.table  # (B, rows, d)


class PositionEmbedding(nn.Module):
    """Learnable factorized (t, h, w) position embeddings: pos_t[t] + pos_h[h] + pos_w[w]."""

    def __init__(self, cfg: MovieGenConfig):
        super().__init__()
        self.pos_t = nn.Embedding(cfg.max_latent_frames, cfg.dim)
        self.pos_h = nn.Embedding(cfg.max_latent_height, cfg.dim)
        self.pos_w = nn.Embedding(cfg.max_latent_width, cfg.dim)

    def forward(self, grid_positions):
        """grid_positions (B, N, 3) int64 (t, h, w) of each token -> (B, N, d)."""
        return self.pos_t(grid_positions[..., 0]) + self.pos_h(grid_positions[..., 1]) + self.pos_w(grid_positions[..., 2])


class Embed(nn.Module):
    """Patch tokens -> d through the shared patch embedding's projection, plus positions."""

    def __init__(self, cfg: MovieGenConfig):
        super().__init__()
        self.patch_embed = PatchEmbed(cfg.latent_channels, cfg.dim, tuple(cfg.patch))
        self.position = PositionEmbedding(cfg)

    def forward(self, tokens, grid_positions):
        return self.patch_embed.proj(tokens) + self.position(grid_positions)  # (B, N, d)


class HeadProjections(nn.Module):
    """The four d x d projections of multi-head attention (no GQA, no bias), shared by Movie Gen's
    self- and cross-attention and CrossFlow's text encoder; `heads` reads (B, H/tp, T, D) from one."""

    def __init__(self, cfg: MovieGenConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def heads(self, projection: nn.Module, x):
        return projection(x).unflatten(-1, (-1, self.head_dim)).transpose(1, 2)  # (B, H/tp, T, D)

    def merge(self, out):
        """(B, H/tp, T, D) -> wo -> (B, T, d)."""
        return self.wo(out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1))


class SelfAttention(HeadProjections):
    """Bidirectional multi-head self-attention over the video tokens; `core` is what CP swaps."""

    def __init__(self, cfg: MovieGenConfig):
        super().__init__(cfg)
        self.core = AttentionCore(causal=False, backend=cfg.attention_backend)

    def forward(self, x, positions, segment_ids):
        q, k, v = self.heads(self.wq, x), self.heads(self.wk, x), self.heads(self.wv, x)
        return self.merge(self.core(q, k, v, positions, segment_ids))  # (B, N, d)


class CrossAttention(HeadProjections):
    """Video tokens attend to the prompt's text tokens (all of them, on every cp rank)."""

    def forward(self, x, text, text_mask):
        """x (B, N, d); text (B, L, d); text_mask (B, L) bool, True on real text tokens."""
        q, k, v = self.heads(self.wq, x), self.heads(self.wk, text), self.heads(self.wv, text)  # (B, H/tp, N|L, D)
        return self.merge(F.scaled_dot_product_attention(q, k, v, attn_mask=text_mask[:, None, None, :]))


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class MovieGenBlock(nn.Module):
    def __init__(self, cfg: MovieGenConfig):
        super().__init__()
        self.modulation = ModulationTable(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = SelfAttention(cfg)
        self.cross_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.cross_attention = CrossAttention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, shared, text, text_mask, positions, segment_ids):
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = self.modulation(shared).unbind(1)  # (B, d) each
        x = x + gate_a[:, None] * self.attention(modulate(self.attention_norm(x), shift_a, scale_a), positions, segment_ids)
        x = x + self.cross_attention(self.cross_norm(x), text, text_mask)
        return x + gate_f[:, None] * self.feed_forward(modulate(self.ffn_norm(x), shift_f, scale_f))


class MovieGen(nn.Module):
    def __init__(self, cfg: MovieGenConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = Embed(cfg)
        self.time_embed = TimeEmbedding(cfg)
        self.adaln = AdaLNSingle(cfg)
        self.text_proj = nn.Linear(cfg.text_dim, cfg.dim)
        self.to_blocks = nn.Identity()    # sequence parallel scatters the residual stream here
        self.layers = nn.ModuleDict({str(i): MovieGenBlock(cfg) for i in range(cfg.n_layers)})
        self.from_blocks = nn.Identity()  # ... and gathers it here
        self.final_modulation = ModulationTable(cfg, rows=2)
        self.final_time = nn.Linear(cfg.dim, 2 * cfg.dim)  # final layer's shift, scale from the time embedding
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.patch_features)

    def forward(self, tokens, t, grid_positions, text, text_lengths, positions=None, segment_ids=None):
        """tokens (B, N, P) noisy latent patches x_t; t (B,); grid_positions (B, N, 3) (t, h, w);
        text (B, L, text_dim) embeddings, text_lengths (B,) real tokens of each prompt;
        positions (N,) global token positions (context parallel); segment_ids (B, N) int or None:
        tokens of different ids do not attend to each other (padding added by context parallel).
        Returns the predicted velocity (B, N, P)."""
        time = self.time_embed(timestep_embedding(t, self.cfg.time_dim))  # (B, d)
        shared = self.adaln(time)  # (B, 6, d)
        text_mask = torch.arange(text.shape[1], device=text.device)[None, :] < text_lengths[:, None]  # (B, L)
        context = self.text_proj(text)  # (B, L, d)
        h = self.to_blocks(self.embed(tokens, grid_positions))
        for layer in self.layers.values():
            h = layer(h, shared, context, text_mask, positions, segment_ids)
        h = self.from_blocks(h)
        shift, scale = self.final_modulation(self.final_time(F.silu(time)).unflatten(-1, (2, -1))).unbind(1)
        return self.output(modulate(self.norm(h), shift, scale))


def parameter_breakdown(cfg: MovieGenConfig) -> dict[str, int]:
    """Parameters by part (built on the meta device): blocks' self-attention + FFN + norms, their
    cross-attention, adaLN (shared MLP, per-block tables, final layer's), embeddings (patch, positions,
    time, text projection) and the output head."""
    key = repr(cfg)
    if key not in _BREAKDOWNS:  # a 30B model takes seconds to build, even on meta
        _BREAKDOWNS[key] = _breakdown(cfg)
    return dict(_BREAKDOWNS[key])


_BREAKDOWNS: dict[str, dict[str, int]] = {}


def _breakdown(cfg: MovieGenConfig) -> dict[str, int]:
    with torch.device("meta"):
        model = MovieGen(cfg)
    parts = {"blocks (self-attention, FFN, norms)": 0, "cross-attention": 0, "adaLN": 0, "embeddings": 0, "output": 0}
    for name, p in model.named_parameters():
        if ".cross_attention." in name or ".cross_norm." in name:
            key = "cross-attention"
        elif ".modulation." in name or name.startswith(("adaln.", "final_modulation.", "final_time.")):
            key = "adaLN"
        elif name.startswith("layers."):
            key = "blocks (self-attention, FFN, norms)"
        elif name.startswith(("embed.", "time_embed.", "text_proj.")):
            key = "embeddings"
        else:
            key = "output"
        parts[key] += p.numel()
    return parts


def count_parameters(cfg: MovieGenConfig) -> int:
    return sum(parameter_breakdown(cfg).values())
