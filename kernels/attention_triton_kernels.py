"""The @triton.jit kernels behind `attention_triton.py` (imported lazily, on first launch, so that
TRITON_INTERPRET=1 set any time before the first call is honoured and triton stays optional).

Forward (`_attn_fwd`, one program per BLOCK_M queries of one (b, h)), FlashAttention-2 online softmax.
Work in base 2: t_ij = s_ij * log2(e), so exp(s) = exp2(t). Keep per query row a running max m, a
running sum l and an unnormalised accumulator acc; for each BLOCK_N key tile:

    m_new = max(m, max_j t_ij)
    alpha = exp2(m - m_new)                      (rescales what was accumulated under the old max)
    p_ij  = exp2(t_ij - m_new)
    l     = alpha * l + sum_j p_ij
    acc   = alpha * acc + p @ v_tile
    m     = m_new

and at the end out = acc / l, lse = ln(2) * (m + log2(l)). While a row has seen no visible key, m is
-inf; we then subtract 0 instead of m (exp2(-inf - 0) = 0, never NaN). A row that never sees a key
keeps l = 0 and stores out = 0, lse = -inf.

Backward (FlashAttention-2 split, no atomics, deterministic):
  `_attn_bwd_preprocess`: D_i = sum_d dout_id * out_id.
  `_attn_bwd_dkdv`: one program per BLOCK_N keys of one (b, kv head); loops over the G query heads of
      the group (outer) and the query tiles (inner), rebuilds p_ij = exp2(t_ij - lse_i * log2(e)) and accumulates
      dv_j += sum_i p_ij dout_i,  ds_ij = p_ij (dout_i . v_j - D_i),  dk_j += scale * sum_i ds_ij q_i.
  `_attn_bwd_dq`: one program per BLOCK_M queries of one (b, h); loops over key tiles:
      dq_i += scale * sum_j ds_ij k_j.

Masking is data driven (positions / segment ids are loaded), so causal, document masks, GQA, ragged
tails and non-monotonic global positions (context parallelism) share one code path. Tiles that hold no
visible pair are not computed:
  DIAG_BOUND (causal, positions absent or contiguous ranges q0 + i, k0 + j: the launcher checks this
      and passes DIAG_OFF = q0 - k0): key j is visible to query i iff j <= i + DIAG_OFF, so the loop
      bounds stop at the diagonal, no branches, and the compiler can software-pipeline the K/V (Q/dO)
      loads. Positions are then not loaded at all.
  SKIP_EMPTY (explicit positions or segment ids): positions need not be sorted (zig-zag context
      parallelism), so a run-time test per tile (`_tile_may_see`, from 1-D min / max of positions and
      segment ids) skips tiles that cannot hold a visible pair; the exact mask is applied inside.

Checked without a GPU: every autotune config compiles for sm_90 (bf16, head dim 128) through ptxas;
register spilling was used to choose them. Never timed on a GPU yet.

CAST_FP32: operands are upcast to fp32 right after loading. Needed under the interpreter (its bf16
arithmetic is broken) and used for fp32 inputs; on GPU, bf16 inputs keep bf16 tensor-core operands
(P and dS are cast to bf16 for their matmuls) with fp32 accumulation. PRECISION is "ieee" for fp32
inputs so fp32 results are not silently TF32.
"""

import triton
import triton.language as tl

INTERPRET = bool(triton.knobs.runtime.interpret)

LOG2E = 1.4426950408889634  # host-side copy; kernels may only read constexpr globals
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(0.6931471805599453)


def _autotune(configs, key):
    """Autotune on GPU; under the interpreter the launcher passes fixed block sizes instead."""
    if INTERPRET:
        return lambda fn: fn
    return triton.autotune(configs=configs, key=key)


def make_autotuned(fn, configs, key=None):
    """`triton.autotune` wrapper of a raw kernel (used on GPU; tests build it under the interpreter
    to check that every key names a kernel argument, without running it)."""
    return triton.autotune(configs=configs, key=_KEY if key is None else key)(fn)


def _cfgs(rows):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st) for m, n, w, st in rows]


# (BLOCK_M, BLOCK_N, num_warps, num_stages). Not timed on a GPU yet (none was available): chosen so
# that, compiled for sm_90 with head dim 128 / bf16, ptxas reports no (or little) register spilling.
_FWD_CONFIGS = _cfgs([(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (128, 128, 8, 2)])
_DKDV_CONFIGS = _cfgs([(64, 64, 8, 2), (64, 64, 8, 3), (32, 128, 8, 2), (32, 64, 4, 3)])
_DQ_CONFIGS = _cfgs([(64, 64, 8, 2), (64, 32, 4, 3), (32, 64, 4, 3), (128, 64, 8, 2)])
# Autotune key: the best tile depends on the sequence lengths (few query tiles -> little parallelism;
# causal skipping shifts the balance) and on the head dim / mask kind. T_BUCKET / S_BUCKET are
# next_power_of_2(T / S), passed by the launcher and unused by the kernels, so the tuner re-runs once
# per length bucket instead of once per distinct length (ragged packing would otherwise retune often).
_KEY = ["T_BUCKET", "S_BUCKET", "HEAD_DIM", "GROUP", "CAUSAL", "DIAG_BOUND", "SKIP_EMPTY", "CAST_FP32"]

# Deterministic mode: a fixed config per (kernel, head-dim class, dtype class), no autotune, so the
# accumulation order (set by BLOCK_N in the forward / dq loops and BLOCK_M in the dk / dv loop) is the
# same in every process and run, which bitwise resume needs. Chosen among the autotune candidates
# (16-bit, head dim <= 128: the ones ptxas compiled for sm_90 without spilling); the fp32 and head
# dim > 128 rows are smaller tiles picked for register pressure, not compiled or timed on a GPU.
# (kernel, head dim <= 64 / <= 128 / larger, "16bit" / "fp32") -> (BLOCK_M, BLOCK_N, num_warps, num_stages)
DETERMINISTIC_CONFIGS = {
    ("fwd", 64, "16bit"): (128, 64, 4, 3), ("fwd", 128, "16bit"): (128, 64, 8, 3), ("fwd", 256, "16bit"): (64, 32, 4, 2),
    ("fwd", 64, "fp32"): (64, 64, 4, 2), ("fwd", 128, "fp32"): (64, 64, 4, 2), ("fwd", 256, "fp32"): (32, 32, 4, 2),
    ("dkdv", 64, "16bit"): (64, 64, 4, 2), ("dkdv", 128, "16bit"): (64, 64, 8, 2), ("dkdv", 256, "16bit"): (32, 32, 4, 2),
    ("dkdv", 64, "fp32"): (32, 64, 4, 2), ("dkdv", 128, "fp32"): (32, 64, 4, 2), ("dkdv", 256, "fp32"): (32, 32, 4, 1),
    ("dq", 64, "16bit"): (64, 64, 4, 2), ("dq", 128, "16bit"): (64, 64, 8, 2), ("dq", 256, "16bit"): (32, 32, 4, 2),
    ("dq", 64, "fp32"): (64, 32, 4, 2), ("dq", 128, "fp32"): (64, 32, 4, 2), ("dq", 256, "fp32"): (32, 32, 4, 1),
}


def deterministic_config(kernel, head_dim, dtype_is_fp32):
    """The fixed (BLOCK_M, BLOCK_N, num_warps, num_stages) of `kernel` ("fwd", "dkdv", "dq")."""
    d_class = 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256
    return DETERMINISTIC_CONFIGS[(kernel, d_class, "fp32" if dtype_is_fp32 else "16bit")]


@triton.jit
def _tile_visible(QPOS, KPOS, QSEG, KSEG, qpos_off, kpos_off, qseg_off, kseg_off, diag_off, offs_m, offs_n, T, S,
                  CAUSAL: tl.constexpr, HAS_QPOS: tl.constexpr, HAS_KPOS: tl.constexpr, HAS_SEG: tl.constexpr,
                  KEYS_FIRST: tl.constexpr):
    """Boolean tile: query offs_m sees key offs_n (in range, causal, same segment). Shape
    (BLOCK_M, BLOCK_N), or (BLOCK_N, BLOCK_M) when KEYS_FIRST (the dk / dv kernel's orientation).

    Positions are loaded when given, else they are the indices themselves (default arange). One helper
    for the whole tile because every jit-function call costs ~2 ms under the interpreter."""
    m_valid = offs_m < T
    n_valid = offs_n < S
    if CAUSAL:
        q_pos = offs_m + diag_off  # default positions: query i sits at i + diag_off, key j at j
        k_pos = offs_n
        if HAS_QPOS:
            q_pos = tl.load(QPOS + qpos_off + offs_m, mask=m_valid, other=0)
        if HAS_KPOS:
            k_pos = tl.load(KPOS + kpos_off + offs_n, mask=n_valid, other=0)
    if HAS_SEG:
        q_seg = tl.load(QSEG + qseg_off + offs_m, mask=m_valid, other=0)
        k_seg = tl.load(KSEG + kseg_off + offs_n, mask=n_valid, other=0)
    if KEYS_FIRST:
        vis = n_valid[:, None] & m_valid[None, :]
        if CAUSAL:
            vis = vis & (k_pos[:, None] <= q_pos[None, :])
        if HAS_SEG:
            vis = vis & (k_seg[:, None] == q_seg[None, :])
    else:
        vis = m_valid[:, None] & n_valid[None, :]
        if CAUSAL:
            vis = vis & (k_pos[None, :] <= q_pos[:, None])
        if HAS_SEG:
            vis = vis & (q_seg[:, None] == k_seg[None, :])
    return vis


@triton.jit
def _tile_may_see(QPOS, KPOS, QSEG, KSEG, qpos_off, kpos_off, qseg_off, kseg_off, diag_off, offs_m, offs_n, T, S,
                  CAUSAL: tl.constexpr, HAS_QPOS: tl.constexpr, HAS_KPOS: tl.constexpr, HAS_SEG: tl.constexpr):
    """Cheap necessary condition for a tile to hold a visible pair, from 1-D min / max only (building
    the whole mask before the branch costs registers): some key position <= the largest query
    position, and the query and key segment-id ranges overlap. Tiles failing it are skipped."""
    m_valid = offs_m < T
    n_valid = offs_n < S
    causal_ok = True
    if CAUSAL:
        q_pos = offs_m + diag_off  # default positions: query i sits at i + diag_off, key j at j
        k_pos = offs_n
        if HAS_QPOS:
            q_pos = tl.load(QPOS + qpos_off + offs_m, mask=m_valid, other=0)
        if HAS_KPOS:
            k_pos = tl.load(KPOS + kpos_off + offs_n, mask=n_valid, other=0)
        causal_ok = tl.min(tl.where(n_valid, k_pos, 2147483647)) <= tl.max(tl.where(m_valid, q_pos, -2147483647))
    seg_ok = True
    if HAS_SEG:
        q_seg = tl.load(QSEG + qseg_off + offs_m, mask=m_valid, other=0)
        k_seg = tl.load(KSEG + kseg_off + offs_n, mask=n_valid, other=0)
        q_lo = tl.min(tl.where(m_valid, q_seg, 2147483647))
        q_hi = tl.max(tl.where(m_valid, q_seg, -2147483647))
        k_lo = tl.min(tl.where(n_valid, k_seg, 2147483647))
        k_hi = tl.max(tl.where(n_valid, k_seg, -2147483647))
        seg_ok = (k_lo <= q_hi) & (q_lo <= k_hi)
    return causal_ok & seg_ok


@triton.jit
def _load_tile(base, offs_rows, offs_d, n_rows, stride_row, HEAD_DIM: tl.constexpr, CAST_FP32: tl.constexpr):
    """(rows, BLOCK_D) tile of a head-dim-contiguous tensor; zeros outside; upcast if CAST_FP32."""
    x = tl.load(base + offs_rows[:, None] * stride_row + offs_d[None, :],
                mask=(offs_rows < n_rows)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    if CAST_FP32:
        x = x.to(tl.float32)
    return x


@triton.jit
def _fwd_step(q, k_base, v_base, offs_n, offs_d, S, skt, svt, vis, m_i, l_i, acc, qk_scale,
              HEAD_DIM: tl.constexpr, CAST_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """One key tile of the online softmax (module docstring); returns the updated (m, l, acc)."""
    k = _load_tile(k_base, offs_n, offs_d, S, skt, HEAD_DIM, CAST_FP32)
    v = _load_tile(v_base, offs_n, offs_d, S, svt, HEAD_DIM, CAST_FP32)
    t = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    t = tl.where(vis, t, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(t, 1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_ref)
    p = tl.math.exp2(t - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, QPOS, KPOS, QSEG, KSEG,
              sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
              sqpos_b, skpos_b, sqseg_b, skseg_b,
              H, T, S, qk_scale, DIAG_OFF, T_BUCKET, S_BUCKET,
              GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              CAUSAL: tl.constexpr, HAS_QPOS: tl.constexpr, HAS_KPOS: tl.constexpr, HAS_SEG: tl.constexpr,
              DIAG_BOUND: tl.constexpr, SKIP_EMPTY: tl.constexpr, CAST_FP32: tl.constexpr,
              PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    hkv = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + b * sqb + h * sqh, offs_m, offs_d, T, sqt, HEAD_DIM, CAST_FP32)
    k_base = K + b * skb + hkv * skh
    v_base = V + b * svb + hkv * svh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = S
    if DIAG_BOUND:  # key j <= query i + DIAG_OFF: nothing beyond this tile's last query (hi <= 0: no tile)
        hi = tl.minimum(S, (pid_m + 1) * BLOCK_M + DIAG_OFF)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if SKIP_EMPTY:
            if _tile_may_see(QPOS, KPOS, QSEG, KSEG, b * sqpos_b, b * skpos_b, b * sqseg_b, b * skseg_b,
                             DIAG_OFF, offs_m, offs_n, T, S, CAUSAL, HAS_QPOS, HAS_KPOS, HAS_SEG):
                vis = _tile_visible(QPOS, KPOS, QSEG, KSEG, b * sqpos_b, b * skpos_b, b * sqseg_b, b * skseg_b,
                                    DIAG_OFF, offs_m, offs_n, T, S, CAUSAL, HAS_QPOS, HAS_KPOS, HAS_SEG, False)
                m_i, l_i, acc = _fwd_step(q, k_base, v_base, offs_n, offs_d, S, skt, svt, vis, m_i, l_i, acc,
                                          qk_scale, HEAD_DIM, CAST_FP32, PRECISION)
        else:
            vis = _tile_visible(QPOS, KPOS, QSEG, KSEG, b * sqpos_b, b * skpos_b, b * sqseg_b, b * skseg_b,
                                DIAG_OFF, offs_m, offs_n, T, S, CAUSAL, HAS_QPOS, HAS_KPOS, HAS_SEG, False)
            m_i, l_i, acc = _fwd_step(q, k_base, v_base, offs_n, offs_d, S, skt, svt, vis, m_i, l_i, acc,
                                      qk_scale, HEAD_DIM, CAST_FP32, PRECISION)

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * _LN2)
    m_valid = offs_m < T
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=m_valid[:, None] & (offs_d < HEAD_DIM)[None, :])
    tl.store(LSE + pid_bh * T + offs_m, lse, mask=m_valid)


@triton.jit
def _attn_bwd_preprocess(O, DO, DELTA, sob, soh, sot, sdob, sdoh, sdot, H, T,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """DELTA[b, h, i] = sum_d dout[b, h, i, d] * out[b, h, i, d] in fp32."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(O + b * sob + h * soh, offs_m, offs_d, T, sot, HEAD_DIM, True)
    do = _load_tile(DO + b * sdob + h * sdoh, offs_m, offs_d, T, sdot, HEAD_DIM, True)
    tl.store(DELTA + pid_bh * T + offs_m, tl.sum(o * do, 1), mask=offs_m < T)


@triton.jit
def _load_rows_stats(LSE, DELTA, row_off, offs_m, T):
    """lse in base 2 (+inf on fully masked rows, so that p = exp2(t - inf) = 0) and D_i of a query tile."""
    m_valid = offs_m < T
    lse = tl.load(LSE + row_off + offs_m, mask=m_valid, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E)
    delta = tl.load(DELTA + row_off + offs_m, mask=m_valid, other=0.0)
    return lse2, delta


@triton.jit
def _dkdv_step(Q, DO, LSE, DELTA, k, v, dk, dv, vis_t, q_off, do_off, row_off, offs_m, offs_d,
               sqt, sdot, T, qk_scale, HEAD_DIM: tl.constexpr, CAST_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """Add one query tile's contribution to dk (unscaled) and dv. Tiles are transposed (keys x
    queries) so that nothing has to be transposed back."""
    q = _load_tile(Q + q_off, offs_m, offs_d, T, sqt, HEAD_DIM, CAST_FP32)
    do = _load_tile(DO + do_off, offs_m, offs_d, T, sdot, HEAD_DIM, CAST_FP32)
    lse2, delta = _load_rows_stats(LSE, DELTA, row_off, offs_m, T)
    t_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
    p_t = tl.where(vis_t, tl.math.exp2(t_t - lse2[None, :]), 0.0)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, QPOS, KPOS, QSEG, KSEG,
                   sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdob, sdoh, sdot,
                   sdkb, sdkh, sdkt, sdvb, sdvh, sdvt,
                   sqpos_b, skpos_b, sqseg_b, skseg_b,
                   H, HKV, T, S, qk_scale, scale, DIAG_OFF, T_BUCKET, S_BUCKET,
                   GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   CAUSAL: tl.constexpr, HAS_QPOS: tl.constexpr, HAS_KPOS: tl.constexpr, HAS_SEG: tl.constexpr,
                   DIAG_BOUND: tl.constexpr, SKIP_EMPTY: tl.constexpr, CAST_FP32: tl.constexpr,
                   PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // HKV
    hkv = pid_bh % HKV
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_tile(K + b * skb + hkv * skh, offs_n, offs_d, S, skt, HEAD_DIM, CAST_FP32)
    v = _load_tile(V + b * svb + hkv * svh, offs_n, offs_d, S, svt, HEAD_DIM, CAST_FP32)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo = 0
    if DIAG_BOUND:  # query i >= key j - DIAG_OFF: start at the query tile holding the first such query
        lo = (tl.maximum(pid_n * BLOCK_N - DIAG_OFF, 0) // BLOCK_M) * BLOCK_M
    for g in range(GROUP):  # the GROUP query heads that share this kv head (GQA)
        h = hkv * GROUP + g
        q_off = b * sqb + h * sqh
        do_off = b * sdob + h * sdoh
        row_off = (b * H + h) * T
        for start_m in range(lo, T, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            if SKIP_EMPTY:
                if _tile_may_see(QPOS, KPOS, QSEG, KSEG, b * sqpos_b, b * skpos_b, b * sqseg_b, b * skseg_b,
                                 DIAG_OFF, offs_m, offs_n, T, S, CAUSAL, HAS_QPOS, HAS_KPOS, HAS_SEG):
                    vis_t = _tile_visible(QPOS, KPOS, QSEG, KSEG, b * sqpos_b, b * skpos_b, b * sqseg_b,
                                          b * skseg_b, DIAG_OFF, offs_m, offs_n, T, S, CAUSAL, HAS_QPOS, HAS_KPOS, HAS_SEG,
                                          True)
                    dk, dv = _dkdv_step(Q, DO, LSE, DELTA, k, v, dk, dv, vis_t, q_off, do_off, row_off, offs_m,
                                        offs_d, sqt, sdot, T, qk_scale, HEAD_DIM, CAST_FP32, PRECISION)
            else:
                vis_t = _tile_visible(QPOS, KPOS, QSEG, KSEG, b * sqpos_b, b * skpos_b, b * sqseg_b, b * skseg_b,
                                      DIAG_OFF, offs_m, offs_n, T, S, CAUSAL, HAS_QPOS, HAS_KPOS, HAS_SEG, True)
                dk, dv = _dkdv_step(Q, DO, LSE, DELTA, k, v, dk, dv, vis_t, q_off, do_off, row_off, offs_m,
                                    offs_d, sqt, sdot, T, qk_scale, HEAD_DIM, CAST_FP32, PRECISION)
    kv_mask = (offs_n < S)[:, None] & (offs_d < HEAD_DIM)[None, :]
    tl.store(DK + b * sdkb + hkv * sdkh + offs_n[:, None] * sdkt + offs_d[None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * sdvb + hkv * sdvh + offs_n[:, None] * sdvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_step(q, do, lse2, delta, k_base, v_base, offs_n, offs_d, S, skt, svt, vis, dq, qk_scale,
             HEAD_DIM: tl.constexpr, CAST_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """Add one key tile's contribution to dq (unscaled)."""
    k = _load_tile(k_base, offs_n, offs_d, S, skt, HEAD_DIM, CAST_FP32)
    v = _load_tile(v_base, offs_n, offs_d, S, svt, HEAD_DIM, CAST_FP32)
    t = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    p = tl.where(vis, tl.math.exp2(t - lse2[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, QPOS, KPOS, QSEG, KSEG,
                 sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdob, sdoh, sdot, sdqb, sdqh, sdqt,
                 sqpos_b, skpos_b, sqseg_b, skseg_b,
                 H, T, S, qk_scale, scale, DIAG_OFF, T_BUCKET, S_BUCKET,
                 GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 CAUSAL: tl.constexpr, HAS_QPOS: tl.constexpr, HAS_KPOS: tl.constexpr, HAS_SEG: tl.constexpr,
                 DIAG_BOUND: tl.constexpr, SKIP_EMPTY: tl.constexpr, CAST_FP32: tl.constexpr,
                 PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    hkv = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + b * sqb + h * sqh, offs_m, offs_d, T, sqt, HEAD_DIM, CAST_FP32)
    do = _load_tile(DO + b * sdob + h * sdoh, offs_m, offs_d, T, sdot, HEAD_DIM, CAST_FP32)
    lse2, delta = _load_rows_stats(LSE, DELTA, pid_bh * T, offs_m, T)
    k_base = K + b * skb + hkv * skh
    v_base = V + b * svb + hkv * svh

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = S
    if DIAG_BOUND:
        hi = tl.minimum(S, (pid_m + 1) * BLOCK_M + DIAG_OFF)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if SKIP_EMPTY:
            if _tile_may_see(QPOS, KPOS, QSEG, KSEG, b * sqpos_b, b * skpos_b, b * sqseg_b, b * skseg_b,
                             DIAG_OFF, offs_m, offs_n, T, S, CAUSAL, HAS_QPOS, HAS_KPOS, HAS_SEG):
                vis = _tile_visible(QPOS, KPOS, QSEG, KSEG, b * sqpos_b, b * skpos_b, b * sqseg_b, b * skseg_b,
                                    DIAG_OFF, offs_m, offs_n, T, S, CAUSAL, HAS_QPOS, HAS_KPOS, HAS_SEG, False)
                dq = _dq_step(q, do, lse2, delta, k_base, v_base, offs_n, offs_d, S, skt, svt, vis, dq, qk_scale,
                              HEAD_DIM, CAST_FP32, PRECISION)
        else:
            vis = _tile_visible(QPOS, KPOS, QSEG, KSEG, b * sqpos_b, b * skpos_b, b * sqseg_b, b * skseg_b,
                                DIAG_OFF, offs_m, offs_n, T, S, CAUSAL, HAS_QPOS, HAS_KPOS, HAS_SEG, False)
            dq = _dq_step(q, do, lse2, delta, k_base, v_base, offs_n, offs_d, S, skt, svt, vis, dq, qk_scale,
                          HEAD_DIM, CAST_FP32, PRECISION)
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqt + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=(offs_m < T)[:, None] & (offs_d < HEAD_DIM)[None, :])


# Autotuned versions (GPU); the raw kernels above are launched directly in deterministic mode and
# under the interpreter.
_attn_fwd_tuned = _autotune(_FWD_CONFIGS, _KEY)(_attn_fwd)
_attn_bwd_dkdv_tuned = _autotune(_DKDV_CONFIGS, _KEY)(_attn_bwd_dkdv)
_attn_bwd_dq_tuned = _autotune(_DQ_CONFIGS, _KEY)(_attn_bwd_dq)
