"""FP8 training through the family seam: the recipe's `fp8:` section (core/config.py Fp8Config) turns the
linear layers inside the family's blocks (`ParallelPlan.blocks`, found by module type, never by name)
into FP8 linears, after tensor parallelism and before FSDP (parallelize.py, step 2). Modules outside
the blocks (embeddings, output heads, routers) and the globs of `fp8.keep_bf16` ("{first}" / "{last}":
the first / last block) stay in the compute dtype.

Backends (`fp8.backend`; "auto": te if importable, tp = 1 and the GPU has FP8 tensor cores (sm_89+),
else torchao if importable on such a GPU, else emulated):
- emulated: kernels/fp8.py's Fp8Linear, on CPU a quantize-dequantize emulation, on sm_89+ real FP8 GEMMs
  through torch._scaled_mm (tensorwise / delayed). Composes with the plan tables: under TP the module
  keeps its ParallelStyle hooks (input / output redistribution) and runs the FP8 GEMM on the local shards
  (`_TPFp8Linear`), with the output, dx and dW placements that DTensor's own F.linear would give.
- torchao: `torchao.float8.Float8Linear` (torchtitan's route), tensorwise or rowwise; DTensor-native, so
  the same ParallelStyle hooks are moved onto it. FSDP2's float8 all-gather (`fsdp_float8_all_gather`,
  tensorwise only) at tp = 1 (after-TP conversion would nest the float8 weight wrapper outside the DTensor).
- te: Transformer Engine's `te.Linear` inside its own fp8_autocast, delayed or tensorwise (current)
  scaling, tp = 1 only. Why: te.Linear carries its own TP (tp_group, parallel_mode, sequence_parallel:
  its own collectives on plain tensors) and cannot take the DTensor styles of our plan tables; mixing
  the two would mean a second TP implementation beside parallel/tensor.py. Where TP is needed, the
  DTensor-native backends (torchao, emulated) run behind the same plan; TE runs the layouts it fits
  (FSDP / HSDP, CP, PP at tp = 1: Llama 3 8B on 8 GPUs), Megatron's own backend, unchanged.

Which groups reduce each amax (so that every rank uses the scale one process would):
- tp: an operand split over tp (a Shard placement, or a Partial gradient): max over mesh["tp"]; rowwise
  scales only when the split cuts the rows (Shard of the last dim);
- cp: activations and their gradients hold T/cp tokens: max over mesh["cp"] (not rowwise: a row is a token);
- dp: never within a step (each micro-batch has its own scale, as in one process). Delayed scaling keeps
  its state per step: every micro-batch of a step uses the scales of the steps before, records its
  amax, and after the optimizer step the step's amaxes are max-reduced over dp x cp and tp (two
  all-reduces of a (modules, 3) tensor) and pushed into the history: dp ranks hold bit-equal scales (the
  buffers are checkpointed once) and the result does not depend on the dp / micro-batch split.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import logging
import weakref

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.optim.optimizer import register_optimizer_step_post_hook

from gigatron.core.config_loader import ConfigError
from gigatron.core.family import blocks_of
from gigatron.kernels.fp8 import Fp8Linear, Fp8Recipe, fp8_matmul_backward, fp8_matmul_forward
from gigatron.parallel.comm import all_reduce

log = logging.getLogger("gigatron")
__all__ = ["apply_fp8", "fp8_targets", "resolve_backend", "validate_fp8", "fp8_modules"]


# -- which linears -----------------------------------------------------------------------------------
def _expand(pattern: str, blocks: str, n_blocks: int) -> str:
    return pattern.replace("{first}", f"{blocks}.0").replace("{last}", f"{blocks}.{max(n_blocks - 1, 0)}")


def fp8_targets(model: nn.Module, plan, n_blocks: int, keep_bf16: list[str]) -> tuple[list[str], list[str]]:
    """(converted, kept): qualified names of the nn.Linear modules inside the plan's blocks, split by the
    keep_bf16 globs (a glob matches a module or anything inside it). Blocks are index-keyed, so "{last}"
    is the model's last block on every pipeline stage."""
    patterns = [_expand(p, plan.blocks, n_blocks) for p in keep_bf16]
    converted, kept = [], []
    for key, block in blocks_of(model, plan).items():
        for sub, module in block.named_modules():
            if type(module) is not nn.Linear:
                continue
            name = f"{plan.blocks}.{key}.{sub}"
            keep = any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, p + ".*") for p in patterns)
            (kept if keep else converted).append(name)
    return converted, kept


# -- backends ----------------------------------------------------------------------------------------
def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def fp8_gpu() -> bool:
    """A CUDA GPU with FP8 tensor cores (Ada / Hopper / Blackwell: sm_89+)."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def resolve_backend(f, tp: int) -> str:
    if f.backend != "auto":
        return f.backend
    if fp8_gpu():
        if _importable("transformer_engine") and tp == 1 and f.recipe != "rowwise":
            return "te"
        if _importable("torchao") and f.recipe != "delayed":
            return "torchao"
    return "emulated"


def validate_fp8(cfg, family) -> None:
    """The fp8 section's rules (called by core/config.validate when fp8.enabled)."""
    f, p = cfg.fp8, cfg.parallel

    def require(ok, key, message):
        if not ok:
            raise ConfigError(key, message)

    require(f.amax_history_len >= 1, "fp8.amax_history_len", f"{f.amax_history_len} must be >= 1")
    require(f.margin >= 0, "fp8.margin", f"{f.margin} must be >= 0 (scales are multiplied by 2^-margin)")
    if f.backend == "te":
        require(_importable("transformer_engine"), "fp8.backend",
                "'te' needs Transformer Engine, which is not installed: pip install 'transformer-engine[pytorch]' "
                "(the .[gpu] extra) on the GPU machine, or set fp8.backend=auto (torchao or emulated)")
        require(p.tp == 1, "fp8.backend",
                f"'te' runs at parallel.tp=1 only (te.Linear carries its own TP, which does not compose with "
                f"the DTensor plan tables); with tp={p.tp} set fp8.backend=torchao or emulated")
        require(f.recipe != "rowwise", "fp8.recipe",
                "Transformer Engine has no rowwise recipe (MXFP8 needs Blackwell); use delayed or tensorwise, "
                "or fp8.backend=torchao for rowwise")
    if f.backend == "torchao":
        require(_importable("torchao"), "fp8.backend",
                "'torchao' is not installed: pip install torchao, or set fp8.backend=auto (te or emulated)")
        require(f.recipe != "delayed", "fp8.recipe",
                "torchao has no delayed scaling (current torchao: tensorwise and rowwise); set "
                "fp8.recipe=tensorwise, or fp8.backend=te / emulated for delayed")
    if f.fsdp_float8_all_gather:
        require(f.recipe == "tensorwise", "fp8.fsdp_float8_all_gather",
                f"FSDP2's float8 all-gather works with tensorwise scaling only, not '{f.recipe}'; set "
                f"fp8.recipe=tensorwise or fp8.fsdp_float8_all_gather=false")
        require(f.backend == "torchao", "fp8.fsdp_float8_all_gather",
                f"only the torchao backend implements FSDP2's float8 all-gather (backend is '{f.backend}'); set "
                f"fp8.backend=torchao or fp8.fsdp_float8_all_gather=false")
        require(p.tp == 1, "fp8.fsdp_float8_all_gather",
                f"the float8 all-gather is supported at parallel.tp=1 (got tp={p.tp}); set it false")
    require(not cfg.train.compile, "train.compile",
            "FP8 linears keep per-call scaling state in Python (amax histories, counters), which "
            "torch.compile of the blocks does not trace yet; set train.compile=false with fp8.enabled")
    with torch.device("meta"):
        model = family.build(cfg.model)
    converted, kept = fp8_targets(model, family.plan, family.n_blocks(cfg.model), f.keep_bf16)
    require(bool(converted), "fp8.keep_bf16",
            f"{f.keep_bf16} keeps all {len(kept)} linear layers of the blocks in bf16, so FP8 would be off; "
            f"remove patterns (e.g. fp8.keep_bf16=[]) or disable fp8")


# -- the emulated backend under tensor parallel -------------------------------------------------------
def _is_last(p, ndim: int) -> bool:
    return p.is_shard() and p.dim in (-1, ndim - 1)


def _layout(px, pw, ndim: int):
    """Placements of y = x W^T on the tp mesh, as DTensor's F.linear: (y, dx, dW, db, grad placement
    backward expects or None (any of Replicate / Partial), tp-split flags {input, weight})."""
    if px.is_replicate() and pw.is_shard(0):  # ColwiseParallel
        return Shard(ndim - 1), Partial(), Shard(0), Shard(0), Shard(ndim - 1), {"input": False, "weight": True}
    if _is_last(px, ndim) and pw.is_shard(1):  # RowwiseParallel
        return Partial(), Shard(ndim - 1), Shard(1), Replicate(), Replicate(), {"input": True, "weight": True}
    if px.is_replicate() and pw.is_replicate():  # replicated weight (ReplicatedKV, ReplicateParallel)
        return Replicate(), None, None, None, None, {"input": False, "weight": False}
    if px.is_shard() and pw.is_replicate():  # sequence-sharded input, replicated weight
        return px, px, Partial(), Partial(), px, {"input": True, "weight": False}
    raise NotImplementedError(f"fp8: no FP8 linear for input {px} x weight {pw} on the tp mesh; "
                              f"keep this module in bf16 (fp8.keep_bf16)")


def _wrap(local: torch.Tensor, mesh, shape, placement) -> DTensor:
    """A DTensor of global `shape` (contiguous) from this rank's part."""
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, mesh, [placement], run_check=False, shape=shape, stride=stride)


class _DTensorFp8Function(torch.autograd.Function):
    """FP8 linear on the local shards of DTensor x and W (1-D tp mesh); returns / takes DTensors."""

    @staticmethod
    def forward(ctx, x, weight, bias, module):
        px, pw = x.placements[0], weight.placements[0]
        py, pdx, pdw, pdb, pg, split = _layout(px, pw, x.ndim)
        x_l, w_l = x.to_local(), weight.to_local()
        rowwise = module.fp8_recipe.scaling == "rowwise"
        tp_split = {"input": _is_last(px, x.ndim) if rowwise else split["input"],
                    "weight": pw.is_shard(1) if rowwise else split["weight"]}
        y2, saved = fp8_matmul_forward(module, x_l.reshape(-1, x_l.shape[-1]), w_l, module.reducer(tp_split))
        y_l = y2.reshape(*x_l.shape[:-1], w_l.shape[0])
        if bias is not None:
            b_l = bias.to_local().to(y_l.dtype)
            if not isinstance(py, Partial) or weight.device_mesh.get_local_rank() == 0:
                y_l = y_l + b_l  # a Partial output gets the bias once, from tp rank 0
        ctx.save_for_backward(*saved[:4])
        ctx.w_dtype, ctx.module, ctx.has_bias = saved[4], module, bias is not None
        shapes = (x.shape, weight.shape, bias.shape if bias is not None else None)
        ctx.meta = (x.device_mesh, shapes, pdx, pdw, pdb, pg, rowwise)  # shapes only: x itself is not kept
        return _wrap(y_l, x.device_mesh, (*x.shape[:-1], weight.shape[0]), py)

    @staticmethod
    def backward(ctx, g):
        mesh, (x_shape, w_shape, b_shape), pdx, pdw, pdb, pg, rowwise = ctx.meta
        if pg is not None and g.placements[0] != pg:
            g = g.redistribute(placements=[pg])
        elif pg is None and g.placements[0].is_shard():
            g = g.redistribute(placements=[Replicate()])
        p = g.placements[0]
        pdx, pdw, pdb = (q if q is not None else p for q in (pdx, pdw, pdb))  # replicated weight: follow g
        split = _is_last(p, g.ndim) or isinstance(p, Partial) if rowwise else not p.is_replicate()
        g_l = g.to_local()
        g2 = g_l.reshape(-1, g_l.shape[-1])
        dx2, dw_l = fp8_matmul_backward(ctx.module, (*ctx.saved_tensors, ctx.w_dtype), g2,
                                        ctx.module.reducer({"grad_output": split}))
        x_local_shape = list(g_l.shape[:-1]) + [dx2.shape[-1]]
        dx = _wrap(dx2.reshape(x_local_shape), mesh, x_shape, pdx)
        dw = _wrap(dw_l, mesh, w_shape, pdw)
        db = _wrap(g2.float().sum(0).to(ctx.w_dtype), mesh, b_shape, pdb) if ctx.has_bias else None
        return dx, dw, db, None


class _TPFp8Linear(Fp8Linear):
    """Fp8Linear that also runs under the plan's ParallelStyles (DTensor weight and input), and reduces
    its amaxes over the groups named in the module docstring."""

    def forward(self, x):
        if isinstance(self.weight, DTensor):
            return _DTensorFp8Function.apply(x, self.weight, self.bias, self)
        return super().forward(x)

    def reducer(self, tp_split: dict):
        """amax_reduce for one call: cp for activations / gradients (not rowwise), tp for the kinds
        tp_split marks; gloo / NCCL MAX on the amax's own device."""
        tp_group, cp_group = self.fp8_groups
        rowwise = self.fp8_recipe.scaling == "rowwise"

        def reduce(amax, kind):
            if kind != "weight" and not rowwise and cp_group is not None:
                dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=cp_group)
            if tp_split.get(kind) and tp_group is not None:
                dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=tp_group)
            return amax

        return reduce


def _group(mesh, dim):
    return mesh[dim].get_group() if mesh is not None and mesh[dim].size() > 1 else None


def _convert_emulated(model, names, recipe, mesh):
    tp_group, cp_group = _group(mesh, "tp"), _group(mesh, "cp")
    modules = []
    for name in names:
        module = model.get_submodule(name)
        module.__class__ = _TPFp8Linear  # in place: the ParallelStyle hooks and the parameters stay
        module._init_fp8(recipe, None)
        module.fp8_groups = (tp_group, cp_group)
        module.amax_reduce = module.reducer({})  # plain (tp = 1) calls: cp only
        module.fp8_per_call_update = False  # delayed: once per optimizer step (_DelayedScales)
        modules.append(module)
    if recipe.scaling == "delayed":
        _DelayedScales(modules, mesh)
    return modules


# -- delayed scaling: one update per optimizer step ---------------------------------------------------
_STATES: list = []


class _DelayedScales:
    """The Fp8Linears of one model part: after each optimizer step that updates their weights, their
    pending amaxes are max-reduced over mesh "loss" (dp x cp) and "tp" and pushed into the histories."""

    def __init__(self, modules, mesh):
        self.modules = [weakref.ref(m) for m in modules]
        self.mesh = mesh
        _STATES.append(self)

    def alive(self):
        return [m for m in (r() for r in self.modules) if m is not None]

    @torch.no_grad()
    def update(self) -> None:
        modules = self.alive()
        pending = torch.stack([m.fp8_pending_amax for m in modules])  # (modules, 3)
        if self.mesh is not None:
            all_reduce(pending, self.mesh, "loss", dist.ReduceOp.MAX)
            all_reduce(pending, self.mesh, "tp", dist.ReduceOp.MAX)
        for m, amax in zip(modules, pending):
            m.fp8_update_scales(amax)


def _after_optimizer_step(optimizer, args, kwargs) -> None:
    params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for state in list(_STATES):
        modules = state.alive()
        if not modules:
            _STATES.remove(state)
        elif any(id(m.weight) in params for m in modules):
            state.update()


register_optimizer_step_post_hook(_after_optimizer_step)


# -- torchao and Transformer Engine (GPU; feature-detected, never imported on CPU) -------------------
def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the module at `name` by `new`, moving its ParallelStyle hooks (forward pre / post)."""
    old = model.get_submodule(name)
    for attr in ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                 "_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
        setattr(new, attr, getattr(old, attr))
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _convert_torchao(model, names, f):
    from torchao.float8 import Float8LinearConfig
    from torchao.float8.float8_linear import Float8Linear

    config = Float8LinearConfig.from_recipe_name(f.recipe)
    if f.fsdp_float8_all_gather:
        import dataclasses

        config = dataclasses.replace(config, enable_fsdp_float8_all_gather=True)
    for name in names:
        _swap(model, name, Float8Linear.from_float(model.get_submodule(name), config=config))
    return []


def _convert_te(model, names, f, mesh):
    import transformer_engine.pytorch as te
    from transformer_engine.common import recipe as te_recipe

    if f.recipe == "delayed":
        rec = te_recipe.DelayedScaling(fp8_format=te_recipe.Format.HYBRID, margin=f.margin,
                                       amax_history_len=f.amax_history_len, amax_compute_algo="max")
    else:
        rec = te_recipe.Float8CurrentScaling(fp8_format=te_recipe.Format.HYBRID)
    group = _group(mesh, "loss")  # tp = 1: the amax group is dp x cp

    class TELinear(te.Linear):
        """te.Linear in its own fp8_autocast region (the trainer knows nothing of FP8)."""

        def forward(self, x, *args, **kwargs):
            with te.fp8_autocast(enabled=True, fp8_recipe=rec, fp8_group=group):
                return super().forward(x, *args, **kwargs)

    for name in names:
        old = model.get_submodule(name)
        new = TELinear(old.in_features, old.out_features, bias=old.bias is not None,
                       params_dtype=old.weight.dtype, device=old.weight.device)
        new.weight = old.weight  # the same parameter object: names, init and checkpoints unchanged
        if old.bias is not None:
            new.bias = old.bias
        _swap(model, name, new)
    return []


# -- the seam ----------------------------------------------------------------------------------------
_logged: set = set()


def apply_fp8(model: nn.Module, mesh, cfg, plan, n_blocks: int) -> list[str]:
    """Convert the block linears selected by cfg.fp8 (after TP, before FSDP). Returns their names.
    mesh None: one device without a process group (benchmarks, tests)."""
    f = getattr(cfg, "fp8", None)
    if f is None or not f.enabled:
        return []
    backend = resolve_backend(f, mesh["tp"].size() if mesh is not None else 1)
    names, kept = fp8_targets(model, plan, n_blocks, f.keep_bf16)
    if backend == "te":
        _convert_te(model, names, f, mesh)
    elif backend == "torchao":
        _convert_torchao(model, names, f)
    else:
        scaling = "current" if f.recipe == "tensorwise" else f.recipe
        _convert_emulated(model, names, Fp8Recipe(scaling, margin=f.margin, amax_history_len=f.amax_history_len), mesh)
    key = (backend, f.recipe, len(names), len(kept))
    if key not in _logged and (not dist.is_initialized() or dist.get_rank() == 0):
        _logged.add(key)
        log.info("fp8: backend %s (asked %s), recipe %s: %d block linears in FP8, %d kept in %s (%s)",
                 backend, f.backend, f.recipe, len(names), len(kept), "bf16", ", ".join(f.keep_bf16) or "none")
    return names


def fp8_modules(model: nn.Module) -> list[Fp8Linear]:
    """The emulated backend's FP8 linears of a model (for counters and tests)."""
    return [m for m in model.modules() if isinstance(m, Fp8Linear)]
