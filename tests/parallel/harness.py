"""Drive the real trainer in-process (inside `run_distributed` workers) and return what parity and
accounting tests compare: per-step losses, full final parameters, and per-rank byte counts."""

from __future__ import annotations

import math
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPE = os.path.join(ROOT, "recipes/llama3_debug.yaml")

# small, fast, fp32 version of the debug recipe on byte tokens (vocab 258)
SMALL = ["model.dim=64", "model.n_layers=2", "model.n_heads=8", "model.n_kv_heads=2", "model.ffn_dim=128",
         "model.vocab_size=258", "train.seq_len=64", "train.global_batch_size=4", "train.micro_batch_size=2",
         "train.steps=5", "train.warmup_steps=2", "train.lr=1e-3", "train.min_lr=1e-4", "train.dtype=float32",
         "data.tokenizer=bytes", "data.max_mb=0.2", "run.tensorboard=false", "run.progress=false",
         "parallel.sequence_parallel=false"]


def masked_token_loader(cfg, split, dp_rank, dp_size):
    """The "tokens" reader with the first (sample_index % 5) * 7 labels of every row set to
    IGNORE_INDEX, so the number of loss terms differs between rows, dp ranks and cp ranks."""
    from gigatron.data_pipeline.sampler import build_token_loader
    from gigatron.parallel.tensor import IGNORE_INDEX

    loader = build_token_loader(cfg, split, dp_rank, dp_size)
    plain = loader.next_batch

    def next_batch():
        batch = plain()
        T = batch["labels"].shape[1]
        cut = (batch["sample_index"] % 5) * 7  # (B,)
        batch["labels"] = batch["labels"].masked_fill(torch.arange(T)[None, :] < cut[:, None], IGNORE_INDEX)
        return batch

    loader.next_batch = next_batch
    return loader


def build_trainer(world_size: int, overrides: list[str], data_dir: str):
    from gigatron.data_pipeline.loader import register_format

    register_format("tokens_masked", masked_token_loader)
    from gigatron.core.config import load_config
    from gigatron.core.train import Trainer
    from gigatron.parallel.mesh import init_distributed

    if not any(o.startswith("parallel.dp=") for o in overrides):  # dp fills the job
        tp = next((int(o.split("=")[1]) for o in overrides if o.startswith("parallel.tp=")), 1)
        overrides = overrides + [f"parallel.dp={world_size // tp}"]
    cfg = load_config(RECIPE, SMALL + [f"data.path={data_dir}/bytes"] + overrides, world_size=world_size)
    cfg.run.dir = os.path.join(data_dir, "run_" + "_".join(o.replace("=", "") for o in overrides)[:80])
    dims = init_distributed(cfg.parallel)
    return Trainer(cfg, dims)


def full_params(model) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().numpy().copy() for k, v in sd.items()}  # numpy: tensors would travel as fds


def train_run(rank: int, world_size: int, overrides: list[str], data_dir: str, steps: int = 5) -> dict:
    """Train `steps` steps; every rank returns its losses and gradient norms (before clipping),
    rank 0 also the full final parameters."""
    trainer = build_trainer(world_size, overrides, data_dir)
    counts = []  # this rank's number of loss terms per step (before the all-reduce)
    global_count = trainer.global_count

    def spy(batches):
        counts.append(int(sum(trainer.objective.count(b) for b in batches)))
        return global_count(batches)

    trainer.global_count = spy
    values = [trainer.train_step() for _ in range(steps)]
    params = full_params(trainer.model)
    return {"losses": [v["loss"] for v in values], "grad_norms": [v["grad_norm"] for v in values],
            "counts": counts, "params": params if rank == 0 else None}


def train_many(rank: int, world_size: int, runs: list[list[str]], data_dir: str) -> list[dict]:
    """Several layouts in one launch (spawning processes costs more than a run)."""
    return [train_run(rank, world_size, overrides, data_dir) for overrides in runs]


def _tp_local_shape(param, tp: int, tp_rank: int) -> tuple[int, ...]:
    """Shape of this rank's tensor-parallel part of `param` (before FSDP shards it further)."""
    from torch.distributed.tensor import DTensor, Shard

    shape = list(param.shape)
    if isinstance(param, DTensor) and tp > 1 and isinstance(param.placements[-1], Shard):
        d = param.placements[-1].dim
        chunk = -(-shape[d] // tp)
        shape[d] = max(0, min(chunk, shape[d] - tp_rank * chunk))
    return tuple(shape)


def comm_and_memory(rank: int, world_size: int, overrides: list[str], data_dir: str) -> dict:
    """One step to warm up, then record the collectives of one whole training step and compare them
    with the layout's textbook minimum (`comm.textbook_bytes`); count the bytes this rank holds for
    parameters, gradients and AdamW state after a last micro-batch (gradients kept)."""
    from gigatron.parallel.comm import CommRecorder, textbook_bytes

    trainer = build_trainer(world_size, overrides, data_dir)
    cfg, mesh = trainer.cfg, trainer.mesh
    trainer.train_step()
    with CommRecorder(mesh) as recorder:
        trainer.train_step()
    tp, tp_rank = cfg.parallel.tp, mesh["tp"].get_local_rank()
    model = trainer.model
    units = [sum(math.prod(_tp_local_shape(p, tp, tp_rank)) for p in block.parameters()) for block in model.layers.values()]
    units.append(sum(math.prod(_tp_local_shape(p, tp, tp_rank)) for n, p in model.named_parameters()
                     if not n.startswith("layers.")))
    m = cfg.model
    expected = textbook_bytes(cfg, units, trainer.n_micro, 4, m.n_layers, m.dim, m.n_kv_heads, m.head_dim)
    measured = recorder.bytes_by()
    # memory: keep one micro-batch's gradients, then take an optimizer step (creates AdamW state)
    trainer.forward_backward(trainer.next_batch(), 1.0)
    trainer.optimizer.step()
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
    held = {"params": 0, "grads": 0, "optim": 0}
    total = {"params": 0, "grads": 0, "optim": 0}
    for name, p in trainer.model.named_parameters():
        if name.endswith("norm.weight") or (tp > 1 and p.placements[-1].is_replicate()):
            continue  # replicated over tp by design: norms, and KV heads when n_kv_heads < tp
        held["params"] += local(p).numel() * 4
        held["grads"] += local(p.grad).numel() * 4
        total["params"] += p.numel() * 4
        total["grads"] += p.numel() * 4
        state = trainer.optimizer.state[p]
        for key in ("exp_avg", "exp_avg_sq"):
            held["optim"] += local(state[key]).numel() * 4
            total["optim"] += p.numel() * 4
    p = cfg.parallel
    return {"measured": measured, "expected": expected, "held": held, "total": total,
            "shards": p.tp * p.cp * p.dp // p.dp_replicate,  # HSDP replicates over dp_replicate
            "records": recorder.totals()}


def run_jobs(rank: int, world_size: int, jobs: list[tuple[str, list[str]]], data_dir: str) -> list:
    """("train", overrides) -> train_run; ("comm", overrides) -> comm_and_memory; rank 0's results
    plus every rank's comm/memory figures."""
    out = []
    for kind, overrides in jobs:
        result = (train_run if kind == "train" else comm_and_memory)(rank, world_size, overrides, data_dir)
        out.append(result)
    return out


SIGNAL_RECIPE = os.path.join(ROOT, "tests/families/signal.yaml")


def signal_run(rank: int, world_size: int, overrides: list[str], data_dir: str, steps: int = 3,
               grad_scale: float = 1.0) -> dict:
    """The test-only "signal" family (tests/families/signal.py) through the unchanged trainer.
    grad_scale != 1 injects a wrong gradient scale (a test that the parity check can fail)."""
    import tests.families.signal  # noqa: F401  registers the family and its reader
    from gigatron.core.config import load_config
    from gigatron.core.train import Trainer
    from gigatron.parallel.mesh import init_distributed

    cfg = load_config(SIGNAL_RECIPE, overrides, world_size=world_size)
    cfg.run.dir = os.path.join(data_dir, "signal_" + "_".join(o.replace("=", "") for o in overrides)[:80])
    trainer = Trainer(cfg, init_distributed(cfg.parallel))
    if grad_scale != 1.0:
        forward_backward = trainer.forward_backward
        trainer.forward_backward = lambda batch, scale: forward_backward(batch, scale * grad_scale)
    values = [trainer.train_step() for _ in range(steps)]
    return {"losses": [v["loss"] for v in values], "grad_norms": [v["grad_norm"] for v in values]}


def signal_many(rank: int, world_size: int, runs: list[tuple[list[str], float]], data_dir: str) -> list[dict]:
    return [signal_run(rank, world_size, overrides, data_dir, grad_scale=scale) for overrides, scale in runs]


def relative_errors(ref: dict, got: dict) -> tuple[float, float]:
    """(max relative loss difference, max relative gradient-norm difference) over the steps."""
    loss = max(abs(a - b) / abs(a) for a, b in zip(ref["losses"], got["losses"]))
    norm = max(abs(a - b) / abs(a) for a, b in zip(ref["grad_norms"], got["grad_norms"]))
    return loss, norm
