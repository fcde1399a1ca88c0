"""Single-process training throughput: gigatron's Llama vs Hugging Face transformers' LlamaForCausalLM.

Both models get the same architecture (read from a recipe), the same real token batches, AdamW with
the same hyper-parameters, the same dtype and the same thread count, and are timed in the same run,
alternating between the two so that a noisy machine slows both alike. The result is the ratio of
tokens/s (ours / transformers) and a JSON file.

    python benchmarks/bench_train_vs_hf.py --recipe recipes/llama3_debug.yaml --steps 6 --out bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from gigatron.core.config import load_config
from gigatron.core.family import get_family
from gigatron.data_pipeline.prepare import prepare_text
from gigatron.data_pipeline.sampler import PackedBatchStream
from gigatron.data_pipeline.token_shards import TokenShards
from gigatron.parallel.parallelize import init_weights


def hf_model(cfg):
    from transformers import LlamaConfig, LlamaForCausalLM

    m = cfg.model
    hf_cfg = LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.dim, intermediate_size=m.ffn_dim, num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads, head_dim=m.head_dim,
        rms_norm_eps=m.norm_eps, max_position_embeddings=m.max_seq_len, tie_word_embeddings=False,
        rope_theta=m.rope_theta, rope_scaling={"rope_type": "llama3", "factor": m.rope_scaling_factor,
                                               "low_freq_factor": m.rope_low_freq_factor,
                                               "high_freq_factor": m.rope_high_freq_factor,
                                               "original_max_position_embeddings": m.rope_original_max_len},
        attn_implementation="sdpa")
    return LlamaForCausalLM(hf_cfg)


def ours_loss_fn(objective):
    """gigatron's training loss, through the family seam as the trainer computes it: the objective's
    inputs, loss sum (the fused cross-entropy of gigatron.kernels) and count."""
    def loss(model, batch):
        batch = dict(batch, positions=torch.arange(batch["input_ids"].shape[1]))
        args, kwargs = objective.inputs(batch)
        return objective.loss(model(*args, **kwargs), batch, model) / objective.count(batch)
    return loss


def hf_loss(model, batch):
    logits = model(input_ids=batch["input_ids"]).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten())


def make_optimizer(model, cfg):
    t = cfg.train
    return torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps,
                             weight_decay=t.weight_decay, foreach=True)


def timed_step(model, loss_fn, optimizer, batch) -> tuple[float, float]:
    start = time.perf_counter()
    loss = loss_fn(model, batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start, loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="recipes/llama3_debug.yaml")
    parser.add_argument("--batch", type=int, default=2, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=0, help="0: the recipe's train.seq_len")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per model (after 2 warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "gigatron_bench", "stdlib"))
    parser.add_argument("--out", default="", help="write the results as JSON here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    # Same architecture on both sides, plain causal attention (transformers has no document mask).
    cfg = load_config(args.recipe, ["model.document_mask=false", "model.attention_backend=sdpa"])
    seq_len = args.seq_len or cfg.train.seq_len
    if not os.path.exists(args.data + ".json"):
        prepare_text(["stdlib"], args.data, cfg.data.tokenizer, max_bytes=2_000_000, progress=False)
    stream = PackedBatchStream(TokenShards(args.data), seq_len, args.batch, dp_rank=0, dp_size=1, seed=0)
    batches = [stream.next_batch() for _ in range(args.steps + 2)]

    torch.manual_seed(0)
    family = get_family(cfg.model.name)
    ours = family.build(cfg.model)
    init_weights(ours, family, cfg, seed=0)
    ours_loss = ours_loss_fn(family.objective(cfg, None))
    theirs = hf_model(cfg)
    n_ours, n_theirs = (sum(p.numel() for p in m.parameters()) for m in (ours, theirs))
    assert n_ours == n_theirs, f"architectures differ: {n_ours} vs {n_theirs} parameters"
    runs = {"gigatron": (ours, ours_loss, make_optimizer(ours, cfg)),
            "transformers": (theirs, hf_loss, make_optimizer(theirs, cfg))}
    times = {name: [] for name in runs}
    for i, batch in enumerate(batches):  # alternate: both models see the same machine state
        for name, (model, loss_fn, optimizer) in runs.items():
            seconds, _ = timed_step(model, loss_fn, optimizer, batch)
            if i >= 2:
                times[name].append(seconds)

    tokens = args.batch * seq_len
    tps = {name: tokens / statistics.median(t) for name, t in times.items()}
    ratio = tps["gigatron"] / tps["transformers"]
    result = {
        "benchmark": "train_throughput_vs_transformers", "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
        "recipe": args.recipe, "parameters": n_ours, "batch": args.batch, "seq_len": seq_len,
        "threads": args.threads, "dtype": "float32", "steps": args.steps,
        "tokens_per_s": tps, "ratio": ratio,
    }
    print(f"{'model':<14}{'tokens/s':>12}{'median step s':>16}")
    for name, t in times.items():
        print(f"{name:<14}{tps[name]:>12,.0f}{statistics.median(t):>16.3f}")
    print(f"ratio gigatron/transformers: {ratio:.2f}  (target >= 1.0, goal 1.3)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
