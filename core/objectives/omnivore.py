"""Omnivore's objective: softmax cross-entropy of each sample over its own dataset's classes, for
batches drawn from several datasets (data.format mixture: images, videos, RGB-D).

Batch: "images" (B, 3, S, S) or "videos" (B, 3, F, S, S), optionally "depth" (B, 1, S, S) (an
RGB-D source), "labels" (B,) int64 (a class of the sample's dataset) or (B, k_i) multi-hot, and
"source" (B,) int64 from the mixture (data_pipeline/mixture.py): the dataset, hence the head. A
run without a mixture has one dataset (source 0).

The model's head is the concatenation of the per-dataset heads (core/models/omnivore.py). `prepare`
writes "targets" (B, sum(classes)), nonzero only inside the row's block, and "head_mask" (B,
sum(classes)): 0 inside the block, MASKED elsewhere; the loss adds the mask to the logits, so
exp(masked logit - max) is exactly 0 in fp32 and the softmax, the loss and every gradient are
those of the row's own head alone (the other heads get exactly zero gradient from that row). Under
tensor parallelism the logits arrive sharded on the class axis: the mask is cut to each rank's
columns (no communication) and the loss is the ViT's vocabulary-parallel soft cross-entropy.

Evaluation: "accuracy" over all rows and "accuracy_<dataset>" per head (argmax inside the block);
every rank reports every dataset's (sum, count), zero where it held none, so the trainer's packed
all-reduce lines up.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from gigatron.core.objectives.classification import pixels
from gigatron.parallel.tensor import vocab_parallel_soft_cross_entropy

MASKED = -1.0e6  # added to other datasets' logits: exp(-1e6) underflows to 0 in fp32 and bf16 alike


class OmnivoreObjective:
    sequence_keys = ()

    def __init__(self, mesh, classes: list[int], names: list[str]):
        self.mesh, self.classes, self.names = mesh, list(classes), list(names)
        self.offsets = torch.tensor([0] + list(classes)).cumsum(0)[:-1]  # first column of each head
        self.width = sum(classes)

    def _blocks(self, source: torch.Tensor) -> torch.Tensor:
        """(B, K) bool: the columns of each row's dataset."""
        start = self.offsets[source]  # (B,)
        col = torch.arange(self.width)
        return (col[None, :] >= start[:, None]) & (col[None, :] < (start + torch.tensor(self.classes)[source])[:, None])

    def prepare(self, batch: dict) -> dict:
        labels = batch["labels"]
        source = batch.get("source", torch.zeros(labels.shape[0], dtype=torch.int64)).long()
        if int(source.max()) >= len(self.classes):
            raise ValueError(f"a batch from source {int(source.max())} but model.classes lists {len(self.classes)} heads")
        targets = torch.zeros(labels.shape[0], self.width)
        rows = torch.arange(labels.shape[0])
        if labels.dim() == 1:
            k = torch.tensor(self.classes)[source]
            if bool((labels < 0).any() or (labels >= k).any()):
                raise ValueError(f"labels {labels.tolist()} outside their datasets' classes {k.tolist()}")
            targets[rows, self.offsets[source] + labels.long()] = 1.0
        else:  # multi-hot (B, k) of one dataset's width, rows summing to 1 after normalisation
            hot = labels.float()
            for i in source.unique().tolist():
                sel = source == i
                if hot.shape[1] != self.classes[i]:
                    raise ValueError(f"multi-hot labels of width {hot.shape[1]} for dataset {i} of {self.classes[i]} classes")
                o = int(self.offsets[i])
                targets[sel, o:o + self.classes[i]] = hot[sel] / hot[sel].sum(-1, keepdim=True).clamp(min=1.0)
        batch["targets"] = targets
        batch["head_mask"] = torch.where(self._blocks(source), 0.0, MASKED)
        batch["source"] = source
        return batch

    def inputs(self, batch: dict) -> tuple[tuple, dict]:
        x = pixels(batch)
        if "depth" in batch:  # RGB-D: the depth channels follow the colour ones (core/models/omnivore.py)
            x = torch.cat([x, batch["depth"].to(x.dtype)], dim=1)
        return (x,), {}

    def count(self, batch: dict) -> torch.Tensor:
        return (batch["targets"].sum(-1) > 0).sum()

    def _masked(self, logits, batch: dict):
        mask = batch["head_mask"].to(logits.device)
        if isinstance(logits, DTensor):  # each rank cuts its own columns of the (identical) mask
            mask = distribute_tensor(mask, logits.device_mesh, logits.placements, src_data_rank=None)
        return logits + mask

    def loss(self, logits, batch: dict, model=None) -> torch.Tensor:
        return vocab_parallel_soft_cross_entropy(self._masked(logits, batch), batch["targets"].to(logits.device), self.mesh)

    def metrics(self, logits, batch: dict) -> dict:
        masked = self._masked(logits, batch)
        full = masked.full_tensor() if isinstance(masked, DTensor) else masked  # evaluation only: (B, K)
        targets = batch["targets"].to(full.device)
        hit = (targets.gather(1, full.argmax(-1, keepdim=True)).squeeze(1) > 0).double()
        labelled = (targets.sum(-1) > 0).double()
        source = batch["source"].to(full.device)
        out = {"accuracy": (hit.sum(), labelled.sum())}
        for i, name in enumerate(self.names):
            rows = (source == i).double() * labelled
            out[f"accuracy_{name}"] = ((hit * rows).sum(), rows.sum())
        return out
