"""Fused RMSNorm, SwiGLU and RoPE: Triton (interpreter on CPU) vs the PyTorch references, values and
gradients, fp32 and bf16; the impl selector.

Tolerances. fp32: values <= 1e-5, gradients <= 1e-4 absolute (inputs O(1); the kernels and references
differ only in fp32 summation order, ~1e-6). bf16: both sides see the same bf16 inputs and compute in
fp32, so they differ by the final rounding to bf16 (relative 2^-9, round to nearest) plus fp32 noise:
we allow |got - want| <= 2^-8 |want| + 1e-5 max|want| elementwise (2x the rounding bound).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import logging  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from gigatron.kernels import _select  # noqa: E402
from gigatron.kernels.attention_triton import interpret_mode, triton_available  # noqa: E402
from gigatron.kernels.rmsnorm import rms_norm, rms_norm_reference  # noqa: E402
from gigatron.kernels.rope import apply_rope, apply_rope_reference  # noqa: E402
from gigatron.kernels.swiglu import swiglu, swiglu_reference  # noqa: E402

DEVICE = "cpu" if interpret_mode() or not torch.cuda.is_available() else "cuda"
requires_triton = pytest.mark.skipif(not triton_available(), reason="triton is not importable")
FWD_TOL, GRAD_TOL = 1e-5, 1e-4


def _check(name, got, want, dtype):
    err = (got.float() - want.float()).abs()
    if dtype == torch.float32:
        tol = FWD_TOL if name == "out" else GRAD_TOL
        print(f"  {name}: max abs err {err.max():.2e} (tol {tol:.0e})")
        assert err.max() <= tol, f"{name}: {err.max()} > {tol}"
    else:
        bound = 2.0**-8 * want.float().abs() + 1e-5 * want.float().abs().max()
        print(f"  {name}: max err/bound {(err / bound).max():.2f}")
        assert got.dtype == dtype and (err <= bound).all(), f"{name}: worst {(err - bound).max()}"


def _parity(fn_fused, fn_ref, inputs, grad_mask=None):
    """Run fused and reference with the same upstream gradient; return (out, ref, grads, ref grads)."""
    leaves = [t.detach().requires_grad_(m) for t, m in zip(inputs, grad_mask or [True] * len(inputs))]
    out = fn_fused(*leaves)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, out.dtype)
    grads = torch.autograd.grad(out, [t for t in leaves if t.requires_grad], dout)
    f32 = [t.detach().float().requires_grad_(t.requires_grad) for t in leaves]
    ref = fn_ref(*f32)
    ref_grads = torch.autograd.grad(ref, [t for t in f32 if t.requires_grad], dout.float())
    return out, ref, grads, ref_grads


def _rand(*shape, dtype=torch.float32, seed=0, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale + shift).to(DEVICE, dtype)


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 7, 48), (5, 130)])  # D not a power of two; rows not a block multiple
def test_rmsnorm(dtype, shape):
    x, w = _rand(*shape, dtype=dtype), _rand(shape[-1], dtype=dtype, seed=1, scale=0.3, shift=1.0)
    out, ref, grads, ref_grads = _parity(lambda a, b: rms_norm(a, b, 1e-5, impl="triton"),
                                         lambda a, b: rms_norm_reference(a, b, 1e-5), [x, w])
    _check("out", out, ref.to(dtype), dtype)
    for n, g, gr in zip(("dx", "dw"), grads, ref_grads):
        _check(n, g, gr.to(dtype), dtype)


def test_rmsnorm_reference_matches_llama_formula():
    """The reference equals the unfused composition of core/models/llama.py's RMSNorm (fp32)."""
    x, w = _rand(4, 64), _rand(64, seed=1)
    want = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)) * w
    assert (rms_norm_reference(x, w, 1e-6) - want).abs().max() <= 1e-6


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu(dtype):
    a, b = _rand(3, 5, 333, dtype=dtype, scale=3.0), _rand(3, 5, 333, dtype=dtype, seed=1)  # 4995: ragged tail
    out, ref, grads, ref_grads = _parity(lambda x, y: swiglu(x, y, impl="triton"),
                                         lambda x, y: F.silu(x) * y, [a, b])
    _check("out", out, ref.to(dtype), dtype)
    for n, g, gr in zip(("da", "db"), grads, ref_grads):
        _check(n, g, gr.to(dtype), dtype)


def test_swiglu_reference():
    a, b = _rand(10, 20), _rand(10, 20, seed=1)
    assert (swiglu_reference(a, b) - F.silu(a) * b).abs().max() <= 1e-6


@requires_triton
def test_swiglu_shape_check():
    a = _rand(10, 20)
    with pytest.raises(ValueError):
        swiglu(a, a[:, :10], impl="triton")


def _rope_tables(T, D, distinct_halves=False, seed=2):
    freqs = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    ang = torch.arange(T).float()[:, None] * freqs[None, :]  # (T, D/2)
    ang2 = ang * 1.3 + 0.1 if distinct_halves else ang  # the kernel must not assume equal halves
    cos, sin = torch.cat([ang.cos(), ang2.cos()], -1), torch.cat([ang.sin(), ang2.sin()], -1)
    return cos.to(DEVICE), sin.to(DEVICE)


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("strided,D,distinct", [(False, 32, False), (True, 48, True)])
def test_rope(dtype, strided, D, distinct):
    B, H, T = 2, 3, 37
    if strided:  # as in the model: a (B, T, H, D) projection viewed as (B, H, T, D)
        x = _rand(B, T, H, D, dtype=dtype).transpose(1, 2)
    else:
        x = _rand(B, H, T, D, dtype=dtype)
    cos, sin = _rope_tables(T, D, distinct)
    out, ref, grads, ref_grads = _parity(lambda t, c, s: apply_rope(t, c, s, impl="triton"), apply_rope_reference,
                                         [x, cos, sin], grad_mask=[True, False, False])
    _check("out", out, ref.to(dtype), dtype)
    _check("dx", grads[0], ref_grads[0].to(dtype), dtype)


def test_rope_reference_is_a_rotation():
    """Negative control for the reference itself: with equal halves it preserves each pair's norm
    (a rotation), and rotating back by -angle recovers x."""
    x = _rand(1, 2, 9, 16)
    cos, sin = _rope_tables(9, 16)
    y = apply_rope_reference(x, cos, sin)
    pair_norm = lambda t: t[..., :8].pow(2) + t[..., 8:].pow(2)  # noqa: E731
    assert (pair_norm(y) - pair_norm(x)).abs().max() <= 1e-5
    assert (apply_rope_reference(y, cos, -sin) - x).abs().max() <= 1e-5
    assert (y - x).abs().max() > 0.1  # it did rotate


def test_impl_selector_logged_once(caplog, monkeypatch):
    _select._logged.clear()
    x, w = _rand(2, 8), _rand(8)
    with caplog.at_level(logging.INFO, logger="gigatron"):
        for _ in range(3):
            rms_norm(x, w, impl="auto")
    msgs = [r.getMessage() for r in caplog.records if r.name.startswith("gigatron")]
    assert len(msgs) == 1 and "rms_norm impl 'auto' -> 'torch'" in msgs[0], msgs
    monkeypatch.setattr(_select, "triton_available", lambda: True)
    assert _select.select_impl("swiglu", "auto", torch.device("cuda")) == "triton"
    assert _select.select_impl("swiglu", "auto", torch.device("cpu")) == "torch"
    monkeypatch.setattr(_select, "triton_available", lambda: False)
    assert _select.select_impl("swiglu", "auto", torch.device("cuda")) == "torch"
    with pytest.raises(RuntimeError):
        _select.select_impl("swiglu", "triton", torch.device("cuda"))
    with pytest.raises(ValueError):
        _select.select_impl("swiglu", "liger", torch.device("cpu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_cpu_path_is_the_unfused_formula_bitwise(dtype):
    """llama.py calls the dispatchers; on CPU tensors they run exactly the model's former formulas
    (bitwise, in fp32 and bf16), so every existing parity test sees the same numbers."""
    from gigatron.core.models.llama import FeedForward, LlamaConfig, RMSNorm, apply_rope as model_rope

    x, w = _rand(3, 5, 64, dtype=dtype), _rand(64, dtype=dtype, seed=1, scale=0.3, shift=1.0)
    norm = RMSNorm(64, 1e-5).to(dtype)
    norm.weight.data.copy_(w)
    was = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)).type_as(x) * w
    assert torch.equal(norm(x), was)
    ff = FeedForward(LlamaConfig(dim=64, ffn_dim=96)).to(dtype)
    assert torch.equal(ff(x), ff.w2(F.silu(ff.w1(x)) * ff.w3(x)))
    q = _rand(2, 3, 9, 16, dtype=dtype)
    cos, sin = _rope_tables(9, 16)
    q1, q2 = q.chunk(2, dim=-1)
    was = (q.float() * cos + torch.cat((-q2, q1), dim=-1).float() * sin).type_as(q)
    assert torch.equal(model_rope(q, cos, sin), was)


def test_tensor_subclasses_take_the_torch_path():
    """DTensor (tensor parallel) and FakeTensor (torch.compile) inputs never reach a Triton kernel."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 8)
        assert _select.select_for("rms_norm", "auto", x) == "torch"
        with pytest.raises(RuntimeError):
            _select.select_for("rms_norm", "triton", x)
    assert _select.select_for("rms_norm", "auto", torch.ones(2), torch.nn.Parameter(torch.ones(2))) == "torch"
