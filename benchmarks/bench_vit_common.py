"""Shared by the ViT experiments (bench_vit_digits.py, bench_vit_maws.py): scikit-learn's digits
through `prepare-images`, runs of the real trainer (torchrun, the recipes in recipes/vit_debug_*.yaml),
and a deterministic held-out evaluation of each saved checkpoint (every held-out image once, whole,
at 32 px: no random crop), so the curves are exact accuracies, not noisy samples."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "runs/data")
FULL, FEW = "digits32", "digits32_10pc"  # all 1,797 digits; 10 labelled images per class (train split only)
SHARDS, EVAL_FRACTION = 18, 0.12         # 100 per shard; the last 2 shards (197 images) are held out
# tuning: train on shards 0..13 (1,400 images), validate on 14..15 (200), both from the training split
TUNE_PATH, TUNE_EVAL_FRACTION, VALIDATION_SHARDS = "train-{000000..000015}.tar", 0.125, range(14, 16)


def prepare_digits(data: str = DATA) -> dict:
    """Write data/digits32 (train-000000..17.tar, 32 px) and data/digits32_10pc (100 images: the first
    10 of each class in a seeded shuffle of the training shards' samples), through prepare-images."""
    from gigatron.data_pipeline.prepare_images import prepare_images

    out = {}
    full = os.path.join(data, FULL)
    if not os.path.exists(os.path.join(full, "dataset.json")):
        from sklearn.datasets import load_digits

        os.makedirs(data, exist_ok=True)
        d = load_digits()
        images = np.round(d.images * (255 / 16)).astype(np.uint8)
        np.savez(os.path.join(data, "digits.npz"), images=images, labels=d.target)
        prepare_images(os.path.join(data, "digits.npz"), full, shard_size=100, resize=32, progress=False)
        n_train = 100 * (SHARDS - round(SHARDS * EVAL_FRACTION))
        order = np.random.default_rng(0).permutation(n_train)
        few = np.concatenate([order[d.target[order] == c][:10] for c in range(10)])
        np.savez(os.path.join(data, "digits_10pc.npz"), images=images[few], labels=d.target[few])
        prepare_images(os.path.join(data, "digits_10pc.npz"), os.path.join(data, FEW), shard_size=100, resize=32,
                       progress=False)
    for name in (FULL, FEW):
        with open(os.path.join(data, name, "dataset.json")) as f:
            out[name] = json.load(f)
    return out


def heldout(data: str = DATA, validation: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out split (the last shards, as data.eval_fraction holds them out): images (N, 3, 32, 32)
    normalised as the loader does (ImageNet statistics), labels (N,). validation=True: the validation
    split carved from the training shards instead (VALIDATION_SHARDS; tuning never sees the held-out split)."""
    from PIL import Image

    from gigatron.data_pipeline.shard_loader import normalise
    from gigatron.data_pipeline.shards import split_shards
    from gigatron.data_pipeline.tar_reader import ShardEnd, read_tar_shard

    shards = [os.path.join(data, FULL, f"train-{i:06d}.tar") for i in range(SHARDS)]
    _, held = split_shards(shards, EVAL_FRACTION)
    held = VALIDATION_SHARDS if validation else held
    pixels, labels = [], []
    for i in held:
        for got in read_tar_shard(shards[i]):
            if not isinstance(got, ShardEnd):
                pixels.append(np.asarray(Image.open(io.BytesIO(got[1]["jpg"])).convert("RGB")))
                labels.append(int(got[1]["cls"]))
    return normalise(np.stack(pixels)), torch.tensor(labels)


def load_model(checkpoint: str):
    """A single-process ViT with the weights of a DCP checkpoint (any layout wrote it)."""
    from gigatron.core.checkpoint.reader import CheckpointReader
    from gigatron.core.config_loader import build
    from gigatron.core.models.vit import ViT, ViTConfig

    with open(os.path.join(checkpoint, "config.json")) as f:
        cfg = build(ViTConfig, json.load(f)["model"], "model")
    model = ViT(cfg)
    reader = CheckpointReader(checkpoint)
    state = {k[len("model."):]: reader.read(k) for k in reader.keys("model.")}
    model.load_state_dict(state, strict=True)
    return model.eval()


@torch.no_grad()
def accuracy(checkpoint: str, images: torch.Tensor, labels: torch.Tensor) -> float:
    model = load_model(checkpoint)
    logits = torch.cat([model(images[i:i + 256]) for i in range(0, len(images), 256)])
    return (logits.argmax(-1) == labels).float().mean().item()


def train(recipe: str, overrides: list[str], run_dir: str, nproc: int = 1) -> list[dict]:
    """One run of the real trainer (torchrun); returns its metrics.jsonl rows."""
    args = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "-m", "gigatron.core.train",
            recipe, "--set", f"run.dir={run_dir}", "--set", f"parallel.dp={nproc}", "--set", "run.progress=false"]
    for o in overrides:
        args += ["--set", o]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, 2 // nproc)))
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"training failed ({done.returncode}):\n{done.stderr[-3000:]}")
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def checkpoints(root: str) -> list[tuple[int, str]]:
    """(step, path) of every committed checkpoint under root, in step order."""
    from gigatron.core.checkpoint.store import committed, step_of

    return sorted((step_of(p), p) for p in committed(root))
