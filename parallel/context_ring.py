"""Ring attention over mesh["cp"] (Movie Gen's bidirectional context parallelism; Liu et al. 2023).

Placements: q (B, H, T/cp, D), k, v (B, Hkv, T/cp, D) Shard(T) on every cp rank; output Shard(T).
Keys never gather: at ring step s rank r holds the K/V block of rank (r - s) mod cp.

Forward (cp steps): post the asynchronous P2P shift of the current K/V block (send to r+1, receive
from r-1, `comm.ring_shift`), run the kernel on the current block while it travels, then merge the
block's (out, lse) into the running result by log-sum-exp (`merge_partials`, exact). cp-1 hops.

Backward (cp steps): the same ring. For the block held at step s, `attention_backward` with the
GLOBAL out / lse gives this rank's exact share of dq and the block's dk, dv (kernels/attention.py).
dk, dv travel with their block and accumulate as they go (summed in fp32 on each rank, sent in the
input dtype: bf16 under bf16 training, one rounding per hop); after the last step one more hop
brings each block's complete dk, dv back to its owner. K/V hops (cp-1) overlap with compute; each
dK/dV hop overlaps with the next step's compute. Tags keep the two kinds of hop apart.

Masks: keys carry their GLOBAL positions and segment ids (gathered once per call by the caller,
int64), sliced per block, so causal runs (zigzag layout) and document masks also work; a block that a
query cannot see returns lse = -inf and weighs 0 in the merge.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh

from gigatron.kernels.attention import attention, attention_backward, attention_forward, merge_partials, resolve_backend
from gigatron.parallel.comm import ring_shift

CP_DIM = "cp"
KV_TAG, GRAD_TAG = 11, 12


def _block_ids(kv_positions, kv_segment_ids, owner: int, t: int):
    """Positions (t,) and segment ids (B, t) of cp rank `owner`'s block in the gathered ids."""
    sl = slice(owner * t, (owner + 1) * t)
    return kv_positions[sl], None if kv_segment_ids is None else kv_segment_ids[:, sl]


def _wait(works) -> None:
    for w in works:
        w.wait()


class RingAttention(torch.autograd.Function):
    """out = softmax(q K^T) V over the keys of all cp ranks; gradients for the local q, k, v."""

    @staticmethod
    def forward(ctx, q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, causal, backend, mesh,
                deterministic=False):
        W, r = mesh[CP_DIM].size(), mesh[CP_DIM].get_local_rank()
        t = k.shape[2]  # T/cp
        mask = dict(causal=causal, q_positions=q_positions, q_segment_ids=q_segment_ids, backend=backend,
                    positions_hint="explicit", deterministic=deterministic)  # zigzag blocks: no host sync
        kv = torch.stack([k, v])  # (2, B, Hkv, T/cp, D): one message per hop
        out = lse = None
        for step in range(W):
            if step < W - 1:
                next_kv, works = ring_shift(kv, mesh, CP_DIM, tag=KV_TAG)  # in flight during the kernel
            pos, seg = _block_ids(kv_positions, kv_segment_ids, (r - step) % W, t)
            o, l = attention_forward(q, kv[0], kv[1], kv_positions=pos, kv_segment_ids=seg, **mask)
            out, lse = (o.float(), l) if out is None else merge_partials(out, lse, o.float(), l)  # (B, H, T/cp, D)
            if step < W - 1:
                _wait(works)
                kv = next_kv
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, q_positions, kv_positions, q_segment_ids, kv_segment_ids)
        ctx.causal, ctx.backend, ctx.mesh, ctx.deterministic = causal, backend, mesh, deterministic
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, q_positions, kv_positions, q_segment_ids, kv_segment_ids = ctx.saved_tensors
        mesh, W = ctx.mesh, ctx.mesh[CP_DIM].size()
        r, t = mesh[CP_DIM].get_local_rank(), k.shape[2]
        mask = dict(causal=ctx.causal, q_positions=q_positions, q_segment_ids=q_segment_ids, backend=ctx.backend,
                    positions_hint="explicit", deterministic=ctx.deterministic)
        dout = dout.contiguous()
        dq = torch.zeros_like(q, dtype=torch.float32)  # (B, H, T/cp, D)
        kv = torch.stack([k, v])  # (2, B, Hkv, T/cp, D)
        grad_recv = grad_works = None
        for step in range(W):
            if step < W - 1:
                next_kv, kv_works = ring_shift(kv, mesh, CP_DIM, tag=KV_TAG)
            pos, seg = _block_ids(kv_positions, kv_segment_ids, (r - step) % W, t)
            dq_b, dk_b, dv_b = attention_backward(dout, q, kv[0], kv[1], out, lse, kv_positions=pos,
                                                  kv_segment_ids=seg, **mask)
            dq += dq_b.float()
            dkv = torch.stack([dk_b, dv_b]).float()  # this rank's share for the block it holds
            if grad_works is not None:
                _wait(grad_works)
                dkv += grad_recv.float()  # the shares of the ranks this block visited before
            grad_send = dkv.to(k.dtype)  # travels in the input dtype (bf16: half the bytes of fp32)
            grad_recv, grad_works = ring_shift(grad_send, mesh, CP_DIM, tag=GRAD_TAG)  # to r+1 (last: the owner)
            if step < W - 1:
                _wait(kv_works)
                kv = next_kv
        _wait(grad_works)  # grad_recv now holds this rank's own block's complete dk, dv
        return (dq.to(q.dtype), grad_recv[0].to(k.dtype), grad_recv[1].to(v.dtype),
                None, None, None, None, None, None, None, None)


def ring_attention(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, *, causal: bool,
                   backend: str, mesh: DeviceMesh, deterministic: bool = False) -> torch.Tensor:
    """q (B, H, T/cp, D), k/v (B, Hkv, T/cp, D) local; kv_positions (T,) / kv_segment_ids (B, T): every
    rank's ids in cp-rank order (`context.kv_positions_of`, `SegmentIdsCache`). Returns (B, H, T/cp, D)."""
    backend = resolve_backend(backend, q.device)
    if mesh[CP_DIM].size() == 1:  # nothing circulates
        return attention(q, k, v, causal=causal, q_positions=q_positions, kv_positions=kv_positions,
                         q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, backend=backend,
                         deterministic=deterministic)
    return RingAttention.apply(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids,
                               causal, backend, mesh, deterministic)
