"""Tests for gigatron.kernels attention: reference vs SDPA, triton vs reference, merge, masking, backends.

TRITON_INTERPRET=1 must be set before triton is imported, hence the first lines. Shapes are tiny: the
interpreter is ~100-300x slower than torch. With TRITON_INTERPRET=0 on a CUDA machine the same tests
run the compiled kernels on the GPU.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402
import logging  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from gigatron.kernels import attention, attention_backward, attention_forward, merge_partials  # noqa: E402
from gigatron.kernels.attention_reference import (  # noqa: E402
    attention_backward_reference, attention_forward_reference, visibility_mask)
from gigatron.kernels.attention_triton import (  # noqa: E402
    attention_backward_triton, attention_forward_triton, interpret_mode, triton_available)

# The package re-exports the function `attention`, which shadows the submodule of the same name as an
# attribute, so `import gigatron.kernels.attention as m` would give the function: fetch the module itself.
attn_mod = importlib.import_module("gigatron.kernels.attention")
DEVICE = "cpu" if interpret_mode() or not torch.cuda.is_available() else "cuda"
requires_triton = pytest.mark.skipif(not triton_available(),
                                     reason="triton is not importable (pip install triton; TRITON_INTERPRET=1 for CPU)")
FWD_TOL, GRAD_TOL = 1e-5, 1e-4  # fp32 acceptance: out / lse, and dq / dk / dv
# bf16 tolerance: inputs are the same bf16 values in both runs, so the kernel differs from the fp32
# reference only by rounding its bf16 outputs (relative 2^-9 = 0.2%) and, on GPU, by bf16 P / dS
# operands in the matmuls (~0.4% relative per term, averaging out over keys). Values are O(1), so
# 2e-2 absolute (scaled by the largest reference magnitude when that exceeds 1) is a few bf16 ulps.
BF16_TOL = 2e-2


def _err(a, b):
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def _close(name, got, want, tol):
    err = _err(got, want)
    print(f"  {name}: max abs err {err:.2e} (tol {tol:.0e})")
    assert torch.isfinite(got).all() or torch.isneginf(want).any(), f"{name} has NaN/inf"
    assert err <= tol, f"{name}: max abs err {err} > {tol}"


def _inputs(B, H, Hkv, T, S, D, dtype=torch.float32, seed=0, strided=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g).transpose(1, 2) if strided else torch.randn(B, H, T, D, generator=g)
    k, v = torch.randn(B, Hkv, S, D, generator=g), torch.randn(B, Hkv, S, D, generator=g)
    dout = torch.randn(B, H, T, D, generator=g)
    return [t.to(DEVICE, dtype) for t in (q, k, v, dout)]


def _segments(B, n, docs, pad=0, pad_id=-1):
    """(B, n) segment ids: documents of the given lengths (rotated per batch row), then `pad` padding."""
    rows = []
    for b in range(B):
        lens = docs[b % len(docs):] + docs[:b % len(docs)]
        ids = torch.cat([torch.full((m,), i) for i, m in enumerate(lens)])[: n - pad]
        rows.append(torch.cat([ids, torch.full((n - len(ids),), pad_id)]))
    return torch.stack(rows).to(DEVICE)


# name: (B, H, Hkv, T, S, D, causal, mask kwargs builder, extra flags)
CASES = {
    "causal": (1, 2, 2, 37, 37, 32, True, None, {}),
    "bidirectional": (1, 2, 2, 37, 37, 32, False, None, {}),
    "multi_tile_causal": (1, 1, 1, 100, 100, 16, True, None, {}),
    "causal_more_queries": (1, 1, 1, 70, 40, 16, True, None, {}),  # default positions, T != S
    "causal_more_keys": (1, 1, 1, 20, 45, 16, True, None, {}),
    "segments_causal_padded": (2, 2, 2, 45, 45, 16, True,
                               lambda: dict(q_segment_ids=_segments(2, 45, [12, 20, 13], pad=5, pad_id=-1),
                                            kv_segment_ids=_segments(2, 45, [12, 20, 13], pad=5, pad_id=-2)), {}),
    "segments_bidirectional": (1, 2, 2, 40, 40, 16, False,
                               lambda: dict(q_segment_ids=_segments(1, 40, [7, 25, 8]),
                                            kv_segment_ids=_segments(1, 40, [7, 25, 8])), {}),
    "gqa_h4_kv2_causal": (1, 4, 2, 40, 40, 16, True, None, {}),
    "gqa_h4_kv1_bidirectional": (1, 4, 1, 33, 33, 16, False, None, {}),
    "q_chunk_offset_positions": (1, 2, 1, 24, 70, 16, True,
                                 lambda: dict(q_positions=torch.arange(46, 70, device=DEVICE)), {}),
    "zigzag_kv_positions": (1, 2, 2, 20, 64, 16, True,
                            lambda: dict(q_positions=torch.arange(30, 50, device=DEVICE),
                                         kv_positions=torch.cat([torch.arange(48, 64), torch.arange(0, 16),
                                                                 torch.arange(32, 48), torch.arange(16, 32)]).to(DEVICE)),
                            {}),
    "per_batch_positions": (2, 1, 1, 20, 30, 16, True,
                            lambda: dict(q_positions=torch.stack([torch.arange(10, 30), torch.arange(0, 20)]).to(DEVICE),
                                         kv_positions=torch.arange(30, device=DEVICE)), {}),
    "head_dim_64": (1, 1, 1, 20, 20, 64, True, None, {}),
    "head_dim_128": (1, 1, 1, 20, 20, 128, False, None, {}),
    "head_dim_48_strided_q_scale": (1, 2, 1, 21, 21, 48, True, None, dict(strided=True, scale=0.3)),
}


def _case(name, dtype=torch.float32):
    B, H, Hkv, T, S, D, causal, mask_fn, extra = CASES[name]
    q, k, v, dout = _inputs(B, H, Hkv, T, S, D, dtype, strided=extra.get("strided", False))
    kw = dict(causal=causal, scale=extra.get("scale"), **(mask_fn() if mask_fn else {}))
    return q, k, v, dout, kw


@requires_triton
@pytest.mark.parametrize("name", list(CASES))
def test_triton_matches_reference_fp32(name):
    q, k, v, dout, kw = _case(name)
    out_r, lse_r = attention_forward_reference(q, k, v, **kw)
    out_t, lse_t = attention_forward_triton(q, k, v, **kw)
    _close("out", out_t, out_r, FWD_TOL)
    assert torch.equal(torch.isneginf(lse_t), torch.isneginf(lse_r))
    fin = torch.isfinite(lse_r)
    _close("lse", lse_t[fin], lse_r[fin], FWD_TOL)
    grads_r = attention_backward_reference(dout, q, k, v, out_r, lse_r, **kw)
    grads_t = attention_backward_triton(dout, q, k, v, out_r, lse_r, **kw)
    for n, gt, gr in zip(("dq", "dk", "dv"), grads_t, grads_r):
        _close(n, gt, gr, GRAD_TOL)


def _sdpa(q, k, v, kw):
    """SDPA (math) with an explicit boolean mask; GQA by repeating k / v."""
    rep = q.shape[1] // k.shape[1]
    mask = visibility_mask(q.shape[2], k.shape[2], causal=kw["causal"], device=q.device,
                           **{n: kw.get(n) for n in ("q_positions", "kv_positions", "q_segment_ids", "kv_segment_ids")})
    return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                          attn_mask=None if mask is None else mask[:, None], scale=kw.get("scale"))


@pytest.mark.parametrize("name", ["causal", "bidirectional", "segments_bidirectional", "gqa_h4_kv2_causal",
                                  "q_chunk_offset_positions", "zigzag_kv_positions", "per_batch_positions",
                                  "head_dim_48_strided_q_scale"])
def test_reference_matches_sdpa_and_autograd(name):
    """The reference forward equals SDPA; its flash-style backward equals autograd through both."""
    q, k, v, dout, kw = _case(name)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    want = _sdpa(q, k, v, kw)
    out, lse = attention_forward_reference(q, k, v, **kw)
    _close("out vs sdpa", out, want, FWD_TOL)
    g_sdpa = torch.autograd.grad(want, (q, k, v), dout)
    g_auto = torch.autograd.grad(out, (q, k, v), dout)
    g_flash = attention_backward_reference(dout, q.detach(), k.detach(), v.detach(), out.detach(), lse, **kw)
    for n, gf, ga, gs in zip(("dq", "dk", "dv"), g_flash, g_auto, g_sdpa):
        _close(f"{n} flash vs autograd", gf, ga, GRAD_TOL)
        _close(f"{n} flash vs sdpa", gf, gs, GRAD_TOL)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_triton)])
def test_autograd_function(backend):
    """attention() through AttentionFunction: out / lse / grads equal the reference; lse has no grad."""
    q, k, v, dout, kw = _case("gqa_h4_kv2_causal")
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out, lse = attention(*leaves, backend=backend, return_lse=True, **kw)
    assert not lse.requires_grad and lse.dtype == torch.float32
    out.backward(dout)
    out_r, lse_r = attention_forward_reference(q, k, v, **kw)
    _close("out", out, out_r, FWD_TOL)
    _close("lse", lse, lse_r, FWD_TOL)
    for n, leaf, gr in zip(("dq", "dk", "dv"), leaves, attention_backward_reference(dout, q, k, v, out_r, lse_r, **kw)):
        _close(n, leaf.grad, gr, GRAD_TOL)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_triton)])
def test_bf16(backend):
    q, k, v, dout, kw = _case("segments_causal_padded", torch.bfloat16)
    out, lse = attention_forward(q, k, v, backend=backend, **kw)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    f32 = [t.float() for t in (q, k, v, dout)]
    out_r, lse_r = attention_forward_reference(*f32[:3], **kw)
    _close("bf16 out", out, out_r, BF16_TOL)
    fin = torch.isfinite(lse_r)
    _close("bf16 lse", lse[fin], lse_r[fin], BF16_TOL)
    grads = attention_backward(dout, q, k, v, out, lse, backend=backend, **kw)
    for n, g, gr in zip(("dq", "dk", "dv"), grads, attention_backward_reference(f32[3], *f32[:3], out_r, lse_r, **kw)):
        assert g.dtype == torch.bfloat16
        _close(f"bf16 {n}", g, gr, BF16_TOL * max(1.0, gr.abs().max().item()))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_triton)])
def test_fully_masked_rows(backend):
    """Rows with no visible key: out = 0, lse = -inf, zero grads, no NaN anywhere."""
    q, k, v, dout = _inputs(2, 2, 1, 20, 24, 16)
    qs = torch.zeros(2, 20, dtype=torch.long, device=DEVICE)
    qs[0, 15:] = -1  # padding queries of row 0
    qs[1] = -1  # row 1 entirely padding
    kw = dict(causal=True, q_positions=torch.arange(4, 24, device=DEVICE), q_segment_ids=qs,
              kv_segment_ids=torch.zeros(2, 24, dtype=torch.long, device=DEVICE))
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out, lse = attention(*leaves, backend=backend, return_lse=True, **kw)
    out.backward(dout)
    dead = qs == -1  # (B, T)
    assert torch.isneginf(lse[dead[:, None].expand_as(lse)]).all() and torch.isfinite(lse[~dead[:, None].expand_as(lse)]).all()
    assert (out[dead[:, None].expand_as(lse)] == 0).all()
    assert all(torch.isfinite(t.grad).all() for t in leaves)
    assert (leaves[0].grad[dead[:, None].expand_as(lse)] == 0).all() and (leaves[1].grad[1] == 0).all()
    # Causal with every key in the future of every query: everything masked.
    out, lse = attention_forward(q, k, v, causal=True, kv_positions=torch.arange(100, 124, device=DEVICE),
                                 backend=backend)
    assert (out == 0).all() and torch.isneginf(lse).all()
    grads = attention_backward(dout, q, k, v, out, lse, causal=True, backend=backend,
                               kv_positions=torch.arange(100, 124, device=DEVICE))
    assert all((g == 0).all() for g in grads)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_triton)])
def test_merge_partials_and_blockwise_backward(backend):
    """Keys split in two: merged forward equals full attention; per-block backward with the GLOBAL
    out / lse gives dq shares that sum to the full dq and the exact dk / dv slices."""
    q, k, v, dout = _inputs(1, 4, 2, 32, 48, 16)
    kw = dict(causal=True, q_positions=torch.arange(16, 48, device=DEVICE))  # the last 32 of 48 positions
    kv_pos = torch.arange(48, device=DEVICE)
    out, lse = attention_forward_reference(q, k, v, **kw)
    halves = [slice(24, 48), slice(0, 24)]  # first block gives -inf lse for the queries at positions < 24
    parts = [attention_forward(q, k[:, :, s], v[:, :, s], kv_positions=kv_pos[s], backend=backend, **kw)
             for s in halves]
    assert torch.isneginf(parts[0][1]).any()
    m_out, m_lse = merge_partials(*parts[0], *parts[1])
    _close("merged out", m_out, out, 1e-6)
    _close("merged lse", m_lse, lse, 1e-6)
    full = attention_backward_reference(dout, q, k, v, out, lse, **kw)
    blocks = [attention_backward(dout, q, k[:, :, s], v[:, :, s], m_out, m_lse, kv_positions=kv_pos[s],
                                 backend=backend, **kw) for s in halves]
    _close("blockwise dq", blocks[0][0] + blocks[1][0], full[0], GRAD_TOL)
    for i, n in ((1, "dk"), (2, "dv")):
        _close(f"blockwise {n}", torch.cat([blocks[1][i], blocks[0][i]], 2), full[i], GRAD_TOL)
    # Both partials -inf: merged row stays out = 0, lse = -inf.
    z = torch.full_like(lse, float("-inf"))
    o, l_ = merge_partials(torch.zeros_like(out), z, torch.zeros_like(out), z)
    assert (o == 0).all() and torch.isneginf(l_).all()


def test_auto_backend_choice_logged_once(caplog, monkeypatch):
    attn_mod._logged.clear()
    q, k, v, _, kw = _case("causal")
    want = "triton" if triton_available() and DEVICE == "cuda" else "torch"
    with caplog.at_level(logging.INFO, logger="gigatron.kernels"):
        for _ in range(2):
            attention(q, k, v, backend="auto", **kw)
    records = [r for r in caplog.records if r.name == "gigatron.kernels"]
    assert len(records) == 1, [r.getMessage() for r in records]
    assert f"-> '{want}'" in records[0].getMessage()
    # The decision table, without running kernels.
    monkeypatch.setattr(attn_mod, "triton_available", lambda: True)
    assert attn_mod.resolve_backend("auto", torch.device("cuda")) == "triton"
    assert attn_mod.resolve_backend("auto", torch.device("cpu")) == "torch"  # even with TRITON_INTERPRET=1
    monkeypatch.setattr(attn_mod, "triton_available", lambda: False)
    assert attn_mod.resolve_backend("auto", torch.device("cuda")) == "torch"
    with pytest.raises(RuntimeError):
        attn_mod.resolve_backend("triton", torch.device("cuda"))
    with pytest.raises(ValueError):
        attn_mod.resolve_backend("flash", torch.device("cpu"))


# -- kernel-variant dispatch, autotune key, deterministic mode (issue 11) ---------------------------

if triton_available():
    from gigatron.kernels import attention_triton as at  # noqa: E402


def _run_both(kw, shape=(1, 2, 1, 40, 40, 16), **extra):
    """Forward + backward through the triton backend; returns (out, lse, grads)."""
    q, k, v, dout = _inputs(*shape)
    out, lse = attention_forward(q, k, v, backend="triton", **kw, **extra)
    grads = attention_backward(dout, q, k, v, out, lse, backend="triton", **kw, **extra)
    return (q, k, v, dout), out, lse, grads


# (positions kwargs, expected variant). The engine passes positions = arange(T) for both q and kv:
# that must take the diagonal fast path, as must a contiguous query chunk (offset diagonal).
VARIANT_CASES = {
    "no_positions": (lambda: {}, "causal_diag"),
    "engine_aranges": (lambda: dict(q_positions=torch.arange(40), kv_positions=torch.arange(40)), "causal_diag"),
    "offset_chunk": (lambda: dict(q_positions=torch.arange(25, 65), kv_positions=torch.arange(0, 40)), "causal_diag"),
    "keys_ahead": (lambda: dict(q_positions=torch.arange(0, 40), kv_positions=torch.arange(13, 53)), "causal_diag"),
    "per_batch_same_ranges": (lambda: dict(q_positions=torch.arange(40).expand(1, 40)), "causal_diag"),
    "segments_aranges": (lambda: dict(q_positions=torch.arange(40), q_segment_ids=_segments(1, 40, [9, 31]),
                                      kv_segment_ids=_segments(1, 40, [9, 31])), "causal_diag_segments"),
    "reversed_positions": (lambda: dict(kv_positions=torch.arange(39, -1, -1)), "positions"),
    "zigzag": (lambda: dict(kv_positions=torch.cat([torch.arange(20, 40), torch.arange(0, 20)])), "positions"),
}


@requires_triton
@pytest.mark.parametrize("name", list(VARIANT_CASES))
def test_causal_fast_path_dispatch(name):
    """The diagonal fast path runs whenever positions are ranges (counted per kernel), and gives the
    reference's result; the forced data-driven path gives the same result."""
    kw_fn, want = VARIANT_CASES[name]
    kw = dict(causal=True, **{n: t.to(DEVICE) for n, t in kw_fn().items()})
    at.reset_kernel_stats()
    (q, k, v, dout), out, lse, grads = _run_both(kw)
    assert {key: n for key, n in at.kernel_stats.items() if key[0] != "range_check"} == {
        ("fwd", want): 1, ("dkdv", want): 1, ("dq", want): 1}, at.kernel_stats
    out_r, lse_r = attention_forward_reference(q, k, v, **kw)
    _close("out", out, out_r, FWD_TOL)
    fin = torch.isfinite(lse_r)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse_r))
    _close("lse", lse[fin], lse_r[fin], FWD_TOL)
    for n, g, gr in zip(("dq", "dk", "dv"), grads, attention_backward_reference(dout, q, k, v, out_r, lse_r, **kw)):
        _close(n, g, gr, GRAD_TOL)
    at.reset_kernel_stats()
    _, out_x, lse_x, grads_x = _run_both(kw, positions_hint="explicit")
    explicit = "positions" if ("q_positions" in kw or "kv_positions" in kw) else want
    assert at.kernel_stats[("fwd", explicit)] == 1
    _close("out fast vs explicit", out, out_x, FWD_TOL)
    for n, g, gx in zip(("dq", "dk", "dv"), grads, grads_x):
        _close(f"{n} fast vs explicit", g, gx, GRAD_TOL)


@requires_triton
def test_positions_hint_default_and_cache():
    """"default" trusts the caller (no check: wrong positions are ignored, by contract); "auto" checks
    once per tensor and re-checks after an in-place change (version counter)."""
    pos = torch.arange(40, device=DEVICE)
    assert at.plan_mask(True, pos, pos, None, None, "auto")[:2] == ("causal_diag", 0)
    key = id(pos)
    assert at._RANGE_CACHE[key][2] == 0  # cached: the next layer's call does not sync
    pos[5] = 100  # in-place edit bumps the version: re-checked, no longer a range
    assert at.plan_mask(True, pos, pos, None, None, "auto")[0] == "positions"
    assert at.plan_mask(True, pos, pos, None, None, "default")[:2] == ("causal_diag", 0)
    assert at.plan_mask(False, pos, pos, None, None, "auto")[0] == "dense"
    with pytest.raises(ValueError):
        at.plan_mask(True, pos, pos, None, None, "arange")
    with pytest.raises(ValueError):
        at.plan_mask(True, pos, pos, None, None, True)  # a bool is not an offset
    # an int hint: the caller's host-side offset, trusted, no check (no sync)
    at.reset_kernel_stats()
    assert at.plan_mask(True, torch.arange(30, 50), torch.arange(0, 40), None, None, 30)[:2] == ("causal_diag", 30)
    assert at.kernel_stats[("range_check", "host_sync")] == 0
    # the torch backend honours the same hint contract
    q, k, v, _ = _inputs(1, 1, 1, 40, 40, 16)
    shuffled = torch.randperm(40, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    out_d = attention_forward(q, k, v, causal=True, q_positions=shuffled, kv_positions=shuffled, backend="torch",
                              positions_hint="default")[0]
    _close("default hint == no positions", out_d, attention_forward_reference(q, k, v, causal=True)[0], 0.0)


@requires_triton
def test_one_range_check_per_step_across_layers():
    """The engine passes one positions tensor to every layer: 3 layers forward + backward pay a single
    host sync for the range check, and every kernel takes the diagonal path."""
    q, k, v, _ = _inputs(1, 2, 2, 40, 40, 16)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    pos = torch.arange(40, device=DEVICE)
    at.reset_kernel_stats()
    out = sum(attention(*leaves, causal=True, q_positions=pos, kv_positions=pos, backend="triton") for _ in range(3))
    out.sum().backward()
    assert at.kernel_stats == {("range_check", "host_sync"): 1, ("fwd", "causal_diag"): 3,
                               ("dkdv", "causal_diag"): 3, ("dq", "causal_diag"): 3}, at.kernel_stats


@requires_triton
def test_autotune_key_buckets_sequence_lengths():
    """The autotune key holds the length buckets and head dim, and every key names a kernel argument
    (a misspelt key would only fail at the first GPU launch)."""
    kern = importlib.import_module("gigatron.kernels.attention_triton_kernels")
    for must in ("T_BUCKET", "S_BUCKET", "HEAD_DIM"):
        assert must in kern._KEY
    for raw, cfgs in ((kern._attn_fwd, kern._FWD_CONFIGS), (kern._attn_bwd_dkdv, kern._DKDV_CONFIGS),
                      (kern._attn_bwd_dq, kern._DQ_CONFIGS)):
        tuned = kern.make_autotuned(raw, cfgs)
        assert set(tuned.keys) <= set(tuned.arg_names), set(tuned.keys) - set(tuned.arg_names)
    assert [at.seq_bucket(n) for n in (1, 16, 17, 100, 128, 129, 4096, 5000)] == [16, 16, 32, 128, 128, 256, 4096, 8192]


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic_mode_fixed_config(dtype):
    """deterministic=True launches the documented fixed config for (head dim, dtype) for all three
    kernels, matches the reference, and repeats bit for bit."""
    kern = importlib.import_module("gigatron.kernels.attention_triton_kernels")
    q, k, v, dout = _inputs(1, 2, 1, 70, 70, 16, dtype)
    kw = dict(causal=True, q_positions=torch.arange(70, device=DEVICE), kv_positions=torch.arange(70, device=DEVICE))
    runs = []
    for _ in range(2):
        at.reset_kernel_stats()
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = attention(*leaves, backend="triton", deterministic=True, **kw)
        out.backward(dout)
        runs.append([out.detach()] + [t.grad for t in leaves])
        for name in ("fwd", "dkdv", "dq"):
            bm, bn, w, st = kern.deterministic_config(name, 16, dtype == torch.float32)
            assert at.last_config[name] == dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st,
                                                autotuned=False, variant="causal_diag"), at.last_config[name]
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    f32 = [t.float() for t in (q, k, v, dout)]
    out_r, lse_r = attention_forward_reference(*f32[:3], **kw)
    tol = FWD_TOL if dtype == torch.float32 else BF16_TOL
    _close("deterministic out", runs[0][0], out_r, tol)
    for n, g, gr in zip(("dq", "dk", "dv"), runs[0][1:], attention_backward_reference(f32[3], *f32[:3], out_r, lse_r, **kw)):
        _close(f"deterministic {n}", g, gr, GRAD_TOL if dtype == torch.float32 else BF16_TOL * max(1.0, gr.abs().max().item()))
    # every table row is a valid tile: powers of two, >= 16 (tl.dot's minimum)
    for (name, d, cls), (bm, bn, w, st) in kern.DETERMINISTIC_CONFIGS.items():
        assert bm >= 16 and bn >= 16 and bm & (bm - 1) == 0 and bn & (bn - 1) == 0 and w in (4, 8) and st >= 1


@requires_triton
def test_int_positions_hint_matches_auto():
    """A ring-CP-style block (queries 40..59, keys 16..47) with the offset given on the host: same
    result as the checked path and the reference, no host sync."""
    q, k, v, dout = _inputs(1, 2, 1, 20, 32, 16)
    kw = dict(causal=True, q_positions=torch.arange(40, 60, device=DEVICE), kv_positions=torch.arange(16, 48, device=DEVICE))
    at.reset_kernel_stats()
    out, lse = attention_forward(q, k, v, backend="triton", positions_hint=40 - 16, **kw)
    grads = attention_backward(dout, q, k, v, out, lse, backend="triton", positions_hint=24, **kw)
    assert at.kernel_stats[("range_check", "host_sync")] == 0 and at.kernel_stats[("fwd", "causal_diag")] == 1
    out_r, lse_r = attention_forward_reference(q, k, v, **kw)
    _close("out", out, out_r, FWD_TOL)
    for n, g, gr in zip(("dq", "dk", "dv"), grads, attention_backward_reference(dout, q, k, v, out_r, lse_r, **kw)):
        _close(n, g, gr, GRAD_TOL)
