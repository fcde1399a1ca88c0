"""AdamW with linear warm-up and cosine decay (the Llama 3 recipe: 8,000 warm-up steps, then cosine
decay of the peak rate to a floor), with the family's parameter groups."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from gigatron.core.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up to cfg.lr over warmup_steps,
    then a half cosine from cfg.lr to cfg.min_lr over decay_steps (default: the rest of the run),
    then cfg.min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay = cfg.decay_steps or max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def parameter_groups(model: nn.Module, weight_decay: float, no_decay: Callable[[str], bool]) -> list[dict]:
    """Two AdamW groups: decayed, and exempt (the family names them: norms, biases, position
    embeddings). Groups keep the model's parameter order, so optimizer state maps back by name."""
    decay, exempt = [], []
    for name, param in model.named_parameters():
        (exempt if no_decay(name) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if exempt:
        groups.append({"params": exempt, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, cfg: TrainConfig,
                    no_decay: Callable[[str], bool] = lambda name: False) -> torch.optim.Optimizer:
    """AdamW over the family's parameter groups. The learning rate is set before every step by
    `set_lr` from the global step alone, so a resumed run needs no scheduler state."""
    return torch.optim.AdamW(parameter_groups(model, cfg.weight_decay, no_decay), lr=lr_at(0, cfg),
                             betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=True)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
