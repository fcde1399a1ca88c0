"""ImageBind's objective (Girdhar et al. 2023): symmetric InfoNCE between pairs of modalities, with
the negatives of every data-parallel rank, whose gradients go back to the rank that made them.

Model output: {modality: (B, E) L2-normalised embeddings, "logit_scale": 0-dim or (1,) (FSDP2's
fully_shard refuses scalar parameters), the learnable log inverse temperature}. For each pair (a, b) and each direction, the local rows of a against the
gathered rows of b over the "batch" mesh (parallel/comm.py all_gather_with_grad: a reduce-scatter
of the summed gradient in backward), scaled by the pair's inverse temperature, with cross-entropy
against the row's own partner at its global index (rank offset + arange):

    loss = sum_pairs sum_local_i [CE(s * a_i . B_all^T, g_i) + CE(s * b_i . A_all^T, g_i)]

count = 2 x B_local x pairs, so the trainer's mean (core/family.py: sum over ranks / N) is the mean of
every term of the global batch, exactly as one process over that batch computes it. Ranks hold
equally many rows (a flat all-gather). With cp > 1 the ranks of one cp group hold the same samples and
compute the same loss, so count reports count / cp (the family.py rule); without a "batch" mesh
dimension of more than one rank (or without a mesh) nothing is gathered.

Temperatures: one per pair, "learnable" (the model's logit_scale, exp taken here; ImageBind's text
pair, CLIP's init 0.07) or a fixed temperature T (scale 1/T). ImageBind's fixed logit scales
(imagebind_model.py postprocessors, see ../shared/notes/references.md): audio 20 (T = 0.05),
thermal 10, depth 5, IMU 5. Built from an ImageBind model config (core/models/imagebind.py), the
image-text pair is learnable and every other pair gets `fixed_temperature`.

Batch: "images" (B, 3, S, S), "audio" (B, 1, M, F), "text_tokens" (B, L) int64, "text_lengths" (B,),
"labels" (B,), all passed through; `inputs` hands the model the tensors of the modalities the pairs
use. Evaluation: in-batch retrieval top-1 per direction over the gathered batch
("retrieval_audio_to_image": the local audio rows whose nearest gathered image row has the same
label; the same row itself when the batch has no 1-D labels), as (sum, count).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from gigatron.parallel.comm import all_gather_dim0, all_gather_with_grad

KEYS = {"image": ("images",), "text": ("text_tokens", "text_lengths"), "audio": ("audio",)}
LEARNABLE = "learnable"


def _size(mesh, dim: str) -> int:
    if mesh is None:
        return 1
    try:
        return mesh[dim].size()
    except (KeyError, RuntimeError, ValueError):
        return 1


class ContrastiveObjective:
    sequence_keys = ()

    def __init__(self, mesh, pairs: Any, temperatures: list | None = None, dim: str = "batch", grad: bool = True):
        """pairs: [(a, b), ...] of modality names, or an ImageBind model config (pairs, init and
        fixed temperatures read from it); temperatures: per pair, "learnable" or a float.
        grad=False gathers without gradient: the tests' negative control only."""
        if hasattr(pairs, "pairs"):  # the family passes cfg.model
            cfg, pairs = pairs, pairs.pairs
            temperatures = [LEARNABLE if set(p) == {"image", "text"} else cfg.fixed_temperature for p in pairs]
        self.pairs = [tuple(p) for p in pairs]
        self.temperatures = list(temperatures) if temperatures is not None else [LEARNABLE] * len(self.pairs)
        if len(self.temperatures) != len(self.pairs):
            raise ValueError(f"{len(self.temperatures)} temperatures for {len(self.pairs)} pairs")
        for t in self.temperatures:
            if t != LEARNABLE and not float(t) > 0:
                raise ValueError(f"temperature {t!r}: give a positive float or {LEARNABLE!r}")
        self.modalities = list(dict.fromkeys(m for p in self.pairs for m in p))
        unknown = [m for m in self.modalities if m not in KEYS]
        if unknown:
            raise ValueError(f"unknown modalities {unknown}; choose from {list(KEYS)}")
        self.mesh, self.dim, self.grad = mesh, dim, grad
        self.W, self.cp = _size(mesh, dim), _size(mesh, "cp")

    # -- the batch ------------------------------------------------------------------------------

    def prepare(self, batch: dict) -> dict:
        missing = [k for m in self.modalities for k in KEYS[m] if k not in batch]
        if missing:
            raise ValueError(f"the pairs {self.pairs} need batch keys {missing}; the batch has {sorted(batch)}")
        return batch

    def inputs(self, batch: dict) -> tuple[tuple, dict]:
        return (), {k: batch[k] for m in self.modalities for k in KEYS[m]}

    def _rows(self, batch: dict) -> int:
        return batch[KEYS[self.modalities[0]][0]].shape[0]

    def count(self, batch: dict) -> torch.Tensor:
        n = 2 * self._rows(batch) * len(self.pairs)
        return torch.tensor(n) if self.cp == 1 else torch.tensor(n / self.cp, dtype=torch.float64)

    # -- the loss -------------------------------------------------------------------------------

    def _gather(self, x: torch.Tensor, grad: bool) -> torch.Tensor:
        if self.W == 1:
            return x
        if grad:
            return all_gather_with_grad(x, self.mesh, self.dim, grad=self.grad)
        return all_gather_dim0(x.detach(), self.mesh, self.dim)

    def _offset(self, n: int) -> int:
        return self.mesh[self.dim].get_local_rank() * n if self.W > 1 else 0

    def _scale(self, output: dict, i: int) -> torch.Tensor:
        t = self.temperatures[i]
        return output["logit_scale"].float().exp().reshape(()) if t == LEARNABLE else torch.tensor(1.0 / float(t))

    def loss(self, output: dict, batch: dict, model=None) -> torch.Tensor:
        emb = {m: output[m].float() for m in self.modalities}
        every = {m: self._gather(x, grad=True) for m, x in emb.items()}
        n = next(iter(emb.values())).shape[0]
        device = next(iter(emb.values())).device
        target = self._offset(n) + torch.arange(n, device=device)
        total = torch.zeros((), device=device)
        for i, (a, b) in enumerate(self.pairs):
            s = self._scale(output, i).to(device)
            total = total + F.cross_entropy(s * emb[a] @ every[b].T, target, reduction="sum")
            total = total + F.cross_entropy(s * emb[b] @ every[a].T, target, reduction="sum")
        return total

    # -- evaluation -----------------------------------------------------------------------------

    def metrics(self, output: dict, batch: dict) -> dict:
        emb = {m: output[m].detach().float() for m in self.modalities}
        every = {m: self._gather(x, grad=False) for m, x in emb.items()}
        n = next(iter(emb.values())).shape[0]
        device = next(iter(emb.values())).device
        labels = batch.get("labels")
        if labels is not None and labels.dim() == 1:
            mine = labels.to(device)
            keys = self._gather(mine.contiguous(), grad=False)
        else:  # instance retrieval: the partner itself
            mine = self._offset(n) + torch.arange(n, device=device)
            keys = torch.arange(n * self.W, device=device)
        out = {}
        for a, b in self.pairs:
            for x, y in ((a, b), (b, a)):
                nearest = (emb[x] @ every[y].T).argmax(-1)
                hit = (keys[nearest] == mine).double()
                out[f"retrieval_{x}_to_{y}"] = (hit.sum(), torch.tensor(float(n), dtype=torch.float64, device=device))
        return out
