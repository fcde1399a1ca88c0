"""CrossFlow ("Flowing from Words to Pixels: A Noise-Free Framework for Cross-Modality Evolution",
Liu et al. 2025): flow matching from the distribution of text latents straight to image latents, with
no Gaussian source and no cross-attention, as plain single-device PyTorch.

- The variational text encoder (`text_encoder`) reads the prompt's frozen embeddings (B, L, text_dim)
  through `text_layers` bidirectional transformer blocks over the real tokens, mean-pools them and
  projects to a mean and a log-variance of the image latent's shape (C, H', W'), both patchified to
  (B, N, P) in the image tokens' order. The source of the flow is z0 = mu + exp(logvar / 2) eps
  (eps ~ N(0, I), drawn by the objective), and the KL term to N(0, I) is returned per element,
  0.5 (mu^2 + exp(logvar) - 1 - logvar).
- The flow: x_t = t x1 + (1 - (1 - sigma_min) t) z0 and its velocity x1 - (1 - sigma_min) z0 (the
  same path as Movie Gen's, with z0 in place of noise, core/objectives/flow_matching.py); the target
  depends on the encoder, so the flow loss trains it too. The model computes both from the image
  latent x1 and eps, and returns (prediction, target, kl, mu), each (B, N, P) for the local tokens.
- The encoder's own loss (model.align_weight): mu regressed on the paired image latent, (mu - x1)^2
  per element. The paper trains its encoder with a contrastive loss against the image (better than
  text reconstruction, by its ablation); a regression needs no negatives, so it is per sample and the
  same in every layout. Without it (and with a small KL weight) the tiny debug model let sigma
  collapse and ignored the caption: a point source already makes the flow nearly exact.
- The velocity model is Movie Gen's transformer without cross-attention (core/models/moviegen.py's
  self-attention, SwiGLU, RMSNorm, adaLN-single, factorized positions, the shared patch embedding).
- Classifier-free guidance through the indicator: a learned embedding of 1 (conditional) or 0
  (unconditional) added to the time embedding. Unconditional rows (the share model.text_dropout)
  get the empty prompt, so their source z0 carries no information on their image: the model learns
  the unconditional flow there; the sampler mixes both (core/families/crossflow.py).

Context parallelism splits the image tokens; every cp rank encodes the whole prompt and keeps its
tokens' mean, log-variance and KL (`positions`), so the KL of each element is counted once. Under
tensor parallelism the text encoder is replicated (its attention is explicit math: a DTensor-safe
path over a few text tokens); the velocity blocks use Movie Gen's TP tables without the cross rows.

Shapes: B batch, N image tokens (local), P features per patch, L text tokens, d width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from gigatron.core.models.llama import FeedForward, RMSNorm
from gigatron.core.models.moviegen import (AdaLNSingle, Embed, HeadProjections, MovieGenConfig, ModulationTable,
                                           SelfAttention, TimeEmbedding, modulate, timestep_embedding)
from gigatron.core.models.patch_embed import patchify


@dataclass
class CrossFlowConfig(MovieGenConfig):
    """The `model:` section of a crossflow recipe: Movie Gen's fields (its cross-attention unused)
    plus the text encoder and the KL weight. Images are one-frame clips: max_latent_frames 1, and
    max_latent_height x width is THE latent grid (the text encoder's output has its shape)."""

    name: Literal["crossflow"] = "crossflow"   # the model family (core/family.py)
    text_layers: int = 4                  # transformer blocks of the variational text encoder
    kl_weight: float = 1e-3               # beta: loss = flow + beta * KL + align_weight * align (per element, one count)
    align_weight: float = 0.0             # the encoder's own loss: (mu - x1)^2, the text latent's mean regressed on its image
    logvar_min: float = -30.0             # the log-variance is clamped to [min, max] (as Stable Diffusion's VAE)
    logvar_max: float = 20.0
    max_latent_frames: int = 1

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """(C, 1, H', W') of the image latent (and of z0)."""
        return (self.latent_channels, 1, self.max_latent_height * self.patch_hw, self.max_latent_width * self.patch_hw)

    @property
    def latent_numel(self) -> int:
        return math.prod(self.latent_shape)


class TextAttention(HeadProjections):
    """Bidirectional self-attention over the prompt's tokens, masked to the real ones (explicit math)."""

    def forward(self, x, bias):
        """x (B, L, d); bias (B, 1, 1, L): 0 on real tokens, a large negative number on padding."""
        q, k, v = self.heads(self.wq, x), self.heads(self.wk, x), self.heads(self.wv, x)  # (B, H, L, D)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + bias, dim=-1)  # (B, H, L, L)
        return self.merge(weights @ v)


class TextBlock(nn.Module):
    def __init__(self, cfg: CrossFlowConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = TextAttention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, bias):
        x = x + self.attention(self.attention_norm(x), bias)
        return x + self.feed_forward(self.ffn_norm(x))


class TextVariationalEncoder(nn.Module):
    """Prompt embeddings -> (B, 2, C, 1, H', W'): the mean and the log-variance of the image latent's shape."""

    def __init__(self, cfg: CrossFlowConfig):
        super().__init__()
        self.cfg = cfg
        self.proj = nn.Linear(cfg.text_dim, cfg.dim)
        self.layers = nn.ModuleDict({str(i): TextBlock(cfg) for i in range(cfg.text_layers)})
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, 2 * cfg.latent_numel)

    def forward(self, text, mask):
        """text (B, L, text_dim); mask (B, L) float, 1 on the real tokens."""
        bias = ((1.0 - mask) * -1e9)[:, None, None, :]  # (B, 1, 1, L)
        h = self.proj(text)
        for layer in self.layers.values():
            h = layer(h, bias)
        pooled = (self.norm(h) * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # (B, d)
        return self.head(pooled).unflatten(-1, (2, *self.cfg.latent_shape))


class CrossFlowBlock(nn.Module):
    """Movie Gen's block without cross-attention: adaLN-modulated self-attention and SwiGLU."""

    def __init__(self, cfg: CrossFlowConfig):
        super().__init__()
        self.modulation = ModulationTable(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = SelfAttention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, shared, positions, segment_ids):
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = self.modulation(shared).unbind(1)  # (B, d) each
        x = x + gate_a[:, None] * self.attention(modulate(self.attention_norm(x), shift_a, scale_a), positions, segment_ids)
        return x + gate_f[:, None] * self.feed_forward(modulate(self.ffn_norm(x), shift_f, scale_f))


class CrossFlow(nn.Module):
    def __init__(self, cfg: CrossFlowConfig):
        super().__init__()
        self.cfg = cfg
        self.text_encoder = TextVariationalEncoder(cfg)
        self.embed = Embed(cfg)
        self.time_embed = TimeEmbedding(cfg)
        self.indicator = nn.Embedding(2, cfg.dim)  # 0 unconditional, 1 conditional (classifier-free guidance)
        self.adaln = AdaLNSingle(cfg)
        self.to_blocks = nn.Identity()    # sequence parallel scatters the residual stream here
        self.layers = nn.ModuleDict({str(i): CrossFlowBlock(cfg) for i in range(cfg.n_layers)})
        self.from_blocks = nn.Identity()  # ... and gathers it here
        self.final_modulation = ModulationTable(cfg, rows=2)
        self.final_time = nn.Linear(cfg.dim, 2 * cfg.dim)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.patch_features)

    def encode(self, text, text_lengths):
        """(mu, logvar) tokens (B, N, P) of the whole latent grid for the prompts."""
        mask = (torch.arange(text.shape[1], device=text.device)[None, :] < text_lengths[:, None]).to(text.dtype)
        mu, logvar = self.text_encoder(text, mask).unbind(1)  # (B, C, 1, H', W') each
        logvar = logvar.clamp(self.cfg.logvar_min, self.cfg.logvar_max)
        return patchify(mu, self.cfg.patch), patchify(logvar, self.cfg.patch)

    def velocity(self, x_t, t, indicator, grid_positions, positions=None, segment_ids=None):
        """The predicted velocity (B, N, P) at the tokens x_t (B, N, P), times t (B,), indicator (B,) int."""
        time = self.time_embed(timestep_embedding(t, self.cfg.time_dim)) + self.indicator(indicator)  # (B, d)
        shared = self.adaln(time)  # (B, 6, d)
        h = self.to_blocks(self.embed(x_t, grid_positions))
        for layer in self.layers.values():
            h = layer(h, shared, positions, segment_ids)
        h = self.from_blocks(h)
        shift, scale = self.final_modulation(self.final_time(F.silu(time)).unflatten(-1, (2, -1))).unbind(1)
        return self.output(modulate(self.norm(h), shift, scale))

    def forward(self, x1, eps, t, indicator, grid_positions, text, text_lengths, positions=None, segment_ids=None):
        """x1 (B, N, P) image-latent tokens, eps (B, N, P) the reparameterisation noise, t (B,),
        indicator (B,) int64, grid_positions (B, N, 3), text (B, L, text_dim), text_lengths (B,);
        positions (N,) the global positions of the local tokens (context parallel), segment_ids (B, N)
        or None. Returns (prediction, target, kl, mu), each (B, N, P)."""
        mu, logvar = self.encode(text, text_lengths)  # (B, N_all, P): every cp rank encodes the whole prompt
        if positions is not None:  # this cp rank's tokens (padding past the grid reads the last; the loss masks it)
            index = positions.clamp(max=mu.shape[1] - 1)
            mu, logvar = mu.index_select(1, index), logvar.index_select(1, index)
        z0 = mu + torch.exp(0.5 * logvar) * eps
        tb = t.view(-1, 1, 1).to(z0.dtype)
        sigma_min = self.cfg.sigma_min
        x_t = tb * x1 + (1 - (1 - sigma_min) * tb) * z0
        target = x1 - (1 - sigma_min) * z0
        kl = 0.5 * (mu * mu + logvar.exp() - 1.0 - logvar)
        return self.velocity(x_t, t, indicator, grid_positions, positions, segment_ids), target, kl, mu
