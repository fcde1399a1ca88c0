"""Next-token prediction: the summed cross-entropy of a causal language model, and its token count.

Batch (data_pipeline/sampler.py): "input_ids" (B, T) int64, "labels" (B, T) int64 (the next tokens;
IGNORE_INDEX = -100 marks a token without a loss), "document_ids" (B, T), "sample_index" (B,).
Context parallelism splits the three (B, T) fields along T; "positions" (T/cp,) comes with them.

loss = sum over tokens with a label of -log softmax(logits)[label]; count = the number of such
tokens. Under tensor parallelism the logits arrive sharded on V and the loss is the vocabulary-
parallel one (parallel/tensor.py): no rank ever holds the full (B, T, V) logits.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh

from gigatron.parallel.tensor import IGNORE_INDEX, vocab_parallel_cross_entropy


class LanguageModelObjective:
    sequence_keys = ("input_ids", "labels", "document_ids")

    def __init__(self, mesh: DeviceMesh, document_mask: bool = True):
        self.mesh, self.document_mask = mesh, document_mask

    def prepare(self, batch: dict) -> dict:
        return batch

    def inputs(self, batch: dict) -> tuple[tuple, dict]:
        kwargs = {"positions": batch["positions"]}
        if self.document_mask:
            kwargs["document_ids"] = batch["document_ids"]
        return (batch["input_ids"],), kwargs

    def count(self, batch: dict) -> torch.Tensor:
        return (batch["labels"] != IGNORE_INDEX).sum()

    def loss(self, logits, batch: dict, model=None) -> torch.Tensor:
        return vocab_parallel_cross_entropy(logits, batch["labels"], self.mesh)

    def metrics(self, logits, batch: dict) -> dict:
        return {}
