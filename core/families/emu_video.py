"""Emu Video on the family seam: Movie Gen's transformer with image conditioning (core/models/emu_video.py,
our adaptation of Emu Video's U-Net), trained by zero-terminal-SNR v-prediction diffusion
(core/objectives/diffusion.py) or flow matching, `model.objective: diffusion | flow`.

Everything parallel is Movie Gen's (the module names are its own): the TP tables of
parallel/plans/moviegen.py, the CP swap of the bidirectional self-attention core, the first/last-stage
modules; validation, FLOPs and the planner shape are Movie Gen's plus the conditioning projection.

The video model's objective appends the conditioning features to each token of x_t (the clean first
frame's latent at frame 0, zeros after it, and the mask channel), in `prepare`, before context
parallelism splits the tokens: every cp rank gets its tokens' conditioning with them.

`gigatron sample RUN --prompt ...` runs the two steps: the image stage's checkpoint makes the first
frame from the prompt, the video stage's continues it (both from the same run's checkpoints/<stage>/).
"""

from __future__ import annotations

import os

import torch

from gigatron.core.config_loader import ConfigError
from gigatron.core.family import InitRule, ModelFamily, ParallelPlan, register_family
from gigatron.core.families import moviegen
from gigatron.core.models.emu_video import EmuVideo, EmuVideoConfig, condition_tokens, count_parameters


def validate(cfg) -> None:
    moviegen.validate(cfg)
    m = cfg.model
    if m.objective == "diffusion":
        if m.diffusion_steps < 2:
            raise ConfigError("model.diffusion_steps", f"{m.diffusion_steps} must be >= 2 (Emu Video: 1000)")
        if not 0 < m.beta_start < m.beta_end < 1:
            raise ConfigError("model.beta_start", f"need 0 < beta_start ({m.beta_start}) < beta_end ({m.beta_end}) < 1")
    if m.image_conditioning and cfg.data.num_frames // m.patch_t < 2:
        raise ConfigError("data.num_frames", f"the video model (model.image_conditioning: true) conditions on the "
                                             f"first of its latent frames and needs at least 2 ({cfg.data.num_frames} "
                                             f"frames / patch_t {m.patch_t}); use image_conditioning: false for images")


def init(m: EmuVideoConfig, name: str) -> InitRule:
    """Movie Gen's rules; the conditioning projection starts at 0 (zero_init: the video model starts as
    the image model it is initialised from)."""
    if name == "embed.condition.weight" and m.zero_init:
        return InitRule("zeros")
    return moviegen.init(m, name)


def first_flops(cfg) -> float:
    m = cfg.model
    extra = 6 * m.condition_features * m.dim * cfg.train.seq_len if m.image_conditioning else 0
    return moviegen.first_flops(cfg) + extra


def flops_per_sample(cfg) -> float:
    return cfg.model.n_layers * moviegen.block_flops(cfg) + first_flops(cfg) + moviegen.last_flops(cfg)


def planner_shape(cfg):
    """Movie Gen's shape, with the conditioning features as more input features of the patch projection."""
    import dataclasses

    m = cfg.model
    shape = moviegen.planner_shape(cfg)
    extra = m.condition_features if m.image_conditioning else 0
    return dataclasses.replace(shape, name=f"emu_video ({m.n_layers} layers, dim {m.dim})",
                               input_features=m.patch_features + extra)


class ImageConditioned:
    """The video model's objective: the base objective (diffusion or flow) with the conditioning
    features (clean first frame + mask, core/models/emu_video.py) appended to every x_t token."""

    def __init__(self, base, cfg):
        self.base, self.m = base, cfg.model
        self.sequence_keys = base.sequence_keys

    def prepare(self, batch: dict) -> dict:
        from gigatron.core.objectives.flow_matching import to_latents

        latents = to_latents(batch["videos"].float(), self.m)  # (B, C, F, H', W')
        out = self.base.prepare(batch)
        cond = condition_tokens(latents[:, :, :1], latents.shape[2], self.m.patch)  # (B, N, P_cond)
        out["x_t"] = torch.cat([out["x_t"], cond], dim=-1)
        return out

    def inputs(self, batch):
        return self.base.inputs(batch)

    def count(self, batch):
        return self.base.count(batch)

    def loss(self, prediction, batch, model=None):
        return self.base.loss(prediction, batch, model)

    def metrics(self, prediction, batch):
        return self.base.metrics(prediction, batch)


def _objective(cfg, mesh):
    if cfg.model.objective == "diffusion":
        from gigatron.core.objectives.diffusion import DiffusionObjective as base
    else:
        from gigatron.core.objectives.flow_matching import FlowMatchingObjective as base
    objective = base(cfg)
    return ImageConditioned(objective, cfg) if cfg.model.image_conditioning else objective


# -- gigatron sample: text -> first frame (image stage) -> video (video stage) ---------------------
def stage_checkpoints(ckpt: str) -> tuple[str, str]:
    """(image model checkpoint, video model checkpoint) of the run `ckpt` belongs to: the video one is
    `ckpt` (a video stage's), the image one the newest image stage's latest in the same run."""
    from gigatron.core.checkpoint import latest
    from gigatron.core.checkpoint.store import step_of
    from gigatron.core.sample import read_config

    if not read_config(ckpt)["model"].get("image_conditioning"):
        raise ValueError(f"{ckpt} is Emu Video's image model; give the run directory or a video stage's checkpoint")
    root = os.path.dirname(os.path.dirname(os.path.abspath(ckpt)))  # RUN/checkpoints (from .../<stage>/step_N)
    images = []
    for stage in sorted(os.listdir(root)):
        found = latest(os.path.join(root, stage)) if os.path.isdir(os.path.join(root, stage)) else None
        if found and not read_config(found)["model"].get("image_conditioning"):
            images.append(found)
    if not images:
        raise ValueError(f"no image stage (model.image_conditioning: false) has a checkpoint under {root}: "
                         f"Emu Video's first step needs one")
    return max(images, key=step_of), ckpt


def sample(args, ckpt: str, config: dict) -> str:
    """The first frame from the image model, then the clip from the video model conditioned on it
    (DDIM or Euler, each model by its own objective) -> OUT/samples.png (per prompt: the first frame,
    a gap, the clip's frames) and OUT/sample_<i>.mp4."""
    import numpy as np

    from gigatron.core.objectives.diffusion import schedule_of
    from gigatron.core.sample import (clip_size, generate, load_model, prompts_for, save_grid, save_video,
                                      to_uint8)

    image_ckpt, video_ckpt = stage_checkpoints(ckpt)
    image_model, _ = load_model(image_ckpt, ema=not args.no_ema)
    video_model, config = load_model(video_ckpt, ema=not args.no_ema)
    mi, mv = image_model.cfg, video_model.cfg
    frames, height, width = clip_size(args, mv, config.get("data", {}))
    s = mv.pixel_downsample
    text, lengths = prompts_for(args, mv)
    schedule = lambda m: schedule_of(m) if m.objective == "diffusion" else None  # noqa: E731
    first, _ = generate(image_model, mi, text, lengths, 1, height // s, width // s, args.seed, args.guidance,
                        args.steps, alphas_bar=schedule(mi))  # (B, C, 1, h, w)
    condition = condition_tokens(first, frames, mv.patch)
    clip, _ = generate(video_model, mv, text, lengths, frames, height // s, width // s, args.seed + 1, args.guidance,
                       args.steps, condition=condition, alphas_bar=schedule(mv))
    firsts, clips = to_uint8(first, mi), to_uint8(clip, mv)
    gap = np.full_like(firsts[:, :1], 255)
    save_grid(list(np.concatenate([firsts, gap, clips], axis=1)), os.path.join(args.out, "samples.png"),
              labels=args.prompt)
    for i, c in enumerate(clips):
        save_video(c, os.path.join(args.out, f"sample_{i}.mp4"))
    return (f"{len(clips)} first frames ({os.path.basename(os.path.dirname(image_ckpt))}) and clips of "
            f"{frames}x{height}x{width} ({os.path.basename(os.path.dirname(video_ckpt))}; {config['_weights']} "
            f"weights, {args.steps} steps, guidance {args.guidance}) -> {args.out}/samples.png, sample_*.mp4")


EMU_VIDEO = register_family(ModelFamily(
    name="emu_video",
    config=EmuVideoConfig,
    build=EmuVideo,
    init=init,
    plan=ParallelPlan(blocks="layers", first_stage=("embed", "time_embed", "adaln", "text_proj", "to_blocks"),
                      last_stage=("from_blocks", "final_modulation", "final_time", "norm", "output"),
                      tp_model=moviegen._tp_model, tp_block=moviegen._tp_block, cp_attention=("attention.core",),
                      causal=False, block_cost=moviegen.block_flops, first_cost=first_flops,
                      last_cost=moviegen.last_flops),
    objective=_objective,
    validate=validate,
    n_blocks=lambda m: m.n_layers,
    parameters=count_parameters,
    no_decay=moviegen.no_decay,
    flops_per_sample=flops_per_sample,
    samples_unit="tokens",
    units_per_sample=lambda cfg: cfg.train.seq_len,
    data_format="webdataset",
    planner_shape=planner_shape,
    sample=sample,
))
