"""Activation checkpointing per block (Chen et al. 2016; selective: Korthikanti et al. 2022).

- "full": a block keeps only its input; backward re-runs its whole forward (attention, and the
  collectives inside it: tp all-gathers / reduce-scatters, cp's K/V all-gather).
- "selective": per op type. The outputs of matmuls (the expensive ops) are saved, the cheap
  elementwise work (norms, SiLU, RoPE, residual adds) is recomputed, and so is a sequence-parallel
  all-gather. Some modules are *kept units*: run once, never re-run by the recompute, their own
  saved tensors exempt from the checkpoint's hooks; when backward re-runs the block, a unit hands
  back the output it computed in forward (a FIFO per unit), so neither its FLOPs nor its
  collectives are repeated. The units are
  - every attention core (a module with `attention_core = True`), whatever kernel runs it (SDPA,
    gigatron's Triton or PyTorch kernels, context-parallel all-gather or ring attention): q, k, v,
    output and log-sum-exp are kept;
  - under tensor parallelism, the row-parallel projections of the family's TP table (Llama's wo and
    w2): their matmul makes a partial sum that is reduced over tp (reduce-scattered under SP,
    all-reduced without). Kept as a unit, a projection holds its input (for the weight gradient) and
    its reduced output, and neither the (T, d) partial sum before the reduce is saved (per token
    2 d bytes in bf16 per projection, unsharded: the largest saved tensor of a tp8 405B block) nor
    the reduce repeated in backward.

Why not simply mark attention's aten ops "must save": the kernels update matmul outputs in place
(scores += mask bias), and a saved-then-mutated tensor replayed in the recompute is wrong (measured:
a 20% gradient-norm error). The core is one unit instead: no op inside it is cached.

Layer-wise mixed recompute (`parallel.full_recompute_every: K`, 0 = off): the block at position i of
its pipeline rank (the rank's blocks over all its virtual stages, in layer order; without a pipeline,
the model's) gets "full" when i % K == 0 and `activation_checkpoint` otherwise, so each rank trades
ceil(n / K) of its n blocks' saved activations for one more forward each. The position is the
rank's, not the model's: with interleaved chunks a rank holds layers pp apart, and a global
index % K would give some ranks only full blocks and others none. `block_policies` is the one place
that decides a block's policy; "none", "selective" and "full" for every block are K = 0.

The block's `forward` is wrapped in place, and a unit becomes an instance of a subclass of its own
class whose `__call__` keeps it (as FSDP2's `fully_shard` swaps classes): no wrapper module, so
parameter names, and therefore the name-keyed initialisation and checkpoint keys, stay those of the
plain model. The unit wraps the module's whole call, hooks included: tensor parallelism's
reduce-scatter runs in RowwiseParallel's output hook.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import threading

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.utils.checkpoint import (CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts,
                                     set_checkpoint_early_stop)

from gigatron.core.family import blocks_of

_aten = torch.ops.aten
SAVE = {
    _aten.mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _aten._scaled_dot_product_cudnn_attention.default,
    torch.ops._c10d_functional.reduce_scatter_tensor.default,
}
_state = threading.local()  # .recomputing: inside a backward re-run; .in_unit: inside a kept unit


def _policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if getattr(_state, "in_unit", False):
        return CheckpointPolicy.PREFER_RECOMPUTE  # cache nothing: a kept unit is not re-run (see below)
    return CheckpointPolicy.MUST_SAVE if op in SAVE else CheckpointPolicy.PREFER_RECOMPUTE


@contextlib.contextmanager
def _flag(name: str, value: bool):
    old = getattr(_state, name, False)
    setattr(_state, name, value)
    try:
        yield
    finally:
        setattr(_state, name, old)


@contextlib.contextmanager
def _recomputing(recompute):
    with recompute, _flag("recomputing", True):
        yield


def _selective_context():
    forward, recompute = create_selective_checkpoint_contexts(_policy)
    return forward, _recomputing(recompute)


def _checkpointed(forward, context_fn, *args, **kwargs):
    return checkpoint(forward, *args, use_reentrant=False, context_fn=context_fn, **kwargs)


def _checkpointed_to_the_end(forward, context_fn, *args, **kwargs):
    """Selective: the recompute runs the whole block (no early stop), so that every kept unit, the
    last projection of a block included, hands back its output and its FIFO never holds a stale one.
    What runs past the last needed tensor is a replayed unit and a residual add."""
    with set_checkpoint_early_stop(False):
        return checkpoint(forward, *args, use_reentrant=False, context_fn=context_fn, **kwargs)


@contextlib.contextmanager
def _outside_selective_cache():
    """Run a kept unit's forward outside the selective checkpoint's caching mode (the top dispatch
    mode inside a selectively checkpointed block). torch's SAC files each op's output under its
    invocation count; the unit's ops do not run again in the recompute, so counting them would shift
    every later op of the same kind onto another op's cached output."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode, _pop_mode_temporarily

    mode = _get_current_dispatch_mode()
    if mode is not None and type(mode).__name__ == "_CachingTorchDispatchMode":
        with _pop_mode_temporarily():
            yield
    else:
        yield


def _kept_unit(forward, outputs: collections.deque, *args, **kwargs):
    """A kept unit under selective checkpointing: run once, keep its saved tensors, and replay its
    output (a FIFO: backward re-runs blocks in the order their forwards ran, under every pipeline
    schedule) when backward re-runs the block."""
    if getattr(_state, "recomputing", False):
        out, requires_grad = outputs.popleft()
        # a leaf that requires grad as the original did, so the ops after it save the same tensors
        return out.detach().requires_grad_(requires_grad)
    with _outside_selective_cache(), _flag("in_unit", True), \
            torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        out = forward(*args, **kwargs)
    if torch.is_grad_enabled():
        outputs.append((out.detach(), out.requires_grad))
    return out


def _keep(module: nn.Module) -> None:
    """Make `module` a kept unit: its class becomes a subclass whose __call__ goes through _kept_unit."""
    cls, outputs = type(module), collections.deque()

    def __call__(self, *args, **kwargs):
        return _kept_unit(functools.partial(cls.__call__, self), outputs, *args, **kwargs)

    # kept_outputs: outputs waiting for the backward re-run (empty once a backward is done)
    module.__class__ = type(f"Kept{cls.__name__}", (cls,), {"__call__": __call__, "kept_outputs": outputs})


def kept_units(block: nn.Module, cfg, plan) -> list[nn.Module]:
    """The modules of one block that selective checkpointing keeps: its attention cores, and under
    tp > 1 the row-parallel projections named in the family's TP table (plan.tp_block)."""
    from torch.distributed.tensor.parallel import RowwiseParallel

    units = [m for m in block.modules() if getattr(m, "attention_core", False)]
    if cfg.parallel.tp > 1 and plan.tp_block is not None:
        for path, style in plan.tp_block(cfg).items():
            if isinstance(style, RowwiseParallel):
                units.append(block.get_submodule(path))
    return units


def rank_block_positions(blocks, pp_rank: int, cfg) -> dict[str, int]:
    """Position of each of `blocks` (names: global indices) among the blocks pipeline rank `pp_rank` runs,
    over all the rank's virtual stages in layer order (parallel/pipeline.py's split: assign_layers,
    rank_chunks); without a pipeline, among the model's blocks."""
    p = cfg.parallel
    pp = getattr(p, "pp", 1)
    if pp > 1:
        from gigatron.core.family import get_family
        from gigatron.parallel.pipeline_split import assign_layers, rank_chunks

        assignment = assign_layers(get_family(cfg.model.name).n_blocks(cfg.model), pp, p.pp_virtual_stages,
                                   p.pp_first_last_fewer_layers)
        chunks = rank_chunks(pp_rank, pp, p.pp_virtual_stages)
        mine = sorted(i for c in chunks for i in assignment[c])
    else:
        mine = sorted(int(name) for name in blocks)
    position = {index: i for i, index in enumerate(mine)}
    return {name: position[int(name)] for name in blocks}


def block_policies(model: nn.Module, mesh: DeviceMesh | None, cfg, plan) -> dict[str, str]:
    """The recompute policy of each block of `model`: "full" at rank positions 0, K, 2K, ... when
    parallel.full_recompute_every = K > 0, parallel.activation_checkpoint everywhere else."""
    mode = cfg.parallel.activation_checkpoint
    every = getattr(cfg.parallel, "full_recompute_every", 0)
    blocks = blocks_of(model, plan)
    if not every:
        return {name: mode for name in blocks}
    pp_rank = mesh["pp"].get_local_rank() if getattr(cfg.parallel, "pp", 1) > 1 else 0
    positions = rank_block_positions(blocks, pp_rank, cfg)
    return {name: "full" if positions[name] % every == 0 else mode for name in blocks}


def apply_ac(model: nn.Module, mesh: DeviceMesh | None, cfg, plan) -> nn.Module:
    """Wrap each block's forward per its policy (`block_policies`: "none", "full", "selective").
    Input/output placements are unchanged (whatever the block takes and returns)."""
    from torch.utils.checkpoint import noop_context_fn

    policies = block_policies(model, mesh, cfg, plan)
    for name, block in blocks_of(model, plan).items():
        mode = policies[name]
        if mode == "none":
            continue
        if mode == "selective":
            for module in kept_units(block, cfg, plan):
                _keep(module)
            block.forward = functools.partial(_checkpointed_to_the_end, block.forward, _selective_context)
        else:
            block.forward = functools.partial(_checkpointed, block.forward, noop_context_fn)
    return model
