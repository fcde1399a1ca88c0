"""Llama 3 on the family seam: the model (core/models/llama.py), its TP tables
(parallel/plans/llama3.py), next-token cross-entropy (core/objectives/language_model.py), its
initialisation, validation rules, FLOPs and the Hugging Face converter (core/convert/hf.py)."""

from __future__ import annotations

import math

from gigatron.core.config_loader import ConfigError
from gigatron.core.family import InitRule, ModelFamily, ParallelPlan, register_family
from gigatron.core.models.llama import Llama, LlamaConfig, count_parameters


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def validate(cfg) -> None:
    """Llama's own rules: head counts, widths and the vocabulary against tp; CP needs the LSE kernels."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    for key, value in [("model.n_layers", m.n_layers), ("model.dim", m.dim), ("model.n_heads", m.n_heads),
                       ("model.n_kv_heads", m.n_kv_heads), ("model.ffn_dim", m.ffn_dim),
                       ("model.vocab_size", m.vocab_size)]:
        _require(value >= 1, key, f"must be a positive integer, got {value}")
    _require(m.dim % m.n_heads == 0, "model.dim", f"{m.dim} is not divisible by model.n_heads={m.n_heads}")
    _require(m.n_heads % m.n_kv_heads == 0, "model.n_kv_heads",
             f"{m.n_kv_heads} must divide model.n_heads={m.n_heads}")
    _require(m.n_heads % p.tp == 0, "parallel.tp",
             f"model.n_heads={m.n_heads} is not divisible by tp={p.tp}; pick tp among "
             f"{[d for d in range(1, m.n_heads + 1) if m.n_heads % d == 0 and d <= 64]}")
    _require(m.n_kv_heads % p.tp == 0 or p.tp % m.n_kv_heads == 0, "parallel.tp",
             f"model.n_kv_heads={m.n_kv_heads} and tp={p.tp}: one must divide the other "
             f"(KV heads are split, or replicated when fewer than tp)")
    _require(m.ffn_dim % p.tp == 0, "model.ffn_dim", f"{m.ffn_dim} is not divisible by tp={p.tp}")
    # the vocabulary is sharded torch.chunk-style over tp (uneven allowed): every rank needs a piece
    vocab_chunk = -(-m.vocab_size // p.tp)
    _require(vocab_chunk * (p.tp - 1) < m.vocab_size, "model.vocab_size",
             f"{m.vocab_size} rows split over tp={p.tp} in chunks of {vocab_chunk} leave a rank without "
             f"vocabulary; use a vocab_size above {vocab_chunk * (p.tp - 1)} or a smaller tp")
    _require(m.dim % p.tp == 0, "model.dim", f"{m.dim} is not divisible by tp={p.tp}")
    # context parallel merges partial attentions through their log-sum-exp (parallel/context.py)
    _require(p.cp == 1 or m.attention_backend != "sdpa", "model.attention_backend",
             f"'sdpa' returns no log-sum-exp, which context parallel (cp={p.cp}) needs; set "
             f"model.attention_backend=auto (triton on GPU, the torch kernel on CPU) or torch")
    _require(t.seq_len <= m.max_seq_len, "train.seq_len", f"{t.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    _require(not m.tie_embeddings or p.pp == 1, "model.tie_embeddings",
             f"a tied output projection would live on the first and the last of pp={p.pp} stages; "
             f"untie it (model.tie_embeddings=false) or set parallel.pp=1")


def init(m: LlamaConfig, name: str) -> InitRule:
    """Norms start at 1; projections N(0, init_std); the output projections of residual branches
    (wo, w2) are scaled by 1/sqrt(2 * n_layers) (GPT-2)."""
    if name.endswith("norm.weight"):
        return InitRule("ones")
    std = m.init_std
    if name.endswith(("wo.weight", "w2.weight")):
        std /= math.sqrt(2 * m.n_layers)
    return InitRule("normal", std)


# -- training FLOPs per token (forward 2, backward 4 per weight; PaLM appendix B) ------------------
def block_flops(cfg) -> float:
    """One block: 6 per weight plus attention scores and values, 12 * dim * seq_len (causal masking
    not discounted, as in Megatron and torchtitan, so MFU figures compare)."""
    m = cfg.model
    kv = m.n_kv_heads * m.head_dim
    weights = 2 * m.dim * m.dim + 2 * m.dim * kv + 3 * m.dim * m.ffn_dim
    return 6 * weights + 12 * m.dim * cfg.train.seq_len


def embedding_flops(cfg) -> float:
    return 2 * cfg.model.dim  # a lookup: forward gather, backward scatter-add


def output_flops(cfg) -> float:
    return 6 * cfg.model.dim * cfg.model.vocab_size + 10 * cfg.model.vocab_size  # + softmax / cross-entropy


def flops_per_sample(cfg) -> float:
    """Training FLOPs of one sequence: 6 per non-embedding weight per token + the attention term."""
    m, t = cfg.model, cfg.train
    matmul_params = count_parameters(m) - m.vocab_size * m.dim
    return (6 * matmul_params + 12 * m.n_layers * m.dim * t.seq_len) * t.seq_len


def _tp_model(cfg):
    from gigatron.parallel.plans.llama3 import model_plan

    return model_plan(cfg)


def _tp_block(cfg):
    from gigatron.parallel.plans.llama3 import block_plan

    return block_plan(cfg)


def _objective(cfg, mesh):
    from gigatron.core.objectives.language_model import LanguageModelObjective

    return LanguageModelObjective(mesh, document_mask=cfg.model.document_mask)


LLAMA3 = register_family(ModelFamily(
    name="llama3",
    config=LlamaConfig,
    build=Llama,
    init=init,
    plan=ParallelPlan(blocks="layers", first_stage=("tok_embeddings",), last_stage=("norm", "output"),
                      tied=lambda m: [("output.weight", "tok_embeddings.weight")] if m.tie_embeddings else [],
                      tp_model=_tp_model, tp_block=_tp_block, cp_attention=("attention.core",), causal=True,
                      block_cost=block_flops, first_cost=embedding_flops, last_cost=output_flops),
    objective=_objective,
    validate=validate,
    n_blocks=lambda m: m.n_layers,
    parameters=count_parameters,
    flops_per_sample=flops_per_sample,
    samples_unit="tokens",
    units_per_sample=lambda cfg: cfg.train.seq_len,
    data_format="tokens",
    converters={"hf": "gigatron.core.convert.hf"},
))
