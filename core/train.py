"""The trainer: `torchrun --nproc-per-node=N -m gigatron.core.train RECIPE [--set key=value ...]`.

One step: split the global batch into micro-batches, run forward/backward on each (gradients
accumulate in FP32), clip the global gradient norm, step AdamW and the LR schedule, then reduce the
metrics across ranks and log them. The loss is the mean over every token of the global batch:
each rank divides its summed cross-entropy by its own token count, and FSDP averages gradients over
the dp x cp ranks, which all hold the same number of tokens.

Pipeline parallel (pp > 1, parallel/pipeline.py): `self.model` is the rank's part of the model (full
parameter names), the pipeline schedule runs every micro-batch through the rank's stages in one call,
the loss sum is all-reduced over pp, and the gradient norm sums squares over pp.

Exit codes: 0 finished; 2 bad recipe; 3 too many non-finite steps in a row (train.max_skipped_steps);
42 checkpointed on request (a `checkpoint_request` file in the run folder, or SIGTERM/SIGUSR1 from the
scheduler): the launcher requeues the job, which resumes from `latest`.
"""

from __future__ import annotations

import argparse
import logging
import dataclasses
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from gigatron.core import checkpoint
from gigatron.core.config import Config, ConfigError, load_config
from gigatron.core.metrics import MetricsWriter, device_peak_flops, flops_per_token, format_step
from gigatron.core.models.llama import Llama, count_parameters
from gigatron.core.optim import build_optimizer
from gigatron.data_pipeline.sampler import PackedBatchStream
from gigatron.data_pipeline.token_shards import TokenShards
from gigatron.parallel.context import cp_shard_batch
from gigatron.parallel.mesh import ParallelDims, device_type, init_distributed
from gigatron.parallel.parallelize import parallelize_llama, place_shard
from gigatron.parallel.pipeline import Pipeline, build_pipeline, clip_grad_norm_
from gigatron.parallel.tensor import build_loss_fn

log = logging.getLogger("gigatron")
REQUEUE_EXIT_CODE = 42
NON_FINITE_EXIT_CODE = 3


def compute_dtype(cfg: Config) -> torch.dtype:
    if cfg.train.dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, cfg.train.dtype)


def ensure_data(cfg: Config) -> TokenShards:
    """Tokenize the recipe's sources once (rank 0) if the shards are missing; everyone waits."""
    if dist.get_rank() == 0 and not os.path.exists(cfg.data.path + ".json"):
        from gigatron.data_pipeline.prepare import prepare_text

        max_bytes = int(cfg.data.max_mb * 1e6) or None
        prepare_text(cfg.data.sources, cfg.data.path, cfg.data.tokenizer, max_bytes=max_bytes)
    dist.barrier()
    shards = TokenShards(cfg.data.path)
    if shards.vocab_size > cfg.model.vocab_size:
        raise ConfigError("model.vocab_size", f"{cfg.model.vocab_size} is smaller than the data's vocabulary "
                          f"({shards.vocab_size}, {cfg.data.path}); raise it or use a matching data.tokenizer")
    return shards


def build_model(cfg: Config, dims: ParallelDims, device: torch.device) -> tuple[Llama, Pipeline | None]:
    """Build on the meta device, parallelize, then allocate only this rank's shards and init them.
    With pp > 1 the model is the rank's part of the layers, run by the returned pipeline's stages."""
    def parallelize(module: Llama) -> Llama:
        return parallelize_llama(module, dims, cfg, compute_dtype(cfg))

    if dims.pp > 1:
        n_micro = cfg.train.global_batch_size // (cfg.train.micro_batch_size * dims.dp)
        return build_pipeline(cfg, dims, device, parallelize, place_shard, n_micro, build_loss_fn(dims.mesh))
    with torch.device("meta"):
        model = Llama(cfg.model)
    model = parallelize(model)
    model.to_empty(device=device)
    model.init_weights(cfg.train.seed, place=place_shard)
    return model, None


class Trainer:
    def __init__(self, cfg: Config, dims: ParallelDims):
        self.cfg, self.dims, self.mesh = cfg, dims, dims.mesh
        self.device = torch.device(device_type(), torch.cuda.current_device() if torch.cuda.is_available() else None)
        torch.manual_seed(cfg.train.seed)
        self.model, self.pipeline = build_model(cfg, dims, self.device)
        self.loss_fn = build_loss_fn(self.mesh)  # summed CE; vocabulary-parallel when the logits are sharded on V
        self.optimizer, self.scheduler = build_optimizer(self.model.parameters(), cfg.train)
        t = cfg.train
        self.n_micro = t.global_batch_size // (t.micro_batch_size * dims.dp)
        self.batches = PackedBatchStream(ensure_data(cfg), t.seq_len, t.micro_batch_size,
                                    dp_rank=self.mesh["batch"].get_local_rank(), dp_size=dims.dp, seed=t.seed)
        self.step = 0
        self.n_params = count_parameters(cfg.model)  # the whole model, whatever this rank holds
        self.flops_per_token = flops_per_token(cfg.model, self.n_params, t.seq_len)
        self.ckpt_root = os.path.join(cfg.run.dir, "checkpoints")
        c = cfg.checkpoint
        self.checkpointer = checkpoint.Checkpointer(self.ckpt_root, keep_last=c.keep_last, keep_every=c.keep_every,
                                                    async_save=c.async_save, fallback_to_previous=c.fallback_to_previous,
                                                    config=dataclasses.asdict(cfg))
        self.saved_step = -1
        self.skipped_steps, self.skipped_in_a_row = 0, 0
        self.stop_signal: int | None = None  # set by SIGTERM/SIGUSR1: checkpoint at the next step boundary
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.stop_signal = signum  # only a flag: the save happens between steps, on every rank together

    # -- checkpoints -------------------------------------------------------------------------
    def state_extra(self) -> dict:
        return {"step": self.step, "scheduler": self.scheduler.state_dict(), "data": self.batches.state_dict()}

    def save(self) -> str:
        path = checkpoint.step_dir(self.ckpt_root, self.step)
        if self.saved_step != self.step:  # e.g. the final save right after an interval save
            path = self.checkpointer.save(self.step, self.model, self.optimizer, self.state_extra())
            self.saved_step = self.step
        return path

    def maybe_resume(self) -> None:
        """Resume from the run's own `latest` (verified), else from checkpoint.load if set. A
        model-only checkpoint (e.g. converted from Hugging Face) starts at step 0, fresh optimizer."""
        path = self.checkpointer.resume_path(self.cfg.checkpoint.load)
        if path:
            extra = self.checkpointer.load(path, self.model, self.optimizer, self.state_extra())
            if extra is None:
                if dist.get_rank() == 0:
                    log.info("loaded model weights from %s (model-only): step 0, fresh optimizer", path)
                return
            self.step = extra["step"]
            self.scheduler.load_state_dict(extra["scheduler"])
            self.batches.load_state_dict(extra["data"])
            if dist.get_rank() == 0:
                log.info("resumed from %s at step %d", path, self.step)

    # -- one step ----------------------------------------------------------------------------
    def forward_backward(self, batch: dict) -> torch.Tensor:
        """Summed cross-entropy of one micro-batch; backward of its share of the mean loss."""
        # context parallel: keep this rank's chunks i and 2cp-1-i of each row (T/cp tokens) and their
        # global positions for RoPE (parallel/context.py); unchanged, positions None, when cp == 1
        batch = cp_shard_batch(batch, self.mesh)
        positions = batch["positions"].to(self.device) if "positions" in batch else None  # (T/cp,)
        tokens = batch["input_ids"].to(self.device)  # (B, T/cp)
        labels = batch["labels"].to(self.device)  # (B, T/cp)
        logits = self.model(tokens, positions=positions, document_ids=batch["document_ids"].to(self.device))
        loss_sum = self.loss_fn(logits, labels)
        # the LOCAL token count: FSDP then averages gradients over dp x cp, which gives the global mean
        local_tokens = self.n_micro * labels.numel()
        (loss_sum / local_tokens).backward()
        return loss_sum.detach()

    def train_step(self) -> dict[str, float]:
        start = time.perf_counter()
        loss_sum = torch.zeros((), device=self.device)
        if self.pipeline is not None:  # PP: the schedule runs every micro-batch through this rank's stages
            loss_sum = self.pipeline.step([self.batches.next_batch() for _ in range(self.n_micro)], self.cfg.run.dir)
        else:
            for _ in range(self.n_micro):
                loss_sum += self.forward_backward(self.batches.next_batch())
        # global norm: DTensor shards reduced over dp/tp, squared norms summed over pp
        grad_norm = clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip or float("inf"), self.mesh)
        lr = self.scheduler.get_last_lr()[0]
        # a non-finite loss or gradient norm on any rank: every rank drops this step's gradients
        skip = torch.tensor(float(not (torch.isfinite(grad_norm).all() and torch.isfinite(loss_sum).all())),
                            device=self.device)
        dist.all_reduce(skip, op=dist.ReduceOp.MAX)
        if skip.item():
            self.skipped_steps, self.skipped_in_a_row = self.skipped_steps + 1, self.skipped_in_a_row + 1
        else:
            self.optimizer.step()
            self.skipped_in_a_row = 0
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        # metrics: the mean loss over all tokens of the global batch, reduced over the "loss" mesh
        dist.all_reduce(loss_sum, group=self.mesh["loss"].get_group())
        elapsed = time.perf_counter() - start
        tokens = self.cfg.train.tokens_per_step
        tflops = self.flops_per_token * tokens / elapsed / dist.get_world_size() / 1e12
        peak = device_peak_flops()
        return {"loss": loss_sum.item() / tokens, "lr": lr, "grad_norm": grad_norm.item(),
                "tokens_per_s": tokens / elapsed, "tflops_per_device": tflops,
                "mfu": tflops * 1e12 / peak if peak else None, "step_time_s": elapsed}

    # -- the loop ----------------------------------------------------------------------------
    def train(self) -> int:
        cfg, rank0 = self.cfg, dist.get_rank() == 0
        writer = MetricsWriter(cfg.run.dir, cfg.run.tensorboard) if rank0 else None
        request = os.path.join(cfg.run.dir, "checkpoint_request")
        bar = tqdm(total=cfg.train.steps, initial=self.step, disable=not (rank0 and cfg.run.progress),
                   desc="train", unit="step", dynamic_ncols=True)
        while self.step < cfg.train.steps:
            values = self.train_step()
            values["skipped_steps"] = self.skipped_steps
            if self.skipped_in_a_row >= cfg.train.max_skipped_steps:
                message = (f"stopping at step {self.step}: {self.skipped_in_a_row} steps in a row had a non-finite "
                           f"loss or gradient norm (train.max_skipped_steps={cfg.train.max_skipped_steps}); "
                           f"lower train.lr or resume from an earlier checkpoint")
                if rank0:
                    log.error(message)
                    print(f"gigatron: {message}", file=sys.stderr)
                self.checkpointer.wait()
                return NON_FINITE_EXIT_CODE
            bar.update(1)
            bar.set_postfix(loss=f"{values['loss']:.3f}", tok_s=f"{values['tokens_per_s']:,.0f}")
            if rank0:
                writer.write(self.step, values)
                if self.step % cfg.run.log_every == 0:
                    bar.write(format_step(self.step, cfg.train.steps, values))
            requested = torch.tensor(float(os.path.exists(request) or self.stop_signal is not None))
            dist.all_reduce(requested, op=dist.ReduceOp.MAX)  # every rank must agree to stop
            if requested.item():
                path = self.save()
                self.checkpointer.wait()
                if rank0 and os.path.exists(request):
                    os.remove(request)
                    log.info("checkpoint requested: saved %s, exiting for requeue", path)
                return REQUEUE_EXIT_CODE
            if cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0:
                self.save()
        bar.close()
        path = self.save()
        self.checkpointer.wait()
        if rank0:
            writer.close()
            log.info("finished %d steps; checkpoint %s", self.step, path)
        return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gigatron.core.train", description=__doc__.split("\n")[0])
    parser.add_argument("recipe", help="path to a YAML recipe, e.g. recipes/llama3_debug.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe field, e.g. --set train.steps=10 (repeatable)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO,
                        format=f"[%(asctime)s rank{rank}] %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = load_config(args.recipe, args.overrides, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as err:
        print(f"gigatron: {err}", file=sys.stderr)
        return 2
    if not cfg.run.dir:
        cfg.run.dir = os.path.join("runs", os.path.splitext(os.path.basename(args.recipe))[0])
    torch.set_num_threads(max(1, torch.get_num_threads()))
    dims = init_distributed(cfg.parallel)
    try:
        trainer = Trainer(cfg, dims)
        trainer.maybe_resume()
        code = trainer.train()
    except ConfigError as err:
        print(f"gigatron: {err}", file=sys.stderr)
        code = 2
    dist.barrier()
    dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
