"""Chunked (fused linear) cross-entropy: parity with the full-logits reference, ignore_index, chunk
boundaries, vocabulary parallelism over a thread-simulated tp group, and peak memory (the (N, V)
logits never exist).

Tolerances (fp32): the loss is a sum of N terms of size ~5; both sides sum in fp32 in a different
order, so we allow 1e-6 relative (a few ulps of the total). Gradients are (softmax - one_hot) times
O(1) weights summed over V or N: allowed 1e-4 absolute (measured ~1e-6). bf16: stated at the test.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from gigatron.kernels.attention_triton import interpret_mode, triton_available  # noqa: E402
from gigatron.kernels.chunked_cross_entropy import (  # noqa: E402
    chunked_cross_entropy, cross_entropy_full_reference, default_chunk_size)
from tests.kernels._fake_tp import run_tp  # noqa: E402

DEVICE = "cpu" if interpret_mode() or not torch.cuda.is_available() else "cuda"
IMPLS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not triton_available(), reason="no triton"))]
LOSS_RTOL, GRAD_TOL = 1e-6, 1e-4


def _problem(N=45, d=24, V=300, dtype=torch.float32, seed=0, ignored=(3, 8, 44)):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, d, generator=g)
    w = torch.randn(V, d, generator=g) * 0.5  # logits ~ N(0, 6): a peaked softmax, not a flat one
    y = torch.randint(0, V, (N,), generator=g)
    y[list(ignored)] = -100
    return h.to(DEVICE, dtype), w.to(DEVICE, dtype), y.to(DEVICE)


def _reference(h, w, y, ignore_index=-100):
    h, w = (t.detach().float().requires_grad_() for t in (h, w))
    loss = cross_entropy_full_reference(h, w, y, ignore_index)
    return (loss.detach(), *torch.autograd.grad(loss * 0.5, (h, w)))


def _ours(h, w, y, **kw):
    h, w = (t.detach().requires_grad_() for t in (h, w))
    loss = chunked_cross_entropy(h, w, y, **kw)
    return (loss.detach(), *torch.autograd.grad(loss * 0.5, (h, w)))


def _close_loss(got, want):
    rel = abs(got.item() - want.item()) / abs(want.item())
    print(f"  loss rel err {rel:.1e}")
    assert rel <= LOSS_RTOL


def _close(name, got, want, tol=GRAD_TOL):
    err = (got.float() - want.float()).abs().max().item()
    print(f"  {name}: max abs err {err:.1e} (tol {tol:.0e})")
    assert err <= tol


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("chunk", [7, 16, 1000])  # ragged last chunk; exact multiple-ish; one chunk
def test_matches_full_reference(impl, chunk):
    h, w, y = _problem()
    loss, dh, dw = _ours(h, w, y, chunk_size=chunk, impl=impl)
    loss_r, dh_r, dw_r = _reference(h, w, y)
    _close_loss(loss, loss_r)
    _close("dh", dh, dh_r)
    _close("dw", dw, dw_r)
    assert (dh[[3, 8, 44]] == 0).all()  # ignored rows: no gradient


@pytest.mark.parametrize("impl", IMPLS)
def test_ignore_index_contract(impl):
    """All rows ignored: loss 0, gradients 0. A custom ignore_index (here a real vocabulary id, 7) is
    honoured: those rows are dropped exactly as F.cross_entropy(ignore_index=7) drops them."""
    h, w, y = _problem(N=10, ignored=range(10))
    loss, dh, dw = _ours(h, w, y, chunk_size=4, impl=impl)
    assert loss.item() == 0 and (dh == 0).all() and (dw == 0).all()
    h, w, y = _problem(N=20, ignored=())
    y[[1, 2]] = 7  # with ignore_index=7 every row labelled 7 is dropped, here rows 1, 2 (and any other 7s)
    loss, dh, dw = _ours(h, w, y, chunk_size=6, ignore_index=7, impl=impl)
    loss_r, dh_r, dw_r = _reference(h, w, y, ignore_index=7)
    _close_loss(loss, loss_r)
    _close("dh", dh, dh_r)
    _close("dw", dw, dw_r)


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16(impl):
    """bf16 h and W: the loss is computed from the same bf16 values in fp32 (on CPU the chunk logits
    are fp32): relative 1e-5 (fp32 order; on a GPU the logits come out of cuBLAS in bf16, so there we
    allow 1e-2: bf16 logits carry 2^-9 relative error, ~0.02 absolute at |z| ~ 10). Gradients are
    rounded once to bf16: 2^-8 relative to the largest entry."""
    h, w, y = _problem(dtype=torch.bfloat16)
    loss, dh, dw = _ours(h, w, y, chunk_size=16, impl=impl)
    loss_r, dh_r, dw_r = _reference(h, w, y)
    assert dh.dtype == dw.dtype == torch.bfloat16 and loss.dtype == torch.float32
    rtol = 1e-5 if DEVICE == "cpu" else 1e-2
    assert abs(loss.item() - loss_r.item()) <= rtol * abs(loss_r.item())
    for n, g, gr in (("dh", dh, dh_r), ("dw", dw, dw_r)):
        tol = (2.0**-8 if DEVICE == "cpu" else 2e-2) * gr.abs().max().item()
        _close(n, g, gr, tol)


@pytest.mark.parametrize("impl", ["torch"])  # the triton interpreter is not thread-safe; same math as tp=1
@pytest.mark.parametrize("world,sizes", [(2, (150, 150)), (3, (120, 100, 80))])  # even and uneven shards
def test_vocab_parallel_matches_full(impl, world, sizes):
    """Each simulated rank holds a vocabulary shard; three forward all-reduces, one backward
    (dh); the loss equals the full-vocabulary loss on every rank and the shard gradients concatenate
    to the full dW."""
    h, w, y = _problem(V=sum(sizes))
    offsets = [sum(sizes[:r]) for r in range(world)]
    shards = list(torch.split(w, list(sizes)))

    def rank_fn(rank, all_reduce):
        return _ours(h, shards[rank], y, vocab_offset=offsets[rank], chunk_size=16, all_reduce=all_reduce,
                     impl=impl)

    results, group = run_tp(world, rank_fn)
    loss_r, dh_r, dw_r = _reference(h, w, y)
    for loss, dh, _ in results:
        _close_loss(loss, loss_r)
        _close("dh (all-reduced)", dh, dh_r)
    _close("dW (concatenated shards)", torch.cat([r[2] for r in results]), dw_r)
    assert group.calls == {"max": 1, "sum": 3}, group.calls  # fwd: max, sum-exp, target; bwd: dh
    # Without the backward reduction each rank returns its partial dh, and the partials sum to dh.
    results, group = run_tp(world, lambda r, ar: _ours(h, shards[r], y, vocab_offset=offsets[r], chunk_size=16,
                                                       all_reduce=ar, reduce_grad_input=False, impl=impl))
    _close("sum of partial dh", sum(r[1] for r in results), dh_r)
    assert group.calls == {"max": 1, "sum": 2}


class _LargestTensor(TorchDispatchMode):
    """Tracks the largest tensor, in bytes, that any aten op returns (CPU stand-in for peak-memory
    profiling). Bytes, not elements: the Triton interpreter copies kernel arguments as uint8 storage."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("impl", IMPLS)
def test_peak_memory_never_holds_full_logits(impl):
    N, d, V, chunk = 64, 16, 512, 8
    h, w, y = _problem(N=N, d=d, V=V, ignored=())
    h, w = h.requires_grad_(), w.requires_grad_()
    with _LargestTensor() as mode:
        chunked_cross_entropy(h, w, y, chunk_size=chunk, impl=impl).backward()
    # largest: an fp32 (chunk, V) logits chunk or dW (V, d): 16 KiB / 32 KiB; full logits: 128 KiB
    print(f"  largest tensor {mode.largest} bytes; full fp32 logits {N * V * 4}")
    assert mode.largest <= 4 * max(chunk * V, V * d, N * d) < 4 * N * V
    with _LargestTensor() as control:  # negative control: the unchunked reference does build them
        cross_entropy_full_reference(h, w, y).backward()
    assert control.largest >= 4 * N * V


def test_default_chunk_size():
    assert default_chunk_size(10_000, 128_256) == 523  # 256 MiB / (4 B * 128256)
    assert default_chunk_size(100, 128_256) == 100
    assert default_chunk_size(5, 10**12) == 1
