"""Flow matching (Lipman et al. 2023) as Movie Gen trains it: predict the velocity from noise to data.

Per sample: data x1 (the latents), noise x0 ~ N(0, I), a time t ~ logit-normal(mean, std), and

    x_t = t x1 + (1 - (1 - sigma_min) t) x0        (sigma_min = 1e-5)
    v   = d x_t / d t = x1 - (1 - sigma_min) x0      the target
    loss = sum over real tokens and features of (model(x_t, t, text) - v)^2;  count = their number

x0, t and the text dropout (classifier-free guidance: the prompt replaced by the empty prompt, one
zero token) are drawn in `prepare`, before context parallelism splits the tokens, from the
layout-invariant generator (core/rng.py) keyed by the sample's global index: every tp/cp rank of a
sample and a resumed run draw the same values. The index is batch["sample_index"] when the reader
gives one, else a 31-bit hash of (sample_ids, epochs) (the shard readers' provenance: a clip seen
again in a later epoch gets new noise).

Latents: pixels stand in for Movie Gen's temporal autoencoder (none is available offline): the
videos (B, 3, F, H, W), normalised by the reader, average-pooled by model.pixel_downsample in H and
W, are the latents (C = 3). They are patchified here (core/models/patch_embed.py), so context
parallelism splits tokens: "x_t", "velocity" and "grid_positions" (B, N, ...) are the sequence
keys. A length cp does not divide is padded by `cp_shard_batch`, which marks the real tokens
("real_tokens"); padding is masked out of attention (segment ids) and out of the loss and count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gigatron.core import rng
from gigatron.core.models.patch_embed import grid_of, patchify
from gigatron.parallel.context import padding_segment_ids


def to_latents(videos: torch.Tensor, cfg) -> torch.Tensor:
    """(B, 3, F, H, W) normalised pixels -> (B, C, F, H/s, W/s) latents (the documented stand-in)."""
    s = cfg.pixel_downsample
    latents = F.avg_pool3d(videos, (1, s, s)) if s > 1 else videos
    if latents.shape[1] != cfg.latent_channels:
        raise ValueError(f"the pixel stand-in gives {latents.shape[1]} latent channels but model.latent_channels="
                         f"{cfg.latent_channels}; set model.latent_channels={latents.shape[1]} (no autoencoder here)")
    return latents


def grid_positions(grid: tuple[int, int, int], batch: int, device=None) -> torch.Tensor:
    """(B, gt*gh*gw, 3) int64 (t, h, w) of each token, in patchify's token order (time-major)."""
    gt, gh, gw = grid
    n = torch.arange(gt * gh * gw, device=device)
    thw = torch.stack([n // (gh * gw), (n // gw) % gh, n % gw], dim=-1)
    return thw[None].expand(batch, -1, -1)


def sample_keys(batch: dict) -> torch.Tensor:
    """(B,) int64 global sample indices keying each sample's randomness (see the module docstring)."""
    if "sample_index" in batch:
        return batch["sample_index"].long()
    ids = batch["sample_ids"].long() ^ (batch["epochs"].long() << 40)
    return rng.random_bits(rng.stream_key("sample_key"), ids) >> 1  # 31 bits


def flow_path(x1: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, sigma_min: float):
    """(x_t, velocity) for data x1, noise x0 (same shape, batch first) and t (B,)."""
    tb = t.view(-1, *([1] * (x1.dim() - 1)))
    return tb * x1 + (1 - (1 - sigma_min) * tb) * x0, x1 - (1 - sigma_min) * x0


def guidance_text(batch: dict, m, dropped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(text (B, L, text_dim), lengths (B,)): the batch's prompts with the `dropped` rows (classifier-free
    guidance) replaced by the empty prompt, one zero token; all empty when the data has no prompts."""
    text = batch.get("text_embeddings")
    B = dropped.shape[0]
    if text is None:  # no prompt in the data: unconditional (the empty prompt)
        return torch.zeros(B, 1, m.text_dim), torch.ones(B, dtype=torch.int64)
    lengths = batch["text_lengths"].clone()
    lengths[dropped] = 1
    return text.masked_fill(dropped[:, None, None], 0.0), lengths


def denoiser_batch(batch: dict, m, x_t: torch.Tensor, target: torch.Tensor, t: torch.Tensor,
                   dropped: torch.Tensor) -> dict:
    """The prepared batch of a denoiser (flow matching here, diffusion in core/objectives/diffusion.py):
    x_t and the model's target (B, C, F, H', W') patchified to (B, N, P) under "x_t" / "velocity", the
    token grid, the time input t (B,), and the prompt with the `dropped` rows (classifier-free
    guidance) replaced by the empty prompt, one zero token."""
    B = x_t.shape[0]
    grid = grid_of(x_t.shape, m.patch)
    text, lengths = guidance_text(batch, m, dropped)
    out = {k: v for k, v in batch.items() if k not in ("videos", "text_embeddings", "text_lengths")}
    out.update({"x_t": patchify(x_t, m.patch), "velocity": patchify(target, m.patch),  # (B, N, P)
                "grid_positions": grid_positions(grid, B), "t": t, "text": text, "text_lengths": lengths,
                "grid": torch.tensor(grid)})
    return out


class FlowMatchingObjective:
    sequence_keys = ("x_t", "velocity", "grid_positions")

    def __init__(self, cfg):
        self.m, self.seed = cfg.model, cfg.train.seed

    def _key(self, what: str) -> int:
        return rng.stream_key("flow_matching", what, self.seed)

    def draw(self, keys: torch.Tensor, shape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noise x0 of `shape` (B, ...), t (B,), text dropped (B,) bool) for the samples `keys`."""
        m, n = self.m, int(torch.Size(shape[1:]).numel())
        counters = keys[:, None] * n + torch.arange(n)[None, :]
        x0 = rng.normal(self._key("x0"), counters).view(shape)
        t = torch.sigmoid(m.t_logit_mean + m.t_logit_std * rng.normal(self._key("t"), keys))
        dropped = rng.uniform(self._key("text_dropout"), keys) < m.text_dropout
        return x0, t, dropped

    def prepare(self, batch: dict) -> dict:
        x1 = to_latents(batch["videos"].float(), self.m)  # (B, C, F, H', W')
        x0, t, dropped = self.draw(sample_keys(batch), x1.shape)
        x_t, velocity = flow_path(x1, x0, t, self.m.sigma_min)
        return denoiser_batch(batch, self.m, x_t, velocity, t, dropped)

    def inputs(self, batch: dict) -> tuple[tuple, dict]:
        return (batch["x_t"],), {"t": batch["t"], "grid_positions": batch["grid_positions"], "text": batch["text"],
                                 "text_lengths": batch["text_lengths"], "positions": batch["positions"],
                                 "segment_ids": padding_segment_ids(batch)}

    def _real(self, batch: dict) -> torch.Tensor | None:
        real = batch.get("real_tokens")
        return None if real is None else real[..., None].float()

    def count(self, batch: dict) -> torch.Tensor:
        v = batch["velocity"]
        real = batch.get("real_tokens")
        tokens = real.sum() if real is not None else torch.tensor(v.shape[0] * v.shape[1])
        return tokens * v.shape[-1]

    def loss(self, prediction, batch: dict, model=None) -> torch.Tensor:
        err = (prediction.float() - batch["velocity"]) ** 2  # (B, N, P)
        real = self._real(batch)
        return (err * real).sum() if real is not None else err.sum()

    def metrics(self, prediction, batch: dict) -> dict:
        return {}
