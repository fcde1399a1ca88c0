"""Calibration of the cost model on published runs, and the table that compares them.

`fit()` chooses the two fitted constants (hardware.CostModel: gemm_efficiency and
layer_collective_overlap) that minimise the mean absolute relative error of TFLOP/s per GPU over
the Megatron-Core weak-scaling rows; every other constant stays at its documented value. The
result is written into hardware.py by hand (the planner never refits at run time), and
tests/cluster/test_planner_throughput.py checks that a refit lands on the stored values.

The baseline the model must beat is a constant MFU fitted to the same rows: the single TFLOP/s
value that minimises the same error (a weighted median of the published figures).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from gigatron.cluster.planner.hardware import COST_MODEL, CostModel, gpu
from gigatron.cluster.planner.published import LLAMA3_405B, MEGATRON_WEAK_SCALING, PublishedRun
from gigatron.cluster.planner.throughput import project

FITTED = ("gemm_efficiency", "layer_collective_overlap")
BOUNDS = {"gemm_efficiency": (0.3, 0.95), "layer_collective_overlap": (0.0, 1.0)}


def projected(run: PublishedRun, constants: CostModel = COST_MODEL) -> float:
    return project(run.shape, run.layout, gpu(run.gpu), constants).tflops_per_gpu


def relative_errors(runs: list[PublishedRun], constants: CostModel = COST_MODEL) -> list[float]:
    return [projected(r, constants) / r.tflops_per_gpu - 1 for r in runs]


def mean_absolute(values: list[float]) -> float:
    return sum(abs(v) for v in values) / len(values)


def constant_baseline(runs: list[PublishedRun]) -> float:
    """The constant TFLOP/s minimising the mean absolute relative error over `runs`: the optimum
    of a piecewise-linear convex function lies at one of the published values."""
    published = [r.tflops_per_gpu for r in runs]
    return min(published, key=lambda c: mean_absolute([c / p - 1 for p in published]))


def nelder_mead(f, x0: list[float], bounds: list[tuple[float, float]], step: float = 0.1,
                tolerance: float = 1e-6, max_iterations: int = 400) -> list[float]:
    """Minimise f over a box by the Nelder-Mead simplex (reflection 1, expansion 2, contraction
    1/2, shrink 1/2), points clipped into the box. Pure Python: no optimiser package needed."""
    clip = lambda x: [min(hi, max(lo, v)) for v, (lo, hi) in zip(x, bounds)]  # noqa: E731
    n = len(x0)
    simplex = [clip(x0)] + [clip([v + (step * (hi - lo) if i == j else 0) for j, (v, (lo, hi)) in
                                  enumerate(zip(x0, bounds))]) for i in range(n)]
    values = [f(x) for x in simplex]
    for _ in range(max_iterations):
        order = sorted(range(n + 1), key=lambda i: values[i])
        simplex, values = [simplex[i] for i in order], [values[i] for i in order]
        if values[-1] - values[0] < tolerance:
            break
        centroid = [sum(x[j] for x in simplex[:-1]) / n for j in range(n)]
        toward = lambda t: clip([c + t * (w - c) for c, w in zip(centroid, simplex[-1])])  # noqa: E731
        reflected = toward(-1.0)
        fr = f(reflected)
        if fr < values[0]:
            expanded = toward(-2.0)
            fe = f(expanded)
            simplex[-1], values[-1] = (expanded, fe) if fe < fr else (reflected, fr)
        elif fr < values[-2]:
            simplex[-1], values[-1] = reflected, fr
        else:
            contracted = toward(0.5)
            fc = f(contracted)
            if fc < values[-1]:
                simplex[-1], values[-1] = contracted, fc
            else:  # shrink toward the best point
                best = simplex[0]
                simplex = [best] + [clip([b + 0.5 * (v - b) for b, v in zip(best, x)]) for x in simplex[1:]]
                values = [values[0]] + [f(x) for x in simplex[1:]]
    return simplex[min(range(n + 1), key=lambda i: values[i])]


def fit(runs: list[PublishedRun] | None = None, base: CostModel = COST_MODEL) -> dict[str, float]:
    """The two fitted constants minimising the mean absolute relative error over `runs` (default:
    the Megatron-Core rows), the other constants as in `base`: Nelder-Mead from three starts
    spread over the bounds (not from the stored values, so that a refit checks them)."""
    runs = runs or MEGATRON_WEAK_SCALING

    def loss(x: list[float]) -> float:
        return mean_absolute(relative_errors(runs, replace(base, **dict(zip(FITTED, x)))))

    bounds = [BOUNDS[k] for k in FITTED]
    starts = ([0.8, 0.5], [0.6, 0.9], [0.45, 0.2])
    best = min((nelder_mead(loss, x0, bounds) for x0 in starts), key=loss)
    return dict(zip(FITTED, best))


@dataclass
class Row:
    name: str
    published: float
    projected: float
    baseline: float
    held_out: bool

    @property
    def error(self) -> float:
        return self.projected / self.published - 1

    @property
    def baseline_error(self) -> float:
        return self.baseline / self.published - 1


def comparison(constants: CostModel = COST_MODEL) -> list[Row]:
    """Every published row: projected and constant-baseline TFLOP/s against the published figure."""
    base = constant_baseline(MEGATRON_WEAK_SCALING)
    rows = [Row(r.name, r.tflops_per_gpu, projected(r, constants), base, False) for r in MEGATRON_WEAK_SCALING]
    rows += [Row(r.name, r.tflops_per_gpu, projected(r, constants), base, True) for r in LLAMA3_405B]
    return rows


def format_table(rows: list[Row]) -> str:
    lines = [f"{'run':<34} {'published':>9} {'projected':>9} {'error':>7} {'baseline':>8} {'error':>7}"]
    for r in rows:
        tag = " (held out)" if r.held_out else ""
        lines.append(f"{(r.name + tag):<34.34} {r.published:>9.1f} {r.projected:>9.1f} {r.error:>+7.1%} "
                     f"{r.baseline:>8.1f} {r.baseline_error:>+7.1%}")
    calibration = [r for r in rows if not r.held_out]
    for label, subset in (("calibration rows", calibration), ("all rows", rows)):
        model = mean_absolute([r.error for r in subset])
        base = mean_absolute([r.baseline_error for r in subset])
        lines.append(f"mean absolute error, {label}: model {model:.1%}, constant baseline {base:.1%} "
                     f"(ratio {model / base:.2f})")
    return "\n".join(lines)
