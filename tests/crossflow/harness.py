"""Drive the real trainer on the CrossFlow debug recipe in-process (inside `run_distributed` workers),
on real captioned digits (conftest.py). Parity layouts keep dp 1, so every rank reads the same batches."""

from __future__ import annotations

import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPE = os.path.join(ROOT, "recipes/crossflow_debug.yaml")

# fp32, tiny; zero_init off so every path (the text encoder's head too) carries gradient at step 1;
# a KL weight large enough that a KL counted twice (or lost) moves the loss (the KL per element is ~4e-4
# at step 1 with a 0.02-std head: x 30 it is ~0.3% of the loss)
SMALL = ["model.dim=32", "model.n_heads=4", "model.ffn_dim=64", "model.n_layers=2", "model.text_layers=1",
         "model.text_dim=16", "model.time_dim=32", "model.zero_init=false", "model.text_dropout=0.25",
         "model.kl_weight=30", "model.align_weight=0.5", "train.global_batch_size=4", "train.micro_batch_size=2", "train.warmup_steps=1",
         "train.lr=1e-3", "train.dtype=float32", "train.ema_decay=0", "data.shuffle_buffer=8",
         "checkpoint.interval=0", "run.progress=false", "run.tensorboard=false"]


def parity_run(rank: int, world_size: int, overrides: list[str], run_dir: str, steps: int = 3) -> dict:
    from gigatron.core.config import load_config
    from gigatron.core.train import Trainer
    from gigatron.parallel.mesh import init_distributed

    cfg = load_config(RECIPE, SMALL + overrides, world_size=world_size)
    cfg.run.dir = os.path.join(run_dir, "_".join(o.replace("=", "").replace("/", "")[-20:] for o in overrides)[:80])
    trainer = Trainer(cfg, init_distributed(cfg.parallel))
    values = [trainer.train_step() for _ in range(steps)]
    return {"losses": [v["loss"] for v in values], "grad_norms": [v["grad_norm"] for v in values]}


def parity_many(rank: int, world_size: int, runs: list[list[str]], run_dir: str) -> list[dict]:
    return [parity_run(rank, world_size, overrides, run_dir) for overrides in runs]
