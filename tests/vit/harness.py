"""Drive the real trainer on the tiny ViT (tests/vit/vit_tiny.yaml) inside `run_distributed` workers.

The "digits_multilabel" reader: sample g is scikit-learn digit g % 1797 (real 8x8 images, read from
the .npz at data.path that `write_digits` saves once per test session, upscaled to 16 px), with a multi-hot target of 1 to 5 labels out of model.num_classes: the digit
itself plus (g % 5) more drawn from the layout-invariant generator keyed by g. Every layout sees
the same samples (the signal family's reader does the same, tests/families/signal.py).
"""

from __future__ import annotations

import os

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPE = os.path.join(ROOT, "tests/vit/vit_tiny.yaml")
_DIGITS: dict = {}


def write_digits(path: str) -> str:
    """scikit-learn's digits as an .npz of "images" (1797, 8, 8) uint8 and "labels" (1797,): importing
    sklearn.datasets costs seconds, so the workers read this file instead."""
    from sklearn.datasets import load_digits

    d = load_digits()
    np.savez(path, images=np.round(d.images * (255 / 16)).astype(np.uint8), labels=d.target)
    return path


def digits(path: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """((1797, 3, size, size) float32 images, bilinearly upscaled and normalised; (1797,) labels)."""
    if (path, size) not in _DIGITS:
        with np.load(path, allow_pickle=False) as f:
            images, labels = torch.from_numpy(f["images"].astype(np.float32) / 255.0)[:, None], torch.from_numpy(f["labels"])
        images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        _DIGITS[path, size] = ((images - 0.5) / 0.25).expand(-1, 3, -1, -1).contiguous(), labels
    return _DIGITS[path, size]


def multilabel(digit: torch.Tensor, g: torch.Tensor, classes: int) -> torch.Tensor:
    from gigatron.core import rng

    target = digit
    hot = torch.zeros(len(g), classes)
    hot[torch.arange(len(g)), target] = 1.0
    extra = (rng.uniform(rng.stream_key("digits_labels"), g[:, None] * 8 + torch.arange(8)) * classes).long()
    for j in range(4):
        rows = (g % 5) > j  # sample g carries g % 5 extra labels (duplicates allowed: 1 to 5 labels)
        hot[rows, extra[rows, j]] = 1.0
    return hot


class DigitsLoader:
    def __init__(self, cfg, split: str, dp_rank: int, dp_size: int):
        self.path, self.size, self.B, self.classes = cfg.data.path, cfg.data.image_size, cfg.train.micro_batch_size, \
            cfg.data.num_labels
        self.dp_rank, self.dp_size, self.consumed = dp_rank, dp_size, 0
        self.offset = 1000 if split == "eval" else 0

    def next_batch(self):
        first = self.consumed + self.dp_rank * self.B
        g = torch.arange(first, first + self.B) + self.offset
        self.consumed += self.B * self.dp_size
        images, labels = digits(self.path, self.size)
        return {"sample_index": g, "images": images[g % 1797], "labels": multilabel(labels[g % 1797], g, self.classes)}

    def state_dict(self):
        return {"consumed": self.consumed}

    def load_state_dict(self, state):
        self.consumed = int(state["consumed"])

    def stats(self):
        return {}


def build_trainer(world_size: int, overrides: list[str], run_dir: str):
    from gigatron.core.config import load_config
    from gigatron.core.train import Trainer
    from gigatron.data_pipeline.loader import register_format
    from gigatron.parallel.mesh import init_distributed

    register_format("digits_multilabel", DigitsLoader)
    cfg = load_config(RECIPE, overrides, world_size=world_size)
    cfg.run.dir = os.path.join(run_dir, "vit_" + "_".join(o.replace("=", "") for o in overrides)[:80])
    return Trainer(cfg, init_distributed(cfg.parallel))


def vit_run(rank: int, world_size: int, overrides: list[str], run_dir: str, steps: int = 3) -> dict:
    trainer = build_trainer(world_size, overrides, run_dir)
    values = [trainer.train_step() for _ in range(steps)]
    return {"losses": [v["loss"] for v in values], "grad_norms": [v["grad_norm"] for v in values]}


def soft_target_check(rank: int, world_size: int, data: str) -> dict:
    """The vocabulary-parallel soft-target loss on the tp sub-mesh (tp = 2) against the
    plain one on every rank: loss and the logits' gradient, 1 to 5 labels per row, 13 classes (an
    uneven 7 + 6 split at tp 2)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    from gigatron.core.objectives.classification import soft_targets
    from gigatron.parallel.mesh import init_distributed
    from gigatron.parallel.tensor import vocab_parallel_soft_cross_entropy
    from gigatron.core.config import ParallelConfig

    dims = init_distributed(ParallelConfig(tp=2, dp=world_size // 2, sequence_parallel=False))
    g = torch.arange(24)
    targets = soft_targets(multilabel(digits(data, 8)[1][g], g, 13), 13)
    logits = torch.randn(24, 13, generator=torch.Generator().manual_seed(0)) * 3
    ref_logits = logits.clone().requires_grad_(True)
    ref = vocab_parallel_soft_cross_entropy(ref_logits, targets, dims.mesh)
    ref.backward()
    shard = distribute_tensor(logits.clone(), dims.mesh["tp"], [Shard(-1)]).requires_grad_(True)
    loss = vocab_parallel_soft_cross_entropy(shard, targets, dims.mesh)
    loss.backward()
    grad = shard.grad.full_tensor()
    labels = (targets > 0).sum(-1)
    return {"loss": loss.item(), "ref": ref.item(), "grad_err": (grad - ref_logits.grad).abs().max().item(),
            "grad_max": ref_logits.grad.abs().max().item(), "labels": (labels.min().item(), labels.max().item()),
            "torch_ref": -(targets * logits.log_softmax(-1)).sum().item()}


def vit_many(rank: int, world_size: int, runs: list[list[str]], run_dir: str, soft_check: bool = False) -> dict:
    """Several runs in one launch; run_dir holds digits.npz (write_digits)."""
    data = os.path.join(run_dir, "digits.npz")
    out = {"runs": [vit_run(rank, world_size, overrides + [f"data.path={data}"], run_dir) for overrides in runs]}
    if soft_check:  # on the same process group, a (tp 2, dp world/2) mesh
        out["soft"] = soft_target_check(rank, world_size, data)
    return out


def relative_errors(ref: dict, got: dict) -> tuple[float, float]:
    """(max relative loss difference, max relative gradient-norm difference) over the steps."""
    loss = max(abs(a - b) / abs(a) for a, b in zip(ref["losses"], got["losses"]))
    norm = max(abs(a - b) / abs(a) for a, b in zip(ref["grad_norms"], got["grad_norms"]))
    return loss, norm


MAWS = os.path.join(ROOT, "recipes/vit_debug_maws.yaml")
SWAG = os.path.join(ROOT, "recipes/vit_debug_swag.yaml")
QUICK = ["parallel.dp=1", "data.num_workers=0", "run.tensorboard=false", "run.progress=false", "train.eval_every=0",
         "train.warmup_steps=2", "model.dim=32", "model.mlp_dim=64", "model.depth=2", "data.shuffle_buffer=50"]


def real_data_run(rank: int, world_size: int, root: str, shards: str) -> dict:
    """Short versions of the benchmarks' paths (benchmarks/bench_vit_digits.py, bench_vit_maws.py) on
    digit shards written by prepare-images: SWAG-style training with both stems through the webdataset
    reader, and the two-stage MAWS recipe through run_stages, then the second stage's start weights."""
    from gigatron.core import checkpoint
    from gigatron.core.checkpoint.reader import CheckpointReader
    from gigatron.core.config import load_config
    from gigatron.core.train import Trainer, run_stages
    from gigatron.parallel.mesh import init_distributed

    out = {}
    data = [f"data.path={shards}", "data.eval_fraction=0.25"]
    for stem in ("patchify", "conv"):
        cfg = load_config(SWAG, QUICK + data + [f"model.stem={stem}", "model.depth=3" if stem == "conv" else "model.depth=2",
                                                "train.steps=12", "train.global_batch_size=32", "train.micro_batch_size=32",
                                                "train.lr=3e-3"])
        cfg.run.dir = os.path.join(root, f"swag_{stem}")
        trainer = Trainer(cfg, init_distributed(cfg.parallel))
        out[stem] = [trainer.train_step()["loss"] for _ in range(cfg.train.steps)]
        del trainer
    # MAWS: a copy of the recipe with short stages and this test's shards
    with open(MAWS) as f:
        text = f.read().replace("until_step: 400", "until_step: 6").replace("train.warmup_steps: 20", "train.warmup_steps: 1")
    text = text.replace("train.decay_steps: 280", "train.decay_steps: 1")
    text = text.replace("runs/data/digits32_10pc/train-000000.tar", shards).replace(
        "runs/data/digits32/train-{000016..000017}.tar", shards)
    recipe = os.path.join(root, "maws.yaml")
    with open(recipe, "w") as f:
        f.write(text)
    cfg = load_config(recipe, QUICK + data + ["train.steps=8", "train.global_batch_size=16", "train.micro_batch_size=16",
                                              "model.decoder_dim=16", "model.decoder_depth=1", "model.decoder_mlp_dim=32"])
    cfg.run.dir = os.path.join(root, "maws")
    dims = init_distributed(cfg.parallel)
    assert run_stages(cfg, dims) == 0
    with open(os.path.join(cfg.run.dir, "metrics.jsonl")) as f:
        import json

        rows = [json.loads(line) for line in f]
    out["stages"] = [r.get("stage") for r in rows]
    out["mae_losses"] = [r["loss"] for r in rows if r.get("stage") == "mae"]
    # stage two, built again from its config, starting from stage one's last checkpoint
    first = checkpoint.latest(os.path.join(cfg.run.dir, "checkpoints", "mae"))
    second = Trainer(cfg.resolved_stages[1], dims, "supervised_check", init_from=first, fresh_optimizer=True)
    fresh = {k: v.detach().clone() for k, v in second.model.state_dict().items()}
    second.maybe_resume()
    reader = CheckpointReader(first)
    saved = {k[len("model."):] for k in reader.keys("model.")}
    state = second.model.state_dict()
    out["encoder_equal"] = all(torch.equal(state[k], reader.read("model." + k)) for k in state if k in saved)
    out["encoder_moved"] = any(not torch.equal(fresh[k], state[k]) for k in state if k in saved)
    out["carried"] = sorted(k for k in state if k in saved)
    out["fresh"] = sorted(k for k in state if k not in saved)
    out["left_behind"] = sorted(k for k in saved if k not in state)
    out["head_is_init"] = all(torch.equal(fresh[k], state[k]) for k in out["fresh"])
    return out
