"""Llama 3 ("The Llama 3 Herd of Models", Meta 2024), as plain single-device PyTorch.

Grouped-query attention, RoPE with the llama3 frequency scaling, SwiGLU, RMSNorm, pre-norm blocks,
and a document mask: tokens of a packed sequence attend only within their own document.

Nothing here imports torch.distributed. Parallelism is applied from `gigatron.parallel`:
- blocks live in a ModuleDict keyed by layer index, and `tok_embeddings`, `norm` and `output` may be
  None, so a pipeline stage keeps the full model's parameter names;
- head counts are read from projection outputs (under tensor parallel a rank holds H/tp heads, and
  under sequence parallel the block input holds T/tp tokens);
- `Attention.core` is the attention op, which context parallelism swaps for its distributed version.

RoPE layout: we rotate (first half, second half) of each head, as Hugging Face does, rather than
Meta's interleaved pairs. Checkpoints therefore convert to Hugging Face by renaming alone.

Shapes: B batch, T tokens (local), H query heads, Hkv key/value heads, D head dim, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from gigatron.core.models.attention import AttentionCore
from gigatron.kernels import rmsnorm, rope, swiglu


@dataclass
class LlamaConfig:
    """The `model:` section of a llama3 recipe. Defaults are Llama 3 8B."""

    name: Literal["llama3"] = "llama3"    # the model family (core/family.py)
    dim: int = 4096                       # model width d
    n_layers: int = 32                    # transformer blocks
    n_heads: int = 32                     # query heads
    n_kv_heads: int = 8                   # key/value heads (GQA); must divide n_heads
    ffn_dim: int = 14336                  # SwiGLU hidden width
    vocab_size: int = 128256              # Llama 3: 128,000 BPE + 256 special tokens
    norm_eps: float = 1e-5                # RMSNorm epsilon
    rope_theta: float = 500000.0          # RoPE base frequency (Llama 3)
    rope_scaling: bool = True             # apply Llama 3.1's "llama3" frequency scaling
    rope_scaling_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192     # context the unscaled frequencies were trained for
    max_seq_len: int = 131072             # longest position the RoPE table covers
    document_mask: bool = True            # no attention across documents of a packed sequence
    attention_backend: Literal["auto", "sdpa", "triton", "torch"] = "auto"  # auto: triton on GPU, SDPA on CPU
    init_std: float = 0.02                # std of the normal init of projections
    tie_embeddings: bool = False          # output projection = token embedding (Llama 3.2 1B/3B); not with pp > 1

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


ModelConfig = LlamaConfig  # the name older code and tests import


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/D), with Llama 3.1's scaling: wavelengths longer than
    original_len/low_freq_factor are slowed by `factor`, shorter than original_len/high_freq_factor
    are kept, and the band between is interpolated smoothly."""
    D = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    if not cfg.rope_scaling:
        return inv_freq.float()
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = cfg.rope_original_max_len / cfg.rope_low_freq_factor
    high_wavelen = cfg.rope_original_max_len / cfg.rope_high_freq_factor
    smooth = (cfg.rope_original_max_len / wavelen - cfg.rope_low_freq_factor) / (
        cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
    scaled = torch.where(wavelen > low_wavelen, inv_freq / cfg.rope_scaling_factor, inv_freq)
    middle = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    blended = (1 - smooth) * inv_freq / cfg.rope_scaling_factor + smooth * inv_freq
    return torch.where(middle, blended, scaled).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D) rotated by angle position*freq in the half-split layout; cos/sin (T, D).
    Fused kernels (kernels/rope.py, rmsnorm.py, swiglu.py): Triton on CUDA, the PyTorch formula on CPU
    and for DTensor inputs, chosen once per op and logged once ("gigatron.kernels")."""
    return rope.apply_rope(x, cos, sin, impl="auto")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rmsnorm.rms_norm(x, self.weight, self.eps, impl="auto")  # x*rsqrt(mean(x^2)+eps) * w, fp32 math


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.core = AttentionCore(causal=True, backend=cfg.attention_backend)

    def forward(self, x, cos, sin, positions, document_ids):
        B, D = x.shape[0], self.head_dim
        q = self.wq(x).unflatten(-1, (-1, D)).transpose(1, 2)  # (B, H, T, D)
        k = self.wk(x).unflatten(-1, (-1, D)).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.wv(x).unflatten(-1, (-1, D)).transpose(1, 2)  # (B, Hkv, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = self.core(q, k, v, positions, document_ids)  # (B, H, T, D)
        return self.wo(out.transpose(1, 2).reshape(B, out.shape[2], -1))  # (B, T, dim)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.w2(swiglu.swiglu(self.w1(x), self.w3(x), impl="auto"))  # silu(a) * b


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin, positions, document_ids):
        x = x + self.attention(self.attention_norm(x), cos, sin, positions, document_ids)
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg) for i in range(cfg.n_layers)})
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight  # one parameter, both (V, dim)
        self.register_buffer("rope_inv_freq", rope_inv_freq(cfg), persistent=False)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) ids, or (B, T, dim) hidden states on a later pipeline stage.
        positions (T,) global token positions (context parallel passes its chunks' positions).
        document_ids (B, T) document index per token, or None for plain causal attention.
        Returns logits (B, T, V), or hidden states if this stage has no output layer."""
        T = tokens.shape[1]
        if positions is None:
            positions = torch.arange(T, device=tokens.device)
        angles = positions.float()[:, None] * self.rope_inv_freq[None, :]  # (T, D/2)
        cos, sin = angles.cos().repeat(1, 2), angles.sin().repeat(1, 2)  # (T, D)
        if not self.cfg.document_mask:
            document_ids = None
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        for layer in self.layers.values():
            h = layer(h, cos, sin, positions, document_ids)
        h = self.norm(h) if self.norm is not None else h
        return self.output(h) if self.output is not None else h

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute the non-parameter state (after `to_empty` on a model built on meta)."""
        self.rope_inv_freq.copy_(rope_inv_freq(self.cfg).to(self.rope_inv_freq.device))


def count_parameters(cfg: ModelConfig) -> int:
    """Parameter count, built on the meta device: no memory is allocated, even for 405B."""
    with torch.device("meta"):
        model = Llama(cfg)
    return sum(p.numel() for p in model.parameters())
