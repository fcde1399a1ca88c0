"""The light MAE decoder (He et al. 2022): visible tokens + mask tokens -> pixels of every patch.

`input` projects the encoder's tokens to the decoder width, appends one learned mask token per
masked patch, restores the original patch order (`ids_restore`) and adds the decoder's own positions
(class-token row first, as HF ViTMAE's decoder_pos_embed); then blocks, a norm and `pred`, a linear
map to the C*pt*p*p values of each patch in `patchify`'s (C, pt, ph, pw) order. The class token's
output is dropped. Its parameters live in submodules (input, blocks, norm, pred) so that tensor
parallelism can shard its blocks like the encoder's (parallel/plans/vit.py).
"""

from __future__ import annotations

import torch
from torch import nn

from gigatron.core.models.vit import Block, ViTConfig, positions


class DecoderInput(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.n_cls = cfg.n_cls
        gt, gh, gw = cfg.grid
        self.embed = nn.Linear(cfg.dim, cfg.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.n_cls + gh * gw, cfg.decoder_dim))
        self.time_embed = nn.Parameter(torch.zeros(1, gt, cfg.decoder_dim)) if gt > 1 else None

    def forward(self, h: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.embed(h)  # (B, n_cls + n_keep, Dd)
        cls, visible = x[:, :self.n_cls], x[:, self.n_cls:]
        B, N = ids_restore.shape
        spatial = self.pos_embed.shape[1] - self.n_cls
        masked = self.mask_token.expand(B, N - visible.shape[1], -1)
        x = torch.cat([visible, masked], dim=1).gather(1, ids_restore[..., None].expand(-1, -1, x.shape[-1]))
        x = x + positions(self.pos_embed[:, self.n_cls:], self.time_embed, N // spatial)
        return torch.cat([cls + self.pos_embed[:, :self.n_cls], x], dim=1)  # (B, n_cls + N, Dd)


class MAEDecoder(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.n_cls = cfg.n_cls
        self.input = DecoderInput(cfg)
        self.blocks = nn.ModuleDict({str(i): Block(cfg.decoder_dim, cfg.decoder_heads, cfg.decoder_mlp_dim,
                                                   cfg.norm_eps, cfg.qkv_bias, cfg.attention_backend)
                                     for i in range(cfg.decoder_depth)})
        self.norm = nn.LayerNorm(cfg.decoder_dim, eps=cfg.norm_eps)
        pt, p, _ = cfg.patch_size
        self.pred = nn.Linear(cfg.decoder_dim, cfg.channels * pt * p * p)

    def forward(self, h: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.input(h, ids_restore)
        for block in self.blocks.values():
            x = block(x)
        return self.pred(self.norm(x))[:, self.n_cls:]  # (B, N, C*pt*p*p)
