"""The contrastive objective (core/objectives/contrastive.py) and its gather (parallel/comm.py
all_gather_with_grad).

Distributed (one launch of 2 gloo ranks, FSDP2 over the engine's mesh): three toy encoders (linear
maps of random features, a bag of token embeddings for text) and two pairs, image-text with the
learnable temperature and image-audio at a fixed 0.05. Each rank back-propagates its loss sum x dp / N
(N: the count all-reduced over "loss"), FSDP2 averages gradients over dp, as the trainer does
(core/family.py). The loss (mean of all terms) and the gradient norm must equal one process's over
the whole batch of 8 within 1e-5 relative: only the order of fp32 sums differs (local sums then an
all-reduce, the reduce-scatter's sum of two partial gradients), each of a few dozen O(1) terms,
~1e-7 relative; 1e-5 leaves 100x margin and is three orders below the negative control's error.
The negative control gathers without gradient (open_clip's gather_with_grad=False: the other ranks'
rows detached): the loss is identical but the gradient misses every term where the other rank's loss
uses this rank's rows, and its norm must differ by more than 1%.

Single process: the loss against F.cross_entropy written on the full similarity matrix, the
temperature's gradient, and the temperatures read from an ImageBind model config.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.distributed import run_distributed

REL = 1e-5
B, E, WORLD = 8, 8, 2   # global batch, embedding width, ranks
PAIRS = [("image", "text"), ("image", "audio")]
TEMPS = ["learnable", 0.05]


class Toy(nn.Module):
    """Three small encoders with unit-norm outputs and a learnable log inverse temperature."""

    def __init__(self):
        super().__init__()
        self.image = nn.Linear(6, E)
        self.audio = nn.Linear(5, E)
        self.tokens = nn.Embedding(11, E)
        self.logit_scale = nn.Parameter(torch.tensor([1.0 / 0.07]).log())  # (1,): fully_shard refuses 0-dim

    def forward(self, images=None, text_tokens=None, text_lengths=None, audio=None) -> dict:
        out = {"logit_scale": self.logit_scale}
        if images is not None:
            out["image"] = F.normalize(self.image(images), dim=-1)
        if audio is not None:
            out["audio"] = F.normalize(self.audio(audio.flatten(1)), dim=-1)
        if text_tokens is not None:
            mask = torch.arange(text_tokens.shape[1])[None] < text_lengths[:, None]
            out["text"] = F.normalize((self.tokens(text_tokens) * mask[..., None]).sum(1), dim=-1)
        return out


def global_batch() -> dict:
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 3, (B,), generator=g)
    return {"images": torch.randn(B, 6, generator=g), "audio": torch.randn(B, 1, 1, 5, generator=g),
            "text_tokens": torch.randint(0, 11, (B, 4), generator=g), "text_lengths": torch.randint(1, 5, (B,), generator=g),
            "labels": labels, "sample_index": torch.arange(B)}


def toy() -> Toy:
    torch.manual_seed(0)
    return Toy()


def step(model: nn.Module, objective, batch: dict, loss_mesh=None) -> tuple[float, dict]:
    """The trainer's rule: back-propagate loss_sum x dp / N; returns (global mean loss, metrics)."""
    batch = objective.prepare(dict(batch))
    args, kwargs = objective.inputs(batch)
    output = model(*args, **kwargs)
    loss, count = objective.loss(output, batch, model), objective.count(batch).double()
    metrics = {k: torch.stack(v).double() for k, v in objective.metrics(output, batch).items()}
    dp = 1
    if loss_mesh is not None:
        import torch.distributed as dist

        dp = loss_mesh.size()
        dist.all_reduce(count, group=loss_mesh.get_group())
        for v in metrics.values():
            dist.all_reduce(v, group=loss_mesh.get_group())
    (loss * dp / count).backward()
    total = loss.detach().double().clone()
    if loss_mesh is not None:
        dist.all_reduce(total, group=loss_mesh.get_group())
    return float(total / count), {k: float(v[0] / v[1]) for k, v in metrics.items()}


def grad_norm(model: nn.Module) -> float:
    grads = [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad for p in model.parameters()]
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))


def ranks(rank: int, world: int) -> dict:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from gigatron.core.objectives.contrastive import ContrastiveObjective
    from gigatron.parallel.comm import all_gather_with_grad
    from gigatron.parallel.mesh import ParallelDims

    dist.init_process_group("gloo")
    mesh = ParallelDims(tp=1, cp=1, pp=1, dp=world).build_mesh("cpu")
    full = global_batch()
    n = B // world
    local = {k: v[rank * n:(rank + 1) * n] for k, v in full.items()}
    out: dict = {}

    # the collective alone: rank s's rows get the SUM over ranks of the gradient put on them
    x = torch.full((2, 3), float(rank + 1), requires_grad=True)
    weights = torch.arange(2 * world * 3, dtype=torch.float32).reshape(2 * world, 3) * (rank + 1)
    (all_gather_with_grad(x, mesh, "batch") * weights).sum().backward()
    every = torch.arange(2 * world * 3, dtype=torch.float32).reshape(2 * world, 3) * sum(r + 1 for r in range(world))
    out["gather_grad_ok"] = bool(torch.equal(x.grad, every[rank * 2:(rank + 1) * 2]))

    ref = toy()  # one process over the whole batch, the same initial weights
    out["ref_loss"], out["ref_metrics"] = step(ref, ContrastiveObjective(None, PAIRS, TEMPS), full)
    out["ref_norm"] = grad_norm(ref)
    for name, grad in (("gathered", True), ("no_grad", False)):
        model = fully_shard(toy(), mesh=mesh["fsdp_shard"])
        objective = ContrastiveObjective(mesh, PAIRS, TEMPS, grad=grad)
        out[f"{name}_loss"], out[f"{name}_metrics"] = step(model, objective, local, mesh["loss"])
        out[f"{name}_norm"] = grad_norm(model)
    return out


@pytest.fixture(scope="module")
def dp2():
    return run_distributed(ranks, WORLD)


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(a)


def test_gather_backward_is_the_sum_over_ranks(dp2):
    assert all(r["gather_grad_ok"] for r in dp2)


def test_dp2_gathered_negatives_match_one_process(dp2):
    for r in dp2:
        loss, norm = rel(r["ref_loss"], r["gathered_loss"]), rel(r["ref_norm"], r["gathered_norm"])
        print(f"contrastive dp2 all_gather_with_grad: loss rel {loss:.1e}, grad norm rel {norm:.1e}")
        assert loss <= REL and norm <= REL, r
        assert r["gathered_metrics"] == pytest.approx(r["ref_metrics"], rel=1e-12), r


def test_dp2_gather_without_gradient_fails(dp2):
    for r in dp2:
        loss, norm = rel(r["ref_loss"], r["no_grad_loss"]), rel(r["ref_norm"], r["no_grad_norm"])
        print(f"contrastive dp2 gather without grad: loss rel {loss:.1e}, grad norm rel {norm:.1e}")
        assert loss <= REL  # the forward is the same: a loss check alone would not see the bug
        assert norm > 0.01, r


def test_loss_matches_cross_entropy_on_the_full_matrix():
    from gigatron.core.objectives.contrastive import ContrastiveObjective

    model, batch = toy(), global_batch()
    objective = ContrastiveObjective(None, PAIRS, TEMPS)
    args, kwargs = objective.inputs(objective.prepare(batch))
    out = model(*args, **kwargs)
    got = objective.loss(out, batch, model)
    want = torch.zeros(())
    target = torch.arange(B)
    for (a, b), scale in zip(PAIRS, (out["logit_scale"].exp(), torch.tensor(1 / 0.05))):
        sim = scale * out[a] @ out[b].T  # (B, B): row i of a against every b; its transpose the other way
        want = want + F.cross_entropy(sim, target, reduction="sum") + F.cross_entropy(sim.T, target, reduction="sum")
    assert int(objective.count(batch)) == 2 * B * len(PAIRS)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)  # the same fp32 ops, summed in another order

    got.backward()
    g = model.logit_scale.grad
    assert g is not None and torch.isfinite(g) and float(g.abs()) > 1e-6  # the learnable temperature learns


def test_fixed_temperature_leaves_logit_scale_alone():
    from gigatron.core.objectives.contrastive import ContrastiveObjective

    model, batch = toy(), global_batch()
    objective = ContrastiveObjective(None, [("image", "audio")], [0.05])
    args, kwargs = objective.inputs(objective.prepare(batch))
    assert sorted(kwargs) == ["audio", "images"]
    objective.loss(model(*args, **kwargs), batch, model).backward()
    assert model.logit_scale.grad is None and model.image.weight.grad is not None


def test_temperatures_from_the_imagebind_config():
    from gigatron.core.models.imagebind import ImageBindConfig
    from gigatron.core.objectives.contrastive import ContrastiveObjective

    cfg = ImageBindConfig(pairs=[["image", "text"], ["image", "audio"]])
    objective = ContrastiveObjective(None, cfg)
    assert objective.pairs == PAIRS and objective.temperatures == ["learnable", cfg.fixed_temperature]
    with pytest.raises(ValueError, match="need batch keys"):
        objective.prepare({"images": torch.zeros(2, 6)})
