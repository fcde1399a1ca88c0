"""FP8 training logic, emulated on CPU: scaling recipes, quantize-dequantize, an `Fp8Linear` drop-in for
nn.Linear, and `convert_linears` (Micikevicius et al. 2022, "FP8 Formats for Deep Learning";
Transformer Engine's delayed scaling).

Formats: forward operands (activations, weights) in float8_e4m3fn (max 448, 3 mantissa bits);
gradients in float8_e5m2 (max 57344, 2 mantissa bits, more range).

Scale (multiplies the high-precision tensor before the cast):
    scale = fp8_max / amax * 2^-margin
with the standard special cases (as Transformer Engine): amax == 0, inf or nan -> keep the previous
scale (1.0 when there is none); a finite scale overflowing fp32 (amax tiny) is clamped to fp32 max.
    quantize(x)   = cast_fp8(clamp(x * scale, -fp8_max, fp8_max))   (saturating; nan stays nan)
    dequantize(q) = q / scale
Recipes (`Fp8Recipe.scaling`):
    "delayed"  per tensor kind (input, weight, grad_output) an amax history of length H (buffers, so it
               is checkpointed); the scale used at step t comes from max(history) over steps < t
               ("most_recent": the last amax), then this step's amax is pushed. The first call (empty
               history) uses the current amax, so step 0 does not saturate.
    "current"  (alias "tensorwise") scale from this tensor's amax.
    "rowwise"  one scale per row of each operand (per token for activations and gradients, per output
               channel for weights), from that row's amax.
Sharded tensors: pass amax_reduce(amax, kind) -> amax, kind in ("input", "weight", "grad_output"): it
max-reduces the local amax (tensorwise (1,), rowwise (rows, 1)) over the ranks that split that tensor,
so all ranks use the scale one process would (parallel/fp8.py decides the groups per operand).
Delayed scaling per step: see Fp8Linear.fp8_update_scales.

Fp8Linear: forward y = dq(q(x)) dq(q(W))^T + b, backward dx = dq(q(g)) dq(q(W)), dW = dq(q(g))^T dq(q(x)),
db = sum g in high precision. The fp8 x and W are what is saved for backward. GEMMs: emulated (dequantize
to fp32, matmul, round to the output dtype) on CPU; on CUDA with torch._scaled_mm and dims divisible by
16, the tensorwise forward / backward GEMMs and the rowwise forward GEMM call it (e4m3 x e4m3, e5m2 x
e4m3), other cases fall back to emulation. `quantize_calls` counts quantizations per tensor kind, so a
test or a log can prove FP8 was on.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

__all__ = ["E4M3", "E5M2", "FP8_MAX", "Fp8Recipe", "compute_scale", "quantize", "dequantize", "quantize_dequantize",
           "fp8_matmul_forward", "fp8_matmul_backward", "Fp8Linear", "convert_linears", "fp8_stats"]

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FP8_MAX = {E4M3: float(torch.finfo(E4M3).max), E5M2: float(torch.finfo(E5M2).max)}  # 448, 57344
SCALINGS = ("delayed", "current", "tensorwise", "rowwise")
KINDS = ("input", "weight", "grad_output")  # rows of the amax history / scale buffers
fp8_stats: Counter = Counter()  # process-wide quantize calls per kind (all Fp8Linear modules)
AmaxReduce = Callable[[torch.Tensor, str], torch.Tensor]  # (local amax, kind) -> amax of the whole tensor


@dataclass(frozen=True)
class Fp8Recipe:
    """scaling: "delayed" | "current" ("tensorwise") | "rowwise"; margin: scale *= 2^-margin (headroom
    for growth between steps); amax_history_len: H for "delayed"; amax_compute_algo: "max" over the
    history or "most_recent"; fwd_dtype / bwd_dtype: the fp8 formats of forward operands / gradients."""

    scaling: str = "delayed"
    margin: int = 0
    amax_history_len: int = 16
    amax_compute_algo: str = "max"
    fwd_dtype: torch.dtype = E4M3
    bwd_dtype: torch.dtype = E5M2

    def __post_init__(self):
        if self.scaling not in SCALINGS:
            raise ValueError(f"Fp8Recipe.scaling must be one of {SCALINGS}, got {self.scaling!r}")
        if self.amax_compute_algo not in ("max", "most_recent"):
            raise ValueError(f"amax_compute_algo must be 'max' or 'most_recent', got {self.amax_compute_algo!r}")
        if self.amax_history_len < 1 or self.margin < 0:
            raise ValueError("amax_history_len must be >= 1 and margin >= 0")
        for dt in (self.fwd_dtype, self.bwd_dtype):
            if dt not in FP8_MAX:
                raise ValueError(f"fp8 dtype must be float8_e4m3fn or float8_e5m2, got {dt}")


def compute_scale(amax: torch.Tensor, fp8_max, margin: int = 0,
                  prev_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """fp8_max / amax * 2^-margin (fp32, amax's shape; fp8_max a float or a tensor broadcasting with
    amax); amax == 0 / inf / nan -> prev_scale (or 1)."""
    amax = amax.float()
    fallback = torch.ones_like(amax) if prev_scale is None else prev_scale.float().expand_as(amax)
    ok = torch.isfinite(amax) & (amax > 0)
    scale = fp8_max / torch.where(ok, amax, 1.0) * 2.0 ** -margin
    scale = scale.clamp(max=torch.finfo(torch.float32).max)  # inf (amax subnormal) -> fp32 max
    return torch.where(ok, scale, fallback)


def quantize(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = E4M3) -> torch.Tensor:
    """Saturating cast of x * scale to fp8 (scale a scalar or broadcastable, e.g. (M, 1) per row)."""
    m = FP8_MAX[dtype]
    return (x.float() * scale).clamp(-m, m).to(dtype)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() / scale).to(dtype)


def quantize_dequantize(x, scale, dtype=E4M3):
    """x rounded through fp8 with the given scale, back in x's dtype (the emulation primitive)."""
    return dequantize(quantize(x, scale, dtype), scale, x.dtype)


def _scaled_mm_usable(a_q: torch.Tensor, b_q: torch.Tensor) -> bool:
    """torch._scaled_mm needs CUDA (sm_89+), both dims of each operand divisible by 16."""
    return (a_q.is_cuda and hasattr(torch, "_scaled_mm") and all(n % 16 == 0 for n in (*a_q.shape, *b_q.shape)))


def _gemm(a_q, a_scale, b_q, b_scale, out_dtype):
    """a @ b for fp8 a (M, K) with scale (1,) or (M, 1), fp8 b (K, N) with scale (1,) or (1, N);
    returns dequantized (M, N) in out_dtype."""
    rowwise_ok = a_scale.numel() == 1 and b_scale.numel() == 1 or (
        a_scale.shape == (a_q.shape[0], 1) and b_scale.shape == (1, b_q.shape[1]) and out_dtype == torch.bfloat16)
    if rowwise_ok and _scaled_mm_usable(a_q, b_q):
        a = a_q.contiguous()  # row-major
        b = b_q.t().contiguous().t()  # column-major, as cuBLASLt's fp8 GEMM requires
        sa = (1.0 / a_scale.float()).reshape(a_scale.shape if a_scale.numel() > 1 else ())
        sb = (1.0 / b_scale.float()).reshape(b_scale.shape if b_scale.numel() > 1 else ())
        return torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=out_dtype)
    return (dequantize(a_q, a_scale) @ dequantize(b_q, b_scale)).to(out_dtype)


def fp8_matmul_forward(module, x2: torch.Tensor, weight: torch.Tensor, reduce: Optional[AmaxReduce] = None):
    """y2 = x2 @ weight^T through fp8 (x2 (M, K), weight (N, K), local tensors; no bias). Returns (y2 in
    x2's dtype, what backward needs: the fp8 operands and their scales)."""
    rec = module.fp8_recipe
    x_q, x_s = module._quantize("input", x2, rec.fwd_dtype, reduce)  # scale (1,) or (M, 1)
    w_q, w_s = module._quantize("weight", weight, rec.fwd_dtype, reduce)  # scale (1,) or (N, 1)
    y = _gemm(x_q, x_s, w_q.t(), w_s.reshape(1, -1) if w_s.numel() > 1 else w_s, x2.dtype)  # (M, N)
    return y, (x_q, x_s, w_q, w_s, weight.dtype)


def fp8_matmul_backward(module, saved, g2: torch.Tensor, reduce: Optional[AmaxReduce] = None):
    """(dx2 (M, K), dw (N, K)) of fp8_matmul_forward for the output gradient g2 (M, N), quantized to
    the recipe's backward format (e5m2)."""
    x_q, x_s, w_q, w_s, w_dtype = saved
    g_q, g_s = module._quantize("grad_output", g2, module.fp8_recipe.bwd_dtype, reduce)
    if g_s.numel() == 1 and w_s.numel() == 1:  # tensorwise: both GEMMs may run in fp8 on GPU
        dx = _gemm(g_q, g_s, w_q, w_s, g2.dtype)  # (M, K)
        dw = _gemm(g_q.t(), g_s, x_q, x_s, w_dtype)  # (N, K)
    else:  # rowwise scales lie along the contraction dims here: emulate
        g = dequantize(g_q, g_s)
        dx = (g @ dequantize(w_q, w_s)).to(g2.dtype)
        dw = (g.t() @ dequantize(x_q, x_s)).to(w_dtype)
    return dx, dw


class _Fp8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, module):
        y, saved = fp8_matmul_forward(module, x.reshape(-1, x.shape[-1]), weight, module.amax_reduce)
        if bias is not None:
            y = y + bias.to(y.dtype)
        ctx.module, ctx.x_shape, ctx.has_bias, ctx.w_dtype = module, x.shape, bias is not None, saved[4]
        ctx.save_for_backward(*saved[:4])  # the fp8 x and W are what backward keeps
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        g2 = grad_out.reshape(-1, grad_out.shape[-1])  # (M, N)
        dx, dw = fp8_matmul_backward(ctx.module, (*ctx.saved_tensors, ctx.w_dtype), g2, ctx.module.amax_reduce)
        db = g2.float().sum(0).to(ctx.w_dtype) if ctx.has_bias else None
        return dx.reshape(ctx.x_shape), dw, db, None


class Fp8Linear(nn.Linear):
    """nn.Linear with FP8 GEMMs (see the module docstring). Same parameters and names as nn.Linear
    (weight, bias), plus two persistent buffers: fp8_amax_history (3, H) and fp8_scale (3,), rows
    ordered input, weight, grad_output, and one transient buffer fp8_pending_amax (3,) (the step's
    amaxes not yet in the history; zero at every step boundary, so never checkpointed).

    Delayed scaling updates its history after every quantize call by default; with
    `fp8_per_call_update = False` (what the engine sets, parallel/fp8.py) a call only records its
    amax in fp8_pending_amax and the owner calls `fp8_update_scales()` once per optimizer step: every
    micro-batch of a step then uses the same scales, whatever the split into dp ranks and micro-batches."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None,
                 recipe: Fp8Recipe = Fp8Recipe(), amax_reduce: Optional[AmaxReduce] = None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_fp8(recipe, amax_reduce)

    def _init_fp8(self, recipe, amax_reduce):
        self.fp8_recipe, self.amax_reduce = recipe, amax_reduce
        dev = self.weight.device
        self.register_buffer("fp8_amax_history", torch.zeros(len(KINDS), recipe.amax_history_len, device=dev))
        self.register_buffer("fp8_scale", torch.ones(len(KINDS), device=dev))
        self.register_buffer("fp8_pending_amax", torch.zeros(len(KINDS), device=dev), persistent=False)
        self.fp8_per_call_update = True
        self._history_filled = [False] * len(KINDS)  # per kind: a delayed scale exists (cached check)
        self.quantize_calls: Counter = Counter()

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: Fp8Recipe = Fp8Recipe(),
                    amax_reduce: Optional[AmaxReduce] = None) -> "Fp8Linear":
        """Wrap an existing nn.Linear, sharing its Parameter objects (no copy, no re-init)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.bias = linear.bias
        new._init_fp8(recipe, amax_reduce)
        new.train(linear.training)
        return new

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Fresh scaling state (after `to_empty` on a model built on the meta device)."""
        self.fp8_amax_history.zero_()
        self.fp8_scale.fill_(1.0)
        self.fp8_pending_amax.zero_()
        self._history_filled = [False] * len(KINDS)

    def forward(self, x):
        return _Fp8LinearFunction.apply(x, self.weight, self.bias, self)

    @torch.no_grad()
    def _quantize(self, kind: str, t: torch.Tensor, dtype: torch.dtype, reduce: Optional[AmaxReduce] = None):
        """Quantize t for GEMM operand `kind`; return (fp8 tensor, scale (1,) or (rows, 1)).
        reduce(amax, kind) -> amax makes the amax that of the whole tensor when t is a shard (the
        engine's max-all-reduce over the groups that split t)."""
        rec, i, fp8_max = self.fp8_recipe, KINDS.index(kind), FP8_MAX[dtype]
        self.quantize_calls[kind] += 1
        fp8_stats[kind] += 1
        if rec.scaling == "rowwise":
            amax = t.detach().abs().amax(dim=-1, keepdim=True).float()
            scale = compute_scale(reduce(amax, kind) if reduce is not None else amax, fp8_max, rec.margin)
            return quantize(t, scale, dtype), scale
        amax = t.detach().abs().amax().float().reshape(1)
        if rec.scaling in ("current", "tensorwise"):
            amax = reduce(amax, kind) if reduce is not None else amax
            scale = compute_scale(amax, fp8_max, rec.margin)
            self.fp8_scale[i] = scale[0]
            return quantize(t, scale, dtype), scale
        if self.fp8_per_call_update and reduce is not None:
            amax = reduce(amax, kind)  # the whole tensor's amax goes into the history at once
        if not self._history_filled[i]:  # a loaded checkpoint fills the history too
            self._history_filled[i] = bool((self.fp8_amax_history[i] != 0).any())
        if not self._history_filled[i]:  # nothing delayed yet (first step): use the current, whole-tensor amax
            current = reduce(amax.clone(), kind) if reduce is not None and not self.fp8_per_call_update else amax
            self.fp8_scale[i] = compute_scale(current, fp8_max, rec.margin, self.fp8_scale[i])[0]
        scale = self.fp8_scale[i].clone().reshape(1)  # the delayed scale, from steps before this one
        if self.fp8_per_call_update:
            self.fp8_pending_amax[i] = amax[0]
            self._push(torch.arange(len(KINDS)) == i)
        else:
            self.fp8_pending_amax[i] = torch.maximum(self.fp8_pending_amax[i], amax[0])
        return quantize(t, scale, dtype), scale

    @torch.no_grad()
    def _push(self, rows: torch.Tensor) -> None:
        """Push fp8_pending_amax into the history for `rows` (bool (3,)), recompute their scales, clear."""
        rows = rows.to(self.fp8_scale.device)
        amax = torch.nan_to_num(self.fp8_pending_amax, nan=0.0, posinf=0.0)  # a skipped non-finite step
        hist = self.fp8_amax_history
        rolled = torch.roll(hist, 1, dims=1)
        rolled[:, 0] = amax
        hist.copy_(torch.where(rows[:, None], rolled, hist))
        ref = hist.max(dim=1).values if self.fp8_recipe.amax_compute_algo == "max" else hist[:, 0]
        fp8_max = torch.tensor([FP8_MAX[self.fp8_recipe.fwd_dtype]] * 2 + [FP8_MAX[self.fp8_recipe.bwd_dtype]],
                               device=hist.device)  # per row: input, weight (e4m3), grad_output (e5m2)
        new = compute_scale(ref, fp8_max, self.fp8_recipe.margin, self.fp8_scale)
        self.fp8_scale.copy_(torch.where(rows, new, self.fp8_scale))
        self.fp8_pending_amax.masked_fill_(rows, 0.0)

    @torch.no_grad()
    def fp8_update_scales(self, amax: Optional[torch.Tensor] = None) -> None:
        """End of an optimizer step (delayed scaling, fp8_per_call_update False): push this step's
        amaxes (`amax` (3,) if given: the pending amaxes already max-reduced over the ranks) into the
        history and compute the scales the next step uses. A kind never quantized this step (amax 0)
        still shifts its history. No-op for the other recipes."""
        if self.fp8_recipe.scaling != "delayed":
            return
        if amax is not None:
            self.fp8_pending_amax.copy_(amax)
        self._push(torch.ones(len(KINDS), dtype=torch.bool))

    def extra_repr(self):
        return f"{super().extra_repr()}, fp8={self.fp8_recipe.scaling}"


def convert_linears(model: nn.Module, predicate: Callable[[str], bool], recipe: Fp8Recipe = Fp8Recipe(),
                    amax_reduce: Optional[AmaxReduce] = None) -> list:
    """Replace, in place, every nn.Linear whose qualified name satisfies predicate(name) by an
    Fp8Linear sharing its parameters: parameter names (and objects) are unchanged, two buffers per
    converted module are added to the state dict. Returns the converted names. Which layers stay in
    bf16 (e.g. the output head, the router) is the caller's predicate."""
    converted = []
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and predicate(name):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, Fp8Linear.from_linear(module, recipe, amax_reduce))
            converted.append(name)
    return converted
