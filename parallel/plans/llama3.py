"""Llama 3's parallelization plan: the tensor-parallel tables, as literals (parallel/tensor.py applies them).

The plan, per block (SP = sequence_parallel; "a" = activation (B, T, dim), T/tp under SP):
| module              | style                    | input -> output placements | fwd / bwd collective      |
| attention_norm      | SequenceParallel         | Shard(1) -> Shard(1)        | - / -                     |
| attention (input)   | PrepareModuleInput       | Shard(1) -> Replicate       | all-gather / reduce-scatter |
| wq, wk, wv          | ColwiseParallel          | Replicate -> Shard(-1)      | - / (summed as Partial)   |
| wk, wv (Hkv < tp)   | ReplicatedKV             | Replicate -> local kv head  | - / all-reduce of weight grad |
| wo                  | RowwiseParallel          | Shard(-1) -> Shard(1)       | reduce-scatter / all-gather |
| ffn_norm            | SequenceParallel         | Shard(1) -> Shard(1)        | - / -                     |
| feed_forward (input)| PrepareModuleInput       | Shard(1) -> Replicate       | all-gather / reduce-scatter |
| w1, w3              | ColwiseParallel          | Replicate -> Shard(-1)      | - / -                     |
| w2                  | RowwiseParallel          | Shard(-1) -> Shard(1)       | reduce-scatter / all-gather |
and for the whole model:
| tok_embeddings      | RowwiseParallel (vocab)  | Replicate ids -> Shard(1)   | reduce-scatter / all-gather |
| norm                | SequenceParallel         | Shard(1) -> Shard(1)        | - / -                     |
| output              | ColwiseParallel (vocab)  | Shard(1) -> Shard(-1) logits| all-gather / reduce-scatter |
| loss                | vocab_parallel_cross_entropy | Shard(-1) logits -> scalar | 3 all-reduces of (B*T,) / - |
Without SP, Shard(1) reads Replicate, the norms are replicated (`ReplicateParallel`), and the
row-parallel outputs and the column-parallel input gradients are all-reduced instead.

RoPE stays global under SP: the model computes cos/sin from `positions` on the (B, T) token ids,
before the embedding shards the sequence, and attention sees all T tokens after its all-gather.
"""

from __future__ import annotations

from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel, SequenceParallel
from torch.distributed.tensor.parallel.style import ParallelStyle

from gigatron.parallel.tensor import ReplicatedKV, ReplicateParallel


def block_plan(cfg) -> dict[str, ParallelStyle]:
    """The tensor-parallel plan of one transformer block, as a literal table."""
    m, sp = cfg.model, cfg.parallel.sequence_parallel
    seq = Shard(1) if sp else Replicate()  # placement of the residual stream
    norm = SequenceParallel() if sp else ReplicateParallel()
    if m.n_kv_heads >= cfg.parallel.tp:
        kv = ColwiseParallel()
    else:
        kv = ReplicatedKV(m.n_kv_heads, m.head_dim)
    return {
        "attention_norm": norm,
        "attention": PrepareModuleInput(input_layouts=(seq, None, None, None, None),
                                        desired_input_layouts=(Replicate(), None, None, None, None),
                                        use_local_output=False),
        "attention.wq": ColwiseParallel(),
        "attention.wk": kv,
        "attention.wv": kv,
        "attention.wo": RowwiseParallel(output_layouts=seq),
        "ffn_norm": norm,
        "feed_forward": PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),),
                                           use_local_output=False),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w3": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=seq),
    }


def model_plan(cfg) -> dict[str, ParallelStyle]:
    """Vocabulary-parallel embedding and output; the logits stay sharded on V for the loss."""
    sp = cfg.parallel.sequence_parallel
    seq = Shard(1) if sp else Replicate()
    return {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=seq),
        "norm": SequenceParallel() if sp else ReplicateParallel(),
        "output": ColwiseParallel(input_layouts=seq, output_layouts=Shard(-1), use_local_output=False),
    }
