"""The attention op of one device: softmax(q k^T / sqrt(D) + mask) v for all heads of a block.

`AttentionCore` is a module of its own so that context parallelism can replace it (it all-gathers
K/V or passes them around a ring, then calls the same kernels with global positions).

Backends:
- "sdpa": torch's scaled_dot_product_attention; a causal run without document masks takes its
  fused is_causal path, a document-masked run passes a boolean mask.
- "triton" / "torch": gigatron's own kernels (`gigatron.kernels.attention`), which also return the
  log-sum-exp that context parallelism merges with.
- "auto": triton on CUDA, sdpa otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def attention_mask(q_positions, kv_positions, q_segment_ids, kv_segment_ids, causal: bool):
    """Boolean (B or 1, 1, T, S) mask: True where query i may attend key j."""
    mask = None
    if causal:
        mask = (kv_positions[None, :] <= q_positions[:, None])[None, None]  # (1, 1, T, S)
    if q_segment_ids is not None:
        same = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])[:, None]  # (B, 1, T, S)
        mask = same if mask is None else mask & same
    return mask


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend != "auto":
        return backend
    if device.type == "cuda":
        try:
            import triton  # noqa: F401

            return "triton"
        except ImportError:
            return "sdpa"
    return "sdpa"


class AttentionCore(nn.Module):
    attention_core = True  # selective checkpointing saves its work (parallel/checkpointing.py)

    def __init__(self, causal: bool, backend: str = "auto"):
        super().__init__()
        self.causal = causal
        self.backend = backend
        self.deterministic = False  # fixed kernel configurations, no autotune (train.deterministic)

    def forward(self, q, k, v, positions, segment_ids, kv_positions=None, kv_segment_ids=None):
        """q (B, H, T, D); k, v (B, Hkv, S, D); positions (T,); segment_ids (B, T) or None.
        kv_positions / kv_segment_ids default to the query ones (self-attention on one device)."""
        kv_positions = positions if kv_positions is None else kv_positions
        kv_segment_ids = segment_ids if kv_segment_ids is None else kv_segment_ids
        backend = resolve_backend(self.backend, q.device)
        if backend in ("triton", "torch"):
            from gigatron.kernels import attention

            return attention(q, k, v, causal=self.causal, q_positions=positions, kv_positions=kv_positions,
                             q_segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, backend=backend,
                             deterministic=self.deterministic)
        gqa = q.shape[1] != k.shape[1]
        plain_causal = self.causal and segment_ids is None and kv_positions is positions
        if plain_causal:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        mask = attention_mask(positions, kv_positions, segment_ids, kv_segment_ids, self.causal)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
