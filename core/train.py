"""The trainer: `torchrun --nproc-per-node=N -m gigatron.core.train RECIPE [--set key=value ...]`.

The trainer knows no model: the recipe's `model.name` selects a family (core/family.py), which
builds the model, plans its parallelism and owns the objective; `data.format` selects the reader
(data_pipeline/loader.py). One step:

    micro-batches -> objective.prepare -> split over cp -> N = sum of objective.count, all-reduced
    over the "loss" mesh (dp x cp) -> forward/backward of loss_sum * (dp*cp)/N per micro-batch
    (FSDP averages gradients over dp x cp; gradients accumulate in FP32) -> clip the global norm ->
    AdamW at lr(step) -> metrics reduced over the "loss" mesh

so the gradient is that of the mean over all N loss terms of the global batch, whatever each rank's
share of N. Pipeline parallel (pp > 1, parallel/pipeline.py): `self.model` is the rank's part of
the model (full parameter names) and the schedule runs every micro-batch through the rank's stages.

Multi-stage recipes (`stages:` in the recipe, core/config.py): `main` runs the stages in order, each
a Trainer of its own config, checkpointing under checkpoints/<stage>/ and starting from the
previous stage's last checkpoint (modules it adds start fresh, modules it drops are left behind).

Exit codes: 0 finished; 2 bad recipe or data; 3 too many non-finite steps in a row
(train.max_skipped_steps); 42 checkpointed on request (a `checkpoint_request` file in the run
folder, or SIGTERM/SIGUSR1 from the scheduler): the launcher requeues the job, which resumes.
Monitoring (core/monitoring.py): per-rank compute times and stragglers every run.straggler_every
steps; a `profile_request` file in the run folder profiles the next run.profile_steps steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from gigatron.core import checkpoint, faults, goodput, heartbeat
from gigatron.core.config import Config, ConfigError, load_config
from gigatron.core.ema import EMA
from gigatron.core.family import ModelFamily, get_family
from gigatron.core.metrics import MetricsWriter, Progress, device_peak_flops, format_step
from gigatron.core.monitoring import StepMonitor
from gigatron.core.optim import build_optimizer, lr_at, set_lr
from gigatron.parallel.comm import all_reduce
from gigatron.parallel.context import cp_shard_batch
from gigatron.parallel.mesh import ParallelDims, device_type, init_distributed
from gigatron.parallel.parallelize import init_weights, parallelize, precision_policy
from gigatron.parallel.pipeline import build_pipeline, clip_grad_norm_

log = logging.getLogger("gigatron")
REQUEUE_EXIT_CODE = 42
NON_FINITE_EXIT_CODE = 3


def compute_dtype(cfg: Config) -> torch.dtype:
    if cfg.train.dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, cfg.train.dtype)


def build_model(cfg: Config, dims: ParallelDims, family: ModelFamily, objective, device: torch.device):
    """Build on the meta device, parallelize, then allocate only this rank's shards and init them.
    With pp > 1 the model is the rank's part of the blocks, run by the returned pipeline's stages."""
    def apply(module):
        return parallelize(module, dims, cfg, family, compute_dtype(cfg))

    def init(module):
        init_weights(module, family, cfg, cfg.train.seed)

    if dims.pp > 1:
        n_micro = cfg.train.global_batch_size // (cfg.train.micro_batch_size * dims.dp)
        return build_pipeline(cfg, dims, device, family, objective, apply, init, n_micro)
    with torch.device("meta"):
        model = family.build(cfg.model)
    model = apply(model)
    model.to_empty(device=device)
    init(model)
    return model, None


def peak_memory_gb() -> float:
    """This rank's peak memory so far: the CUDA allocator's peak on a GPU, the process's peak RSS on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class Trainer:
    """One stage of a run: the model, optimizer, data and loop for `cfg` (a resolved stage config).

    Args: stage_name: "" for a one-stage recipe, else the stage's name (its checkpoint folder);
    schedule_start: the global step where this stage's LR schedule starts (0 unless the stage
    restarts it); init_from: a checkpoint to start from when this stage has none of its own."""

    def __init__(self, cfg: Config, dims: ParallelDims, stage_name: str = "", schedule_start: int = 0,
                 init_from: str = "", fresh_optimizer: bool = False):
        self.cfg, self.dims, self.mesh = cfg, dims, dims.mesh
        self.family = get_family(cfg.model.name)
        self.device = torch.device(device_type(), torch.cuda.current_device() if torch.cuda.is_available() else None)
        torch.manual_seed(cfg.train.seed)
        self.objective = self.family.objective(cfg, self.mesh)
        if dist.get_rank() == 0:
            log.info("precision: %s", precision_policy(compute_dtype(cfg)))
        self.model, self.pipeline = build_model(cfg, dims, self.family, self.objective, self.device)
        if cfg.train.deterministic:  # the same accumulation order in every run: bitwise resume on GPUs too
            torch.use_deterministic_algorithms(True, warn_only=True)
            for module in self.model.modules():
                if getattr(module, "attention_core", False):
                    module.deterministic = True
        self.optimizer = build_optimizer(self.model, cfg.train, self.family.no_decay)
        self.ema = EMA(self.model, cfg.train.ema_decay) if cfg.train.ema_decay else None  # weights' EMA (core/ema.py)
        self.schedule_start = schedule_start
        t = cfg.train
        self.n_micro = t.global_batch_size // (t.micro_batch_size * dims.dp)
        self.dp_rank = self.mesh["batch"].get_local_rank()
        from gigatron.data_pipeline.loader import build_loader  # readers are imported only when used

        self.loader = build_loader(cfg, "train", self.dp_rank, dims.dp)
        self.eval_loader = build_loader(cfg, "eval", self.dp_rank, dims.dp) if t.eval_every else None
        self.step = 0
        self.flops_per_sample = self.family.flops_per_sample(cfg)  # the whole model, whatever this rank holds
        self.stage_name, self.init_from, self.fresh_optimizer = stage_name, init_from, fresh_optimizer
        self.ckpt_root = os.path.join(cfg.run.dir, "checkpoints", stage_name)
        c = cfg.checkpoint
        self.checkpointer = checkpoint.Checkpointer(self.ckpt_root, keep_last=c.keep_last, keep_every=c.keep_every,
                                                    async_save=c.async_save, fallback_to_previous=c.fallback_to_previous,
                                                    config=dataclasses.asdict(cfg))
        self.saved_step = -1
        # checkpoint.interval=auto: Young/Daly from the measured save time and cluster.mtbf_hours
        self.auto_interval = goodput.AutoInterval(cfg.cluster.mtbf_hours) if c.interval == "auto" else None
        self.interval_from = 0  # the step the auto interval counts from (the last save, or the resumed step)
        self.skipped_steps, self.skipped_in_a_row = 0, 0
        self.data_wait = 0.0  # seconds spent in loader.next_batch during the current step
        self.stop_signal: int | None = None  # set by SIGTERM/SIGUSR1: checkpoint at the next step boundary
        self.stop_requested = False
        self.request_file = os.path.join(cfg.run.dir, "checkpoint_request")
        self.monitor = StepMonitor(cfg, self.mesh, self.device)  # stragglers, on-demand profiling (core/monitoring.py)
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.stop_signal = signum  # only a flag: the save happens between steps, on every rank together

    # -- checkpoints -------------------------------------------------------------------------
    def state_extra(self, data_layout: int | None = None) -> dict:
        """What a checkpoint holds besides model and optimizer. The loader's position is saved per
        data-parallel rank (`data.dp<r>`; the tp/cp/pp ranks of one dp rank read the same stream).
        data_layout: the saved dp size, to load every old rank's position (readers that re-split
        their streams, `resume_from_layout`) or only this rank's (the others)."""
        state = self.loader.state_dict()
        if data_layout is None or (data_layout == self.dims.dp and not hasattr(self.loader, "resume_from_layout")):
            data = {f"dp{self.dp_rank}": state}
        else:
            data = {f"dp{r}": state for r in range(data_layout)}
        ema = {"ema": self.ema.state_dict()} if self.ema is not None else {}
        return {"step": self.step, "data_dp_size": self.dims.dp, "data": data, **ema}

    def save(self) -> str:
        path = checkpoint.step_dir(self.ckpt_root, self.step)
        if self.saved_step != self.step:  # e.g. the final save right after an interval save
            start = time.perf_counter()
            with heartbeat.phase("checkpoint"):
                path = self.checkpointer.save(self.step, self.model, self.optimizer, self.state_extra())
            self.saved_step = self.interval_from = self.step
            if self.auto_interval is not None:
                self._derive_interval(time.perf_counter() - start)
        return path

    def _derive_interval(self, save_s: float) -> None:
        """checkpoint.interval=auto: every rank must pick the same interval, so the measured save time
        and the median step time are the slowest rank's (one all-reduce MAX of two scalars)."""
        auto = self.auto_interval
        measured = torch.tensor([save_s, auto.median_step()], device=self.device, dtype=torch.float64)
        dist.all_reduce(measured, op=dist.ReduceOp.MAX)
        before = auto.interval
        steps, tau = auto.observe_save(*measured.tolist())
        if dist.get_rank() == 0 and steps != before:
            log.info("checkpoint.interval=auto: save %.3g s, step %.3g s, MTBF %.3g h -> Young/Daly interval "
                     "%.3g s = every %d steps", auto.save_s, auto.step_s, auto.mtbf_s / 3600, tau, steps)

    def checkpoint_due(self) -> bool:
        interval = self.cfg.checkpoint.interval
        if self.auto_interval is not None:
            return self.step - self.interval_from >= self.auto_interval.interval
        return bool(interval) and self.step % interval == 0

    def _load_data_state(self, extra: dict, legacy: bool, saved_dp: int) -> None:
        if legacy:  # written before per-rank data state: one global stream position
            self.loader.load_state_dict(extra["data"])
        elif hasattr(self.loader, "resume_from_layout"):  # also right when only num_workers changed
            self.loader.resume_from_layout([extra["data"][f"dp{r}"] for r in range(saved_dp)])
        elif saved_dp == self.dims.dp:
            self.loader.load_state_dict(extra["data"][f"dp{self.dp_rank}"])
        else:
            raise ConfigError("parallel.dp", f"the checkpoint was written with dp={saved_dp} and this run has "
                                             f"dp={self.dims.dp}, which the '{self.cfg.data.format}' reader cannot "
                                             f"re-split; resume with parallel.dp={saved_dp}")

    def maybe_resume(self) -> None:
        """Resume from this stage's own `latest` (verified); else start from `init_from` (the previous
        stage's checkpoint: weights, and optimizer state unless the stage is fresh), else from
        checkpoint.load. A model-only checkpoint (e.g. converted from Hugging Face) starts at step 0."""
        own = checkpoint.latest(self.ckpt_root)
        path = self.checkpointer.resume_path("" if own else (self.init_from or self.cfg.checkpoint.load))
        if not path:
            return
        keys = checkpoint.keys_of(path)
        if not own and self.init_from:  # a new stage: the previous stage's weights, matched by name
            optimizer = None if self.fresh_optimizer else self.optimizer
            extra = checkpoint.load(path, self.model, optimizer, {"step": 0}, verify=False, strict=False)
            self.step = extra["step"] if extra else 0
            if dist.get_rank() == 0:
                log.info("stage %s starts at step %d from %s%s", self.stage_name, self.step, path,
                         " (fresh optimizer)" if self.fresh_optimizer else "")
            return
        legacy = "extra.data.samples_consumed" in keys
        saved_dp = 0 if legacy else checkpoint.load_value(path, "extra.data_dp_size")
        template = {"step": 0, "data": self.loader.state_dict()} if legacy else self.state_extra(saved_dp)
        extra = self.checkpointer.load(path, self.model, self.optimizer, template)
        if extra is None:
            if dist.get_rank() == 0:
                log.info("loaded model weights from %s (model-only): step 0, fresh optimizer", path)
            return
        self.step = extra["step"]
        self._load_data_state(extra, legacy, saved_dp)
        if dist.get_rank() == 0:
            log.info("resumed from %s at step %d", path, self.step)

    # -- one step ----------------------------------------------------------------------------
    def next_batch(self, loader=None) -> dict:
        """The next micro-batch: read (timed: the data wait), prepared by the objective, split over cp."""
        start = time.perf_counter()
        batch = (loader or self.loader).next_batch()
        self.data_wait += time.perf_counter() - start
        batch = self.objective.prepare(batch)
        batch = cp_shard_batch(batch, self.mesh, self.objective.sequence_keys, self.family.plan.causal)
        return _to(batch, self.device)

    def global_count(self, batches: list[dict]) -> torch.Tensor:
        """N: the loss terms of the whole global batch (one all-reduce of a scalar over dp x cp)."""
        count = torch.stack([self.objective.count(b).to(self.device, torch.float64) for b in batches]).sum()
        return all_reduce(count, self.mesh, "loss")

    def forward_backward(self, batch: dict, scale: float) -> torch.Tensor:
        """Loss sum of one micro-batch; backward of loss_sum * scale (scale = dp*cp / N)."""
        args, kwargs = self.objective.inputs(batch)
        output = self.model(*args, **kwargs)
        loss_sum = self.objective.loss(output, batch, self.model)
        (loss_sum * scale).backward()
        return loss_sum.detach()

    def train_step(self) -> dict[str, float]:
        start = time.perf_counter()
        self.data_wait = 0.0
        batches = [self.next_batch() for _ in range(self.n_micro)]
        count = self.global_count(batches)
        # FSDP divides the summed gradients by its dp x cp ranks; this undoes it and divides by N
        scale = self.dims.dp * self.dims.cp / count.clamp(min=1).item()
        if self.pipeline is not None:  # PP: the schedule runs every micro-batch through this rank's stages
            loss_sum = self.pipeline.step(batches, scale, self.cfg.run.dir)
        else:
            loss_sum = torch.zeros((), device=self.device)
            per_step = self.cfg.parallel.grad_sync == "per_step" and hasattr(self.model, "set_requires_gradient_sync")
            for i, batch in enumerate(batches):
                if per_step:  # FSDP: parameters stay gathered and unsharded FP32 gradients accumulate over
                    last = i == len(batches) - 1  # the micro-batches; one all-gather, one reduce-scatter per step
                    self.model.set_requires_gradient_sync(last)
                    self.model.set_reshard_after_backward(last)
                loss_sum += self.forward_backward(batch, scale)
        # global norm: DTensor shards reduced over dp/tp, squared norms summed over pp
        grad_norm = clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip or float("inf"), self.mesh)
        lr = lr_at(self.step - self.schedule_start, self.cfg.train)
        # one all-reduce (MAX, on the compute device: NCCL has no CPU tensors) of three flags: a non-finite
        # loss or gradient norm on any rank (every rank drops this step's gradients), a stop request
        # (SIGTERM/SIGUSR1 on any rank, or the request file, which only rank 0 looks for), a profiling request
        nonfinite = ~(torch.isfinite(grad_norm).all() & torch.isfinite(loss_sum).all())
        requested = self.stop_signal is not None or (dist.get_rank() == 0 and os.path.exists(self.request_file))
        flags = torch.stack([nonfinite.float(), torch.tensor(float(requested), device=self.device),
                             torch.tensor(float(self.monitor.request_seen()), device=self.device)])  # + profiling
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        skip, self.stop_requested, profile = flags.tolist()
        self.monitor.request_agreed(profile)
        if skip:
            self.skipped_steps, self.skipped_in_a_row = self.skipped_steps + 1, self.skipped_in_a_row + 1
        else:
            set_lr(self.optimizer, lr)
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update()
            self.skipped_in_a_row = 0
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        # metrics: the mean loss over all loss terms of the global batch, reduced over the "loss" mesh
        all_reduce(loss_sum, self.mesh, "loss")
        elapsed = time.perf_counter() - start
        samples = self.cfg.train.global_batch_size
        units = samples * self.family.units_per_sample(self.cfg)
        tflops = self.flops_per_sample * samples / elapsed / dist.get_world_size() / 1e12
        peak = device_peak_flops()
        return {"loss": loss_sum.item() / max(count.item(), 1), "lr": lr, "grad_norm": grad_norm.item(),
                f"{self.family.samples_unit}_per_s": units / elapsed, "tflops_per_device": tflops,
                "mfu": tflops * 1e12 / peak if peak else None, "step_time_s": elapsed,
                "data_wait_fraction": self.data_wait / elapsed, "peak_memory_gb": peak_memory_gb()}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean held-out loss (and the family's metrics) over train.eval_batches micro-batches per rank."""
        self.model.eval()  # (validate() refuses eval_every with pp > 1)
        totals: dict[str, list[torch.Tensor]] = {}
        for _ in range(self.cfg.train.eval_batches):
            batch = self.next_batch(self.eval_loader)
            args, kwargs = self.objective.inputs(batch)
            output = self.model(*args, **kwargs)
            pairs = {"loss": (self.objective.loss(output, batch, self.model), self.objective.count(batch))}
            pairs.update(self.objective.metrics(output, batch))
            for name, (value, n) in pairs.items():
                acc = totals.setdefault(name, [torch.zeros((), device=self.device, dtype=torch.float64)] * 2)
                totals[name] = [acc[0] + value.double(), acc[1] + n.double()]
        self.model.train()
        packed = torch.stack([v for pair in totals.values() for v in pair])
        all_reduce(packed, self.mesh, "loss")
        return {f"eval_{name}": (packed[2 * i] / packed[2 * i + 1].clamp(min=1)).item()
                for i, name in enumerate(totals)}

    # -- the loop ----------------------------------------------------------------------------
    def train(self, until: int | None = None) -> int:
        cfg, rank0 = self.cfg, dist.get_rank() == 0
        until = cfg.train.steps if until is None else until
        writer = MetricsWriter(cfg.run.dir, cfg.run.tensorboard) if rank0 else None
        request = self.request_file
        bar = Progress(until, self.step, rank0 and cfg.run.progress, self.stage_name or "train", cfg.run.progress_every)
        ledger = goodput.Goodput(cfg.run.dir, self.step) if rank0 else None  # effective training time
        self.interval_from = self.step
        heartbeat.set_phase("first_step")  # a slow phase: warm-up, torch.compile
        while self.step < until:
            faults.at_step(self.step)  # drills only (core/faults.py)
            self.monitor.begin(self.step + 1)
            values = self.train_step()
            values.update(self.monitor.end(self.step))
            heartbeat.progress(self.step)
            if self.auto_interval is not None:
                self.auto_interval.observe_step(values["step_time_s"])
                auto = self.auto_interval  # the Young/Daly choice in force, and what it was derived from
                values.update(checkpoint_interval=auto.interval, checkpoint_save_s=auto.save_s,
                              checkpoint_step_s=auto.step_s)
            if ledger is not None:
                values.update(ledger.update(values["step_time_s"]))
            values["skipped_steps"] = self.skipped_steps
            values.update({k: v for k, v in self.loader.stats().items()})
            if cfg.train.eval_every and self.step % cfg.train.eval_every == 0:
                with heartbeat.phase("eval"):
                    values.update(self.evaluate())
            if self.stage_name:
                values["stage"] = self.stage_name
            if self.skipped_in_a_row >= cfg.train.max_skipped_steps:
                message = (f"stopping at step {self.step}: {self.skipped_in_a_row} steps in a row had a non-finite "
                           f"loss or gradient norm (train.max_skipped_steps={cfg.train.max_skipped_steps}); "
                           f"lower train.lr or resume from an earlier checkpoint")
                if rank0:
                    log.error(message)
                    print(f"gigatron: {message}", file=sys.stderr)
                self.checkpointer.wait()
                return NON_FINITE_EXIT_CODE
            bar.update(self.step, values)
            if rank0:
                writer.write(self.step, values)
                if self.step % cfg.run.log_every == 0:
                    bar.write(format_step(self.step, cfg.train.steps, values))
            if self.stop_requested:  # agreed by every rank in train_step
                path = self.save()
                self.checkpointer.wait()
                if rank0 and os.path.exists(request):
                    os.remove(request)
                    log.info("checkpoint requested: saved %s, exiting for requeue", path)
                return REQUEUE_EXIT_CODE
            if self.checkpoint_due():
                self.save()
        bar.close()
        self.monitor.close()
        heartbeat.set_phase("shutdown")
        path = self.save()
        self.checkpointer.wait()
        for loader in (self.loader, self.eval_loader):
            if hasattr(loader, "close"):
                loader.close()
        if rank0:
            writer.close()
            log.info("finished %d steps%s; checkpoint %s", self.step,
                     f" of stage {self.stage_name}" if self.stage_name else "", path)
        return 0


def run_stages(cfg: Config, dims: ParallelDims) -> int:
    """Train a recipe: its stages in order (or the recipe itself), each resuming where it stopped."""
    if not cfg.stages:
        trainer = Trainer(cfg, dims)
        trainer.maybe_resume()
        return trainer.train()
    previous, start = "", 0
    for stage, stage_cfg in zip(cfg.stages, cfg.resolved_stages):
        stage_cfg.run.dir = cfg.run.dir
        root = os.path.join(cfg.run.dir, "checkpoints", stage.name)
        done = checkpoint.latest(root)
        if done and checkpoint.step_of(done) >= stage.until_step:  # finished in an earlier attempt
            previous, start = done, stage.until_step
            continue
        schedule_start = start if stage.fresh_optimizer else 0
        trainer = Trainer(stage_cfg, dims, stage.name, schedule_start, init_from=previous,
                          fresh_optimizer=stage.fresh_optimizer)
        trainer.maybe_resume()
        code = trainer.train(until=stage.until_step)
        if code:
            return code
        previous, start = checkpoint.latest(root), stage.until_step
        del trainer
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
    dims = init_distributed(cfg.parallel, cfg.cluster)
    faults.install(cfg.run.dir, dist.get_rank())  # inert unless a drill opts in (core/faults.py)
    heartbeat.start(cfg.cluster, cfg.run.dir, dims.groups())  # hang detection (core/heartbeat.py)
    from gigatron.data_pipeline.loader import DataError

    try:
        code = run_stages(cfg, dims)
    except (ConfigError, DataError) as err:  # a bad recipe or too much bad data: one line, no traceback
        print(f"gigatron: {err}", file=sys.stderr)
        code = 2
    heartbeat.set_phase("shutdown")
    dist.barrier()
    heartbeat.stop()
    dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
