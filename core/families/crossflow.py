"""CrossFlow on the family seam: the text-to-image flow from text latents (core/models/crossflow.py),
its objective (core/objectives/crossflow.py), Movie Gen's pieces for the rest.

- Parallel plans: Movie Gen's TP tables (parallel/plans/moviegen.py) without the cross-attention rows
  (the blocks have none); the variational text encoder and the indicator are replicated over tp like
  the time MLP; CP swaps the bidirectional self-attention core of the blocks.
- FLOPs: the blocks (self-attention with its sequence term, SwiGLU), the text encoder over
  model.text_tokens tokens (run whole on every cp rank), the patch projection and the output head.
- `gigatron sample RUN --prompt ...`: z0 drawn from each prompt's text latent, Euler steps of the
  guided flow (the indicator 0 / 1 in one batched pass, the unconditional branch on the empty
  prompt's source: `flow`) -> samples.png
  (one row of samples per prompt) and, with two prompts or more, interpolation.png: the first two
  prompts' latent means mixed in equal steps, each flowed to an image.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from gigatron.core import rng
from gigatron.core.config_loader import ConfigError
from gigatron.core.families import moviegen
from gigatron.core.family import InitRule, ModelFamily, ParallelPlan, register_family
from gigatron.core.models.crossflow import CrossFlow, CrossFlowConfig
from gigatron.core.models.patch_embed import grid_of, unpatchify


def validate(cfg) -> None:
    moviegen.validate(cfg)
    m, d, t = cfg.model, cfg.data, cfg.train
    if m.text_layers < 1:
        raise ConfigError("model.text_layers", f"the text encoder needs at least 1 block, got {m.text_layers}")
    if m.kl_weight < 0:
        raise ConfigError("model.kl_weight", f"{m.kl_weight} must be >= 0 (CrossFlow: a small positive weight)")
    if m.max_latent_frames != 1 or m.patch_t != 1:
        raise ConfigError("model.max_latent_frames", "CrossFlow generates images: set model.max_latent_frames=1 "
                                                     "and model.patch_t=1")
    if d.modality != "image" or not d.text_embeddings:
        raise ConfigError("data.text_embeddings", "CrossFlow trains on captioned images: set data.modality=image and "
                                                  "data.text_embeddings=true (prepare-images --caption ... "
                                                  "--text-encoder ...)")
    side = m.max_latent_height * m.patch_hw * m.pixel_downsample
    if m.max_latent_height != m.max_latent_width or d.image_size != side:
        raise ConfigError("data.image_size", f"the text latent has the image latent's shape: square images of "
                                             f"max_latent_height x patch_hw x pixel_downsample = {side} px "
                                             f"(max_latent_width equal), got data.image_size={d.image_size}")
    tokens = m.max_latent_height * m.max_latent_width
    if t.seq_len != tokens:
        raise ConfigError("train.seq_len", f"set train.seq_len={tokens}: the image tokens ({m.max_latent_height} x "
                                           f"{m.max_latent_width})")


def init(m: CrossFlowConfig, name: str) -> InitRule:
    """Movie Gen's rules; with zero_init the text encoder's head starts at 0 too (mu 0, logvar 0: the
    first source is N(0, I), flow matching's own)."""
    if m.zero_init and name.startswith("text_encoder.head."):
        return InitRule("zeros")
    return moviegen.init(m, name)


def no_decay(name: str) -> bool:
    return moviegen.no_decay(name) or name.startswith("indicator.")


# -- FLOPs (6 per weight and token, 12 d per token pair of attention) ---------------------------
def block_flops(cfg) -> float:
    m, N = cfg.model, cfg.train.seq_len
    d = m.dim
    return (6 * (4 * d * d + 3 * d * m.ffn_dim) + 12 * d * N) * N


def text_flops(cfg) -> float:
    m, L = cfg.model, cfg.model.text_tokens
    d = m.dim
    block = (6 * (4 * d * d + 3 * d * m.ffn_dim) + 12 * d * L) * L
    return m.text_layers * block + 6 * m.text_dim * d * L + 6 * d * 2 * m.latent_numel


def first_flops(cfg) -> float:
    return 6 * cfg.model.patch_features * cfg.model.dim * cfg.train.seq_len + text_flops(cfg)


def flops_per_sample(cfg) -> float:
    return cfg.model.n_layers * block_flops(cfg) + first_flops(cfg) + moviegen.last_flops(cfg)


def parameter_count(m: CrossFlowConfig) -> int:
    with torch.device("meta"):
        model = CrossFlow(m)
    return sum(p.numel() for p in model.parameters())


def planner_shape(cfg):
    """Llama-style bidirectional blocks plus each block's (6, d) adaLN table; the text encoder, time MLP,
    adaLN-single, indicator and positions replicated over tp (counted with the final norm)."""
    from gigatron.cluster.planner.model_shape import ModelShape

    m, N = cfg.model, cfg.train.seq_len
    d, f, P = m.dim, m.ffn_dim, m.patch_features
    total = parameter_count(m)
    with torch.device("meta"):
        encoder = sum(p.numel() for p in CrossFlow(m).text_encoder.parameters())
    rest = total - m.n_layers * (4 * d * d + 3 * d * f + 2 * d + 6 * d) - 2 * P * d
    notes = (f"{'text encoder':<36} {encoder:>15,} ({encoder / 1e9:.3f} B)",
             f"{'total':<36} {total:>15,} ({total / 1e9:.3f} B)",
             f"FLOPs/sample {flops_per_sample(cfg):.4g} (text encoder {text_flops(cfg):.4g})")
    return ModelShape(name=f"crossflow ({m.n_layers} layers, dim {d})", n_layers=m.n_layers, dim=d, ffn_dim=f,
                      n_heads=m.n_heads, n_kv_heads=m.n_heads, seq_len=N, vocab_size=0, output_dim=P,
                      input_features=P, ffn_matrices=3, causal=False, norm_weights_per_layer=2 * d,
                      extra_layer_parameters=6 * d, final_norm_weights=rest, notes=notes)


def _tp_block(cfg):
    return {k: v for k, v in moviegen._tp_block(cfg).items() if not k.startswith("cross_")}


def _tp_model(cfg):
    from gigatron.parallel.tensor import ReplicateParallel

    plan = {k: v for k, v in moviegen._tp_model(cfg).items() if k != "text_proj"}
    plan.update({"text_encoder": ReplicateParallel(), "indicator": ReplicateParallel()})
    return plan


def _objective(cfg, mesh):
    from gigatron.core.objectives.crossflow import CrossFlowObjective

    return CrossFlowObjective(cfg)


# -- sampling -------------------------------------------------------------------------------------
def sources(model, text, lengths, seed: int = 0, mix: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(z0, z0 of the empty prompt), tokens (B, N, P) each: every prompt's mean plus sigma times noise from
    the layout-invariant generator (stream "crossflow_sample", one per row), and the empty prompt's latent
    with the SAME noise (the unconditional branch's source for guidance). `mix` (B, 2) weights: row i
    takes mix[i, 0] mu_0 + mix[i, 1] mu_1 of the first two prompts, with no noise (the interpolation)."""
    mu, logvar = model.encode(text, lengths)
    empty_mu, empty_logvar = model.encode(torch.zeros_like(text[:1, :1]), torch.ones_like(lengths[:1]))
    if mix is not None:
        return mix[:, :1, None] * mu[:1] + mix[:, 1:, None] * mu[1:2], empty_mu.expand(mix.shape[0], -1, -1)
    n = mu[0].numel()
    eps = rng.normal(rng.stream_key("crossflow_sample", seed),
                     torch.arange(mu.shape[0])[:, None] * n + torch.arange(n)[None]).view_as(mu)
    return mu + torch.exp(0.5 * logvar) * eps, empty_mu + torch.exp(0.5 * empty_logvar) * eps


@torch.no_grad()
def flow(model, z0: torch.Tensor, z0_empty: torch.Tensor, guidance: float = 1.0, steps: int = 50) -> torch.Tensor:
    """Euler steps of the (guided) flow from z0 (B, N, P) at t = 0 to t = 1 on uniform times; returns the
    image latent (B, C, 1, H', W').

    Guidance: the unconditional branch (indicator 0) was trained from the empty prompt's latent, so it
    runs on its own source: at the point x_u = x + (1 - t)(z0_empty - z0) of the same image and noise.
    The two branches' predicted images, x1 = x + (1 - t) v, are mixed, x1_u + w (x1_c - x1_u), which
    gives v = v_c + (w - 1)(v_c - v_u - (z0_empty - z0)). (Evaluated at x itself the unconditional
    branch sees the conditional source region and copies the conditional velocity: no guidance.)"""
    m = model.cfg
    grid = grid_of((1, m.latent_channels) + m.latent_shape[1:], m.patch)
    from gigatron.core.objectives.flow_matching import grid_positions

    B = z0.shape[0]
    pos = grid_positions(grid, B)
    ones, zeros = torch.ones(B, dtype=torch.int64), torch.zeros(B, dtype=torch.int64)
    shift = z0_empty - z0
    x = z0.clone()
    for i in range(steps):
        t = torch.full((B,), i / steps)
        if guidance == 1.0:
            v = model.velocity(x, t, ones, pos)
        else:
            x_u = x + (1 - i / steps) * shift
            both = model.velocity(torch.cat([x, x_u]), torch.cat([t, t]), torch.cat([ones, zeros]),
                                  torch.cat([pos, pos]))
            v_c, v_u = both[:B], both[B:]
            v = v_c + (guidance - 1) * (v_c - v_u - shift)
        x = x + v / steps
    return unpatchify(x, grid, m.patch, m.latent_channels)


def generate(model, text, lengths, seed: int = 0, guidance: float = 1.0, steps: int = 50) -> torch.Tensor:
    """Image latents (B, C, 1, H', W') for the prompts (one sample each)."""
    return flow(model, *sources(model, text, lengths, seed), guidance, steps)


def sample(args, ckpt: str, config: dict) -> str:
    from gigatron.core.sample import load_model, prompts_for, save_grid, to_uint8

    model, config = load_model(ckpt, ema=not args.no_ema)
    m = model.cfg
    text, lengths = prompts_for(args, m)
    columns = 8
    rows = []
    for c in range(columns):  # sample c of every prompt: its own noise stream (seed, column)
        rows.append(to_uint8(generate(model, text, lengths, args.seed * 1000 + c, args.guidance, args.steps), m)[:, 0])
    grid = np.stack(rows, axis=1)  # (prompts, columns, H, W, 3)
    save_grid(list(grid), os.path.join(args.out, "samples.png"), labels=args.prompt)
    line = f"{columns} samples per prompt ({config['_weights']} weights, {args.steps} Euler steps, guidance {args.guidance})" \
           f" -> {args.out}/samples.png"
    if len(args.prompt) >= 2:
        alphas = torch.linspace(0, 1, columns)
        mix = torch.stack([1 - alphas, alphas], dim=1)
        frames = to_uint8(flow(model, *sources(model, text[:2], lengths[:2], mix=mix), args.guidance, args.steps), m)[:, 0]
        save_grid([frames], os.path.join(args.out, "interpolation.png"),
                  labels=[f"{args.prompt[0]} -> {args.prompt[1]}"])
        line += f", interpolation.png ({args.prompt[0]!r} -> {args.prompt[1]!r}, {columns} steps)"
    return line


CROSSFLOW = register_family(ModelFamily(
    name="crossflow",
    config=CrossFlowConfig,
    build=CrossFlow,
    init=init,
    plan=ParallelPlan(blocks="layers", first_stage=("text_encoder", "embed", "time_embed", "indicator", "adaln",
                                                    "to_blocks"),
                      last_stage=("from_blocks", "final_modulation", "final_time", "norm", "output"),
                      tp_model=_tp_model, tp_block=_tp_block, cp_attention=("attention.core",), causal=False,
                      block_cost=block_flops, first_cost=first_flops, last_cost=moviegen.last_flops),
    objective=_objective,
    validate=validate,
    n_blocks=lambda m: m.n_layers,
    parameters=parameter_count,
    no_decay=no_decay,
    flops_per_sample=flops_per_sample,
    samples_unit="images",
    units_per_sample=lambda cfg: 1,
    data_format="webdataset",
    planner_shape=planner_shape,
    sample=sample,
))
