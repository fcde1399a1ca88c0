"""Masked autoencoding (MAE, He et al. 2022; OmniMAE for images and videos in one backbone).

`prepare` draws each sample's mask from the layout-invariant generator (core/rng.py) keyed by
batch["sample_index"] (or, from the shard readers, the sample's "sample_ids" with a key per epoch):
noise[g, n] = uniform(key, g * N + n), so every TP rank, every pipeline stage and a resumed run mask
the same patches of sample g. As MAE (and HF ViTMAE, which takes this `noise`
as an argument) does, the patches are ranked by noise and the first round(N * (1 - ratio)) kept:
"ids_keep" (B, n_keep) the visible patches, "ids_restore" (B, N) the inverse permutation, "mask"
(B, N) 1 where masked. Images use model.mask_ratio (MAE / MAWS 0.75), videos video_mask_ratio
(OmniMAE up to 0.95).

loss = sum over masked patches of mean_i (pred_i - target_i)^2 over the patch's C*pt*p*p values,
the target being the patch's pixels normalised to mean 0 and variance 1 (norm_pix_loss); count =
the number of masked patches. The encoder sees only visible patches, the decoder predicts all.
"""

from __future__ import annotations

import torch

from gigatron.core import rng
from gigatron.core.models.patch_embed import grid_of, patchify
from gigatron.core.objectives.classification import pixels


def mae_noise(sample_index: torch.Tensor, n_patches: int, seed: int, epochs: torch.Tensor | None = None) -> torch.Tensor:
    """(B, N) uniform noise of each sample's patches: a pure function of (seed, epoch, sample, patch).
    `epochs` (B,), when given, draws a new mask for each pass over the data (MAE re-masks every epoch)."""
    counters = sample_index.long()[:, None] * n_patches + torch.arange(n_patches)[None, :]
    if epochs is None:
        return rng.uniform(rng.stream_key("mae_mask", seed), counters)
    noise = torch.empty(counters.shape)
    for epoch in epochs.unique().tolist():
        rows = epochs == epoch
        noise[rows] = rng.uniform(rng.stream_key("mae_mask", seed, epoch), counters[rows])
    return noise


def sample_identity(batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(per-sample index, epochs or None): the global "sample_index" when the reader gives one (token
    stream, test readers), else the shard readers' provenance "sample_ids" (shard << 32 | index in
    shard) with their "epochs" (data_pipeline/loader.py): the same on every rank and layout."""
    if "sample_index" in batch:
        return batch["sample_index"], None
    return batch["sample_ids"], batch["epochs"]


def mask_from_noise(noise: torch.Tensor, ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids_keep (B, n_keep), ids_restore (B, N), mask (B, N) float 1 = masked), as HF ViTMAE ranks noise."""
    B, N = noise.shape
    n_keep = int(N * (1 - ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(B, N)
    mask[:, :n_keep] = 0
    return ids_shuffle[:, :n_keep], ids_restore, torch.gather(mask, 1, ids_restore)


def pixel_targets(x: torch.Tensor, patch: tuple[int, int, int], normalise: bool) -> torch.Tensor:
    """(B, N, C*pt*p*p) patches of images/clips, normalised per patch (MAE's norm_pix_loss)."""
    target = patchify(x.float(), patch)
    if normalise:
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    return target


class MAEObjective:
    sequence_keys = ()

    def __init__(self, model_cfg, seed: int):
        self.m, self.seed = model_cfg, seed

    def prepare(self, batch: dict) -> dict:
        x = pixels(batch)
        gt, gh, gw = grid_of(x.shape if x.dim() == 5 else (*x.shape[:2], self.m.patch_frames, *x.shape[2:]),
                             self.m.patch_size)
        ratio = self.m.video_mask_ratio if x.dim() == 5 else self.m.mask_ratio
        index, epochs = sample_identity(batch)
        batch["noise"] = mae_noise(index, gt * gh * gw, self.seed, epochs)
        batch["ids_keep"], batch["ids_restore"], batch["mask"] = mask_from_noise(batch["noise"], ratio)
        return batch

    def inputs(self, batch: dict) -> tuple[tuple, dict]:
        return (pixels(batch),), {"ids_keep": batch["ids_keep"], "ids_restore": batch["ids_restore"]}

    def count(self, batch: dict) -> torch.Tensor:
        return batch["mask"].sum()

    def loss(self, pred, batch: dict, model=None) -> torch.Tensor:
        target = pixel_targets(pixels(batch), self.m.patch_size, self.m.norm_pix_loss).to(pred.device)
        per_patch = ((pred.float() - target) ** 2).mean(-1)  # (B, N)
        return (per_patch * batch["mask"].to(pred.device)).sum()

    def metrics(self, pred, batch: dict) -> dict:
        return {}
