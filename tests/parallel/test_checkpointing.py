"""Activation checkpointing (parallel/checkpointing.py), one process, the small fp32 debug Llama on
gigatron's PyTorch attention kernel (whose matmul outputs are updated in place: the case that made
per-op selective checkpointing wrong):

- "none", "selective" and "full" give the same loss and gradients (1e-6 relative: recompute runs
  the same fp32 ops in the same order, so the values are equal up to the last bit in practice);
- selective checkpointing runs each attention core once (forward only), full runs it twice;
- with the row-parallel projections kept too (as under tp > 1: the plan's RowwiseParallel entries,
  here on an unsharded model), the result is the same, each projection runs once, and every kept
  unit's queue is empty after backward (the last projection of a block included: the recompute
  must not stop before it, or its output would be replayed into the next step).
"""

import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _grads(mode, keep_row_parallel=False):
    from gigatron.core.config import load_config
    from gigatron.core.family import get_family
    from gigatron.core.models.attention import AttentionCore
    from gigatron.parallel.checkpointing import apply_ac
    from gigatron.parallel.parallelize import init_weights

    cfg = load_config(os.path.join(ROOT, "recipes/llama3_debug.yaml"),
                      ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
                       "model.ffn_dim=96", "model.vocab_size=300", "model.attention_backend=torch",
                       "train.seq_len=32", "parallel.dp=1", f"parallel.activation_checkpoint={mode}"], world_size=1)
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
        assert sum(type(m).__name__.startswith("Kept") for m in model.modules()) == 3 * 2  # core, wo, w2
        assert projections[0] == 2 * 2  # 2 layers x 2 steps: never re-run
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
