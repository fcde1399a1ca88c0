"""Drive the real trainer on the Emu Video debug recipe in-process (inside `run_distributed` workers),
on Movie Gen's deterministic clip reader (tests/moviegen/synthetic.py: one global sample order, so
every layout sees the same global batch)."""

from __future__ import annotations

import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPE = os.path.join(ROOT, "recipes/emu_video_debug.yaml")

# fp32, tiny; zero_init off so every path (the conditioning projection too) carries gradient at step 1
SMALL = ["data.format=moviegen_synthetic", "model.dim=32", "model.n_heads=4", "model.ffn_dim=64", "model.text_dim=16",
         "model.text_tokens=5", "model.time_dim=32", "model.zero_init=false", "model.text_dropout=0.25",
         "train.global_batch_size=4", "train.micro_batch_size=2", "train.warmup_steps=1", "train.lr=1e-3",
         "train.dtype=float32", "train.ema_decay=0", "run.progress=false", "run.tensorboard=false"]


def parity_run(rank: int, world_size: int, overrides: list[str], run_dir: str, steps: int = 3) -> dict:
    import tests.moviegen.synthetic  # noqa: F401  registers the reader
    from gigatron.core.config import load_config
    from gigatron.core.train import Trainer
    from gigatron.parallel.mesh import init_distributed

    cfg = load_config(RECIPE, SMALL + overrides, world_size=world_size)
    cfg.run.dir = os.path.join(run_dir, "_".join(o.replace("=", "") for o in overrides)[:80] or "ref")
    trainer = Trainer(cfg, init_distributed(cfg.parallel))  # the recipe's top level: one stage, no stages run
    values = [trainer.train_step() for _ in range(steps)]
    return {"losses": [v["loss"] for v in values], "grad_norms": [v["grad_norm"] for v in values]}


def parity_many(rank: int, world_size: int, runs: list[list[str]], run_dir: str) -> list[dict]:
    return [parity_run(rank, world_size, overrides, run_dir) for overrides in runs]
