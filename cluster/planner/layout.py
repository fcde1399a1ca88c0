"""`Layout`: how one training step is laid out over the GPUs, as the planner sees it.

Degrees in Llama 3's mesh order [tp, cp, pp, dp] (innermost first): tp * cp * pp * dp GPUs. FSDP
shards parameters, gradients and optimizer state over dp / dp_replicate * cp ranks (HSDP
replicates over dp_replicate; context-parallel ranks hold the same weights: parallel/fsdp.py).

A step processes `global_batch` samples: each data-parallel rank runs `micro_batches` micro-batches
of `micro_batch` samples, each sample `seq_len` tokens (split over cp).

`grad_sync`: when FSDP reduce-scatters gradients.
- "micro_batch": after every micro-batch's backward; the sharded FP32 gradient accumulates
  (gigatron's parallel.grad_sync=per_microbatch without a pipeline: core/train.py).
- "step": once, after the last micro-batch; until then the unsharded gradient accumulates in FP32
  and the parameters stay gathered (parallel.grad_sync=per_step, the default; pipeline stages
  always defer the sync: parallel/pipeline.py; Megatron-Core and Llama 3).

`full_recompute_every` (parallel.full_recompute_every, parallel/checkpointing.py): layer-wise mixed
recompute. The blocks at positions 0, K, 2K, ... of each pipeline rank (its blocks over all its
virtual stages, in layer order) get full recompute, the others `activation_checkpoint`; 0 = off.
`block_modes` gives each rank's list.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    cp: int = 1
    pp: int = 1
    dp: int = 1
    dp_replicate: int = 1
    sequence_parallel: bool = True
    pp_virtual_stages: int = 1
    pp_schedule: str = "1f1b"               # 1f1b | interleaved_1f1b | gpipe | zero_bubble
    pp_first_last_fewer_layers: int = 1     # Llama 3: the first and last stage hold one layer less
    micro_batch: int = 1                    # samples per micro-batch
    micro_batches: int = 1                  # micro-batches per step on each data-parallel rank
    activation_checkpoint: str = "none"     # none | selective | full
    full_recompute_every: int = 0           # K > 0: full recompute at rank block positions 0, K, 2K, ... (below)
    reshard_after_forward: bool = False
    grad_sync: str = "step"                 # micro_batch | step (see module docstring)

    @property
    def world_size(self) -> int:
        return self.tp * self.cp * self.pp * self.dp

    @property
    def fsdp_shards(self) -> int:
        """Ranks one parameter is sharded over by FSDP: dp_shard * cp."""
        return self.dp // self.dp_replicate * self.cp

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.micro_batches * self.dp

    def as_dict(self) -> dict:
        return {**asdict(self), "world_size": self.world_size, "recompute": self.recompute}

    @property
    def recompute(self) -> str:
        """The recompute policy in one word: "selective", or "selective+full/4" when every 4th block is full."""
        if self.full_recompute_every and self.activation_checkpoint != "full":
            return f"{self.activation_checkpoint}+full/{self.full_recompute_every}"
        return self.activation_checkpoint

    def block_modes(self, n_blocks: int) -> list[str]:
        """The policy of each of a rank's `n_blocks` blocks, by position (parallel/checkpointing.py)."""
        k = self.full_recompute_every
        return ["full" if k and i % k == 0 else self.activation_checkpoint for i in range(n_blocks)]

    def describe(self) -> str:
        pp = f" pp={self.pp}" + (f"x{self.pp_virtual_stages}" if self.pp_virtual_stages > 1 else "")
        hsdp = f" (hsdp {self.dp_replicate})" if self.dp_replicate > 1 else ""
        return (f"tp={self.tp} cp={self.cp}{pp} dp={self.dp}{hsdp} mb={self.micro_batch}x{self.micro_batches}"
                f" ac={self.recompute}")

    def with_(self, **changes) -> "Layout":
        return replace(self, **changes)


def layout_from_config(cfg) -> Layout:
    """The layout of a recipe (gigatron.core.config.Config), with gigatron's accumulation mode."""
    p, t = cfg.parallel, cfg.train
    return Layout(tp=p.tp, cp=p.cp, pp=p.pp, dp=p.dp, dp_replicate=p.dp_replicate,
                  sequence_parallel=p.sequence_parallel and p.tp > 1, pp_virtual_stages=p.pp_virtual_stages,
                  pp_schedule=p.pp_schedule, pp_first_last_fewer_layers=p.pp_first_last_fewer_layers,
                  micro_batch=t.micro_batch_size, micro_batches=t.global_batch_size // (t.micro_batch_size * p.dp),
                  activation_checkpoint=p.activation_checkpoint,
                  full_recompute_every=getattr(p, "full_recompute_every", 0), reshard_after_forward=p.reshard_after_forward,
                  grad_sync="step" if p.pp > 1 or getattr(p, "grad_sync", "per_microbatch") == "per_step"
                  else "micro_batch")
