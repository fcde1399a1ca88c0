"""The fused cross-entropy equals torch's log_softmax + nll_loss, values and gradients."""

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
