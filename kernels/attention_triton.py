"""Triton flash attention with log-sum-exp output: python launchers for forward and backward.

Same interface and semantics as `attention_reference.py` (read its docstring for the math); the
kernels themselves, with the online-softmax and backward derivations, are in
`attention_triton_kernels.py`. That module is imported on first use, so this one imports fine without
triton and honours TRITON_INTERPRET=1 (CPU tensors through the triton interpreter) when it is set any
time before the first launch.

Tensors may be strided (e.g. q = x.view(B, T, H, D).transpose(1, 2)): only the head dim must be
contiguous. Outputs (out, dq, dk, dv, and the fp32 (B, H, T) lse) are freshly allocated contiguous
tensors. The GPU path autotunes block sizes once per (sequence-length buckets, head dim, GQA group,
mask kind, dtype class), or, with deterministic=True, launches one fixed config per (head dim, dtype).
"""

from __future__ import annotations

import functools
import math
import os
import weakref
from collections import Counter

import torch

from .attention_reference import check_inputs

__all__ = ["attention_forward_triton", "attention_backward_triton", "triton_available", "interpret_mode",
           "plan_mask", "check_positions_hint", "seq_bucket", "kernel_stats", "last_config", "reset_kernel_stats", "POSITION_HINTS"]

# Block sizes used under the interpreter (on GPU the kernels autotune). 32 keeps tiny test shapes
# multi-tile, so ragged tails and tile skipping are exercised.
_INTERPRET_BLOCK = 32


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when `import triton` works."""
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install raising something else
        return False
    return True


def interpret_mode() -> bool:
    """True when TRITON_INTERPRET=1 (kernels then run on CPU tensors through the interpreter)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def _kernels():
    if not triton_available():
        raise RuntimeError("the triton attention backend needs triton (pip install triton)")
    from . import attention_triton_kernels

    return attention_triton_kernels


def _empty_like(t):
    """Output buffer shaped like t. Under the interpreter low-precision outputs are written in fp32 and
    rounded by torch afterwards (`_finish`): the interpreter's fp32 -> bf16 cast truncates, whereas GPU
    stores round to nearest even."""
    dtype = torch.float32 if interpret_mode() else t.dtype
    return torch.empty_like(t, dtype=dtype, memory_format=torch.contiguous_format)


def _finish(buf, dtype):
    return buf if buf.dtype == dtype else buf.to(dtype)


def _head_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _bht(t):
    """(b, h, t) strides of a (B, H, T, D) tensor."""
    return t.stride(0), t.stride(1), t.stride(2)


POSITION_HINTS = ("auto", "default", "explicit")


def _range_start(pos):
    """q0 when the (T,) or (B, T) positions are q0 + arange(T) in every row, else None (0 for None).

    One host sync per positions tensor: the result is cached by tensor identity and version, and the
    engine passes the same positions tensor to every layer, so a step pays one sync, not one per layer."""
    if pos is None:
        return 0
    try:
        key = (id(pos), pos._version, pos.data_ptr(), tuple(pos.shape))
    except RuntimeError:  # inference tensors have no version counter: no caching
        key = None
    hit = _RANGE_CACHE.get(key[0]) if key else None
    if hit is not None and hit[0]() is pos and hit[1] == key:
        return hit[2]
    rows = pos.reshape(-1, pos.shape[-1]).long()  # (B or 1, T)
    if rows.shape[-1] == 0:
        start = 0
    else:
        first = rows[:, :1]
        ok = ((rows == first + torch.arange(rows.shape[-1], device=rows.device)).all()
              & (first == first[0, 0]).all())
        ok_flag, first_value = torch.stack([ok.long(), first[0, 0]]).tolist()  # the one sync
        kernel_stats[("range_check", "host_sync")] += 1
        start = int(first_value) if ok_flag else None
    if key:
        if len(_RANGE_CACHE) > 256:
            _RANGE_CACHE.clear()
        _RANGE_CACHE[key[0]] = (weakref.ref(pos), key, start)
    return start


_RANGE_CACHE: dict = {}


def check_positions_hint(positions_hint):
    if not (positions_hint in POSITION_HINTS or (isinstance(positions_hint, int) and not isinstance(positions_hint, bool))):
        raise ValueError(f"positions_hint must be one of {POSITION_HINTS} or an int offset, got {positions_hint!r}")


def plan_mask(causal, q_positions, kv_positions, q_segment_ids, kv_segment_ids, positions_hint="auto"):
    """Choose the kernel variant. Returns (variant, diag_offset, q_positions, kv_positions) where the
    positions are those the kernels must load (None when the variant does not need them).

    positions_hint: "auto"     -> causal with contiguous-range positions (q0 + i, k0 + j; None counts as
                                  arange) takes the diagonal fast path with offset q0 - k0 (one cached
                                  host sync per positions tensor to check);
                    "default"  -> the caller guarantees the positions are arange(T) / arange(S) (or None):
                                  fast path with offset 0, no check, no sync;
                    "explicit" -> always the data-driven path (positions loaded, per-tile skip test).
                    an int     -> the caller guarantees contiguous ranges with q0 - k0 = that int (context
                                  parallelism knows its chunk starts on the host): fast path, no sync.
    Variants: "dense" (no mask), "causal_diag" (diagonal loop bounds), "causal_diag_segments" (diagonal
    bounds + segment skip test), "segments" (bidirectional, segment skip test), "positions" (explicit
    positions, optionally with segments: data-driven skip test)."""
    check_positions_hint(positions_hint)
    has_seg = q_segment_ids is not None
    if not causal:
        return ("segments" if has_seg else "dense"), 0, None, None
    if isinstance(positions_hint, int):
        offset = positions_hint
    elif positions_hint == "default":
        offset = 0
    elif positions_hint == "explicit" and (q_positions is not None or kv_positions is not None):
        offset = None
    else:
        q0, k0 = _range_start(q_positions), _range_start(kv_positions)
        offset = None if q0 is None or k0 is None else q0 - k0
    if offset is not None and abs(offset) < 2**30:
        return ("causal_diag_segments" if has_seg else "causal_diag"), offset, None, None
    return "positions", 0, q_positions, kv_positions


def _mask_args(q, causal, q_positions, kv_positions, q_segment_ids, kv_segment_ids, variant):
    """Pointers, batch strides and flags for positions / segment ids (q stands in for unused ones).
    Positions only matter for causal masks; (T,) positions get batch stride 0, (B, T) ones their own.
    Both are passed as int32 (cheaper masks in registers); values must fit in int32."""
    args, strides, flags = [], [], []
    for pos in (q_positions, kv_positions):
        used = causal and pos is not None
        pos = pos.to(torch.int32).contiguous() if used else q
        args.append(pos)
        strides.append(pos.stride(0) if used and pos.dim() == 2 else 0)
        flags.append(used)
    has_seg = q_segment_ids is not None
    for seg in (q_segment_ids, kv_segment_ids):
        seg = seg.to(torch.int32).contiguous() if has_seg else q
        args.append(seg)
        strides.append(seg.stride(0) if has_seg else 0)
    diag = variant.startswith("causal_diag")
    return args, strides, dict(HAS_QPOS=flags[0], HAS_KPOS=flags[1], HAS_SEG=has_seg,
                               DIAG_BOUND=diag, SKIP_EMPTY=has_seg or any(flags))


def _common(q, k, v, causal, q_positions, kv_positions, q_segment_ids, kv_segment_ids, scale, positions_hint):
    B, H, Hkv, T, S, D = check_inputs(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    variant, diag_off, q_positions, kv_positions = plan_mask(bool(causal), q_positions, kv_positions,
                                                             q_segment_ids, kv_segment_ids, positions_hint)
    mask_ptrs, mask_strides, flags = _mask_args(q, bool(causal), q_positions, kv_positions,
                                                q_segment_ids, kv_segment_ids, variant)
    cast = interpret_mode() or q.dtype == torch.float32
    meta = dict(GROUP=H // Hkv, HEAD_DIM=D, BLOCK_D=max(16, 1 << (D - 1).bit_length()), CAUSAL=bool(causal),
                CAST_FP32=cast, PRECISION="ieee" if q.dtype == torch.float32 else "tf32", **flags)
    # Runtime scalars after the shapes: diagonal offset and the autotune length buckets.
    extra = (diag_off, seq_bucket(T), seq_bucket(S))
    return B, H, Hkv, T, S, D, scale, mask_ptrs, mask_strides, meta, variant, extra


def seq_bucket(n: int) -> int:
    """Autotune bucket of a sequence length: the next power of two (at least 16)."""
    return max(16, 1 << (max(int(n), 1) - 1).bit_length())


# What ran, for tests and logs: counts per (kernel, variant) and the last config per kernel.
kernel_stats: Counter = Counter()
last_config: dict = {}


def reset_kernel_stats():
    kernel_stats.clear()
    last_config.clear()


def _launch(kern, name, grid, args, meta, variant, deterministic, dtype):
    """Launch kernel `name` ("fwd" / "dkdv" / "dq"): the fixed deterministic config, the autotuned
    kernel (GPU), or the interpreter's small blocks."""
    raw = getattr(kern, {"fwd": "_attn_fwd", "dkdv": "_attn_bwd_dkdv", "dq": "_attn_bwd_dq"}[name])
    if deterministic:
        bm, bn, warps, stages = kern.deterministic_config(name, meta["HEAD_DIM"], dtype == torch.float32)
        cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, autotuned=False)
        fn, launch_meta = raw, dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
    elif interpret_mode():
        cfg = dict(BLOCK_M=_INTERPRET_BLOCK, BLOCK_N=_INTERPRET_BLOCK, autotuned=False)
        fn, launch_meta = raw, dict(BLOCK_M=_INTERPRET_BLOCK, BLOCK_N=_INTERPRET_BLOCK)
    else:
        cfg = dict(autotuned=True)
        fn, launch_meta = getattr(kern, {"fwd": "_attn_fwd_tuned", "dkdv": "_attn_bwd_dkdv_tuned",
                                         "dq": "_attn_bwd_dq_tuned"}[name]), {}
    kernel_stats[(name, variant)] += 1
    last_config[name] = dict(cfg, variant=variant)
    fn[grid](*args, **meta, **launch_meta)


def attention_forward_triton(q, k, v, *, causal, q_positions=None, kv_positions=None,
                             q_segment_ids=None, kv_segment_ids=None, scale=None, positions_hint="auto",
                             deterministic=False):
    """Return (out (B, H, T, D) in q's dtype, lse (B, H, T) fp32). See `plan_mask` for positions_hint;
    deterministic=True launches the fixed per-(head dim, dtype) config (`deterministic_config`)."""
    kern = _kernels()
    q, k, v = _head_contiguous(q), _head_contiguous(k), _head_contiguous(v)
    B, H, Hkv, T, S, D, scale, mask_ptrs, mask_strides, meta, variant, extra = _common(
        q, k, v, causal, q_positions, kv_positions, q_segment_ids, kv_segment_ids, scale, positions_hint)
    out = _empty_like(q)
    lse = torch.empty((B, H, T), device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return _finish(out.zero_(), q.dtype), lse.fill_(float("-inf"))
    grid = lambda m: (_cdiv(T, m["BLOCK_M"]), B * H)  # noqa: E731
    _launch(kern, "fwd", grid, (q, k, v, out, lse, *mask_ptrs, *_bht(q), *_bht(k), *_bht(v), *_bht(out),
                                *mask_strides, H, T, S, scale * kern.LOG2E, *extra),
            meta, variant, deterministic, q.dtype)
    return _finish(out, q.dtype), lse


def attention_backward_triton(dout, q, k, v, out, lse, *, causal, q_positions=None, kv_positions=None,
                              q_segment_ids=None, kv_segment_ids=None, scale=None, positions_hint="auto",
                              deterministic=False):
    """Return (dq, dk, dv) in the input dtypes; out / lse may be global results (see the reference)."""
    kern = _kernels()
    dout, q, k, v, out = (_head_contiguous(t) for t in (dout, q, k, v, out))
    B, H, Hkv, T, S, D, scale, mask_ptrs, mask_strides, meta, variant, extra = _common(
        q, k, v, causal, q_positions, kv_positions, q_segment_ids, kv_segment_ids, scale, positions_hint)
    if tuple(lse.shape) != (B, H, T) or tuple(out.shape) != tuple(q.shape) or dout.shape != out.shape:
        raise ValueError(f"out / dout must be {tuple(q.shape)} and lse ({B}, {H}, {T})")
    lse = lse.float().contiguous()
    dq, dk, dv = _empty_like(q), _empty_like(k), _empty_like(v)
    if dq.numel() == 0 or dk.numel() == 0:
        return _finish(dq.zero_(), q.dtype), _finish(dk.zero_(), k.dtype), _finish(dv.zero_(), v.dtype)
    delta = torch.empty((B, H, T), device=q.device, dtype=torch.float32)
    pre_block = 64
    kern._attn_bwd_preprocess[(_cdiv(T, pre_block), B * H)](
        out, dout, delta, *_bht(out), *_bht(dout), H, T,
        HEAD_DIM=D, BLOCK_D=meta["BLOCK_D"], BLOCK_M=pre_block)
    grid_kv = lambda m: (_cdiv(S, m["BLOCK_N"]), B * Hkv)  # noqa: E731
    _launch(kern, "dkdv", grid_kv, (q, k, v, dout, lse, delta, dk, dv, *mask_ptrs,
                                    *_bht(q), *_bht(k), *_bht(v), *_bht(dout), *_bht(dk), *_bht(dv),
                                    *mask_strides, H, Hkv, T, S, scale * kern.LOG2E, scale, *extra),
            meta, variant, deterministic, q.dtype)
    grid_q = lambda m: (_cdiv(T, m["BLOCK_M"]), B * H)  # noqa: E731
    _launch(kern, "dq", grid_q, (q, k, v, dout, lse, delta, dq, *mask_ptrs,
                                 *_bht(q), *_bht(k), *_bht(v), *_bht(dout), *_bht(dq),
                                 *mask_strides, H, T, S, scale * kern.LOG2E, scale, *extra),
            meta, variant, deterministic, q.dtype)
    return _finish(dq, q.dtype), _finish(dk, k.dtype), _finish(dv, v.dtype)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
