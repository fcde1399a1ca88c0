"""`gigatron sample CKPT --prompt TEXT [...]`: videos from a Movie Gen checkpoint, by Euler steps on the flow.

Flow matching's ODE runs from noise (t = 0) to data (t = 1): x <- x + (t_{i+1} - t_i) v(x, t_i).
Times follow Movie Gen's linear-quadratic schedule: the first `linear_steps` (25 of 50) are the
first steps of a 1000-step linear schedule (t = i / 1000, small steps where the noise is large),
the rest are quadratically spaced up to t = 1 (the quadratic's slope at the junction is 1/1000).
Classifier-free guidance: v = v(empty prompt) + w (v(prompt) - v(empty prompt)); the empty prompt
is one zero token, as text dropout makes it in training (core/objectives/flow_matching.py).

The weights are the checkpoint's EMA (`extra.ema.*`, core/ema.py) when it has one (--no-ema: the
raw weights); prompts are embedded by the stand-in text encoder the shards were prepared with
(data_pipeline/text_encoder.py, --text-encoder). Writes OUT/samples.png (one row of frames per
prompt) and OUT/sample_<i>.mp4 (H.264). Runs in one process (CPU or one GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

from gigatron.core import rng
from gigatron.core.models.moviegen import MovieGen, MovieGenConfig
from gigatron.core.models.patch_embed import grid_of, patchify, unpatchify
from gigatron.core.objectives.flow_matching import grid_positions


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


@torch.no_grad()
def velocity(model, x, t, grid_pos, text, lengths, guidance: float):
    """The guided velocity (B, N, P): one batched pass over the conditional and unconditional rows."""
    if guidance == 1.0:
        return model(x, t, grid_pos, text, lengths)
    B = x.shape[0]
    empty = torch.zeros_like(text)
    both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([grid_pos, grid_pos]), torch.cat([text, empty]),
                 torch.cat([lengths, torch.ones_like(lengths)]))
    cond, uncond = both[:B], both[B:]
    return uncond + guidance * (cond - uncond)


@torch.no_grad()
def euler_sample(model, noise, grid_pos, text, lengths, guidance: float = 6.0, times: torch.Tensor | None = None):
    """Integrate from `noise` (B, N, P) at t=0 to t=1; returns the tokens (B, N, P)."""
    times = linear_quadratic_times() if times is None else times
    x = noise.clone()
    for t0, t1 in zip(times[:-1].tolist(), times[1:].tolist()):
        t = torch.full((x.shape[0],), t0, device=x.device)
        x = x + (t1 - t0) * velocity(model, x, t, grid_pos, text, lengths, guidance)
    return x


def initial_noise(m: MovieGenConfig, shape, seed: int, first_index: int = 0) -> torch.Tensor:
    """Latent noise (B, C, F, H, W) from the layout-invariant generator, one stream per sample."""
    n = int(np.prod(shape[1:]))
    g = torch.arange(first_index, first_index + shape[0])
    return rng.normal(rng.stream_key("sample_noise", seed), g[:, None] * n + torch.arange(n)[None]).view(shape)


def generate(model, m: MovieGenConfig, text: torch.Tensor, lengths: torch.Tensor, frames: int, height: int,
             width: int, seed: int = 0, guidance: float = 6.0, steps: int = 50, noise: torch.Tensor | None = None):
    """Latents (B, C, F, H, W) for prompts `text` (B, L, text_dim) at a clip of frames x height x width
    latents (pixels / model.pixel_downsample). Returns (latents, the initial noise)."""
    shape = (text.shape[0], m.latent_channels, frames, height, width)
    noise = initial_noise(m, shape, seed) if noise is None else noise
    grid = grid_of(shape, m.patch)
    tokens = euler_sample(model, patchify(noise, m.patch), grid_positions(grid, shape[0]), text, lengths,
                          guidance, linear_quadratic_times(steps))
    return unpatchify(tokens, grid, m.patch, m.latent_channels), noise


def to_uint8(latents: torch.Tensor, m: MovieGenConfig) -> np.ndarray:
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


def load_model(ckpt: str, ema: bool = True) -> tuple[MovieGen, dict]:
    """The model of a moviegen checkpoint folder (its EMA weights when present and `ema`) and its config."""
    from gigatron.core.checkpoint import latest
    from gigatron.core.checkpoint.reader import CheckpointReader

    if not os.path.exists(os.path.join(ckpt, ".metadata")):
        ckpt = latest(os.path.join(ckpt, "checkpoints")) or latest(ckpt) or ckpt
    config_path = os.path.join(ckpt, "config.json")
    if not os.path.exists(config_path):
        raise ValueError(f"{ckpt} is not a checkpoint folder (no config.json)")
    with open(config_path) as f:
        config = json.load(f)
    if config["model"].get("name") != "moviegen":
        raise ValueError(f"{ckpt} holds a {config['model'].get('name')!r} model; gigatron sample needs moviegen")
    m = MovieGenConfig(**{k: v for k, v in config["model"].items() if k in MovieGenConfig.__dataclass_fields__})
    model = MovieGen(m).eval()
    reader = CheckpointReader(ckpt)
    prefix = "extra.ema." if ema and any(k.startswith("extra.ema.") for k in reader.keys()) else "model."
    model.load_state_dict({k: reader.read(prefix + k) for k in model.state_dict()}, strict=True)
    config["_weights"] = "EMA" if prefix != "model." else "raw"
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gigatron sample", description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt", help="a moviegen checkpoint folder (step_*) or a run directory (its latest)")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable: one row each)")
    parser.add_argument("--out", default="samples", help="output folder (samples.png, sample_<i>.mp4)")
    parser.add_argument("--frames", type=int, default=0, help="frames (default: the recipe's data.num_frames)")
    parser.add_argument("--height", type=int, default=0, help="pixels (default: data.image_size)")
    parser.add_argument("--width", type=int, default=0, help="pixels (default: data.image_size)")
    parser.add_argument("--steps", type=int, default=50, help="Euler steps (default 50)")
    parser.add_argument("--guidance", type=float, default=6.0, help="classifier-free guidance scale (1 = none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text-encoder", default="", help="as prepare-videos used (default llama-bytes:<text_dim>)")
    parser.add_argument("--no-ema", action="store_true", help="the raw weights, not the EMA")
    args = parser.parse_args(argv)
    try:
        model, config = load_model(args.ckpt, ema=not args.no_ema)
        m, d = model.cfg, config.get("data", {})
        s = m.pixel_downsample
        frames = args.frames or d.get("num_frames", 8)
        height, width = args.height or d.get("image_size", 64), args.width or d.get("image_size", 64)
        if height % (s * m.patch_hw) or width % (s * m.patch_hw) or frames % m.patch_t:
            raise ValueError(f"{frames}x{height}x{width} is not divisible by the patch x downsample "
                             f"({m.patch_t}x{s * m.patch_hw}x{s * m.patch_hw})")
        text, lengths = encode_prompts(args.prompt, args.text_encoder or f"llama-bytes:{m.text_dim}", m.text_tokens)
        if text.shape[-1] != m.text_dim:
            raise ValueError(f"the text encoder gives {text.shape[-1]} features, the model takes {m.text_dim}")
        latents, _ = generate(model, m, text, lengths, frames, height // s, width // s, args.seed, args.guidance,
                              args.steps)
        clips = to_uint8(latents, m)
        os.makedirs(args.out, exist_ok=True)
        save_grid(list(clips), os.path.join(args.out, "samples.png"), labels=args.prompt)
        for i, clip in enumerate(clips):
            save_video(clip, os.path.join(args.out, f"sample_{i}.mp4"))
    except (ValueError, OSError, KeyError) as err:
        print(f"gigatron: {err}", file=sys.stderr)
        return 2
    print(f"gigatron sample: {len(clips)} clips of {frames}x{height}x{width} ({config['_weights']} weights, "
          f"{args.steps} steps, guidance {args.guidance}) -> {args.out}/samples.png, sample_*.mp4")
    return 0


if __name__ == "__main__":
    sys.exit(main())
