"""Drive the real trainer on the tiny Omnivore (tests/omnivore/omnivore_tiny.yaml) in `run_distributed`
workers, on a `data.format: mixture` of three test readers. Sample g of every reader is a function of
g alone (every layout sees the same samples; as tests/vit/harness.py):
- omni_digits: scikit-learn digit g % 1797 (real), its class;
- omni_clips:  4 frames of a real digit sliding one pixel per frame, to the right (label 0) or, for
  odd g, to the left (label 1);
- omni_rgbd:   a real digit plus SYNTHETIC depth (B, 1, S, S): a plane tilted by g % 5 (the label)
  with the digit's strokes raised, since no real RGB-D data exists offline.
"""

from __future__ import annotations

import os

import torch

from tests.vit.harness import digits, write_digits  # noqa: F401  (write_digits: the tests' .npz)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPE = os.path.join(ROOT, "tests/omnivore/omnivore_tiny.yaml")


class _Reader:
    kind = "digits"

    def __init__(self, cfg, split: str, dp_rank: int, dp_size: int):
        self.path, self.size, self.B = cfg.data.path, cfg.data.image_size, cfg.train.micro_batch_size
        self.dp_rank, self.dp_size, self.consumed = dp_rank, dp_size, 0

    def next_batch(self):
        first = self.consumed + self.dp_rank * self.B
        g = torch.arange(first, first + self.B)
        self.consumed += self.B * self.dp_size
        images, labels = digits(self.path, self.size)
        x, y = images[g % 1797], labels[g % 1797]
        if self.kind == "digits":
            return {"sample_index": g, "images": x, "labels": y}
        if self.kind == "clips":
            step = torch.where(g % 2 == 0, 1, -1)
            frames = [torch.stack([xi.roll(int(s) * t, dims=-1) for xi, s in zip(x, step)]) for t in range(4)]
            return {"sample_index": g, "videos": torch.stack(frames, 2), "labels": (g % 2).long()}
        tilt = (g % 5).float()[:, None, None, None]
        ramp = torch.linspace(-1, 1, self.size)[None, None, :, None]
        depth = tilt * ramp + 0.5 * x[:, :1]  # synthetic depth: a tilted plane plus the raised strokes
        return {"sample_index": g, "images": x, "depth": depth, "labels": (g % 5).long()}

    def state_dict(self):
        return {"consumed": self.consumed}

    def load_state_dict(self, state):
        self.consumed = int(state["consumed"])

    def stats(self):
        return {}


class DigitsReader(_Reader):
    kind = "digits"


class ClipsReader(_Reader):
    kind = "clips"


class RGBDReader(_Reader):
    kind = "rgbd"


def register() -> None:
    from gigatron.data_pipeline.loader import register_format

    register_format("omni_digits", DigitsReader)
    register_format("omni_clips", ClipsReader)
    register_format("omni_rgbd", RGBDReader)


def omnivore_run(rank: int, world_size: int, overrides: list[str], run_dir: str, steps: int = 3) -> dict:
    """`steps` steps; losses, gradient norms before clipping, and which sources the micro-batches came from."""
    from gigatron.core.config import load_config
    from gigatron.core.train import Trainer
    from gigatron.parallel.mesh import init_distributed

    register()
    data = os.path.join(run_dir, "digits.npz")
    cfg = load_config(RECIPE, overrides, world_size=world_size)
    cfg.data.path = data  # the readers' digits (the mixture copies data.path only from each source)
    for source in cfg.data.mixture:
        source.path = data
    cfg.run.dir = os.path.join(run_dir, "omni_" + "_".join(o.replace("=", "") for o in overrides)[:80])
    trainer = Trainer(cfg, init_distributed(cfg.parallel))
    sources = []
    next_batch = trainer.next_batch

    def spy(loader=None):
        batch = next_batch(loader)
        sources.append(int(batch["source"][0]))
        return batch

    trainer.next_batch = spy
    values = [trainer.train_step() for _ in range(steps)]
    depth = trainer.model.embed.stem.depth.proj.weight
    depth = depth.full_tensor() if hasattr(depth, "full_tensor") else depth
    return {"losses": [v["loss"] for v in values], "grad_norms": [v["grad_norm"] for v in values],
            "sources": sources, "depth_weight_sum": float(depth.detach().abs().sum())}


def omnivore_many(rank: int, world_size: int, runs: list[list[str]], run_dir: str) -> list[dict]:
    return [omnivore_run(rank, world_size, overrides, run_dir) for overrides in runs]
