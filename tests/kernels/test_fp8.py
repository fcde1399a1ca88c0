"""FP8 logic on CPU: scale formula and special cases, saturation / underflow, the recipes, Fp8Linear
against nn.Linear, the amax reduction callback, checkpointed scale state, convert_linears, and the
torch._scaled_mm call path (a layout-checking CPU fake; the real one on a GPU).

Tolerances (relative Frobenius error against the fp32 computation): e4m3 keeps 3 mantissa bits, so
rounding one operand costs at most 2^-4 = 6.25% per element and ~2.6% RMS (measured); a GEMM of two
e4m3 operands ~3.7%: forward tolerance 6%. Gradients use e5m2 (2 mantissa bits, ~5% RMS measured for
the GEMM): tolerance 10%.
"""

import pytest
import torch
from torch import nn

from gigatron.kernels import fp8
from gigatron.kernels.fp8 import (E4M3, E5M2, FP8_MAX, Fp8Linear, Fp8Recipe, compute_scale, convert_linears,
                                  quantize, quantize_dequantize)
from tests.kernels._fake_tp import run_tp

FWD_RTOL, BWD_RTOL = 0.06, 0.10


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_scale_formula_and_special_cases():
    amax = torch.tensor([2.0, 0.0, float("inf"), float("nan"), 1e-45, 448.0])
    prev = torch.full((6,), 3.0)
    s = compute_scale(amax, FP8_MAX[E4M3], margin=1, prev_scale=prev)
    assert s[0] == 448.0 / 2.0 / 2.0  # fp8_max / amax * 2^-margin
    assert (s[1:4] == 3.0).all()  # 0 / inf / nan: keep the previous scale
    assert torch.isfinite(s[4]) and s[4] == torch.finfo(torch.float32).max  # overflow clamped
    assert s[5] == 0.5
    assert (compute_scale(torch.tensor([0.0, float("nan")]), 448.0) == 1.0).all()  # no previous: 1
    assert compute_scale(torch.tensor([4.0]), FP8_MAX[E5M2]).item() == 57344.0 / 4.0


def test_saturation_and_underflow():
    big = torch.tensor([1000.0, -1e6, 448.0, float("inf")])
    q = quantize(big, torch.ones(1), E4M3).float()
    assert q.tolist() == [448.0, -448.0, 448.0, 448.0]  # saturates, never nan / inf
    assert torch.isnan(quantize(torch.tensor([float("nan")]), torch.ones(1), E4M3).float()).all()
    assert quantize(torch.tensor([1e6]), torch.ones(1), E5M2).float().item() == 57344.0
    tiny = torch.tensor([1e-4, -3e-4, 1e-3])  # below / near e4m3's smallest subnormal 2^-9 = 0.00195
    assert (quantize(tiny[:2], torch.ones(1), E4M3).float() == 0).all()  # unscaled: flushed to zero
    s = compute_scale(tiny.abs().amax().reshape(1), FP8_MAX[E4M3])
    assert _rel(quantize_dequantize(tiny, s), tiny) < 2.0**-4  # scaled: kept to e4m3 precision


def test_negative_control_unscaled_small_tensors_fail_tolerance():
    """The scaled path meets the forward tolerance on small-magnitude data; e4m3 without scaling
    (scale 1) breaks it: the values sit in e4m3's subnormal range or below."""
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(0)) * 1e-3
    scaled = _rel(quantize_dequantize(x, compute_scale(x.abs().amax().reshape(1), FP8_MAX[E4M3])), x)
    unscaled = _rel(quantize_dequantize(x, torch.ones(1)), x)
    print(f"  scaled {scaled:.3f}, unscaled {unscaled:.3f} (tol {FWD_RTOL})")
    assert scaled < FWD_RTOL < unscaled


def test_rowwise_scales_per_row():
    lin = Fp8Linear(8, 4, bias=False, recipe=Fp8Recipe("rowwise"))
    x = torch.randn(5, 8) * torch.tensor([1e-3, 1.0, 10.0, 100.0, 0.0])[:, None]  # one all-zero row
    q, s = lin._quantize("input", x, E4M3)
    want = compute_scale(x.abs().amax(-1, keepdim=True), 448.0)
    assert s.shape == (5, 1) and torch.equal(s, want) and s[4].item() == 1.0
    assert (q.float().abs().amax(-1)[:4] == 448.0).all()  # each row's max maps to fp8_max


def test_delayed_scaling_history():
    """H = 2, margin 1: the scale used at call t comes from the history before t (first call: current
    amax); a jump in amax saturates for one step, then the history catches up and old amaxes roll out."""
    lin = Fp8Linear(4, 4, bias=False, recipe=Fp8Recipe("delayed", margin=1, amax_history_len=2))
    used = []
    for amax in (1.0, 4.0, 2.0, 1.0):
        x = torch.tensor([[amax, -amax / 2, 0.0, 0.25]])
        q, s = lin._quantize("input", x, E4M3)
        used.append(s.item())
        if amax == 4.0:
            assert q.float()[0, 0].item() == 448.0  # 4 * 112 * 2 > 448 -> saturated (delayed scaling's cost)
    f = 448.0 / 2  # fp8_max * 2^-margin
    assert used == [f / 1.0, f / 1.0, f / 4.0, f / 4.0]
    assert lin.fp8_amax_history[0].tolist() == [1.0, 2.0] and lin.fp8_scale[0].item() == f / 2.0
    most_recent = Fp8Linear(4, 4, recipe=Fp8Recipe("delayed", amax_history_len=4, amax_compute_algo="most_recent"))
    for amax in (8.0, 1.0):
        most_recent._quantize("weight", torch.full((1, 4), amax), E4M3)
    assert most_recent.fp8_scale[1].item() == 448.0


@pytest.mark.parametrize("scaling", ["delayed", "current", "rowwise"])
def test_fp8_linear_matches_linear(scaling):
    torch.manual_seed(0)
    ref = nn.Linear(64, 32)
    lin = Fp8Linear.from_linear(nn.Linear(64, 32), Fp8Recipe(scaling))
    lin.load_state_dict(ref.state_dict(), strict=False)
    x = torch.randn(2, 8, 64, requires_grad=True)
    g = torch.randn(2, 8, 32)
    y = lin(x)
    grads = torch.autograd.grad(y, (x, lin.weight, lin.bias), g)
    y_r = ref(x)
    grads_r = torch.autograd.grad(y_r, (x, ref.weight, ref.bias), g)
    errs = [_rel(y, y_r)] + [_rel(a, b) for a, b in zip(grads, grads_r)]
    print(f"  {scaling}: out {errs[0]:.3f} dx {errs[1]:.3f} dw {errs[2]:.3f} db {errs[3]:.1e}")
    assert errs[0] < FWD_RTOL and errs[1] < BWD_RTOL and errs[2] < BWD_RTOL
    assert errs[3] < 1e-6  # bias gradient stays high precision
    assert 0 < errs[0]  # it really went through fp8
    assert lin.quantize_calls == {"input": 1, "weight": 1, "grad_output": 1}


def test_amax_reduce_callback_gives_one_scale_over_tp():
    """Two simulated tp ranks with different local amaxes end with the same (max-reduced) scales."""
    xs = [torch.randn(4, 16) * 0.5, torch.randn(4, 16) * 3.0]

    def rank_fn(rank, all_reduce):
        torch.manual_seed(0)
        lin = Fp8Linear(16, 8, recipe=Fp8Recipe("current"), amax_reduce=lambda amax, kind: all_reduce(amax, "max"))
        lin(xs[rank]).sum().backward()
        return lin.fp8_scale.clone()

    (s0, s1), group = run_tp(2, rank_fn)
    assert torch.equal(s0, s1)
    assert s0[0] == 448.0 / torch.stack([x.abs().max() for x in xs]).max()  # fp32 division, exact
    assert group.calls["max"] == 3  # input, weight, grad_output


def test_scale_state_checkpointed_and_resume_bitwise():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    convert_linears(model, lambda name: True, Fp8Recipe("delayed", amax_history_len=4))
    x = torch.randn(8, 16)
    for _ in range(3):
        model(x).sum().backward()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    assert {"0.fp8_amax_history", "0.fp8_scale", "2.fp8_amax_history", "2.fp8_scale"} <= set(sd)
    assert (sd["0.fp8_amax_history"][:, :3] > 0).all()  # three steps recorded for every tensor kind
    fresh = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    convert_linears(fresh, lambda name: True, Fp8Recipe("delayed", amax_history_len=4))
    fresh.load_state_dict(sd)
    assert torch.equal(fresh(x), model(x))  # same delayed scales -> same bits


def test_convert_linears_keeps_names_and_selects_by_predicate():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.wq, self.wo = nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False)

    model = nn.Module()
    model.layers = nn.ModuleDict({"0": Block(), "1": Block()})
    model.output = nn.Linear(8, 20, bias=False)
    names_before = [n for n, _ in model.named_parameters()]
    params_before = [p for _, p in model.named_parameters()]
    x = torch.randn(3, 8)
    out_before = model.output(model.layers["0"].wq(x))
    converted = convert_linears(model, lambda name: name.startswith("layers."), Fp8Recipe("current"))
    assert converted == ["layers.0.wq", "layers.0.wo", "layers.1.wq", "layers.1.wo"]
    assert [n for n, _ in model.named_parameters()] == names_before
    assert all(a is b for a, (_, b) in zip(params_before, model.named_parameters()))  # same objects
    assert type(model.output) is nn.Linear and isinstance(model.layers["1"].wo, Fp8Linear)
    assert isinstance(model.layers["1"].wo, nn.Linear)  # still a drop-in for isinstance checks
    out_after = model.output(model.layers["0"].wq(x))
    assert 0 < _rel(out_after, out_before) < FWD_RTOL
    assert convert_linears(model, lambda name: True, Fp8Recipe()) == ["output"]  # idempotent on converted


def _fake_scaled_mm(a, b, scale_a, scale_b, out_dtype=None, **_):
    """CPU stand-in for torch._scaled_mm that enforces its layout / dtype contract."""
    assert a.dtype in (E4M3, E5M2) and b.dtype in (E4M3, E5M2) and not (a.dtype == b.dtype == E5M2)
    assert a.stride(1) == 1, "mat1 must be row-major"
    assert b.stride(0) == 1, "mat2 must be column-major"
    assert scale_a.dtype == scale_b.dtype == torch.float32
    return ((a.float() @ b.float()) * scale_a * scale_b).to(out_dtype)


@pytest.mark.parametrize("scaling", ["current", "rowwise"])
def test_scaled_mm_path_cpu_twin(scaling, monkeypatch):
    """The GPU branch (torch._scaled_mm) prepares operand layouts and inverse scales so that it equals
    the emulation: checked with a fake that asserts _scaled_mm's contract."""
    torch.manual_seed(0)
    lin = Fp8Linear(32, 16, recipe=Fp8Recipe(scaling))
    x = torch.randn(16, 32, requires_grad=True)
    x_bf16 = x.detach().bfloat16().requires_grad_()
    lin_bf16 = Fp8Linear.from_linear(nn.Linear(32, 16).bfloat16(), Fp8Recipe(scaling))
    lin_bf16.load_state_dict(lin.state_dict())
    want = lin_bf16(x_bf16)
    want_grads = torch.autograd.grad(want.float().sum(), (x_bf16, lin_bf16.weight))
    calls = []
    monkeypatch.setattr(fp8, "_scaled_mm_usable", lambda a, b: True)
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: calls.append(1) or _fake_scaled_mm(*a, **k),
                        raising=False)
    fresh = Fp8Linear.from_linear(nn.Linear(32, 16).bfloat16(), Fp8Recipe(scaling))
    fresh.load_state_dict(lin.state_dict())
    got = fresh(x_bf16)
    got_grads = torch.autograd.grad(got.float().sum(), (x_bf16, fresh.weight))
    assert len(calls) == (3 if scaling == "current" else 1)  # rowwise backward is emulated
    assert _rel(got, want) < 1e-2  # same fp8 operands; bf16 output rounding differs in order only
    for a, b in zip(got_grads, want_grads):
        assert _rel(a, b) < 1e-2


@pytest.mark.skipif(not (torch.cuda.is_available() and hasattr(torch, "_scaled_mm")
                         and torch.cuda.get_device_capability() >= (8, 9)),
                    reason="needs a CUDA GPU with fp8 tensor cores (sm_89+); CPU twin: test_scaled_mm_path_cpu_twin")
def test_scaled_mm_real_gpu_matches_emulation():
    torch.manual_seed(0)
    lin = Fp8Linear(64, 32, recipe=Fp8Recipe("current")).cuda().bfloat16()
    x = torch.randn(32, 64, device="cuda", dtype=torch.bfloat16)
    got = lin(x)
    x_q, x_s = lin._quantize("input", x, E4M3)
    w_q, w_s = lin._quantize("weight", lin.weight, E4M3)
    want = (fp8.dequantize(x_q, x_s) @ fp8.dequantize(w_q, w_s).t() + lin.bias.float()).bfloat16()
    assert _rel(got, want) < 1e-2


def test_recipe_validation():
    with pytest.raises(ValueError):
        Fp8Recipe("blockwise")
    with pytest.raises(ValueError):
        Fp8Recipe(amax_history_len=0)
    with pytest.raises(ValueError):
        Fp8Recipe(fwd_dtype=torch.bfloat16)


def test_delayed_scaling_per_step_update():
    """fp8_per_call_update False (the engine's mode): every call of a step uses the same delayed scale
    (the first step: each call's current amax), the step's max amax is pushed by fp8_update_scales,
    and the new scale is fp8_max / max(history) * 2^-margin per kind (e5m2's max for gradients);
    a non-finite amax (a skipped step) is recorded as 0, i.e. ignored."""
    lin = Fp8Linear(4, 4, bias=False, recipe=Fp8Recipe("delayed", margin=1, amax_history_len=3))
    lin.fp8_per_call_update = False
    f = 448.0 / 2
    used = [lin._quantize("input", torch.full((1, 4), a), E4M3)[1].item() for a in (2.0, 8.0)]
    assert used == [f / 2.0, f / 8.0]  # step 0: no history yet, each call its own amax
    lin.fp8_update_scales()
    assert lin.fp8_amax_history[0].tolist() == [8.0, 0.0, 0.0] and lin.fp8_scale[0].item() == f / 8.0
    used = [lin._quantize("input", torch.full((1, 4), a), E4M3)[1].item() for a in (1.0, 16.0)]
    assert used == [f / 8.0, f / 8.0]  # step 1: both calls use step 0's scale
    lin._quantize("grad_output", torch.full((1, 4), 4.0), E5M2)
    lin.fp8_update_scales(torch.tensor([16.0, float("nan"), 4.0]))  # amaxes as reduced by the engine
    assert lin.fp8_amax_history[:, 0].tolist() == [16.0, 0.0, 4.0]
    assert lin.fp8_scale.tolist() == [f / 16.0, lin.fp8_scale[1].item(), 57344.0 / 2 / 4.0]
    assert lin.fp8_pending_amax.tolist() == [0.0, 0.0, 0.0]
    w = torch.full((4, 4), 0.5)  # a kind with an empty history still starts from its current amax
    assert lin._quantize("weight", w, E4M3)[1].item() == f / 0.5
