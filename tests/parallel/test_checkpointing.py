"""Activation checkpointing (parallel/checkpointing.py), one process, the small fp32 debug Llama on
gigatron's PyTorch attention kernel (whose matmul outputs are updated in place: the case that made
per-op selective checkpointing wrong):

- "none", "selective" and "full" give the same loss and gradients (1e-6 relative: recompute runs
  the same fp32 ops in the same order, so the values are equal up to the last bit in practice);
- selective checkpointing runs each attention core once (forward only), full runs it twice.
"""

import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _grads(mode):
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

    AttentionCore.forward = counted
    try:
        apply_ac(model, None, cfg, family.plan)
        tokens = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0))
        document_ids = (torch.arange(32) >= 20).int().expand(2, 32)
        logits = model(tokens, positions=torch.arange(32), document_ids=document_ids)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.roll(-1, 1).flatten())
        loss.backward()
    finally:
        AttentionCore.forward = original
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}, calls[0]


@pytest.mark.parametrize("mode,core_calls", [("selective", 2), ("full", 4)])
def test_checkpointing_matches_and_selective_never_recomputes_attention(mode, core_calls):
    loss0, grads0, calls0 = _grads("none")
    loss, grads, calls = _grads(mode)
    assert calls0 == 2 and calls == core_calls  # 2 layers
    assert abs(loss - loss0) <= 1e-6 * abs(loss0)
    for name, g in grads0.items():
        assert torch.allclose(grads[name], g, rtol=1e-6, atol=1e-9), name
