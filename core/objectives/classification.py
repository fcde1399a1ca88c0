"""Weakly supervised classification (SWAG, MAWS stage two): softmax cross-entropy against normalised
multi-hot targets over a large label space.

Batch (data_pipeline/loader.py): "images" (B, 3, S, S) or "videos" (B, 3, F, S, S), "labels" (B,)
int64 (one class) or (B, K) float32 multi-hot (data.num_labels = K; SWAG's hashtags, 1 to several
per image). `prepare` turns either into "targets" (B, K): each row divided by its number of labels,
so an image with n hashtags puts 1/n on each (SWAG). loss = sum over samples of
-sum_k q_k log softmax(z)_k; count = the samples with at least one label.

Under tensor parallelism the classifier is column-parallel and its logits arrive sharded on K:
the loss is vocabulary-parallel like the LM head's (parallel/tensor.py
vocab_parallel_soft_cross_entropy): each rank reads its own columns of the targets and no rank
gathers the (B, K) logits. Evaluation reports top-1 accuracy: the argmax is one of the labels.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from gigatron.parallel.tensor import vocab_parallel_soft_cross_entropy


def soft_targets(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B,) class ids or (B, K) multi-hot -> (B, K) float32 rows summing to 1 (0 for an unlabelled row)."""
    if labels.dim() == 1:
        return torch.nn.functional.one_hot(labels.long(), num_classes).float()
    hot = labels.float()
    if hot.shape[-1] != num_classes:
        raise ValueError(f"multi-hot labels of width {hot.shape[-1]} but model.num_classes={num_classes}")
    return hot / hot.sum(-1, keepdim=True).clamp(min=1.0)


def pixels(batch: dict) -> torch.Tensor:
    return batch["images"] if "images" in batch else batch["videos"]


class ClassificationObjective:
    sequence_keys = ()

    def __init__(self, mesh, num_classes: int):
        self.mesh, self.num_classes = mesh, num_classes

    def prepare(self, batch: dict) -> dict:
        batch["targets"] = soft_targets(batch["labels"], self.num_classes)
        return batch

    def inputs(self, batch: dict) -> tuple[tuple, dict]:
        return (pixels(batch),), {}

    def count(self, batch: dict) -> torch.Tensor:
        return (batch["targets"].sum(-1) > 0).sum()

    def loss(self, logits, batch: dict, model=None) -> torch.Tensor:
        return vocab_parallel_soft_cross_entropy(logits, batch["targets"].to(logits.device), self.mesh)

    def metrics(self, logits, batch: dict) -> dict:
        full = logits.full_tensor() if isinstance(logits, DTensor) else logits  # evaluation only: (B, K)
        hit = batch["targets"].gather(1, full.argmax(-1, keepdim=True)).squeeze(1) > 0
        return {"accuracy": (hit.sum().double(), self.count(batch).double())}
