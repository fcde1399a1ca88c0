"""`ModelShape`: what the planner needs to know of a model, whatever its family.

A pre-norm transformer of L identical blocks, an input layer (token embedding lookup, or a linear
projection of patches) and an output layer (the vocabulary projection over every token, or a
classifier over one token per sample). Per block, with width d, H query heads and Hkv key/value
heads of size D, FFN width f and `ffn_matrices` FFN weight matrices (2 for a GeLU MLP, 3 for SwiGLU):

    attention weights   d * H * D + 2 * d * Hkv * D + H * D * d
    FFN weights         ffn_matrices * d * f
    norms               norm_weights_per_layer (2 d for two RMSNorms; 4 d for LayerNorms with bias)
    biases              (H + 2 Hkv) D + d + (ffn_matrices - 1) f + d when `linear_biases`
    extra               extra_layer_parameters (adaLN modulation, cross-attention, ...)

`model_shape(cfg)` builds the shape of a recipe. Each family supplies its own builder: register
one with `register_family("vit", fn)` where `fn(cfg) -> ModelShape`; "llama3" is built in here.
Published models without a recipe (Megatron's GPTs, Movie Gen 30B, ViT-6.5B) are built directly
with the constructors at the bottom.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class ParameterTensor:
    """One parameter tensor: its global shape and how tensor parallelism splits it.

    tp_dim: the dimension split over tp in torch.chunk pieces (None: replicated over tp).
    group: "layer" (one per block), "input", "output" or "final_norm".
    """

    name: str
    shape: tuple[int, ...]
    tp_dim: int | None
    group: str


@dataclass(frozen=True)
class ModelShape:
    name: str
    n_layers: int
    dim: int
    ffn_dim: int
    n_heads: int
    n_kv_heads: int
    seq_len: int                      # tokens per sample (the attention length)
    vocab_size: int = 0               # rows of the token embedding (0: no lookup input)
    output_dim: int = 0               # columns of the output projection (vocabulary or classes)
    ffn_matrices: int = 3             # 3: SwiGLU (w1, w2, w3); 2: GeLU MLP (fc1, fc2)
    head_dim: int = 0                 # 0: dim // n_heads
    causal: bool = True               # causal mask (half the score FLOPs executed) or bidirectional
    tied_embeddings: bool = False     # output projection shares the input embedding
    linear_biases: bool = False       # biases on the projections (GPT-2/Megatron GPT, ViT)
    norm_weights_per_layer: int = -1  # -1: 2 * dim (two RMSNorm weights)
    final_norm_weights: int = -1      # -1: dim (one RMSNorm)
    input_features: int = 0           # > 0: a linear input layer (patch pixels -> dim) instead of a lookup
    output_tokens_per_sample: int = 0  # 0: every token goes through the output layer; k: only k (cls)
    extra_layer_parameters: int = 0   # per block, beyond attention/FFN/norms (adaLN, cross-attention)
    extra_layer_flops_per_token: float = 0.0  # training FLOPs/token of those extras (6 x their matmul weights)
    notes: tuple[str, ...] = field(default=())

    # -- derived sizes ---------------------------------------------------------------------------
    @property
    def head_size(self) -> int:
        return self.head_dim or self.dim // self.n_heads

    @property
    def query_dim(self) -> int:
        return self.n_heads * self.head_size

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_size

    @property
    def norm_per_layer(self) -> int:
        return 2 * self.dim if self.norm_weights_per_layer < 0 else self.norm_weights_per_layer

    @property
    def final_norm(self) -> int:
        return self.dim if self.final_norm_weights < 0 else self.final_norm_weights

    def layer_matmul_parameters(self) -> int:
        """Weights of one block that take part in matmuls (6 FLOPs each per token in training)."""
        d, q, kv, f = self.dim, self.query_dim, self.kv_dim, self.ffn_dim
        return d * q + 2 * d * kv + q * d + self.ffn_matrices * d * f

    def layer_parameters(self) -> int:
        d, q, kv, f = self.dim, self.query_dim, self.kv_dim, self.ffn_dim
        biases = (q + 2 * kv + d + (self.ffn_matrices - 1) * f + d) if self.linear_biases else 0
        return self.layer_matmul_parameters() + self.norm_per_layer + biases + self.extra_layer_parameters

    def input_parameters(self) -> int:
        if self.input_features:
            return self.input_features * self.dim + (self.dim if self.linear_biases else 0)
        return self.vocab_size * self.dim

    def output_parameters(self) -> int:
        if self.tied_embeddings or not self.output_dim:
            return 0
        return self.dim * self.output_dim + (self.output_dim if self.linear_biases else 0)

    def parameters(self) -> int:
        """Total parameter count."""
        return (self.n_layers * self.layer_parameters() + self.input_parameters() + self.output_parameters()
                + self.final_norm)

    # -- FLOPs (training: forward + backward = 3x forward; PaLM appendix B convention) ----------
    def layer_flops_per_token(self) -> float:
        """6 x matmul weights + the attention scores and values 12 * H * D * seq_len (the full score
        matrix is counted, causal or not, as Megatron, torchtitan and core/metrics.py do)."""
        return (6 * self.layer_matmul_parameters() + 12 * self.query_dim * self.seq_len
                + self.extra_layer_flops_per_token)

    def output_flops_per_token(self) -> float:
        """The output projection, averaged over all tokens of a sample."""
        share = 1.0 if not self.output_tokens_per_sample else self.output_tokens_per_sample / self.seq_len
        return 6 * self.dim * self.output_dim * share

    def input_flops_per_token(self) -> float:
        return 6 * self.input_features * self.dim if self.input_features else 0.0

    def flops_per_token(self) -> float:
        """Model FLOPs per training token, the numerator of MFU (embedding lookups excluded)."""
        return (self.n_layers * self.layer_flops_per_token() + self.output_flops_per_token()
                + self.input_flops_per_token())

    # -- parameter tensors, for exact per-rank byte counts ----------------------------------------
    def layer_tensors(self, tp: int) -> list[ParameterTensor]:
        """One block's parameter tensors as gigatron's TP plan splits them (parallel/tensor.py):
        wq, wk, wv and the FFN input matrices column-parallel (dim 0), wo and the FFN output
        row-parallel (dim 1), norms replicated; K/V replicated when n_kv_heads < tp."""
        d, q, kv, f = self.dim, self.query_dim, self.kv_dim, self.ffn_dim
        kv_dim = 0 if self.n_kv_heads >= tp else None
        out = [ParameterTensor("attention.wq", (q, d), 0, "layer"),
               ParameterTensor("attention.wk", (kv, d), kv_dim, "layer"),
               ParameterTensor("attention.wv", (kv, d), kv_dim, "layer"),
               ParameterTensor("attention.wo", (d, q), 1, "layer")]
        for i in range(self.ffn_matrices - 1):
            out.append(ParameterTensor(f"feed_forward.in{i}", (f, d), 0, "layer"))
        out.append(ParameterTensor("feed_forward.out", (d, f), 1, "layer"))
        norm = self.norm_per_layer
        if norm:  # RMSNorm: two weights of d; LayerNorm with bias: four vectors of d
            for i in range(norm // d):
                out.append(ParameterTensor(f"norm{i}", (d,), None, "layer"))
            if norm % d:
                out.append(ParameterTensor("norm_rest", (norm % d,), None, "layer"))
        if self.linear_biases:
            out += [ParameterTensor("attention.bq", (q,), 0, "layer"),
                    ParameterTensor("attention.bk", (kv,), kv_dim, "layer"),
                    ParameterTensor("attention.bv", (kv,), kv_dim, "layer"),
                    ParameterTensor("attention.bo", (d,), None, "layer")]
            out += [ParameterTensor(f"feed_forward.bias_in{i}", (f,), 0, "layer")
                    for i in range(self.ffn_matrices - 1)]
            out.append(ParameterTensor("feed_forward.bias_out", (d,), None, "layer"))
        if self.extra_layer_parameters:
            out.append(ParameterTensor("extra", (self.extra_layer_parameters,), None, "layer"))
        return out

    def input_tensors(self) -> list[ParameterTensor]:
        if self.input_features:  # patch projection: replicated over tp
            return [ParameterTensor("input.weight", (self.dim, self.input_features), None, "input")]
        return [ParameterTensor("tok_embeddings.weight", (self.vocab_size, self.dim), 0, "input")]

    def output_tensors(self) -> list[ParameterTensor]:
        out = [ParameterTensor("norm.weight", (self.final_norm,), None, "final_norm")] if self.final_norm else []
        if self.output_parameters():
            out.append(ParameterTensor("output.weight", (self.output_dim, self.dim), 0, "output"))
        return out


# -- families ---------------------------------------------------------------------------------------
ShapeBuilder = Callable[[object], ModelShape]
_FAMILIES: dict[str, ShapeBuilder] = {}


def register_family(name: str, builder: ShapeBuilder) -> None:
    """Let a model family supply its shape: `builder(cfg) -> ModelShape` (cfg: the whole Config)."""
    _FAMILIES[name] = builder


def model_shape(cfg) -> ModelShape:
    """The ModelShape of a recipe (a gigatron.core.config.Config), by cfg.model.name: the family's
    own `planner_shape(cfg) -> ModelShape` when it has one (core/family.py), else a builder
    registered here."""
    name = getattr(cfg.model, "name", "llama3")
    try:
        from gigatron.core.family import get_family

        family = get_family(name)
    except Exception:  # noqa: BLE001 - an unknown family falls through to the builders below
        family = None
    hook = getattr(family, "planner_shape", None)
    if hook is not None:
        return hook(cfg)
    if name not in _FAMILIES:
        raise ValueError(f"the planner knows no shape for model family '{name}'; "
                         f"known: {', '.join(sorted(_FAMILIES))}")
    return _FAMILIES[name](cfg)


def llama3_shape(cfg) -> ModelShape:
    """Llama 3 from the recipe's model section: SwiGLU, GQA, RMSNorm, untied vocabulary projection,
    causal attention over train.seq_len tokens (core/models/llama.py)."""
    m = cfg.model
    return ModelShape(name=f"llama3 ({m.n_layers} layers, dim {m.dim})", n_layers=m.n_layers, dim=m.dim,
                      ffn_dim=m.ffn_dim, n_heads=m.n_heads, n_kv_heads=m.n_kv_heads, seq_len=cfg.train.seq_len,
                      vocab_size=m.vocab_size, output_dim=m.vocab_size, ffn_matrices=3, causal=True,
                      tied_embeddings=bool(getattr(m, "tie_embeddings", False)))


register_family("llama3", llama3_shape)


# -- published models without a recipe ---------------------------------------------------------------
def megatron_gpt(n_layers: int, dim: int, n_heads: int, seq_len: int = 4096, vocab: int = 131072) -> ModelShape:
    """Megatron-Core's weak-scaling GPTs: GeLU MLP 4 x hidden, multi-head attention, LayerNorm,
    linear biases, untied input/output embeddings (12 L h^2 + 2 V h to first order)."""
    return ModelShape(name=f"GPT {n_layers}x{dim}", n_layers=n_layers, dim=dim, ffn_dim=4 * dim, n_heads=n_heads,
                      n_kv_heads=n_heads, seq_len=seq_len, vocab_size=vocab, output_dim=vocab, ffn_matrices=2,
                      causal=True, linear_biases=True, norm_weights_per_layer=4 * dim, final_norm_weights=2 * dim)


def movie_gen_30b(tokens: int = 73728, text_tokens: int = 0) -> ModelShape:
    """Movie Gen Video 30B: 48 layers, dim 6,144, SwiGLU FFN 16,384, 48 heads (no GQA), bidirectional
    self-attention over the video's latent tokens. Per block beyond Llama's: cross-attention to
    `text_tokens` text embeddings (4 d^2 weights, a norm) and adaLN modulation tables (6 d). Latents
    in, latents out: a linear patch projection (16 channels x 1 x 2 x 2 = 64 -> d) and back; no
    vocabulary. 48 x (4 d^2 + 3 d f + 4 d^2) = 28.9B, the "30B"."""
    d = 6144
    cross = 4 * d * d  # cross-attention q, k, v, o
    # per video token: the q and o projections (6 x 2 d^2) and the scores/values against the text
    # tokens (12 d text_tokens); the k, v projections run over text tokens only (per sample, small)
    cross_flops = 6 * 2 * d * d + 12 * d * text_tokens
    return ModelShape(name="Movie Gen 30B", n_layers=48, dim=d, ffn_dim=16384, n_heads=48, n_kv_heads=48,
                      seq_len=tokens, vocab_size=0, output_dim=64, input_features=64, ffn_matrices=3, causal=False,
                      extra_layer_parameters=cross + 6 * d + d, extra_layer_flops_per_token=cross_flops,
                      notes=("adaLN: per-block scale/shift/gate tables (6 d) from a shared time embedding",))


def vit(n_layers: int, dim: int, mlp: int, n_heads: int, image: int = 224, patch: int = 14,
        classes: int = 0, name: str = "ViT") -> ModelShape:
    """A ViT: (image/patch)^2 patch tokens + 1 cls token, bidirectional, GeLU MLP, LayerNorm with
    bias, linear biases, a linear patch projection of 3 * patch^2 pixels; the classifier sees only
    the cls token."""
    tokens = (image // patch) ** 2 + 1
    return ModelShape(name=name, n_layers=n_layers, dim=dim, ffn_dim=mlp, n_heads=n_heads, n_kv_heads=n_heads,
                      seq_len=tokens, vocab_size=0, output_dim=classes, input_features=3 * patch * patch,
                      ffn_matrices=2, causal=False, linear_biases=True, norm_weights_per_layer=4 * dim,
                      final_norm_weights=2 * dim, output_tokens_per_sample=1)


def vit_6_5b(classes: int = 0) -> ModelShape:
    """ViT-6.5B/14 (MAWS): 32 layers, width 4,096, MLP 16,384, 32 heads, at 224 px: 256 + 1 tokens."""
    return vit(32, 4096, 16384, 32, image=224, patch=14, classes=classes, name="ViT-6.5B/14")
