"""The recipe schema: one dataclass per YAML section, and `validate()` for cross-field rules.

A recipe is data (`recipes/*.yaml`). `load_config(path, overrides, world_size)` returns a checked
`Config` or raises `ConfigError` before any process group exists, so `cluster/launch.sh` can refuse
a bad layout in seconds. Every field carries a one-line comment: unit, meaning, why the default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from gigatron.core.config_loader import ConfigError, apply_overrides, build, load_yaml


@dataclass
class ModelConfig:
    name: Literal["llama3"] = "llama3"   # architecture family (Movie Gen and ViT slot in here)
    dim: int = 4096                       # model width d
    n_layers: int = 32                    # transformer blocks
    n_heads: int = 32                     # query heads
    n_kv_heads: int = 8                   # key/value heads (GQA); must divide n_heads
    ffn_dim: int = 14336                  # SwiGLU hidden width
    vocab_size: int = 128256              # Llama 3: 128,000 BPE + 256 special tokens
    norm_eps: float = 1e-5                # RMSNorm epsilon
    rope_theta: float = 500000.0          # RoPE base frequency (Llama 3)
    rope_scaling: bool = True             # apply Llama 3.1's "llama3" frequency scaling
    rope_scaling_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192     # context the unscaled frequencies were trained for
    max_seq_len: int = 131072             # longest position the RoPE table covers
    document_mask: bool = True            # no attention across documents of a packed sequence
    attention_backend: Literal["auto", "sdpa", "triton", "torch"] = "auto"  # auto: triton on GPU, SDPA on CPU
    init_std: float = 0.02                # std of the normal init of projections

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


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

    @property
    def world_size(self) -> int:
        return self.tp * self.cp * self.pp * self.dp


@dataclass
class TrainConfig:
    steps: int = 1000                     # optimizer steps
    seq_len: int = 8192                   # tokens per sequence
    global_batch_size: int = 2048         # sequences per optimizer step, all ranks together
    micro_batch_size: int = 1             # sequences per forward/backward on one rank
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
    max_skipped_steps: int = 5            # stop after this many non-finite loss/grad steps in a row

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_len


@dataclass
class DataConfig:
    path: str = "runs/data/stdlib"        # token-shard prefix (P.bin, P.idx.npy, P.json)
    sources: list[str] = field(default_factory=lambda: ["stdlib"])  # what prepare-text reads if missing
    tokenizer: Literal["llama3", "bytes"] = "llama3"
    max_mb: float = 0.0                   # cap on prepared text in MB; 0 = everything


@dataclass
class CheckpointConfig:
    interval: int = 0                     # save every N steps; 0 = only at the end
    keep_last: int = 3                    # retention: newest K checkpoints are kept
    load: str = ""                        # a checkpoint to start from when the run has none of its own yet
    keep_every: int = 0                   # retention: also keep every step divisible by N; 0 = none
    async_save: bool = False              # write in a background thread (dcp.async_save); commit at next save
    fallback_to_previous: bool = False    # a checkpoint failing verification: resume from the previous good one


@dataclass
class RunConfig:
    dir: str = ""                         # run directory; launch.sh sets one per job
    log_every: int = 1                    # steps between log lines
    tensorboard: bool = True              # write TensorBoard event files to dir/tb
    progress: bool = True                 # tqdm bar on rank 0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def validate(cfg: Config, world_size: int | None = None) -> Config:
    """Cross-field rules. Each failure names the key, the value and a fix."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    for key, value in [("parallel.tp", p.tp), ("parallel.cp", p.cp), ("parallel.pp", p.pp),
                       ("parallel.dp", p.dp), ("parallel.dp_replicate", p.dp_replicate),
                       ("parallel.pp_virtual_stages", p.pp_virtual_stages), ("model.n_layers", m.n_layers),
                       ("model.dim", m.dim), ("model.n_heads", m.n_heads), ("model.n_kv_heads", m.n_kv_heads),
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
    _require(m.dim % m.n_heads == 0, "model.dim", f"{m.dim} is not divisible by model.n_heads={m.n_heads}")
    _require(m.n_heads % m.n_kv_heads == 0, "model.n_kv_heads",
             f"{m.n_kv_heads} must divide model.n_heads={m.n_heads}")
    _require(m.n_heads % p.tp == 0, "parallel.tp",
             f"model.n_heads={m.n_heads} is not divisible by tp={p.tp}; pick tp among "
             f"{[d for d in range(1, m.n_heads + 1) if m.n_heads % d == 0 and d <= 64]}")
    _require(m.n_kv_heads % p.tp == 0 or p.tp % m.n_kv_heads == 0, "parallel.tp",
             f"model.n_kv_heads={m.n_kv_heads} and tp={p.tp}: one must divide the other "
             f"(KV heads are split, or replicated when fewer than tp)")
    _require(m.ffn_dim % p.tp == 0, "model.ffn_dim", f"{m.ffn_dim} is not divisible by tp={p.tp}")
    # the vocabulary is sharded torch.chunk-style over tp (uneven allowed): every rank needs a piece
    vocab_chunk = -(-m.vocab_size // p.tp)
    _require(vocab_chunk * (p.tp - 1) < m.vocab_size, "model.vocab_size",
             f"{m.vocab_size} rows split over tp={p.tp} in chunks of {vocab_chunk} leave a rank without "
             f"vocabulary; use a vocab_size above {vocab_chunk * (p.tp - 1)} or a smaller tp")
    _require(m.dim % p.tp == 0, "model.dim", f"{m.dim} is not divisible by tp={p.tp}")
    _require(t.seq_len % (2 * p.cp) == 0, "train.seq_len",
             f"{t.seq_len} must be divisible by 2*cp={2 * p.cp} (context parallel splits it into 2*cp chunks)")
    # context parallel merges partial attentions through their log-sum-exp (parallel/context.py)
    _require(p.cp == 1 or m.attention_backend != "sdpa", "model.attention_backend",
             f"'sdpa' returns no log-sum-exp, which context parallel (cp={p.cp}) needs; set "
             f"model.attention_backend=auto (triton on GPU, the torch kernel on CPU) or torch")
    if p.sequence_parallel and p.tp > 1:
        chunk = t.seq_len // p.cp
        _require(chunk % p.tp == 0, "train.seq_len",
                 f"sequence parallel needs seq_len/cp={chunk} divisible by tp={p.tp}; "
                 f"set train.seq_len to a multiple of {p.tp * p.cp} or parallel.sequence_parallel=false")
    _require(t.seq_len <= m.max_seq_len, "train.seq_len", f"{t.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
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
        # every middle stage needs a layer; the first and last may hold only the embedding / loss
        need = max(chunks - 2 * p.pp_first_last_fewer_layers, p.pp)
        _require(m.n_layers >= need, "parallel.pp",
                 f"{m.n_layers} layers cannot fill pp*virtual_stages={chunks} stages "
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
    _require(p.pp_timeline_step >= 0, "parallel.pp_timeline_step",
             f"{p.pp_timeline_step} must be >= 0 (a 1-based step number; 0 = no timeline)")
    _require(0 < t.lr < 1, "train.lr", f"{t.lr} is not a sensible peak learning rate; use a value in (0, 1)")
    _require(0 <= t.min_lr <= t.lr, "train.min_lr", f"{t.min_lr} must lie in [0, train.lr={t.lr}]")
    _require(0 <= t.warmup_steps <= t.steps, "train.warmup_steps",
             f"{t.warmup_steps} must lie in [0, train.steps={t.steps}]")
    _require(t.decay_steps >= 0, "train.decay_steps", f"{t.decay_steps} must be >= 0 (0 = decay until train.steps)")
    _require(0 <= t.beta1 < 1 and 0 <= t.beta2 < 1, "train.beta1", "Adam betas must lie in [0, 1)")
    _require(t.grad_clip >= 0 and math.isfinite(t.grad_clip), "train.grad_clip", f"{t.grad_clip} must be >= 0")
    return cfg


def load_config(path: str, overrides: list[str] | None = None, world_size: int | None = None) -> Config:
    """Read a recipe, apply `section.key=value` overrides, build and validate the typed config."""
    data = apply_overrides(load_yaml(path), overrides or [])
    return validate(build(Config, data), world_size)
