"""Activation checkpointing (parallel/checkpointing.py), one process, the small fp32 debug Llama on
gigatron's PyTorch attention kernel (whose matmul outputs are updated in place: the case that made
per-op selective checkpointing wrong):

- "none", "selective" and "full" give the same loss and gradients (1e-6 relative: recompute runs
  the same fp32 ops in the same order, so the values are equal up to the last bit in practice);
- selective checkpointing runs each attention core once (forward only), full runs it twice;
- with the row-parallel projections kept too (as under tp > 1: the plan's RowwiseParallel entries,
  here on an unsharded model), the result is the same, each projection runs once, and every kept
  unit's queue is empty after backward (the last projection of a block included: the recompute
  must not stop before it, or its output would be replayed into the next step);
- layer-wise mixed recompute (parallel.full_recompute_every = K): on 4 blocks with K = 2, blocks 0
  and 2 run full (their attention twice), 1 and 3 the selected policy, with the same gradients
  (same 1e-6 bound: the same ops in the same order); under a pipeline, the positions are the rank's
  own (every rank of Llama 3 405B's pp16 x v8 layout gets one full block of its eight with K = 8).
"""

import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _grads(mode, keep_row_parallel=False, layers=2, every=0):
    from gigatron.core.config import load_config
    from gigatron.core.family import get_family
    from gigatron.core.models.attention import AttentionCore
    from gigatron.parallel.checkpointing import apply_ac
    from gigatron.parallel.parallelize import init_weights

    cfg = load_config(os.path.join(ROOT, "recipes/llama3_debug.yaml"),
                      ["model.dim=64", f"model.n_layers={layers}", "model.n_heads=4", "model.n_kv_heads=2",
                       "model.ffn_dim=96", "model.vocab_size=300", "model.attention_backend=torch",
                       "train.seq_len=32", "parallel.dp=1", f"parallel.activation_checkpoint={mode}",
                       f"parallel.full_recompute_every={every}"], world_size=1)
    family = get_family("llama3")
    model = family.build(cfg.model)
    init_weights(model, family, cfg, seed=3)
    calls = [0]
    original = AttentionCore.forward

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return original(self, *args, **kwargs)

    if keep_row_parallel:
        cfg.parallel.tp = 2  # kept_units reads the plan's TP table; the model itself stays whole
    projections = [0]
    count = lambda module, args, out: projections.__setitem__(0, projections[0] + 1)  # noqa: E731
    for block in model.layers.values():
        block.feed_forward.w2.register_forward_hook(count)
    AttentionCore.forward = counted
    try:
        apply_ac(model, None, cfg, family.plan)
        for step in range(2):  # a stale queue entry would corrupt the second step
            model.zero_grad()
            tokens = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(step))
            document_ids = (torch.arange(32) >= 20).int().expand(2, 32)
            logits = model(tokens, positions=torch.arange(32), document_ids=document_ids)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.roll(-1, 1).flatten())
            loss.backward()
            for module in model.modules():
                assert len(getattr(type(module), "kept_outputs", ())) == 0, type(module).__name__
    finally:
        AttentionCore.forward = original
    if keep_row_parallel:
        selective_blocks = sum(1 for i in range(layers) if not every or i % every)
        assert sum(type(m).__name__.startswith("Kept") for m in model.modules()) == 3 * selective_blocks  # core, wo, w2
        # once per block and step: a kept w2 never re-runs, and a full block's recompute stops early,
        # after w2's input (the last tensor its backward needs), so its w2 does not re-run either
        assert projections[0] == layers * 2
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}, calls[0]


@pytest.mark.parametrize("mode,core_calls,keep", [("selective", 4, False), ("full", 8, False),
                                                   ("selective", 4, True)])
def test_checkpointing_matches_and_selective_never_recomputes_attention(mode, core_calls, keep):
    loss0, grads0, calls0 = _grads("none")
    loss, grads, calls = _grads(mode, keep)
    assert calls0 == 4 and calls == core_calls  # 2 layers x 2 steps
    assert abs(loss - loss0) <= 1e-6 * abs(loss0)
    for name, g in grads0.items():
        assert torch.allclose(grads[name], g, rtol=1e-6, atol=1e-9), name


@pytest.mark.parametrize("mode,keep", [("selective", False), ("selective", True), ("none", False)])
def test_mixed_recompute_matches_no_recompute(mode, keep):
    """4 blocks, K = 2: blocks 0 and 2 full, 1 and 3 `mode`. Attention cores: each block runs its
    core once per step in forward; the full blocks run theirs again in backward, a selective block
    never, a block without recompute never: 2 steps x (4 + 2) = 12 calls."""
    loss0, grads0, calls0 = _grads("none", layers=4)
    loss, grads, calls = _grads(mode, keep, layers=4, every=2)
    assert calls0 == 2 * 4 and calls == 2 * (4 + 2)
    assert abs(loss - loss0) <= 1e-6 * abs(loss0)
    for name, g in grads0.items():
        assert torch.allclose(grads[name], g, rtol=1e-6, atol=1e-9), name


def test_full_blocks_are_spread_over_every_pipeline_rank():
    """Llama 3 405B's layout (pp 16 x 8 virtual stages, one block per chunk): a rank holds layers 16
    apart, so a global index % 8 would give ranks 1 and 9 only full blocks and the others none. The
    positions are the rank's own: with K = 8 every rank that holds blocks has exactly one full block
    (ceil(blocks / 8)), and K = 0 leaves the policy of every block as configured."""
    from gigatron.core.config import load_config
    from gigatron.parallel.checkpointing import rank_block_positions
    from gigatron.parallel.pipeline_split import assign_layers, rank_chunks

    cfg = load_config(os.path.join(ROOT, "recipes/llama3_405b.yaml"), ["parallel.full_recompute_every=8"])
    p = cfg.parallel
    assignment = assign_layers(cfg.model.n_layers, p.pp, p.pp_virtual_stages, p.pp_first_last_fewer_layers)
    for rank in range(p.pp):
        names = [str(i) for c in rank_chunks(rank, p.pp, p.pp_virtual_stages) for i in assignment[c]]
        positions = rank_block_positions({n: None for n in names}, rank, cfg)
        assert sorted(positions.values()) == list(range(len(names)))
        full = [n for n in names if positions[n] % 8 == 0]
        assert len(full) == -(-len(names) // 8) == 1, (rank, names, full)


def _pipeline_run(rank, world_size, runs, data_dir):
    """The real trainer on pp 2 x 2 virtual stages (6 blocks: chunks of 1, 2, 2, 1; rank 0 runs blocks
    0, 3, 4 and rank 1 blocks 1, 2, 5), 3 steps per recompute policy: losses, gradient norms, and the
    policy each block of this rank was wrapped with (read off the block's forward)."""
    from tests.parallel.harness import build_trainer

    out = []
    for overrides in runs:
        trainer = build_trainer(world_size, overrides, data_dir)
        steps = [trainer.train_step() for _ in range(3)]
        wrapped = {}
        for name, block in trainer.model.layers.items():
            func = getattr(block.forward, "func", None)
            wrapped[int(name)] = {"_checkpointed": "full", "_checkpointed_to_the_end": "selective"}.get(
                getattr(func, "__name__", ""), "none")
        out.append({"loss": [s["loss"] for s in steps], "grad_norm": [s["grad_norm"] for s in steps],
                    "wrapped": wrapped})
    return out


def test_mixed_recompute_under_an_interleaved_pipeline(tmp_path):
    """2 gloo processes, pp 2 x v 2, 4 micro-batches: with K = 2 each rank makes full its own blocks
    at positions 0 and 2 (rank 0: blocks 0 and 4; rank 1: 1 and 5), selective the rest, and training
    matches no recompute step for step (fp32, same ops: 1e-6 relative)."""
    from tests.distributed import run_distributed

    base = ["model.n_layers=6", "parallel.pp=2", "parallel.dp=1", "parallel.pp_schedule=interleaved_1f1b",
            "parallel.pp_virtual_stages=2", "train.micro_batch_size=1", "parallel.pp_timeline_step=0"]
    runs = [base, base + ["parallel.activation_checkpoint=selective", "parallel.full_recompute_every=2"]]
    results = run_distributed(_pipeline_run, 2, runs, str(tmp_path))
    assert results[0][1]["wrapped"] == {0: "full", 3: "selective", 4: "full"}
    assert results[1][1]["wrapped"] == {1: "full", 2: "selective", 5: "full"}
    for rank in results:
        plain, mixed = rank
        assert set(plain["wrapped"].values()) == {"none"}
        for key in ("loss", "grad_norm"):
            for a, b in zip(plain[key], mixed[key]):
                assert abs(a - b) <= 1e-6 * abs(a), (key, plain[key], mixed[key])
