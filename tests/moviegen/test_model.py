"""Movie Gen's model and flow matching, one process: the 30B count and its breakdown, zero-initialised
adaLN gates and head, cross-attention masking, the flow-matching path and its draws (layout-
invariant, logit-normal t, text dropout), the linear-quadratic sampling schedule."""

import math
from types import SimpleNamespace

import pytest
import torch

from gigatron.core.config import load_config
from gigatron.core.family import get_family
from gigatron.core.models.moviegen import MovieGen, MovieGenConfig, count_parameters, parameter_breakdown
from gigatron.core.objectives.flow_matching import FlowMatchingObjective, flow_path
from gigatron.core.sample import linear_quadratic_times
from gigatron.parallel.parallelize import init_weights
from tests.moviegen.harness import RECIPE

TINY = MovieGenConfig(dim=32, n_layers=2, n_heads=4, ffn_dim=64, latent_channels=3, text_dim=16, time_dim=32,
                      max_latent_frames=4, max_latent_height=4, max_latent_width=4, text_dropout=0.25)


def _model(m: MovieGenConfig) -> MovieGen:
    model = MovieGen(m)
    init_weights(model, get_family("moviegen"), SimpleNamespace(model=m), seed=0)
    return model


def _inputs(B=2, N=16, L=3, m=TINY):
    g = torch.Generator().manual_seed(0)
    thw = torch.stack(torch.meshgrid(torch.arange(1), torch.arange(4), torch.arange(4), indexing="ij"), -1).view(1, N, 3)
    return (torch.randn(B, N, m.patch_features, generator=g), torch.rand(B, generator=g), thw.expand(B, -1, -1),
            torch.randn(B, L, m.text_dim, generator=g), torch.tensor([3, 1]))


def test_30b_parameter_count_and_breakdown():
    cfg = load_config("recipes/moviegen_30b.yaml")
    parts = parameter_breakdown(cfg.model)
    total = count_parameters(cfg.model)
    assert 28e9 <= total <= 32e9 and sum(parts.values()) == total
    d, f, L = 6144, 16384, 48
    assert parts["blocks (self-attention, FFN, norms)"] == L * (4 * d * d + 3 * d * f + 2 * d)
    assert parts["cross-attention"] == L * (4 * d * d + d)
    # adaLN-single: one Linear(d, 6d) + a (6, d) table per block + the final layer's, not 48 x Linear(d, 6d)
    assert parts["adaLN"] == (d * 6 * d + 6 * d) + L * 6 * d + (2 * d * d + 2 * d + 2 * d) < 0.4e9
    shape = get_family("moviegen").planner_shape(cfg)
    assert shape.parameters() == total and any("cross-attention" in n for n in shape.notes)
    assert shape.seq_len == 73728 and not shape.causal  # attention's sequence term at 73,728 tokens


def test_zero_init_gates_and_head():
    """adaLN gates start at 0: a block adds only its (ungated) cross-attention; the head outputs 0."""
    model = _model(TINY)
    x, t, thw, text, lengths = _inputs()
    assert torch.equal(model(x, t, thw, text, lengths), torch.zeros_like(x))
    shared = model.adaln(model.time_embed(torch.randn(2, TINY.time_dim)))
    assert torch.equal(shared, torch.zeros_like(shared))
    h, context, mask = model.embed(x, thw), model.text_proj(text), torch.ones(2, 3, dtype=torch.bool)
    block = model.layers["0"]
    expected = h + block.cross_attention(block.cross_norm(h), context, mask)
    assert torch.allclose(block(h, shared, context, mask, None, None), expected, atol=1e-6)


def test_cross_attention_reads_the_prompt_and_ignores_its_padding():
    model = _model(MovieGenConfig(**{**TINY.__dict__, "zero_init": False}))
    x, t, thw, text, lengths = _inputs()
    out = model(x, t, thw, text, lengths)
    padded = text.clone()
    padded[1, 1:] = 100.0  # beyond row 1's single real token
    assert torch.allclose(model(x, t, thw, padded, lengths), out, atol=1e-6)
    other = text.clone()
    other[0, 0] += 1.0
    assert not torch.allclose(model(x, t, thw, other, lengths)[0], out[0], atol=1e-4)


def test_flow_path_and_velocity():
    x1, x0, t = torch.randn(3, 5), torch.randn(3, 5), torch.tensor([0.0, 0.3, 1.0])
    xt, v = flow_path(x1, x0, t, 1e-5)
    assert torch.allclose(xt[0], x0[0]) and torch.allclose(xt[2], x1[2] + 1e-5 * x0[2])
    eps = 1e-3
    ahead, _ = flow_path(x1, x0, t + eps, 1e-5)
    assert torch.allclose((ahead - xt) / eps, v, atol=1e-3)  # v = d x_t / d t


def test_draws_are_keyed_by_sample_index():
    cfg = load_config(RECIPE, ["train.seq_len=64"])
    obj = FlowMatchingObjective(cfg)
    keys = torch.arange(4096)
    x0, t, dropped = obj.draw(keys, (4096, 2))
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item()) < 0.06 and abs(logit.std().item() - 1) < 0.05  # logit-normal(0, 1)
    assert abs(dropped.float().mean().item() - cfg.model.text_dropout) < 0.02
    sub = obj.draw(keys[[7, 3000]], (2, 2))  # the same samples in another batch: the same draws
    assert torch.equal(sub[0], x0[[7, 3000]]) and torch.equal(sub[1], t[[7, 3000]])


def test_linear_quadratic_schedule():
    t = linear_quadratic_times(50)
    steps = t[1:] - t[:-1]
    assert len(t) == 51 and t[0] == 0 and math.isclose(t[-1].item(), 1.0, rel_tol=1e-6)
    assert torch.allclose(steps[:25], torch.full((25,), 1e-3)) and (steps > 0).all()
    assert (steps[25:] > steps[24:-1]).all() and steps[25] < 3e-3  # then growing, from about the same size
    with pytest.raises(ValueError):
        linear_quadratic_times(10, linear_steps=10)
