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

from dataclasses import dataclass

from gigatron.cluster.planner.hardware import COST_MODEL, CostModel, gpu, with_constants
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


def fit(runs: list[PublishedRun] | None = None) -> dict[str, float]:
    """Bounded Nelder-Mead over the two fitted constants (scipy), from several starts."""
    from scipy.optimize import minimize

    runs = runs or MEGATRON_WEAK_SCALING

    def loss(x) -> float:
        return mean_absolute(relative_errors(runs, with_constants(**dict(zip(FITTED, x)))))

    starts = ([0.8, 0.5], [0.6, 0.9], [0.5, 0.2])
    best = min((minimize(loss, x0, method="Nelder-Mead", bounds=[BOUNDS[k] for k in FITTED],
                         options={"xatol": 1e-4, "fatol": 1e-6}) for x0 in starts), key=lambda r: r.fun)
    return dict(zip(FITTED, (float(v) for v in best.x)))


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
