"""@triton.jit kernels of the fused ops (imported lazily by `_select.kernels()`, so triton stays optional
and TRITON_INTERPRET=1 set before the first launch is honoured). Each op's math, reference and
autograd wrapper live in its own module: rmsnorm.py, swiglu.py, rope.py, chunked_cross_entropy.py.

All kernels load their operands, convert to fp32 at once and compute in fp32 (the interpreter's bf16
arithmetic is wrong; on GPU these ops are memory bound, so fp32 math costs nothing), converting only
when storing. Row offsets are int64 so that N * D > 2^31 elements cannot overflow.
"""

import triton
import triton.language as tl


# -- RMSNorm: y = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps) ------------------------------------

@triton.jit
def _rmsnorm_fwd(X, W, Y, RSTD, N, D, sx, sy, eps, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < N
    cmask = cols < D
    mask = rmask[:, None] & cmask[None, :]
    r64 = rows.to(tl.int64)
    x = tl.load(X + r64[:, None] * sx + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / D + eps)
    y = x * rstd[:, None] * w[None, :]
    tl.store(Y + r64[:, None] * sy + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _rmsnorm_bwd(DY, X, W, RSTD, DX, DW_PARTIAL, N, D, sdy, sx, sdx, rows_per_program,
                 BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """dx = rstd * (w*dy - xhat * mean(xhat * w*dy)), xhat = x * rstd; this program's share of
    dw = sum_rows dy * xhat goes to DW_PARTIAL[program] (summed by torch: deterministic, no atomics)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_D], tl.float32)
    start = pid * rows_per_program
    end = tl.minimum(start + rows_per_program, N)
    for r0 in range(start, end, BLOCK_ROWS):
        rows = r0 + tl.arange(0, BLOCK_ROWS)
        rmask = rows < end
        mask = rmask[:, None] & cmask[None, :]
        r64 = rows.to(tl.int64)
        x = tl.load(X + r64[:, None] * sx + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + r64[:, None] * sdy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        xhat = x * rstd[:, None]
        wdy = dy * w[None, :]
        c = tl.sum(xhat * wdy, 1) / D
        dx = (wdy - xhat * c[:, None]) * rstd[:, None]
        tl.store(DX + r64[:, None] * sdx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * xhat, 0)
    tl.store(DW_PARTIAL + pid.to(tl.int64) * D + cols, dw, mask=cmask)


# -- SwiGLU: out = silu(a) * b ------------------------------------------------------------------------

@triton.jit
def _swiglu_fwd(A, B, O, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(O + offs, (a * tl.sigmoid(a) * b).to(O.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(DO, A, B, DA, DB, n, BLOCK: tl.constexpr):
    """da = do * b * s * (1 + a * (1 - s)), db = do * a * s, with s = sigmoid(a) (recomputed)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    tl.store(DA + offs, (do * b * s * (1.0 + a * (1.0 - s))).to(DA.dtype.element_ty), mask=mask)
    tl.store(DB + offs, (do * a * s).to(DB.dtype.element_ty), mask=mask)


# -- RoPE, half-split layout: out = x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1) --------

@triton.jit
def _rope(X, COS, SIN, Y, sxb, sxh, sxt, syb, syh, syt, sct, sst, H, T,
          HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_T: tl.constexpr, BACKWARD: tl.constexpr):
    """Forward: y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2. BACKWARD applies the transpose
    (dx = cos dy + rotate_half^T(sin dy)): dx1 = dy1 c1 + dy2 s2, dx2 = dy2 c2 - dy1 s1."""
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_HALF)
    mask = (t < T)[:, None] & (d < HALF)[None, :]
    t64 = t.to(tl.int64)
    xp = X + b * sxb + h * sxh + t64[:, None] * sxt + d[None, :]
    cp = COS + t64[:, None] * sct + d[None, :]
    sp = SIN + t64[:, None] * sst + d[None, :]
    x1 = tl.load(xp, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(xp + HALF, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(cp, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(cp + HALF, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(sp, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(sp + HALF, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    yp = Y + b * syb + h * syh + t64[:, None] * syt + d[None, :]
    tl.store(yp, y1.to(Y.dtype.element_ty), mask=mask)
    tl.store(yp + HALF, y2.to(Y.dtype.element_ty), mask=mask)


# -- cross-entropy on a chunk of logits (C, V_local) ------------------------------------------------

@triton.jit
def _ce_chunk_stats(Z, LABEL, M, S, TGT, V, sz, BLOCK_V: tl.constexpr):
    """Per row, one pass over the local vocabulary (online max / sum): m = max_v z, s = sum_v exp(z - m),
    tgt = z[label] (0 when the local label is -1: ignored row or target in another shard)."""
    row = tl.program_id(0)
    zrow = Z + row.to(tl.int64) * sz
    label = tl.load(LABEL + row)
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    tgt = tl.zeros([], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z = tl.load(zrow + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, 0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(z - m_ref), 0)
        tgt += tl.sum(tl.where(cols == label, z, 0.0), 0)
        m = m_new
    tl.store(M + row, m)
    tl.store(S + row, s)
    tl.store(TGT + row, tgt)


@triton.jit
def _ce_chunk_grad(Z, G, LABEL, LSE, SCALE, V, sz, sg, BLOCK_V: tl.constexpr):
    """G[row] = (exp(z - lse) - [v == label]) * scale[row]; G may alias Z (in place)."""
    row = tl.program_id(0)
    zrow = Z + row.to(tl.int64) * sz
    grow = G + row.to(tl.int64) * sg
    label = tl.load(LABEL + row)
    lse = tl.load(LSE + row)
    scale = tl.load(SCALE + row)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        cmask = cols < V
        z = tl.load(zrow + cols, mask=cmask, other=0.0).to(tl.float32)
        p = tl.exp(z - lse)
        g = (p - tl.where(cols == label, 1.0, 0.0)) * scale
        tl.store(grow + cols, g.to(G.dtype.element_ty), mask=cmask)
