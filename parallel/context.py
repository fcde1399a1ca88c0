"""Context parallelism over mesh["cp"]: every rank holds T/cp tokens of each sequence, and attention,
the only op that mixes tokens, sees all T keys. Two ways (`parallel.cp_mode`, "auto" picks by mask):

"allgather" (Llama 3 section 3.3.2; default for causal models). The sequence is cut into 2*cp chunks
and cp rank i holds chunks i and 2*cp-1-i, so that under the causal mask every rank does the same
work. Per attention layer:
    placements  q (B, H, T/cp, D) Shard(T);  k, v (B, Hkv, T/cp, D) Shard(T) -> gathered Replicate
    forward     all-gather of K and V together (one collective) over cp; local queries attend to all
                T keys with their GLOBAL positions (computed locally: every rank knows the layout)
                and document ids (all-gathered once per micro-batch as int32 and shared by every
                layer, `SegmentIdsCache`), so document masks cross chunk boundaries freely
    backward    reduce-scatter (sum) of dK, dV over cp: each rank's queries contributed to every key
    output      (B, H, T/cp, D) Shard(T), in the rank's own token order
With GQA the gathered K/V is n_kv_heads/n_heads of the activations (1/4 for Llama 3 8B-405B).

"ring" (Movie Gen; default for bidirectional attention): see `context_ring.py`. K/V blocks circulate
with asynchronous P2P overlapped with the local block's attention; partial outputs merge by LSE.

Padding: a bidirectional sequence whose length cp does not divide is zero-padded to a multiple of
cp (`pad_to_multiple`, "real_tokens" marks the real ones; `padding_segment_ids` masks the padding
out of attention through the document-mask path). The causal load balancing (2*cp chunks) does not
apply to bidirectional attention: any contiguous split balances.

Batch side: `cp_shard_batch` keeps rank i's part of the objective's sequence fields (causal: chunks
i and 2*cp-1-i; bidirectional: the i-th contiguous T/cp) and adds "positions", the global positions
of its tokens (T/cp,), identical for every row, so RoPE is that of the full sequence. The global
mean over the loss terms of all ranks is the trainer's business (core/train.py): it all-reduces the
count over dp x cp before backward.
"""

from __future__ import annotations

import logging
import weakref

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from gigatron.core.family import blocks_of, module_at
from gigatron.kernels.attention import attention
from gigatron.parallel.comm import all_gather_dim0, reduce_scatter_dim0

__all__ = ["apply_cp", "cp_positions", "cp_shard_batch", "pad_to_multiple", "padding_segment_ids", "ContextParallelAttention", "AllGatherKV",
           "kv_positions_of", "SegmentIdsCache", "resolve_cp_mode", "kernel_backend"]

log = logging.getLogger("gigatron")
CP_DIM = "cp"


# -- the batch side ------------------------------------------------------------------------------

def cp_positions(seq_len: int, cp: int, rank: int, device=None, causal: bool = True) -> torch.Tensor:
    """Global positions (T/cp,) held by cp rank `rank`. Causal: chunks rank and 2*cp-1-rank of 2*cp
    (every rank then does the same work under the mask). Bidirectional: the rank's contiguous T/cp
    (every key is visible to every query, so any split balances)."""
    if not causal:
        c = seq_len // cp
        return torch.arange(rank * c, (rank + 1) * c, device=device)
    c = seq_len // (2 * cp)  # chunk length
    first, second = rank * c, (2 * cp - 1 - rank) * c
    return torch.cat([torch.arange(first, first + c, device=device),
                      torch.arange(second, second + c, device=device)])  # (T/cp,)


def cp_shard_batch(batch: dict, mesh: DeviceMesh, keys: tuple[str, ...], causal: bool = True) -> dict:
    """This cp rank's part of the batch: the fields named in `keys` ((B, T, ...) each) keep the rank's
    T/cp positions (`cp_positions`), the other fields stay whole, and "positions" (T/cp,) gives the
    global positions of the local tokens (the plain arange (T,) at cp 1). Document ids keep their
    (per-row) values, so kv segment ids gathered from other ranks compare correctly with local ones."""
    if not keys:  # no sequence fields (a ViT: images and per-sample targets): nothing to split
        return batch
    cp, rank = mesh[CP_DIM].size(), mesh[CP_DIM].get_local_rank()
    some = batch[keys[0]]
    T = some.shape[1]
    if cp > 1 and not causal and T % cp:  # bidirectional: pad to a multiple of cp, mark the real tokens
        batch, keys = pad_to_multiple(batch, keys, cp), tuple(keys) + ("real_tokens",)
        some = batch[keys[0]]
        T = some.shape[1]
    positions = cp_positions(T, cp, rank, device=some.device, causal=causal) if cp > 1 else \
        torch.arange(T, device=some.device)
    out = dict(batch)
    if cp > 1:
        for key in keys:
            out[key] = batch[key].index_select(1, positions)  # (B, T/cp, ...)
    out["positions"] = positions
    return out


def pad_to_multiple(batch: dict, keys: tuple[str, ...], multiple: int) -> dict:
    """Zero-pad the sequence fields `keys` ((B, T, ...)) along T to a multiple of `multiple` and add
    "real_tokens" (B, T') bool, True on the T real tokens. Any bidirectional family can use it: its
    objective masks the loss and count with "real_tokens" and passes `padding_segment_ids(batch)` to
    self-attention, so real tokens never attend to padding (under the causal load balancing the
    length must divide 2*cp instead; config validation refuses it)."""
    some = batch[keys[0]]
    T = some.shape[1]
    pad = -T % multiple
    out = dict(batch)
    for key in keys:
        x = batch[key]
        out[key] = torch.cat([x, x.new_zeros((x.shape[0], pad, *x.shape[2:]))], dim=1)
    out["real_tokens"] = (torch.arange(T + pad, device=some.device) < T).expand(some.shape[0], -1)
    return out


def padding_segment_ids(batch: dict) -> torch.Tensor | None:
    """Segment ids (B, T) int32 that keep padding and real tokens apart in attention (0 real, 1 padding),
    or None when the batch was not padded (no mask, no ids all-gather)."""
    real = batch.get("real_tokens")
    return None if real is None else (~real).to(torch.int32)


# -- the collectives, as autograd Functions ------------------------------------------------------

class AllGatherKV(torch.autograd.Function):
    """k, v (B, Hkv, T/cp, D) Shard(T) -> (B, Hkv, T, D) Replicate, blocks in cp-rank order.
    Forward: one all-gather of stack(k, v) over mesh["cp"]. Backward: one reduce-scatter (sum) of
    stack(dk, dv): the gradient of a replicated input is the sum of every rank's contribution."""

    @staticmethod
    def forward(ctx, k, v, mesh):
        ctx.mesh = mesh
        kv = torch.stack([k, v]).permute(3, 0, 1, 2, 4)  # (T/cp, 2, B, Hkv, D): sequence first (flat layout)
        kv = all_gather_dim0(kv, mesh, CP_DIM).permute(1, 2, 3, 0, 4)  # (2, B, Hkv, T, D)
        return kv[0].contiguous(), kv[1].contiguous()

    @staticmethod
    def backward(ctx, dk, dv):
        dkv = torch.stack([dk, dv]).permute(3, 0, 1, 2, 4)  # (T, 2, B, Hkv, D)
        dkv = reduce_scatter_dim0(dkv, ctx.mesh, CP_DIM).permute(1, 2, 3, 0, 4)  # (2, B, Hkv, T/cp, D)
        return dkv[0], dkv[1], None


def kv_positions_of(positions: torch.Tensor, cp: int, causal: bool) -> torch.Tensor:
    """Global positions (T,) of the keys in the order `AllGatherKV` gathers them (cp-rank order),
    computed locally: every rank knows which positions every other rank holds (`cp_positions`)."""
    T = positions.numel() * cp
    return torch.cat([cp_positions(T, cp, r, device=positions.device, causal=causal) for r in range(cp)])


class SegmentIdsCache:
    """The kv segment (document) ids of a micro-batch, gathered once and shared by every CP attention
    layer of a model: one all-gather of (T/cp, B) int32 per micro-batch, not one per layer. Entries
    are keyed by the local ids tensor itself (the same object reaches every layer) and hold a weak
    reference to it, so a freed tensor whose id is reused never hits."""

    def __init__(self, mesh: DeviceMesh, size: int = 8):
        self.mesh, self.size = mesh, size
        self.entries: list[tuple[weakref.ref, torch.Tensor]] = []

    @torch.no_grad()
    def get(self, segment_ids: torch.Tensor) -> torch.Tensor:
        for ref, gathered in self.entries:
            if ref() is segment_ids:
                return gathered
        ids = all_gather_dim0(segment_ids.T.to(torch.int32), self.mesh, CP_DIM)  # (T, B), cp-rank order
        gathered = ids.T.contiguous()  # (B, T)
        self.entries = [(weakref.ref(segment_ids), gathered)] + self.entries[: self.size - 1]
        return gathered


# -- the module that replaces AttentionCore ------------------------------------------------------

def kernel_backend(backend: str) -> str:
    """CP needs the LSE-returning kernels: "sdpa" (the CPU default of AttentionCore) maps to "torch"."""
    return "torch" if backend == "sdpa" else backend


def resolve_cp_mode(mode: str, causal: bool) -> str:
    if mode == "auto":
        return "allgather" if causal else "ring"
    if mode not in ("allgather", "ring"):
        raise ValueError(f"parallel.cp_mode must be auto, allgather or ring; got {mode!r}")
    return mode


class ContextParallelAttention(nn.Module):
    """Drop-in for `AttentionCore` (same forward signature, self-attention only) over mesh["cp"].

    Inputs: q (B, H, T/cp, D), k, v (B, Hkv, T/cp, D), positions (T/cp,) global, segment_ids
    (B, T/cp) or None, all local (Shard(T)). Output: (B, H, T/cp, D), Shard(T). Collectives per call:
    one all-gather of the ids (both modes), then "allgather": all-gather K/V forward, reduce-scatter
    dK/dV backward; "ring": cp-1 P2P hops of K/V forward, cp-1 of K/V and cp of dK/dV backward."""

    attention_core = True  # selective checkpointing saves its work (parallel/checkpointing.py)

    def __init__(self, causal: bool, backend: str, mesh: DeviceMesh, mode: str = "auto",
                 ids: SegmentIdsCache | None = None):
        super().__init__()
        self.causal, self.backend, self.mesh = causal, kernel_backend(backend), mesh
        self.mode = resolve_cp_mode(mode, causal)
        self.ids = ids or SegmentIdsCache(mesh)
        self.deterministic = False  # fixed kernel configurations, no autotune (train.deterministic)

    def extra_repr(self) -> str:
        return f"causal={self.causal}, mode={self.mode}, cp={self.mesh[CP_DIM].size()}, backend={self.backend}"

    @torch.compiler.disable  # collectives inside autograd Functions: keep them out of compiled graphs
    def forward(self, q, k, v, positions, segment_ids, kv_positions=None, kv_segment_ids=None):
        if kv_positions is not None or kv_segment_ids is not None:
            raise NotImplementedError("context parallelism shards self-attention only (kv ids come from the ranks)")
        kv_positions = kv_positions_of(positions, self.mesh[CP_DIM].size(), self.causal)  # (T,), no collective
        kv_segment_ids = None if segment_ids is None else self.ids.get(segment_ids)  # (B, T), once per micro-batch
        if self.mode == "ring":
            from gigatron.parallel.context_ring import ring_attention

            return ring_attention(q, k, v, positions, kv_positions, segment_ids, kv_segment_ids,
                                  causal=self.causal, backend=self.backend, mesh=self.mesh,
                                  deterministic=self.deterministic)
        k, v = AllGatherKV.apply(k, v, self.mesh)  # (B, Hkv, T, D) each
        return attention(q, k, v, causal=self.causal, q_positions=positions, kv_positions=kv_positions,
                         q_segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, backend=self.backend,
                         positions_hint="explicit", deterministic=self.deterministic)  # zigzag: no host check


def apply_cp(model: nn.Module, mesh: DeviceMesh, cfg, plan) -> nn.Module:
    """Replace the self-attention cores the family's plan lists (`plan.cp_attention`, paths inside
    each block; AttentionCore instances) by ContextParallelAttention over mesh["cp"], in place. Any
    other attention, e.g. cross-attention to text tokens that every cp rank holds whole, stays local.
    Parameter names are unchanged (cores have no parameters). A no-op at cp 1. The batch must then be
    sharded with `cp_shard_batch` (the trainer and the pipeline do it)."""
    if mesh[CP_DIM].size() == 1:
        return model
    swapped, ids = None, SegmentIdsCache(mesh)  # one cache per model (pipeline stage)
    for block in blocks_of(model, plan).values():
        for path in plan.cp_attention:
            parent_path, _, attr = path.rpartition(".")
            parent = module_at(block, parent_path) if parent_path else block
            core = getattr(parent, attr)
            swapped = ContextParallelAttention(core.causal, core.backend, mesh, cfg.parallel.cp_mode, ids)
            setattr(parent, attr, swapped)
    if swapped is not None:
        log.info("context parallel: %s", swapped.extra_repr())
    return model
