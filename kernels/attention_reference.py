"""Pure-PyTorch attention with log-sum-exp output: the CPU training path and the ground truth.

Notation (per batch b and query head h; kv head h // G with G = H // Hkv query heads per kv head):

    s_ij   = scale * q_i . k_j                          (scale defaults to 1 / sqrt(D))
    s_ij   = -inf where key j is not visible to query i
    lse_i  = log sum_j exp(s_ij)                        (natural log; -inf for a fully masked row)
    p_ij   = exp(s_ij - lse_i)                          (softmax; 0 on a fully masked row)
    out_i  = sum_j p_ij v_j                             (0 on a fully masked row)

Visibility: key j is visible to query i iff
    (not causal or kv_positions[j] <= q_positions[i]) and
    (segment ids are None or q_segment_ids[b, i] == kv_segment_ids[b, j]).
Positions are (T,) / (S,) (or per-batch (B, T) / (B, S)) ints, default arange; segment ids are (B, T) / (B, S).

Backward ("flash style": it never differentiates through the softmax normaliser, it re-forms P from lse):

    D_i    = sum_d dout_id * out_id                     (= sum_j p_ij dp_ij)
    dv_j   = sum_i p_ij dout_i
    dp_ij  = dout_i . v_j
    ds_ij  = p_ij (dp_ij - D_i)
    dq_i   = scale * sum_j ds_ij k_j
    dk_j   = scale * sum_i ds_ij q_i
    (dk, dv additionally sum over the G query heads that share a kv head.)

Because P is rebuilt from the given lse and D from the given out, these formulas hold for any BLOCK of
keys when out / lse are the GLOBAL results (merged over all key blocks): the block's dq is its share of
the full dq (shares sum up) and its dk / dv are exact. Ring context parallelism relies on this.

Everything is computed in fp32; out / dq / dk / dv come back in the input dtype, lse is always fp32.
Internally the scores are kept in base 2 (t = s * log2 e, p = 2^(t - lse * log2 e)), as in the kernels:
on CPU torch's exp2 is much faster than exp where masked entries are -inf.
GQA is handled without repeating k / v: q is viewed as (B, Hkv, G*T, D) so one batched matmul per
(b, kv head) covers all G query heads, and the G-sum for dk / dv falls out of the matmul.
"""

from __future__ import annotations

import math

import torch

__all__ = ["attention_forward_reference", "attention_backward_reference", "visibility_mask", "check_inputs"]


def check_inputs(q, k, v, q_positions=None, kv_positions=None, q_segment_ids=None, kv_segment_ids=None):
    """Validate shapes; return (B, H, Hkv, T, S, D)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"expected q (B,H,T,D), k/v (B,Hkv,S,D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"query heads {H} must be a multiple of kv heads {Hkv}")
    for name, t, n in (("q_positions", q_positions, T), ("kv_positions", kv_positions, S)):
        if t is not None and (t.dim() not in (1, 2) or t.shape[-1] != n or (t.dim() == 2 and t.shape[0] != B)):
            raise ValueError(f"{name} must be ({n},) or ({B}, {n}); got {tuple(t.shape)}")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("give both q_segment_ids and kv_segment_ids, or neither")
    if q_segment_ids is not None and (tuple(q_segment_ids.shape) != (B, T) or tuple(kv_segment_ids.shape) != (B, S)):
        raise ValueError(f"segment ids must be ({B}, {T}) and ({B}, {S}); got "
                         f"{tuple(q_segment_ids.shape)}, {tuple(kv_segment_ids.shape)}")
    return B, H, Hkv, T, S, D


def visibility_mask(T, S, *, causal, q_positions=None, kv_positions=None, q_segment_ids=None,
                    kv_segment_ids=None, device=None):
    """Boolean mask, True where query i sees key j: shape (B or 1, T, S), or None when all is visible."""
    mask = None
    if causal:
        qp = torch.arange(T, device=device) if q_positions is None else q_positions
        kp = torch.arange(S, device=device) if kv_positions is None else kv_positions
        mask = kp[..., None, :] <= qp[..., :, None]  # (T, S) or (B, T, S)
        if mask.dim() == 2:
            mask = mask[None]
    if q_segment_ids is not None:
        same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]  # (B, T, S)
        mask = same if mask is None else mask & same
    return mask


LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def _scores2(qf, kf, coef, bias, B, Hkv, G, T, S):
    """Base-2 scores t = s * log2(e) = (coef * q) k^T + bias, shape (B, Hkv, G, T, S), fp32.

    coef = scale * log2(e) is folded into q (T*D work instead of T*S); bias is 0 / -inf (B or 1, T, S).
    Base 2 because torch's exp2 is several times faster than exp on CPU when many entries are -inf
    (masked), and an in-place add of a float bias is faster than masked_fill with a boolean mask."""
    t = torch.matmul(qf * coef, kf.transpose(-1, -2)).view(B, Hkv, G, T, S)
    if bias is not None:
        t.add_(bias[:, None, None])
    return t


def _common(q, k, v, causal, q_positions, kv_positions, q_segment_ids, kv_segment_ids, scale):
    B, H, Hkv, T, S, D = check_inputs(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids)
    G = H // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    mask = visibility_mask(T, S, causal=causal, q_positions=q_positions, kv_positions=kv_positions,
                           q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, device=q.device)
    bias = None if mask is None else torch.where(mask, 0.0, float("-inf")).float()  # (B or 1, T, S)
    qf = q.float().reshape(B, Hkv, G * T, D)
    return B, H, Hkv, G, T, S, D, scale, bias, qf, k.float(), v.float()


def attention_forward_reference(q, k, v, *, causal, q_positions=None, kv_positions=None,
                                q_segment_ids=None, kv_segment_ids=None, scale=None):
    """Return (out (B, H, T, D) in q's dtype, lse (B, H, T) fp32). See the module docstring for the math.

    Memory: materialises one fp32 (B, H, T, S) score matrix (and reuses it in place for P)."""
    B, H, Hkv, G, T, S, D, scale, bias, qf, kf, vf = _common(
        q, k, v, causal, q_positions, kv_positions, q_segment_ids, kv_segment_ids, scale)
    t = _scores2(qf, kf, scale * LOG2E, bias, B, Hkv, G, T, S)
    # Stable softmax, base 2: m = row max, p = 2^(t - m), l = sum p, lse = ln2 * (m + log2 l).
    # A fully masked row has m = -inf: use m := 0 there, so p = 2^-inf = 0, l = 0 and lse = -inf.
    m = t.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isneginf(m), 0.0, m)
    # In place unless autograd records this call (the tests differentiate through the reference).
    tracked = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    p = (t - m).exp2() if tracked else t.sub_(m).exp2_()
    l = p.sum(dim=-1, keepdim=True)
    lse = ((m + torch.log2(l)) * LN2).squeeze(-1)
    out = torch.matmul(p.view(B, Hkv, G * T, S), vf).view(B, Hkv, G, T, D)
    l = torch.where(l == 0, 1.0, l)
    out = out / l if tracked else out.div_(l)
    return out.view(B, H, T, D).to(q.dtype), lse.view(B, H, T)


def attention_backward_reference(dout, q, k, v, out, lse, *, causal, q_positions=None, kv_positions=None,
                                 q_segment_ids=None, kv_segment_ids=None, scale=None):
    """Return (dq, dk, dv) in the input dtypes, using the given out / lse (possibly global, see module doc)."""
    B, H, Hkv, G, T, S, D, scale, bias, qf, kf, vf = _common(
        q, k, v, causal, q_positions, kv_positions, q_segment_ids, kv_segment_ids, scale)
    dof = dout.float().reshape(B, Hkv, G * T, D)
    delta = (dof * out.float().reshape(B, Hkv, G * T, D)).sum(-1)  # D_i, (B, Hkv, G*T)
    lse = lse.float().reshape(B, Hkv, G, T)
    # p = 2^(t - lse * log2 e). A row with lse = -inf has no visible key: use +inf so that p = 0 there.
    lse2 = torch.where(torch.isneginf(lse), float("inf"), lse * LOG2E)
    t = _scores2(qf, kf, scale * LOG2E, bias, B, Hkv, G, T, S)
    p = t.sub_(lse2[..., None]).exp2_().view(B, Hkv, G * T, S)
    dv = torch.matmul(p.transpose(-1, -2), dof)  # sums over the G heads of a group
    dp = torch.matmul(dof, vf.transpose(-1, -2))  # (B, Hkv, G*T, S)
    ds = dp.sub_(delta[..., None]).mul_(p)
    dq = torch.matmul(ds, kf).mul_(scale)
    dk = torch.matmul(ds.transpose(-1, -2), qf).mul_(scale)
    return dq.view(B, H, T, D).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
