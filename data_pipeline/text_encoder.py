"""The frozen text encoder that stands in for Movie Gen's UL2 / ByT5 / MetaCLIP (none is available offline).

A prompt's embeddings are the final hidden states (after the last RMSNorm, before the vocabulary
projection) of a gigatron Llama over the prompt's UTF-8 bytes (the byte tokenizer, BOS first),
(L, dim) float32 with L <= max_tokens. The encoder is frozen and runs outside the optimizer:
`prepare-videos --text-encoder SPEC` precomputes the embeddings into the shards (emb.npy) and
`gigatron sample` encodes its --prompt with the same SPEC. SPEC is either
    llama-bytes:D     a Llama of width D (2 layers, byte vocabulary) initialised by the engine's
                      layout-invariant generator from seed 0: a fixed, deterministic, untrained
                      encoder (distinct prompts give distinct embeddings; no language semantics)
    a checkpoint dir  a byte-vocabulary Llama trained by gigatron (its config.json and model.* weights)
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import numpy as np
import torch


def _llama(spec: str):
    from gigatron.core.models.llama import Llama, LlamaConfig

    if spec.startswith("llama-bytes:"):
        dim = int(spec.split(":", 1)[1])
        cfg = LlamaConfig(dim=dim, n_layers=2, n_heads=max(1, dim // 16), n_kv_heads=max(1, dim // 16),
                          ffn_dim=2 * dim, vocab_size=258, max_seq_len=4096)
        model = Llama(cfg)
        from gigatron.core.families.llama3 import LLAMA3
        from gigatron.parallel.parallelize import init_weights

        init_weights(model, LLAMA3, SimpleNamespace(model=cfg), seed=0)
        return model
    if not os.path.isdir(spec):
        raise ValueError(f"--text-encoder {spec!r}: expected llama-bytes:DIM or a gigatron Llama checkpoint folder")
    from gigatron.core.checkpoint.reader import CheckpointReader

    with open(os.path.join(spec, "config.json")) as f:
        fields = json.load(f)["model"]
    cfg = LlamaConfig(**{k: v for k, v in fields.items() if k in LlamaConfig.__dataclass_fields__})
    if cfg.vocab_size != 258:
        raise ValueError(f"{spec}: the stand-in encoder reads bytes (vocab_size 258), this Llama has {cfg.vocab_size}")
    model = Llama(cfg)
    reader = CheckpointReader(spec)
    model.load_state_dict({k: reader.read("model." + k) for k in model.state_dict()}, strict=True)
    return model


class TextEncoder:
    def __init__(self, spec: str, max_tokens: int = 64):
        self.spec, self.max_tokens = spec, max_tokens
        self.model = _llama(spec).eval()
        self.model.output = None  # hidden states, not logits
        self.dim = self.model.cfg.dim

    @torch.no_grad()
    def __call__(self, prompt: str) -> np.ndarray:
        from gigatron.data_pipeline.tokenizer import ByteTokenizer

        ids = ByteTokenizer().encode(prompt, bos=True)[: self.max_tokens]
        hidden = self.model(torch.tensor([ids]))  # (1, L, dim)
        return hidden[0].float().numpy()  # (L, dim)
