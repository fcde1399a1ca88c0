"""Communication: the few collectives gigatron issues itself, and a recorder of every collective.

Recorder. `CommRecorder(mesh)` is a context manager that logs each collective run while it is
active: kind (all_gather, reduce_scatter, all_reduce, all_to_all, broadcast, send, recv), the mesh
dimension whose process group carried it (a group name is mapped to a mesh dimension name such as
"tp", "fsdp_shard", "dp_replicate"), the bytes, and the count. It is a `TorchDispatchMode` that sees
- DTensor's functional collectives (`torch.ops._c10d_functional.*`): it returns NotImplemented for
  DTensor arguments, so DTensor desugars into local ops and collectives first, then the mode sees
  those (as torch's CommDebugMode does);
- torch.distributed's eager collectives (`torch.ops.c10d.*`), which FSDP2 issues
  (all_gather_single / reduce_scatter_single / all_reduce in _fsdp_collectives.py).
When no recorder is active nothing is installed: the cost is zero.

Bytes convention: the size of the whole buffer a collective spans, i.e. the gathered output of an
all-gather, the unreduced input of a reduce-scatter, the tensor of an all-reduce, the input of an
all-to-all. A ring moves (W-1)/W of it per rank. `textbook_bytes` gives the least a step must move.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.utils._python_dispatch import TorchDispatchMode

# mesh names in priority order: when two names share one group (a flattened mesh of one
# non-trivial dimension), the first wins
MESH_NAMES = ("tp", "cp", "pp", "fsdp_shard", "dp_replicate", "dp_shard", "batch", "loss")

_f = torch.ops._c10d_functional
_c = torch.ops.c10d
# op packet -> (kind, index of the tensor whose size counts, multiply by group size?)
_FUNCTIONAL = {
    _f.all_gather_into_tensor: ("all_gather", 0, True),
    _f.reduce_scatter_tensor: ("reduce_scatter", 0, False),
    _f.all_reduce: ("all_reduce", 0, False),
    _f.all_reduce_: ("all_reduce", 0, False),
    _f.all_to_all_single: ("all_to_all", 0, False),
    _f.broadcast: ("broadcast", 0, False),
}
_EAGER = {
    _c._allgather_base_: ("all_gather", 0),
    _c.allgather_into_tensor_coalesced_: ("all_gather", 0),
    _c._reduce_scatter_base_: ("reduce_scatter", 1),
    _c.reduce_scatter_tensor_coalesced_: ("reduce_scatter", 1),
    _c.allreduce_: ("all_reduce", 0),
    _c.allreduce_coalesced_: ("all_reduce", 0),
    _c.alltoall_base_: ("all_to_all", 1),
    _c.broadcast_: ("broadcast", 0),
    _c.send: ("send", 0),
    _c.recv_: ("recv", 0),
}


def _nbytes(x) -> int:
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return x.numel() * x.element_size() if isinstance(x, torch.Tensor) else 0


def group_names(mesh: DeviceMesh) -> dict:
    """process-group name -> mesh dimension name, for every named (and flattened) dimension; also
    keyed by the group's set of global ranks, since DTensor may run a collective on an equal group
    of an earlier mesh with the same layout (its caches compare meshes by layout)."""
    names: dict = {}
    for name in MESH_NAMES:
        try:
            group = mesh[name].get_group()
        except (KeyError, RuntimeError, ValueError):
            continue
        names.setdefault(group.group_name, name)
        names.setdefault(frozenset(dist.get_process_group_ranks(group)), name)
    return names


def _process_group_name(args) -> str | None:
    """The group of an eager c10d op: its ProcessGroup arrives boxed as a ScriptObject."""
    for a in args:
        if isinstance(a, torch.ScriptObject):
            try:
                return dist.ProcessGroup.unbox(a).group_name
            except RuntimeError:  # a boxed ReduceOp, not a group
                continue
    return None


class CommRecorder(TorchDispatchMode):
    """`with CommRecorder(mesh) as rec: ...` then `rec.totals()` -> {(dim, kind): [count, bytes]}."""

    def __init__(self, mesh: DeviceMesh | None = None):
        super().__init__()
        self.groups = group_names(mesh) if mesh is not None else {}
        self.records: list[tuple[str, str, int]] = []  # (dim, kind, bytes)

    def _dim(self, name: str | None) -> str:
        world = dist.distributed_c10d._get_default_group().group_name if dist.is_initialized() else None
        name = world if name is None else name
        if name not in self.groups and name != world:
            try:
                ranks = frozenset(dist.get_process_group_ranks(dist.distributed_c10d._resolve_process_group(name)))
                self.groups[name] = self.groups.get(ranks, str(name))
            except (RuntimeError, ValueError, KeyError):
                self.groups[name] = str(name)
        return self.groups.get(name, "world" if name == world else str(name))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor

        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # let DTensor desugar first; we see its local collectives
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in _FUNCTIONAL:
            kind, idx, times_group = _FUNCTIONAL[packet]
            group = args[-1] if isinstance(args[-1], str) else kwargs.get("group_name")
            size = _nbytes(args[idx]) * (args[1] if times_group else 1)
            self.records.append((self._dim(group), kind, size))
        elif packet in _EAGER:
            kind, idx = _EAGER[packet]
            self.records.append((self._dim(_process_group_name(args)), kind, _nbytes(args[idx])))
        return func(*args, **kwargs)

    def totals(self) -> dict[tuple[str, str], list[int]]:
        out: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
        for dim, kind, size in self.records:
            out[(dim, kind)][0] += 1
            out[(dim, kind)][1] += size
        return dict(out)

    def bytes_by(self, dims: tuple[str, ...] | None = None) -> dict[tuple[str, str], int]:
        return {key: v[1] for key, v in self.totals().items() if dims is None or key[0] in dims}


# -- the collectives gigatron issues itself ------------------------------------------------------

def all_reduce(x: torch.Tensor, mesh: DeviceMesh, dim: str, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce over mesh[dim]; a no-op when that dimension has size 1. Not autograd-aware:
    callers (the vocabulary-parallel loss) write their own backward."""
    if mesh[dim].size() > 1:
        dist.all_reduce(x, op=op, group=mesh[dim].get_group())
    return x


# torch 2.13 renamed the flat collectives (all_gather_into_tensor -> all_gather_single, ...); the
# engine runs from torch 2.11 on, so take whichever this torch has
all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather_dim0(x: torch.Tensor, mesh: DeviceMesh, dim: str) -> torch.Tensor:
    """(n, ...) -> (W*n, ...) over mesh[dim], rank-ordered along dim 0 (the flat layout gloo needs).
    Conjugate pair: forward all-gather, backward `reduce_scatter_dim0`. Not autograd-aware (context
    parallelism wraps the pair in its own autograd Function). Returns x when the dimension has size 1."""
    W = mesh[dim].size()
    if W == 1:
        return x
    out = x.new_empty((W * x.shape[0], *x.shape[1:]))
    all_gather_flat(out, x.contiguous(), group=mesh[dim].get_group())
    return out


def reduce_scatter_dim0(x: torch.Tensor, mesh: DeviceMesh, dim: str) -> torch.Tensor:
    """(W*n, ...) -> (n, ...) summed over mesh[dim]: rank r keeps rows [r*n, (r+1)*n). The conjugate
    (backward) of `all_gather_dim0`. Returns x when the dimension has size 1."""
    W = mesh[dim].size()
    if W == 1:
        return x
    out = x.new_empty((x.shape[0] // W, *x.shape[1:]))
    _reduce_scatter_flat(out, x.contiguous(), group=mesh[dim].get_group())
    return out


def ring_shift(x: torch.Tensor, mesh: DeviceMesh, dim: str, tag: int = 0) -> tuple[torch.Tensor, list]:
    """Asynchronous P2P on the mesh[dim] ring: send x to rank r+1, receive the same shape from r-1.
    Returns (receive buffer, works); call `w.wait()` on every work before reading the buffer. Its own
    conjugate: a ring pass in backward shifts gradients the same way (context-parallel ring attention).
    Distinct tags keep two shifts in flight at once apart (with W = 2 both go to the same peer)."""
    m = mesh[dim]
    W, r, group = m.size(), m.get_local_rank(), m.get_group()
    x = x.contiguous()
    recv = torch.empty_like(x)
    ops = [dist.P2POp(dist.isend, x, group=group, group_peer=(r + 1) % W, tag=tag),
           dist.P2POp(dist.irecv, recv, group=group, group_peer=(r - 1) % W, tag=tag)]
    return recv, dist.batch_isend_irecv(ops)



class _AllGatherWithGrad(torch.autograd.Function):
    """Forward `all_gather_dim0`, backward `reduce_scatter_dim0` (sum): see `all_gather_with_grad`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, mesh: DeviceMesh, dim: str) -> torch.Tensor:
        ctx.mesh, ctx.dim = mesh, dim
        return all_gather_dim0(x, mesh, dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return reduce_scatter_dim0(grad, ctx.mesh, ctx.dim), None, None


def all_gather_with_grad(x: torch.Tensor, mesh: DeviceMesh, dim: str, grad: bool = True) -> torch.Tensor:
    """(n, ...) -> (W*n, ...) over mesh[dim], rank-ordered rows, differentiable: every rank's rows
    get the gradient of every rank's loss (open_clip's gather_with_grad; contrastive negatives).

    Backward is a reduce-scatter with SUM: rank r's loss used all W*n rows, so the gradient of the
    global loss sum(loss_r) with respect to rank s's rows is the sum over r of what each rank's
    backward puts on those rows; rank s keeps the slice of that sum it owns and back-propagates it
    into its own encoder (a mean would divide every cross-rank term by W). Composition with the
    trainer (core/family.py): each rank back-propagates loss_r * dp / N, so after this sum rank s
    holds dp / N x (the part of d sum(loss) / d theta that flows through its own samples); the
    parts of the W ranks add up to dp / N x the whole gradient, and FSDP's average over the dp ranks
    divides by dp: d sum(loss) / d theta / N, as one process over the global batch. Tensors stay on
    x's device (NCCL-ready); size 1 is the identity.

    grad=False is the naive gather, kept only as the negative control of the tests: the other ranks'
    rows are detached and only this rank's own rows (put back in place) carry gradient, so the
    terms where another rank's loss uses this rank's rows are lost."""
    W = mesh[dim].size()
    if W == 1:
        return x
    if grad:
        return _AllGatherWithGrad.apply(x, mesh, dim)
    out = all_gather_dim0(x.detach(), mesh, dim)
    r, n = mesh[dim].get_local_rank(), x.shape[0]
    return torch.cat([out[:r * n], x, out[(r + 1) * n:]])

# -- the textbook minimum ------------------------------------------------------------------------

def textbook_bytes(cfg, units: list[int], n_micro: int, compute_bytes: int = 4, layers: int = 0, dim: int = 0,
                   kv_heads: int = 0, head_dim: int = 0, causal: bool = True) -> dict[tuple[str, str], int]:
    """The least traffic one optimizer step of this layout must move, per rank, per (mesh dim, kind),
    derived from the layout and the model's shape, not from what the code does. Bytes convention as
    the recorder's (an all-gather's gathered output, a reduce-scatter's unreduced input).

    units: per FSDP unit, the number of this rank's tensor-parallel-local parameter elements.
    layers/dim/kv_heads/head_dim: the transformer's shape (kv_heads: the model's, before tp).

    FSDP over fsdp = dp_shard x cp ranks (Rajbhandari et al. 2020; parameters not resharded after
      forward, gradients synchronised once per step): per unit one all-gather of its parameters in
      the compute dtype and one reduce-scatter of its gradients in FP32, per step; HSDP adds one
      all-reduce of the FP32 gradient shard over dp_replicate. With parallel.grad_sync=per_microbatch,
      both happen once per micro-batch.
    TP + SP (Korthikanti et al. 2022, per micro-batch, a = B * T/cp * dim activations): per layer 2
      all-gathers and 2 reduce-scatters of a in forward and the same in backward; the vocabulary-
      parallel embedding and output add one reduce-scatter and one all-gather each; the vocabulary-
      parallel loss 3 all-reduces of B*T/cp FP32 values. Without SP the 4L+2 pairs are all-reduces.
      The norm weights under SP (and KV projections replicated when n_kv_heads < tp) have partial
      gradients: one FP32 all-reduce of them with each gradient synchronisation.
    CP (Llama 3 all-gather, per micro-batch and layer, kv = K and V of the whole sequence): one all-
      gather of kv forward, one reduce-scatter of dK/dV backward. Ring: cp-1 hops of a kv block
      forward; cp-1 kv hops and cp dK/dV hops backward, each one send and one receive.
    """
    m, p, t = cfg.model, cfg.parallel, cfg.train
    out: dict[tuple[str, str], int] = defaultdict(int)
    fsdp = p.dp // p.dp_replicate * p.cp
    syncs = 1 if p.grad_sync == "per_step" else n_micro
    total = sum(units)
    # with dp_shard = 1 the FSDP group is the cp group itself (one process group): the recorder names it "cp"
    fsdp_dim = "cp" if p.cp > 1 and p.dp // p.dp_replicate == 1 else "fsdp_shard"
    if fsdp > 1:
        out[(fsdp_dim, "all_gather")] += syncs * total * compute_bytes
        out[(fsdp_dim, "reduce_scatter")] += syncs * total * 4
    if p.dp_replicate > 1:
        if fsdp == 1:
            out[("dp_replicate", "all_gather")] += syncs * total * compute_bytes
        out[("dp_replicate", "all_reduce")] += syncs * total // fsdp * 4
    B, T = t.micro_batch_size, t.seq_len // p.cp
    if p.tp > 1:
        a = B * T * dim * compute_bytes
        pairs = n_micro * (4 * layers + 2) * a
        if p.sequence_parallel:
            out[("tp", "all_gather")] += pairs
            out[("tp", "reduce_scatter")] += pairs
        else:
            out[("tp", "all_reduce")] += pairs
        out[("tp", "all_reduce")] += n_micro * 3 * B * T * 4
        partial = (2 * layers + 1) * dim if p.sequence_parallel else 0
        if kv_heads < p.tp:
            partial += layers * 2 * kv_heads * head_dim * dim
        out[("tp", "all_reduce")] += (syncs if fsdp > 1 else n_micro) * partial * 4
    if p.cp > 1:
        kv = 2 * B * max(1, kv_heads // p.tp) * t.seq_len * head_dim * compute_bytes
        if p.cp_mode == "allgather" or (p.cp_mode == "auto" and causal):
            out[("cp", "all_gather")] += n_micro * layers * kv
            out[("cp", "reduce_scatter")] += n_micro * layers * kv
        else:
            hops = n_micro * layers * (2 * (p.cp - 1) + p.cp) * (kv // p.cp)
            out[("cp", "send")] += hops
            out[("cp", "recv")] += hops
    return dict(out)


def cp_attention_bytes(mode: str, batch: int, seq_len: int, kv_heads: int, head_dim: int, cp: int,
                       element_size: int = 4, segment_ids: bool = True) -> dict[tuple[str, str], int]:
    """Bytes on mesh "cp" of ONE context-parallel attention call, forward + backward, per rank, as
    parallel/context.py moves them (without activation checkpointing, which repeats the forward):
    kv = K and V of the whole sequence = 2*B*Hkv*T*D*element_size;
      allgather:  all-gather of kv forward, reduce-scatter of kv backward;
      ring:       forward cp-1 hops of a kv block (kv/cp); backward cp-1 hops of kv blocks and cp hops
                  of dK/dV blocks in the same dtype: every hop is one send and one recv;
      segment_ids: the document ids' all-gather, (T, B) int32, which a micro-batch makes once for
      all its layers (parallel/context.py SegmentIdsCache), here counted for the one call."""
    kv = 2 * batch * kv_heads * seq_len * head_dim * element_size
    ids = seq_len * batch * 4 if segment_ids else 0
    if mode == "allgather":
        return {("cp", "all_gather"): kv + ids, ("cp", "reduce_scatter"): kv}
    hops = (2 * (cp - 1) + cp) * (kv // cp)
    out = {("cp", "send"): hops, ("cp", "recv"): hops}
    if ids:
        out[("cp", "all_gather")] = ids
    return out
