"""A deterministic clip reader for the Movie Gen tests ("moviegen_synthetic"): sample g is a pure
function of g (core/rng.py), served in one global order (g = consumed + dp_rank * B + j), so every
layout sees the same global batch, as the parity tests need. Real clips go through prepare-videos
and the webdataset reader (tests/moviegen/test_real_video.py); this reader only fixes the order.

Clips (B, 3, F, S, S) are smooth: a per-sample colour and a moving gradient plus a little noise, so
attention across frames and positions matters; prompts have 1 + g % L tokens of text_dim features."""

from __future__ import annotations

import torch

from gigatron.core import rng
from gigatron.data_pipeline.loader import register_format


class SyntheticClips:
    def __init__(self, cfg, split: str, dp_rank: int, dp_size: int, height: int = 0):
        self.F, self.S, self.B = cfg.data.num_frames, cfg.data.image_size, cfg.train.micro_batch_size
        self.H = height or self.S
        self.text_dim, self.L = cfg.model.text_dim, cfg.model.text_tokens
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.key = rng.stream_key("moviegen_synthetic", cfg.train.seed, split)
        self.consumed = 0

    def next_batch(self):
        F, H, S, B, L = self.F, self.H, self.S, self.B, self.L
        first = self.consumed + self.dp_rank * B
        g = torch.arange(first, first + B)
        n = 3 * F * H * S
        noise = rng.normal(self.key, g[:, None] * (n + 64) + torch.arange(n)[None]).view(B, 3, F, H, S)
        colour = rng.normal(self.key + 1, g[:, None] * 3 + torch.arange(3)[None])  # (B, 3)
        f = torch.arange(F).view(1, 1, F, 1, 1)
        y, x = torch.arange(H).view(1, 1, 1, H, 1), torch.arange(S).view(1, 1, 1, 1, S)
        wave = torch.sin((x + y + 2 * f) * 0.6 + g.view(B, 1, 1, 1, 1).float())
        videos = colour.view(B, 3, 1, 1, 1) + wave + 0.1 * noise
        lengths = 1 + g % L
        text = rng.normal(self.key + 2, g[:, None] * L * self.text_dim + torch.arange(L * self.text_dim)[None])
        text = text.view(B, L, self.text_dim) * (torch.arange(L)[None, :, None] < lengths[:, None, None])
        self.consumed += B * self.dp_size
        return {"sample_index": g, "videos": videos, "text_embeddings": text, "text_lengths": lengths}

    def state_dict(self):
        return {"consumed": self.consumed}

    def load_state_dict(self, state):
        self.consumed = int(state["consumed"])

    def stats(self):
        return {}


register_format("moviegen_synthetic", SyntheticClips)
