"""The recipe schema: one dataclass per YAML section, and `validate()` for cross-field rules.

A recipe is data (`recipes/*.yaml`). `load_config(path, overrides, world_size)` returns a checked
`Config` or raises `ConfigError` before any process group exists, so `cluster/launch.sh` can refuse
a bad layout in seconds. Every field carries a one-line comment: unit, meaning, why the default.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from gigatron.core.config_loader import ConfigError, apply_overrides, build, load_yaml, set_path
from gigatron.data_pipeline.config import DataConfig


@dataclass
class ParallelConfig:
    tp: int = 1                           # tensor parallel degree (innermost: NVLink)
    cp: int = 1                           # context parallel degree
    pp: int = 1                           # pipeline stages
    dp: int = 1                           # data parallel degree (FSDP shards within it)
    dp_replicate: int = 1                 # HSDP: replica groups; dp must be a multiple of it
    sequence_parallel: bool = True        # shard norm/residual activations over tp along the sequence
    pp_virtual_stages: int = 1            # model chunks per pipeline rank (interleaved schedule)
    pp_schedule: Literal["1f1b", "interleaved_1f1b", "gpipe", "zero_bubble"] = "1f1b"
    pp_first_last_fewer_layers: int = 1   # Llama 3: first/last stage hold one layer less (embedding, loss)
    pp_timeline_step: int = 2             # record this step's pipeline timeline to run.dir (1-based; 0 = never); 2 skips warm-up
    cp_mode: Literal["auto", "allgather", "ring"] = "auto"  # auto: allgather if causal, ring if bidirectional
    reshard_after_forward: bool = False   # Llama 3: keep gathered weights for backward (no 2nd all-gather)
    activation_checkpoint: Literal["none", "selective", "full"] = "none"
    full_recompute_every: int = 0         # layer-wise mixed recompute: the blocks at positions 0, K, 2K, ...
    # of each pipeline rank get full recompute, the others activation_checkpoint (0 = off; parallel/checkpointing.py)
    grad_sync: Literal["per_step", "per_microbatch"] = "per_step"  # FSDP gradient reduce-scatter: once per
    # step (unsharded FP32 gradients accumulate over the micro-batches) or after every micro-batch (less
    # memory, n_micro x the bytes). Pipeline stages always reduce once per step.

    @property
    def world_size(self) -> int:
        return self.tp * self.cp * self.pp * self.dp


@dataclass
class TrainConfig:
    steps: int = 1000                     # optimizer steps
    seq_len: int = 8192                   # tokens (or patches) per sample
    global_batch_size: int = 2048         # samples per optimizer step, all ranks together
    micro_batch_size: int = 1             # samples per forward/backward on one rank
    lr: float = 3e-4                      # peak learning rate
    min_lr: float = 3e-6                  # floor of the cosine decay
    warmup_steps: int = 2000              # linear warm-up from 0 to lr
    decay_steps: int = 0                  # cosine decay length after warm-up; 0 = until `steps`
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0                # max global grad norm; 0 disables
    seed: int = 0                         # seeds init, data order and dropout
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 compute on GPU, fp32 on CPU
    compile: bool = False                 # torch.compile each block
    deterministic: bool = False           # bitwise-reproducible kernels (fixed attention tiles, torch deterministic algorithms)
    max_skipped_steps: int = 5            # stop after this many non-finite loss/grad steps in a row
    eval_every: int = 0                   # evaluate on the held-out split every N steps; 0 = never
    eval_batches: int = 4                 # micro-batches per rank in one evaluation
    ema_decay: float = 0.0                # EMA of the weights (core/ema.py), updated after each step, in checkpoints; 0 = off

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_len


@dataclass
class CheckpointConfig:
    interval: int | Literal["auto"] = 0   # save every N steps; 0 = only at the end; "auto": Young/Daly from the
    # measured save time and cluster.mtbf_hours (core/goodput.py), re-derived after every save and logged
    keep_last: int = 3                    # retention: newest K checkpoints are kept
    load: str = ""                        # a checkpoint to start from when the run has none of its own yet
    keep_every: int = 0                   # retention: also keep every step divisible by N; 0 = none
    async_save: bool = False              # write in a background thread (dcp.async_save); commit at next save
    fallback_to_previous: bool = False    # a checkpoint failing verification: resume from the previous good one


@dataclass
class ClusterConfig:
    """Recovery without a person (cluster/supervisor.py, core/heartbeat.py)."""

    max_restarts: int = 3                 # automatic restarts after a failure, all attempts (and requeues) of the run together
    max_restarts_per_hour: int = 6        # rate limit: a run failing faster than this stops instead of crash-looping
    exclude_failed_nodes: int = 0         # SLURM: requeue without the node whose rank failed first, up to N nodes a run
    heartbeat_s: float = 5.0              # seconds between heartbeats through the rendezvous store (TCPStore)
    hang_timeout_s: float = 120.0         # a rank without progress this long during steps is stuck: torn down, restarted
    slow_phase_timeout_s: float = 900.0   # the same in slow phases: start-up, the first step (compile), checkpoint
    # save, evaluation. Collectives time out a little later (core/heartbeat.py), so the watchdog names the rank
    mtbf_hours: float = 24.0              # expected time between interruptions of the whole job (checkpoint.interval=auto)


@dataclass
class Fp8Config:
    """FP8 matrix multiplies in the blocks' linears (parallel/fp8.py; the recipes in kernels/fp8.py)."""

    enabled: bool = False                 # FP8 GEMMs in the blocks' linear layers; everything else stays bf16
    backend: Literal["auto", "te", "torchao", "emulated"] = "auto"  # auto: te (tp=1) or torchao on an FP8 GPU,
    # else emulated (gigatron's Fp8Linear: quantize-dequantize on CPU, torch._scaled_mm on sm_89+)
    recipe: Literal["delayed", "tensorwise", "rowwise"] = "tensorwise"  # scale from: the amax history
    # (delayed, TE's default), this tensor's amax (tensorwise = current scaling), or each row's amax
    amax_history_len: int = 16            # delayed: steps of amax history behind each scale
    margin: int = 0                       # scales are multiplied by 2^-margin (headroom for amax growth)
    keep_bf16: list[str] = field(default_factory=lambda: ["{first}", "{last}"])  # module-name globs kept in
    # bf16 ("{first}" / "{last}": the first / last block, with everything inside); outside the blocks
    # (embeddings, output head) nothing is ever converted
    fsdp_float8_all_gather: bool = False  # FSDP2 all-gathers weights in float8 (torchao, tensorwise only)


@dataclass
class RunConfig:
    dir: str = ""                         # run directory; launch.sh sets one per job
    log_every: int = 1                    # steps between log lines
    tensorboard: bool = True              # write TensorBoard event files to dir/tb
    progress: bool = True                 # progress on rank 0: a live bar on a terminal, else a line every progress_every steps
    progress_every: int = 10              # steps between plain progress lines when stdout is not a terminal (torchrun, SLURM)
    straggler_every: int = 100            # time every rank's compute every N steps, flag stragglers (core/monitoring.py); 0 = never
    straggler_threshold: float = 0.10     # a straggler's compute time exceeds its pipeline stage's median by this fraction
    profile_steps: int = 3                # steps a `profile_request` file in run.dir profiles on every rank (core/monitoring.py)


@dataclass
class StageConfig:
    """One stage of a multi-stage recipe (Llama 3: 4K then 8K sequences; MAWS: MAE then supervised)."""

    name: str = ""                        # names the stage's checkpoint folder (checkpoints/<name>/)
    until_step: int = 0                   # global optimizer step at which the stage ends; the last ends at train.steps
    set: dict = field(default_factory=dict)  # overrides {"section.key": value} on top of the recipe
    fresh_optimizer: bool = False         # new optimizer state and LR schedule from the stage's start (new modules)


@dataclass
class Config:
    model: Any = None                     # the family's dataclass, chosen by model.name (core/family.py)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    fp8: Fp8Config = field(default_factory=Fp8Config)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    run: RunConfig = field(default_factory=RunConfig)
    stages: list[StageConfig] = field(default_factory=list)  # empty: one stage, the recipe itself
    # each stage's complete, validated config (filled by load_config; not a recipe key)
    resolved_stages: list = field(default_factory=list, init=False, repr=False, compare=False)


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def validate(cfg: Config, world_size: int | None = None) -> Config:
    """Cross-field rules of the layout and the schedule, then the family's own (model.*) rules.
    Each failure names the key, the value and a fix."""
    from gigatron.core.family import get_family

    family = get_family(cfg.model.name)
    p, t = cfg.parallel, cfg.train
    for key, value in [("parallel.tp", p.tp), ("parallel.cp", p.cp), ("parallel.pp", p.pp),
                       ("parallel.dp", p.dp), ("parallel.dp_replicate", p.dp_replicate),
                       ("parallel.pp_virtual_stages", p.pp_virtual_stages),
                       ("train.steps", t.steps), ("train.seq_len", t.seq_len),
                       ("train.global_batch_size", t.global_batch_size), ("train.micro_batch_size", t.micro_batch_size)]:
        _require(value >= 1, key, f"must be a positive integer, got {value}")
    if world_size is not None:
        model_parallel = p.tp * p.cp * p.pp
        fix = (f"set parallel.dp={world_size // model_parallel}" if world_size % model_parallel == 0 else
               f"the job size must be a multiple of tp*cp*pp={model_parallel}")
        _require(p.world_size == world_size, "parallel.dp",
                 f"tp*cp*pp*dp = {p.tp}*{p.cp}*{p.pp}*{p.dp} = {p.world_size} but the job has {world_size} "
                 f"processes; {fix}, or launch {p.world_size} processes")
    family.validate(cfg)  # the model's own rules (head counts against tp, ...) name model.* keys
    if family.plan.causal:  # load balancing under the causal mask: rank i holds chunks i and 2cp-1-i
        _require(t.seq_len % (2 * p.cp) == 0, "train.seq_len",
                 f"{t.seq_len} must be divisible by 2*cp={2 * p.cp} (context parallel splits it into 2*cp chunks)")
    else:
        _require(t.seq_len % p.cp == 0, "train.seq_len", f"{t.seq_len} must be divisible by cp={p.cp}")
    if p.sequence_parallel and p.tp > 1:
        chunk = t.seq_len // p.cp
        _require(chunk % p.tp == 0, "train.seq_len",
                 f"sequence parallel needs seq_len/cp={chunk} divisible by tp={p.tp}; "
                 f"set train.seq_len to a multiple of {p.tp * p.cp} or parallel.sequence_parallel=false")
    per_step = t.micro_batch_size * p.dp
    _require(t.global_batch_size % per_step == 0, "train.global_batch_size",
             f"{t.global_batch_size} is not divisible by micro_batch_size*dp = {t.micro_batch_size}*{p.dp}; "
             f"use a multiple of {per_step}")
    _require(p.dp % p.dp_replicate == 0, "parallel.dp_replicate",
             f"{p.dp_replicate} must divide parallel.dp={p.dp} (HSDP shards within dp/dp_replicate)")
    chunks = p.pp * p.pp_virtual_stages
    _require(p.pp_virtual_stages == 1 or p.pp_schedule in ("interleaved_1f1b", "zero_bubble"),
             "parallel.pp_schedule", f"'{p.pp_schedule}' runs one stage per rank; use interleaved_1f1b for "
             f"pp_virtual_stages={p.pp_virtual_stages}")
    if p.pp > 1:
        # every middle stage needs a block; the first and last may hold only the embedding / loss
        n_blocks = family.n_blocks(cfg.model)
        need = max(chunks - 2 * p.pp_first_last_fewer_layers, p.pp)
        _require(n_blocks >= need, "parallel.pp",
                 f"{n_blocks} blocks cannot fill pp*virtual_stages={chunks} stages "
                 f"(first/last hold {p.pp_first_last_fewer_layers} fewer); lower parallel.pp or pp_virtual_stages")
        n_micro = t.global_batch_size // per_step
        _require(n_micro >= p.pp, "train.global_batch_size",
                 f"gives {n_micro} micro-batches per step but the pipeline has {p.pp} stages; need at least "
                 f"{p.pp} (raise train.global_batch_size to {p.pp * per_step})")
        if p.pp_schedule in ("interleaved_1f1b", "zero_bubble"):
            # torch's flexible interleaved schedules run the micro-batches in max(1, m // pp) equal rounds
            ok = [k for k in range(p.pp, 3 * p.pp + 1) if k % max(1, k // p.pp) == 0]
            _require(n_micro % max(1, n_micro // p.pp) == 0, "train.global_batch_size",
                     f"gives {n_micro} micro-batches, which '{p.pp_schedule}' cannot split into "
                     f"{max(1, n_micro // p.pp)} equal rounds (needs m % max(1, m // pp) == 0); use m among {ok}, "
                     f"i.e. train.global_batch_size among {[k * per_step for k in ok]}")
        _require(p.pp_first_last_fewer_layers >= 0, "parallel.pp_first_last_fewer_layers",
                 f"{p.pp_first_last_fewer_layers} must be >= 0 (layers taken off the first and last stage)")
    _require(p.pp > 1 or p.pp_virtual_stages == 1, "parallel.pp_virtual_stages",
             f"{p.pp_virtual_stages} virtual stages need a pipeline; set parallel.pp > 1 or pp_virtual_stages=1")
    _require(type(p.full_recompute_every) is int and p.full_recompute_every >= 0, "parallel.full_recompute_every",
             f"{p.full_recompute_every!r} must be an integer >= 0: K > 0 gives full recompute to every K-th block of "
             f"each pipeline rank (and activation_checkpoint to the rest), 0 turns it off")
    _require(p.pp_timeline_step >= 0, "parallel.pp_timeline_step",
             f"{p.pp_timeline_step} must be >= 0 (a 1-based step number; 0 = no timeline)")
    _require(0 < t.lr < 1, "train.lr", f"{t.lr} is not a sensible peak learning rate; use a value in (0, 1)")
    _require(0 <= t.min_lr <= t.lr, "train.min_lr", f"{t.min_lr} must lie in [0, train.lr={t.lr}]")
    _require(0 <= t.warmup_steps <= t.steps, "train.warmup_steps",
             f"{t.warmup_steps} must lie in [0, train.steps={t.steps}]")
    _require(t.decay_steps >= 0, "train.decay_steps", f"{t.decay_steps} must be >= 0 (0 = decay until train.steps)")
    _require(0 <= t.beta1 < 1 and 0 <= t.beta2 < 1, "train.beta1", "Adam betas must lie in [0, 1)")
    _require(t.grad_clip >= 0 and math.isfinite(t.grad_clip), "train.grad_clip", f"{t.grad_clip} must be >= 0")
    c = cfg.cluster
    _require(cfg.checkpoint.interval == "auto" or cfg.checkpoint.interval >= 0, "checkpoint.interval",
             f"{cfg.checkpoint.interval} must be >= 0 (0 = only at the end) or 'auto'")
    _require(c.max_restarts >= 0 and c.max_restarts_per_hour >= 1 and c.exclude_failed_nodes >= 0,
             "cluster.max_restarts", "max_restarts and exclude_failed_nodes must be >= 0, max_restarts_per_hour >= 1")
    _require(0 < c.heartbeat_s < c.hang_timeout_s <= c.slow_phase_timeout_s, "cluster.hang_timeout_s",
             f"need 0 < heartbeat_s={c.heartbeat_s} < hang_timeout_s={c.hang_timeout_s} <= "
             f"slow_phase_timeout_s={c.slow_phase_timeout_s}")
    _require(c.mtbf_hours > 0, "cluster.mtbf_hours", f"{c.mtbf_hours} must be > 0 (hours between interruptions)")
    _require(0 <= t.ema_decay < 1, "train.ema_decay", f"{t.ema_decay} must lie in [0, 1) (0 = no EMA; diffusion: 0.9999)")
    r = cfg.run
    _require(r.straggler_every >= 0, "run.straggler_every", f"{r.straggler_every} must be >= 0 (0 = no straggler timing)")
    _require(r.straggler_threshold >= 0 and math.isfinite(r.straggler_threshold), "run.straggler_threshold",
             f"{r.straggler_threshold} must be >= 0 (0.10: 10% slower than the median)")
    _require(r.profile_steps >= 1, "run.profile_steps", f"{r.profile_steps} must be >= 1")
    _require(r.progress_every >= 1, "run.progress_every", f"{r.progress_every} must be >= 1")
    _require(t.eval_every >= 0, "train.eval_every", f"{t.eval_every} must be >= 0 (0 = no evaluation)")
    _require(t.eval_every == 0 or t.eval_batches >= 1, "train.eval_batches",
             f"{t.eval_batches} must be >= 1 when train.eval_every={t.eval_every}")
    _require(t.eval_every == 0 or p.pp == 1, "train.eval_every",
             f"evaluation under pipeline parallelism (pp={p.pp}) is not supported yet; set train.eval_every=0")
    _require(t.eval_every == 0 or cfg.data.eval_fraction > 0, "data.eval_fraction",
             f"evaluation (train.eval_every={t.eval_every}) needs a held-out split: set data.eval_fraction > 0")
    if cfg.fp8.enabled:
        from gigatron.parallel.fp8 import validate_fp8

        validate_fp8(cfg, family)  # backend / recipe / layout rules, naming fp8.* keys (parallel/fp8.py)
    return cfg


def _build(data: dict) -> Config:
    """Build the typed Config; the model section's class is the one of the family model.name names."""
    from gigatron.core.family import get_family

    data = dict(data)
    model = data.pop("model", None) or {}
    if not isinstance(model, dict):
        raise ConfigError("model", f"got {model!r}; expected a mapping of model fields")
    family = get_family(model.get("name", "llama3"))
    cfg = build(Config, data)
    cfg.model = build(family.config, model, prefix="model.")
    if "format" not in (data.get("data") or {}):
        cfg.data.format = family.data_format
    return cfg


def _stage_data(data: dict, stage: StageConfig) -> dict:
    out = copy.deepcopy(data)
    out.pop("stages", None)
    for key, value in stage.set.items():
        set_path(out, str(key), copy.deepcopy(value))
    return out


def load_config(path: str, overrides: list[str] | None = None, world_size: int | None = None) -> Config:
    """Read a recipe, apply `section.key=value` overrides, build and validate the typed config, and
    every stage's (each stage = the recipe plus its `set`; errors name `stages[i].set.<key>`)."""
    data = apply_overrides(load_yaml(path), overrides or [])
    cfg = validate(_build(data), world_size)
    previous_end = 0
    for i, stage in enumerate(cfg.stages):
        key = f"stages[{i}]"
        _require(bool(stage.name) and stage.name.replace("_", "").replace("-", "").isalnum(), f"{key}.name",
                 f"{stage.name!r}: give each stage a name of letters, digits, '-' or '_' (it names a folder)")
        _require(stage.name not in [s.name for s in cfg.stages[:i]], f"{key}.name", f"{stage.name!r} is used twice")
        last = i == len(cfg.stages) - 1
        end = cfg.train.steps if last else stage.until_step
        _require(last or previous_end < end < cfg.train.steps, f"{key}.until_step",
                 f"{stage.until_step} must lie in ({previous_end}, train.steps={cfg.train.steps}): stages run in order")
        _require(not last or stage.until_step in (0, cfg.train.steps), f"{key}.until_step",
                 f"the last stage ends at train.steps={cfg.train.steps}; drop until_step or set it to that")
        stage.until_step = end
        previous_end = end
        try:
            stage_data = _stage_data(data, stage)
            resolved = validate(_build(stage_data), world_size)
        except ConfigError as err:
            if err.key.startswith("stages["):
                raise
            raise ConfigError(f"{key}.set.{err.key}", str(err).split(": ", 1)[-1]) from None
        _require(resolved.train.steps == cfg.train.steps, f"{key}.set.train.steps",
                 "a stage cannot change train.steps (the whole run's length); set the stage's until_step")
        cfg.resolved_stages.append(resolved)
    return cfg
