"""The ViT's parallelization plan: the tensor-parallel tables, as literals (parallel/tensor.py applies them).

Per block (encoder and MAE decoder alike; no sequence parallelism, so activations are replicated):
| module        | style            | input -> output           | fwd / bwd collective     |
| norm1, norm2  | ReplicateParallel | Replicate -> Replicate   | - / -                    |
| attn.q, k, v  | ColwiseParallel  | Replicate -> Shard(-1)    | - / all-reduce           |
| attn.proj     | RowwiseParallel  | Shard(-1) -> Replicate    | all-reduce / -           |
| mlp.fc1       | ColwiseParallel  | Replicate -> Shard(-1)    | - / all-reduce           |
| mlp.fc2       | RowwiseParallel  | Shard(-1) -> Replicate    | all-reduce / -           |
and for the whole model:
| embed (stem, class token, positions) | ReplicateParallel | pixels -> tokens | - / -        |
| norm                                  | ReplicateParallel |                  | - / -        |
| head (classifier)    | ColwiseParallel (vocab) | Replicate -> Shard(-1) logits | - / all-reduce |
| loss                 | vocab_parallel_soft_cross_entropy | 4 all-reduces of (B,) / -    |
| decoder.input, decoder.norm, decoder.pred | ReplicateParallel; decoder.blocks.<i>: the block table |
Separate q/k/v projections (not one fused qkv) keep the column split of each a plain ColwiseParallel,
and match Hugging Face's ViT names; timm's fused qkv is split and joined by the converter.
"""

from __future__ import annotations

from torch.distributed.tensor import Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
from torch.distributed.tensor.parallel.style import ParallelStyle

from gigatron.parallel.tensor import ReplicateParallel


def block_plan(cfg=None, prefix: str = "") -> dict[str, ParallelStyle]:
    """One transformer block's table (`prefix` places it inside the MAE decoder)."""
    return {f"{prefix}norm1": ReplicateParallel(), f"{prefix}attn.q": ColwiseParallel(),
            f"{prefix}attn.k": ColwiseParallel(), f"{prefix}attn.v": ColwiseParallel(),
            f"{prefix}attn.proj": RowwiseParallel(), f"{prefix}norm2": ReplicateParallel(),
            f"{prefix}mlp.fc1": ColwiseParallel(), f"{prefix}mlp.fc2": RowwiseParallel()}


def model_plan(cfg) -> dict[str, ParallelStyle]:
    m = cfg.model
    plan: dict[str, ParallelStyle] = {"embed": ReplicateParallel(), "norm": ReplicateParallel()}
    if m.objective == "classification":
        plan["head"] = ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)
    if m.objective == "mae":
        plan.update({"decoder.input": ReplicateParallel(), "decoder.norm": ReplicateParallel(),
                     "decoder.pred": ReplicateParallel()})
        for i in range(m.decoder_depth):
            plan.update(block_plan(cfg, f"decoder.blocks.{i}."))
    return plan
