"""Movie Gen Video on the family seam: the model (core/models/moviegen.py), its TP tables
(parallel/plans/moviegen.py), flow matching (core/objectives/flow_matching.py), initialisation,
validation rules, FLOPs with attention's sequence term, and the planner's shape with the parameter
breakdown (blocks, cross-attention, adaLN, embeddings)."""

from __future__ import annotations

import math

from gigatron.core.config_loader import ConfigError
from gigatron.core.family import InitRule, ModelFamily, ParallelPlan, register_family
from gigatron.core.models.moviegen import MovieGen, MovieGenConfig, count_parameters, parameter_breakdown
from gigatron.data_pipeline.loader import register_format


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def max_tokens(m: MovieGenConfig) -> int:
    """Latent tokens of the largest clip the position tables cover."""
    return m.max_latent_frames * m.max_latent_height * m.max_latent_width


def validate(cfg) -> None:
    m, p, t = cfg.model, cfg.parallel, cfg.train
    for key in ("dim", "n_layers", "n_heads", "ffn_dim", "latent_channels", "patch_t", "patch_hw", "pixel_downsample",
                "max_latent_frames", "max_latent_height", "max_latent_width", "text_dim", "time_dim"):
        _require(getattr(m, key) >= 1, f"model.{key}", f"must be a positive integer, got {getattr(m, key)}")
    _require(m.dim % m.n_heads == 0, "model.dim", f"{m.dim} is not divisible by model.n_heads={m.n_heads}")
    _require(m.time_dim % 2 == 0, "model.time_dim", f"{m.time_dim} must be even (cos and sin halves)")
    _require(m.n_heads % p.tp == 0, "parallel.tp",
             f"model.n_heads={m.n_heads} is not divisible by tp={p.tp}; pick tp among "
             f"{[d for d in range(1, min(m.n_heads, 64) + 1) if m.n_heads % d == 0]}")
    _require(m.ffn_dim % p.tp == 0, "model.ffn_dim", f"{m.ffn_dim} is not divisible by tp={p.tp}")
    _require(0 <= m.text_dropout < 1, "model.text_dropout", f"{m.text_dropout} must lie in [0, 1)")
    _require(0 < m.sigma_min < 1, "model.sigma_min", f"{m.sigma_min} must lie in (0, 1); Movie Gen uses 1e-5")
    _require(m.t_logit_std > 0, "model.t_logit_std", f"{m.t_logit_std} must be > 0")
    _require(p.pp == 1, "parallel.pp", f"Movie Gen's blocks take the time modulation and the prompt, which the "
                                       f"pipeline does not carry between stages; set parallel.pp=1 (pp={p.pp})")
    _require(t.seq_len <= max_tokens(m) + p.cp, "train.seq_len",
             f"{t.seq_len} latent tokens exceed the position tables (model.max_latent_frames x height x width = "
             f"{max_tokens(m)}); raise them or lower train.seq_len")


def init(m: MovieGenConfig, name: str) -> InitRule:
    """Norms 1, biases 0; projections N(0, init_std), residual outputs (wo, w2) scaled by
    1/sqrt(2 n_layers); adaLN's shared MLP, the per-block tables and the output head start at 0
    (zero_init: every block starts as the identity, the model predicts 0), position tables N(0, 0.02)."""
    if name.endswith("norm.weight"):
        return InitRule("ones")
    if name.endswith(".bias"):
        return InitRule("zeros")
    if m.zero_init and (name.startswith(("adaln.", "final_time.", "output.")) or name.endswith("modulation.table")):
        return InitRule("zeros")
    std = m.init_std
    if name.endswith(("wo.weight", "w2.weight")):
        std /= math.sqrt(2 * m.n_layers)
    return InitRule("normal", std)


def no_decay(name: str) -> bool:
    return name.endswith(("norm.weight", ".bias", "modulation.table")) or ".position." in name


# -- training FLOPs per sample (forward 2, backward 4 per weight and token) ----------------------
def text_tokens(cfg) -> int:
    return cfg.model.text_tokens


def block_flops(cfg) -> float:
    """One block, per sample: 6 per weight per video token (self-attention, FFN, cross q/o), the
    cross k/v over the text tokens, and the attention terms: 12 d N per token for self-attention
    (bidirectional, all scores executed) and 12 d L for cross-attention."""
    m, N, L = cfg.model, cfg.train.seq_len, text_tokens(cfg)
    d = m.dim
    per_token = 6 * (4 * d * d + 3 * d * m.ffn_dim + 2 * d * d) + 12 * d * N + 12 * d * L
    return per_token * N + 6 * 2 * d * d * L


def first_flops(cfg) -> float:
    m = cfg.model
    return 6 * m.patch_features * m.dim * cfg.train.seq_len + 6 * m.text_dim * m.dim * text_tokens(cfg)


def last_flops(cfg) -> float:
    return 6 * cfg.model.dim * cfg.model.patch_features * cfg.train.seq_len


def flops_per_sample(cfg) -> float:
    return cfg.model.n_layers * block_flops(cfg) + first_flops(cfg) + last_flops(cfg)


def planner_shape(cfg):
    """The planner's ModelShape of the recipe (cluster/planner/model_shape.py): Llama-style blocks plus,
    per block, cross-attention (4 d^2 weights and a norm) and the (6, d) adaLN table; the shared adaLN
    MLP, time MLP, text projection, positions and patch projection counted as the input layer. The
    parameter breakdown goes into the notes."""
    from gigatron.cluster.planner.model_shape import ModelShape

    m, N, L = cfg.model, cfg.train.seq_len, text_tokens(cfg)
    d, f = m.dim, m.ffn_dim
    parts = parameter_breakdown(m)
    per_block_extra = 4 * d * d + 6 * d  # cross-attention and the adaLN table (its norm is in norm_weights)
    block_extra_flops = 6 * 2 * d * d + 12 * d * L  # cross q, o per video token + scores/values on the text
    total = count_parameters(m)
    P = m.patch_features
    # what is neither a block, nor the patch projection in, nor the head out: time MLP, adaLN-single,
    # text projection, positions, biases, final norm; replicated over tp, as the final norm
    rest = total - m.n_layers * (4 * d * d + 3 * d * f + 3 * d + per_block_extra) - 2 * P * d
    notes = tuple(f"{name:<36} {n:>15,} ({n / 1e9:.3f} B)" for name, n in parts.items()) + (
        f"{'total':<36} {total:>15,} ({total / 1e9:.3f} B)",
        f"FLOPs/sample {flops_per_sample(cfg):.4g} (attention's sequence term 12 d N per token and block: "
        f"{m.n_layers * 12 * d * N * N:.4g})")
    return ModelShape(name=f"moviegen ({m.n_layers} layers, dim {d})", n_layers=m.n_layers, dim=d, ffn_dim=f,
                      n_heads=m.n_heads, n_kv_heads=m.n_heads, seq_len=N, vocab_size=0, output_dim=m.patch_features,
                      input_features=m.patch_features, ffn_matrices=3, causal=False,
                      norm_weights_per_layer=3 * d, extra_layer_parameters=per_block_extra,
                      extra_layer_flops_per_token=block_extra_flops,
                      final_norm_weights=rest, notes=notes)


def _tp_model(cfg):
    from gigatron.parallel.plans.moviegen import model_plan

    return model_plan(cfg)


def _tp_block(cfg):
    from gigatron.parallel.plans.moviegen import block_plan

    return block_plan(cfg)


def _objective(cfg, mesh):
    from gigatron.core.objectives.flow_matching import FlowMatchingObjective

    return FlowMatchingObjective(cfg)


def sample(args, ckpt: str, config: dict) -> str:
    """`gigatron sample` on a Movie Gen checkpoint: clips from the prompts by Euler steps on the flow
    (core/sample.py) -> OUT/samples.png (one row of frames per prompt) and OUT/sample_<i>.mp4."""
    import os

    from gigatron.core.sample import clip_size, generate, load_model, prompts_for, save_grid, save_video, to_uint8

    model, config = load_model(ckpt, ema=not args.no_ema)
    m = model.cfg
    frames, height, width = clip_size(args, m, config.get("data", {}))
    text, lengths = prompts_for(args, m)
    s = m.pixel_downsample
    latents, _ = generate(model, m, text, lengths, frames, height // s, width // s, args.seed, args.guidance, args.steps)
    clips = to_uint8(latents, m)
    save_grid(list(clips), os.path.join(args.out, "samples.png"), labels=args.prompt)
    for i, clip in enumerate(clips):
        save_video(clip, os.path.join(args.out, f"sample_{i}.mp4"))
    return (f"{len(clips)} clips of {frames}x{height}x{width} ({config['_weights']} weights, {args.steps} steps, "
            f"guidance {args.guidance}) -> {args.out}/samples.png, sample_*.mp4")


MOVIEGEN = register_family(ModelFamily(
    name="moviegen",
    config=MovieGenConfig,
    build=MovieGen,
    init=init,
    plan=ParallelPlan(blocks="layers", first_stage=("embed", "time_embed", "adaln", "text_proj", "to_blocks"),
                      last_stage=("from_blocks", "final_modulation", "final_time", "norm", "output"),
                      tp_model=_tp_model, tp_block=_tp_block, cp_attention=("attention.core",), causal=False,
                      block_cost=block_flops, first_cost=first_flops, last_cost=last_flops),
    objective=_objective,
    validate=validate,
    n_blocks=lambda m: m.n_layers,
    parameters=count_parameters,
    no_decay=no_decay,
    flops_per_sample=flops_per_sample,
    samples_unit="tokens",
    units_per_sample=lambda cfg: cfg.train.seq_len,
    data_format="webdataset",
    planner_shape=planner_shape,
    sample=sample,
))
register_format("video_buckets", "gigatron.data_pipeline.buckets:build_bucket_loader")  # shape buckets (duration, aspect)
