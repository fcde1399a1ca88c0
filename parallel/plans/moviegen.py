"""Movie Gen's parallelization plan: the tensor-parallel tables, as literals (parallel/tensor.py applies them).

Per block (SP = sequence_parallel; the residual stream is (B, N/cp, d), N/(cp tp) under SP):
| module                  | style                     | input -> output            | fwd / bwd collective        |
| modulation (6, d table) | ReplicateParallel         | (B, 6, d) replicated       | - / -                       |
| attention_norm          | SequenceParallel (local)  | Shard(1) -> Shard(1)       | - / -                       |
| attention (input)       | PrepareModuleInput        | Shard(1) -> Replicate      | all-gather / reduce-scatter |
| attention.wq, wk, wv    | ColwiseParallel           | Replicate -> Shard(-1)     | - / -                       |
| attention.wo            | RowwiseParallel           | Shard(-1) -> Shard(1)      | reduce-scatter / all-gather |
| cross_norm              | SequenceParallel (local)  | Shard(1) -> Shard(1)       | - / -                       |
| cross_attention (input) | PrepareModuleInput        | x: Shard(1) -> Replicate; text replicated | all-gather / reduce-scatter |
| cross_attention.wq..wv  | ColwiseParallel           | Replicate -> Shard(-1)     | - / -                       |
| cross_attention.wo      | RowwiseParallel           | Shard(-1) -> Shard(1)      | reduce-scatter / all-gather |
| ffn_norm, feed_forward  | as attention (w1, w3 colwise, w2 rowwise)                                           |
and for the whole model: the embeddings, the time MLP, adaLN-single, the text projection and the
final layer are replicated (`ReplicateParallel`: small, per-sample or per-token-linear work);
`to_blocks` scatters the residual stream over tp (Replicate -> Shard(1), a local slice; backward
all-gather) and `from_blocks` gathers it back (all-gather; backward a slice). Heads split over tp,
so self- and cross-attention need n_heads % tp == 0. The adaLN modulations (B, 6, d) multiply the
local (B, N/tp, d) activations as plain tensors: every tp rank holds them whole.
Without SP, Shard(1) reads Replicate: norms replicated, row-parallel outputs all-reduced.
"""

from __future__ import annotations

from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, PrepareModuleOutput,
                                               RowwiseParallel, SequenceParallel)
from torch.distributed.tensor.parallel.style import ParallelStyle

from gigatron.parallel.tensor import ReplicateParallel


def block_plan(cfg) -> dict[str, ParallelStyle]:
    sp = cfg.parallel.sequence_parallel
    seq = Shard(1) if sp else Replicate()
    norm = SequenceParallel(use_local_output=True) if sp else ReplicateParallel()

    def gathered(n_other: int):
        return PrepareModuleInput(input_layouts=(seq,) + (None,) * n_other,
                                  desired_input_layouts=(Replicate(),) + (None,) * n_other, use_local_output=False)

    plan = {"modulation": ReplicateParallel(), "attention_norm": norm, "attention": gathered(2),
            "cross_norm": norm, "cross_attention": gathered(2), "ffn_norm": norm, "feed_forward": gathered(0)}
    for attn in ("attention", "cross_attention"):
        plan.update({f"{attn}.wq": ColwiseParallel(), f"{attn}.wk": ColwiseParallel(),
                     f"{attn}.wv": ColwiseParallel(), f"{attn}.wo": RowwiseParallel(output_layouts=seq)})
    plan.update({"feed_forward.w1": ColwiseParallel(), "feed_forward.w3": ColwiseParallel(),
                 "feed_forward.w2": RowwiseParallel(output_layouts=seq)})
    return plan


def model_plan(cfg) -> dict[str, ParallelStyle]:
    plan = {name: ReplicateParallel() for name in ("embed", "time_embed", "adaln", "text_proj", "final_modulation",
                                                    "final_time", "norm", "output")}
    if cfg.parallel.sequence_parallel:
        plan["to_blocks"] = PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Shard(1))
        plan["from_blocks"] = PrepareModuleOutput(output_layouts=Shard(1), desired_output_layouts=Replicate())
    return plan
