"""`gigatron sample CKPT --prompt TEXT [...]`: generate from a checkpoint, through its family's sampler.

The command is the same for every family: it finds the checkpoint (a step folder, a run directory's
latest, or a multi-stage run's newest stage), reads the family from its config.json and calls the
family's `sample` hook (core/family.py) with the parsed arguments; the hook writes under --out and
returns one summary line. What the families share lives here:

- the model of a checkpoint folder, built by its family, with the EMA weights when it has them
  (`extra.ema.*`, core/ema.py; --no-ema: the raw weights); prompts embedded by the stand-in text
  encoder the shards were prepared with (data_pipeline/text_encoder.py, --text-encoder);
- classifier-free guidance: out = out(empty prompt) + w (out(prompt) - out(empty prompt)), the empty
  prompt one zero token as text dropout makes it in training, in one batched pass;
- flow matching's sampler (Movie Gen): Euler steps x <- x + (t_{i+1} - t_i) v(x, t_i) from noise
  (t = 0) to data (t = 1) on Movie Gen's linear-quadratic times: the first `linear_steps` (25 of 50)
  are the first steps of a 1000-step linear schedule (t = i / 1000, small steps where the noise is
  large), the rest are quadratically spaced up to t = 1 (the quadratic's slope at the junction is 1/1000);
- diffusion's sampler (Emu Video, core/objectives/diffusion.py): deterministic DDIM on the v-prediction,
  x0 and eps recovered from v, x <- sqrt(ab') x0 + sqrt(1 - ab') eps, on "trailing" steps (Lin et al.:
  the first step is the last training step T - 1, where the zero-terminal-SNR input is pure noise);
- an optional conditioning (B, N, P_cond) appended to every token's features at every step (Emu
  Video's first frame and mask), for both samplers;
- the PNG grid (one row of frames per prompt) and H.264 mp4 writers.
Runs in one process (CPU or one GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

from gigatron.core import rng
from gigatron.core.models.patch_embed import grid_of, patchify, unpatchify
from gigatron.core.objectives.diffusion import from_v
from gigatron.core.objectives.flow_matching import grid_positions


# -- checkpoints and prompts ----------------------------------------------------------------------
def resolve_checkpoint(path: str) -> str:
    """A step folder as it is; a run directory -> its latest checkpoint; a multi-stage run directory
    -> the newest of its stages' latest checkpoints (checkpoints/<stage>/, by step)."""
    from gigatron.core.checkpoint import latest
    from gigatron.core.checkpoint.store import step_of

    if os.path.exists(os.path.join(path, ".metadata")):
        return path
    for root in (os.path.join(path, "checkpoints"), path):
        found = latest(root)
        if found:
            return found
    root = os.path.join(path, "checkpoints")
    stages = [latest(os.path.join(root, d)) for d in sorted(os.listdir(root))] if os.path.isdir(root) else []
    stages = [s for s in stages if s]
    if not stages:
        raise ValueError(f"{path} is neither a checkpoint folder nor a run directory with checkpoints")
    return max(stages, key=step_of)


def read_config(ckpt: str) -> dict:
    path = os.path.join(ckpt, "config.json")
    if not os.path.exists(path):
        raise ValueError(f"{ckpt} is not a checkpoint folder (no config.json)")
    with open(path) as f:
        return json.load(f)


def load_model(ckpt: str, ema: bool = True) -> tuple[torch.nn.Module, dict]:
    """The model of a checkpoint folder or run directory, built by its family (its EMA weights when
    present and `ema`), in eval mode, and its config (config["_weights"]: "EMA" or "raw")."""
    from gigatron.core.checkpoint.reader import CheckpointReader
    from gigatron.core.family import get_family

    ckpt = resolve_checkpoint(ckpt)
    config = read_config(ckpt)
    family = get_family(config["model"].get("name", "llama3"))
    m = family.config(**{k: v for k, v in config["model"].items() if k in family.config.__dataclass_fields__})
    model = family.build(m).eval()
    reader = CheckpointReader(ckpt)
    prefix = "extra.ema." if ema and any(k.startswith("extra.ema.") for k in reader.keys()) else "model."
    model.load_state_dict({k: reader.read(prefix + k) for k in model.state_dict()}, strict=True)
    config["_weights"] = "EMA" if prefix != "model." else "raw"
    config["_path"] = ckpt
    return model, config


def encode_prompts(prompts: list[str], spec: str, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(text (B, L, D) zero-padded, lengths (B,)) from the stand-in text encoder."""
    from gigatron.data_pipeline.text_encoder import TextEncoder

    encoder = TextEncoder(spec, max_tokens)
    embs = [encoder(p) for p in prompts]
    text = torch.zeros(len(embs), max(e.shape[0] for e in embs), embs[0].shape[1])
    for i, e in enumerate(embs):
        text[i, : e.shape[0]] = torch.from_numpy(e)
    return text, torch.tensor([e.shape[0] for e in embs])


# -- samplers -------------------------------------------------------------------------------------
def linear_quadratic_times(steps: int = 50, linear_steps: int | None = None, linear_n: int = 1000) -> torch.Tensor:
    """(steps + 1,) times from 0 to 1: `linear_steps` steps of 1/linear_n, then a quadratic whose first
    step is also 1/linear_n and which ends at t = 1."""
    k = steps // 2 if linear_steps is None else linear_steps
    if not 0 <= k < steps or k / linear_n >= 1:
        raise ValueError(f"linear_steps={k} must lie in [0, steps={steps}) and stay below t=1")
    i = torch.arange(steps + 1, dtype=torch.float64)
    start, slope, q = k / linear_n, 1.0 / linear_n, steps - k
    a = (1.0 - start - slope * q) / q ** 2  # t(steps) = 1
    j = (i - k).clamp(min=0)
    return torch.where(i <= k, i / linear_n, start + slope * j + a * j ** 2).float()


def trailing_steps(steps: int, train_steps: int) -> list[int]:
    """DDIM's `steps` diffusion steps, from the last training step down: round(T - i T / steps) - 1."""
    if not 1 <= steps <= train_steps:
        raise ValueError(f"--steps {steps} must lie in [1, the {train_steps} diffusion steps of the schedule]")
    return [int(round(train_steps - i * train_steps / steps)) - 1 for i in range(steps)]


@torch.no_grad()
def velocity(model, x, t, grid_pos, text, lengths, guidance: float, condition: torch.Tensor | None = None):
    """The guided model output (B, N, P) (flow's velocity or diffusion's v): one batched pass over the
    conditional and unconditional rows; `condition` (B, N, P_cond) is appended to the token features."""
    if condition is not None:
        x = torch.cat([x, condition], dim=-1)
    if guidance == 1.0:
        return model(x, t, grid_pos, text, lengths)
    B = x.shape[0]
    empty = torch.zeros_like(text)
    both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([grid_pos, grid_pos]), torch.cat([text, empty]),
                 torch.cat([lengths, torch.ones_like(lengths)]))
    cond, uncond = both[:B], both[B:]
    return uncond + guidance * (cond - uncond)


@torch.no_grad()
def euler_sample(model, noise, grid_pos, text, lengths, guidance: float = 6.0, times: torch.Tensor | None = None,
                 condition: torch.Tensor | None = None):
    """Integrate the flow from `noise` (B, N, P) at t=0 to t=1; returns the tokens (B, N, P)."""
    times = linear_quadratic_times() if times is None else times
    x = noise.clone()
    for t0, t1 in zip(times[:-1].tolist(), times[1:].tolist()):
        t = torch.full((x.shape[0],), t0, device=x.device)
        x = x + (t1 - t0) * velocity(model, x, t, grid_pos, text, lengths, guidance, condition)
    return x


@torch.no_grad()
def ddim_sample(model, noise, grid_pos, text, lengths, alphas_bar: torch.Tensor, guidance: float = 6.0,
                steps: int = 50, condition: torch.Tensor | None = None):
    """Deterministic DDIM (eta 0) on a v-prediction model from `noise` (B, N, P) at the last of the
    schedule's steps to clean data; alphas_bar (T,) is the training schedule. Returns the tokens."""
    T = alphas_bar.shape[0]
    order = trailing_steps(steps, T)
    x = noise.clone()
    for i, s in enumerate(order):
        ab = alphas_bar[s].expand(x.shape[0])
        t = torch.full((x.shape[0],), s / T, device=x.device)
        x0, eps = from_v(x, velocity(model, x, t, grid_pos, text, lengths, guidance, condition), ab)
        ab_next = float(alphas_bar[order[i + 1]]) if i + 1 < len(order) else 1.0
        x = (ab_next ** 0.5) * x0 + ((1 - ab_next) ** 0.5) * eps
    return x


def initial_noise(m, shape, seed: int, first_index: int = 0) -> torch.Tensor:
    """Latent noise (B, C, F, H, W) from the layout-invariant generator, one stream per sample."""
    n = int(np.prod(shape[1:]))
    g = torch.arange(first_index, first_index + shape[0])
    return rng.normal(rng.stream_key("sample_noise", seed), g[:, None] * n + torch.arange(n)[None]).view(shape)


def generate(model, m, text: torch.Tensor, lengths: torch.Tensor, frames: int, height: int, width: int,
             seed: int = 0, guidance: float = 6.0, steps: int = 50, noise: torch.Tensor | None = None,
             condition: torch.Tensor | None = None, alphas_bar: torch.Tensor | None = None):
    """Latents (B, C, F, H, W) for prompts `text` (B, L, text_dim) at a clip of frames x height x width
    latents (pixels / model.pixel_downsample): flow matching's Euler steps, or DDIM on the diffusion
    schedule `alphas_bar` when given; `condition` as in `velocity`. Returns (latents, the initial noise)."""
    shape = (text.shape[0], m.latent_channels, frames, height, width)
    noise = initial_noise(m, shape, seed) if noise is None else noise
    grid = grid_of(shape, m.patch)
    args = (model, patchify(noise, m.patch), grid_positions(grid, shape[0]), text, lengths)
    if alphas_bar is None:
        tokens = euler_sample(*args, guidance, linear_quadratic_times(steps), condition)
    else:
        tokens = ddim_sample(*args, alphas_bar, guidance, steps, condition)
    return unpatchify(tokens, grid, m.patch, m.latent_channels), noise


# -- pictures and videos --------------------------------------------------------------------------
def to_uint8(latents: torch.Tensor, m) -> np.ndarray:
    """Latents (B, 3, F, H, W) of the pixel stand-in -> frames (B, F, H*s, W*s, 3) uint8 (the reader's
    normalisation undone, each latent pixel repeated s x s)."""
    from gigatron.data_pipeline.shard_loader import MEAN, STD

    x = latents.float() * STD.view(1, 3, 1, 1, 1) + MEAN.view(1, 3, 1, 1, 1)
    s = m.pixel_downsample
    if s > 1:
        x = x.repeat_interleave(s, dim=-1).repeat_interleave(s, dim=-2)
    return x.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 4, 1).numpy()


def save_grid(rows: list[np.ndarray], path: str, scale: int = 4, labels: list[str] | None = None) -> None:
    """Rows of frames ((F, H, W, 3) uint8 each) -> one PNG, frames side by side, `scale` x nearest."""
    from PIL import Image, ImageDraw

    gap, label_w = 2, 0 if not labels else 8 * max(len(t) for t in labels) + 6
    F = max(r.shape[0] for r in rows)
    H, W = rows[0].shape[1] * scale, rows[0].shape[2] * scale
    canvas = Image.new("RGB", (label_w + F * (W + gap), len(rows) * (H + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, frames in enumerate(rows):
        if labels:
            draw.text((2, r * (H + gap) + H // 2 - 5), labels[r], fill="black")
        for f, frame in enumerate(frames):
            tile = Image.fromarray(frame).resize((W, H), Image.NEAREST)
            canvas.paste(tile, (label_w + f * (W + gap), r * (H + gap)))
    canvas.save(path)


def save_video(frames: np.ndarray, path: str, fps: int = 8) -> None:
    """(F, H, W, 3) uint8 -> an H.264 mp4 (sizes rounded up to even by edge padding)."""
    from gigatron.data_pipeline.prepare_videos import encode_clip

    pad = ((0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2), (0, 0))
    with open(path, "wb") as f:
        f.write(encode_clip(np.pad(frames, pad, mode="edge"), fps=fps))


def clip_size(args, m, data: dict) -> tuple[int, int, int]:
    """(frames, height, width) in pixels from the arguments, else the recipe's data section; checked
    against the patch and the pixel stand-in's downsampling."""
    s = m.pixel_downsample
    frames = args.frames or data.get("num_frames", 8)
    height, width = args.height or data.get("image_size", 64), args.width or data.get("image_size", 64)
    if height % (s * m.patch_hw) or width % (s * m.patch_hw) or frames % m.patch_t:
        raise ValueError(f"{frames}x{height}x{width} is not divisible by the patch x downsample "
                         f"({m.patch_t}x{s * m.patch_hw}x{s * m.patch_hw})")
    return frames, height, width


def prompts_for(args, m) -> tuple[torch.Tensor, torch.Tensor]:
    text, lengths = encode_prompts(args.prompt, args.text_encoder or f"llama-bytes:{m.text_dim}", m.text_tokens)
    if text.shape[-1] != m.text_dim:
        raise ValueError(f"the text encoder gives {text.shape[-1]} features, the model takes {m.text_dim}")
    return text, lengths


# -- the command ----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gigatron sample", description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt", help="a checkpoint folder (step_*) or a run directory (its latest; a multi-stage "
                                     "run: its newest stage)")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable: one row each)")
    parser.add_argument("--out", default="samples", help="output folder (samples.png, sample_<i>.mp4)")
    parser.add_argument("--frames", type=int, default=0, help="frames (default: the recipe's data.num_frames)")
    parser.add_argument("--height", type=int, default=0, help="pixels (default: data.image_size)")
    parser.add_argument("--width", type=int, default=0, help="pixels (default: data.image_size)")
    parser.add_argument("--steps", type=int, default=50, help="sampler steps (default 50)")
    parser.add_argument("--guidance", type=float, default=6.0, help="classifier-free guidance scale (1 = none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text-encoder", default="", help="as prepare-videos used (default llama-bytes:<text_dim>)")
    parser.add_argument("--no-ema", action="store_true", help="the raw weights, not the EMA")
    args = parser.parse_args(argv)
    from gigatron.core.config_loader import ConfigError
    from gigatron.core.family import get_family

    try:
        ckpt = resolve_checkpoint(args.ckpt)
        config = read_config(ckpt)
        family = get_family(config["model"].get("name", "llama3"))
        if family.sample is None:
            raise ValueError(f"{ckpt} holds a {family.name!r} model, which has no sampler")
        os.makedirs(args.out, exist_ok=True)
        line = family.sample(args, ckpt, config)
    except (ValueError, OSError, KeyError, ConfigError) as err:
        print(f"gigatron: {err}", file=sys.stderr)
        return 2
    print(f"gigatron sample: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
