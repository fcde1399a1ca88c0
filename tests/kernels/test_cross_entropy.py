"""The fused cross-entropy equals torch's log_softmax + nll_loss, values and gradients."""

import pytest
import torch
import torch.nn.functional as F

from gigatron.kernels.cross_entropy import cross_entropy_sum


def test_matches_torch_cross_entropy():
    torch.manual_seed(0)
    logits = (torch.randn(200, 1003) * 3).requires_grad_()  # rows not a multiple of the chunk size
    labels = torch.randint(0, 1003, (200,))
    labels[[5, 77]] = -100  # ignored rows contribute neither loss nor gradient
    ours = cross_entropy_sum(logits, labels)
    (ours * 0.5).backward()
    grad_ours = logits.grad.clone()
    logits.grad = None
    ref = F.cross_entropy(logits, labels, reduction="sum", ignore_index=-100)
    (ref * 0.5).backward()
    # fp32 sums of 200 terms of size ~10: agreement to a few ulps of the total (~2e3)
    assert torch.allclose(ours, ref, rtol=1e-6, atol=0)
    # per-element gradients are softmax probabilities in [0, 1]: fp32 rounding ~1e-7
    assert (grad_ours - logits.grad).abs().max() < 1e-6
    assert grad_ours[5].abs().max() == 0


def test_bf16_logits_compute_in_fp32():
    torch.manual_seed(0)
    logits = torch.randn(70, 300).bfloat16().requires_grad_()
    labels = torch.randint(0, 300, (70,))
    ours = cross_entropy_sum(logits, labels)
    ours.backward()
    ref = F.cross_entropy(logits.float(), labels, reduction="sum")
    assert logits.grad.dtype == torch.bfloat16
    assert torch.allclose(ours, ref, rtol=1e-6)  # same bf16 inputs, both reduce in fp32


def test_contract_all_ignored_and_custom_ignore_index():
    """Ignored rows count 0 and get zero gradient, also when every row is ignored (loss exactly 0, no
    NaN) and for a non-default ignore_index."""
    logits = torch.randn(6, 11, requires_grad=True)
    loss = cross_entropy_sum(logits, torch.full((6,), -100))
    loss.backward()
    assert loss.item() == 0 and (logits.grad == 0).all()
    labels = torch.tensor([0, 3, 3, 10, 5, 3])
    logits.grad = None
    cross_entropy_sum(logits, labels, ignore_index=3).backward()
    ref = logits.detach().clone().requires_grad_()
    F.cross_entropy(ref, labels, ignore_index=3, reduction="sum").backward()
    assert (logits.grad - ref.grad).abs().max() < 1e-6 and (logits.grad[[1, 2, 5]] == 0).all()


def test_vocab_parallel_logits_shards_honour_ignore_index():
    """The vocabulary-parallel path (logits sharded on V, all_reduce callback over a thread-simulated
    tp group) equals the tp=1 sum on every rank, ignore_index included; shard gradients concatenate
    to the full gradient. 3 forward collectives, none in backward."""
    from tests.kernels._fake_tp import run_tp

    torch.manual_seed(0)
    logits = torch.randn(40, 90) * 3
    labels = torch.randint(0, 90, (40,))
    labels[[0, 17, 39]] = -100
    sizes = (50, 40)  # uneven shards
    shards = torch.split(logits, list(sizes), dim=1)

    def rank_fn(rank, all_reduce):
        x = shards[rank].clone().requires_grad_()
        loss = cross_entropy_sum(x, labels, vocab_offset=sum(sizes[:rank]), all_reduce=all_reduce)
        (loss * 0.5).backward()
        return loss.detach(), x.grad

    results, group = run_tp(2, rank_fn)
    ref_in = logits.clone().requires_grad_()
    ref = F.cross_entropy(ref_in, labels, reduction="sum", ignore_index=-100)
    (ref * 0.5).backward()
    for loss, _ in results:
        assert torch.allclose(loss, ref, rtol=1e-6, atol=0)  # same tolerance as the tp=1 test above
    grad = torch.cat([g for _, g in results], dim=1)
    assert (grad - ref_in.grad).abs().max() < 1e-6 and (grad[[0, 17, 39]] == 0).all()
    assert group.calls == {"max": 1, "sum": 2}
    with pytest.raises(ValueError):
        cross_entropy_sum(logits, labels, vocab_offset=10)
