"""CrossFlow's pieces against independent references: the KL term against torch.distributions, the
reparameterised source and the flow path against their formulas, the text encoder's masking, the
zero-init start (the first source is N(0, I), flow matching's own), the objective's layout-invariant
draws, and the recipe checks that refuse impossible shapes before any process starts."""

import math

import pytest
import torch

from gigatron.core.models.crossflow import CrossFlow, CrossFlowConfig

CFG = dict(dim=32, n_layers=2, n_heads=4, ffn_dim=64, text_layers=1, latent_channels=3, pixel_downsample=4,
           patch_hw=2, max_latent_height=2, max_latent_width=2, text_dim=8, text_tokens=6, time_dim=16,
           zero_init=False, attention_backend="torch")


def _model(**kw):
    torch.manual_seed(0)
    model = CrossFlow(CrossFlowConfig(**{**CFG, **kw}))
    for p in model.parameters():  # every parameter live (the default init zeroes adaLN and the head)
        torch.nn.init.normal_(p, std=0.2)
    return model


def _inputs(B=3, N=4, P=12, L=6):
    g = torch.Generator().manual_seed(1)
    from gigatron.core.objectives.flow_matching import grid_positions

    return dict(x1=torch.randn(B, N, P, generator=g), eps=torch.randn(B, N, P, generator=g), t=torch.rand(B, generator=g),
                indicator=torch.tensor([1, 0, 1]), grid_positions=grid_positions((1, 2, 2), B),
                text=torch.randn(B, L, 8, generator=g), text_lengths=torch.tensor([6, 3, 1]))


def test_kl_matches_torch_distributions_and_the_path_its_formula():
    model, x = _model(), _inputs()
    pred, target, kl, mu_out = model(**x)
    mu, logvar = model.encode(x["text"], x["text_lengths"])
    torch.testing.assert_close(mu_out, mu)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    ref = torch.distributions.kl_divergence(q, torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu)))
    torch.testing.assert_close(kl, ref, rtol=1e-5, atol=1e-6)
    z0 = mu + torch.exp(0.5 * logvar) * x["eps"]
    s = model.cfg.sigma_min
    torch.testing.assert_close(target, x["x1"] - (1 - s) * z0)
    t = x["t"].view(-1, 1, 1)
    torch.testing.assert_close(pred, model.velocity(t * x["x1"] + (1 - (1 - s) * t) * z0, x["t"], x["indicator"],
                                                    x["grid_positions"]))
    assert kl.abs().sum() > 0 and not torch.allclose(pred[0], pred[2])


def test_text_encoder_reads_only_the_real_tokens_and_the_indicator_matters():
    model, x = _model(), _inputs()
    mu, _ = model.encode(x["text"], x["text_lengths"])
    text = x["text"].clone()
    text[1, 3:] = 100.0  # padding of row 1 (3 real tokens) and of row 2 (1 real token)
    text[2, 1:] = -7.0
    mu2, _ = model.encode(text, x["text_lengths"])
    torch.testing.assert_close(mu2, mu)
    text[0, 0] += 1.0  # a real token of row 0
    assert not torch.allclose(model.encode(text, x["text_lengths"])[0][0], mu[0])
    v1 = model.velocity(x["x1"], x["t"], torch.ones(3, dtype=torch.long), x["grid_positions"])
    v0 = model.velocity(x["x1"], x["t"], torch.zeros(3, dtype=torch.long), x["grid_positions"])
    assert (v1 - v0).abs().max() > 1e-3


def test_cp_slicing_keeps_each_tokens_latent():
    """With `positions` (a cp rank's tokens) the source, target and KL are those of the full grid's tokens
    at those positions (the velocity differs: attention sees only the local tokens without CP's swap)."""
    model, x = _model(), _inputs()
    _, target, kl, mu = model(**x)
    pos = torch.tensor([3, 1])
    local = dict(x, x1=x["x1"][:, pos], eps=x["eps"][:, pos], grid_positions=x["grid_positions"][:, pos])
    _, t2, kl2, mu2 = model(**local, positions=pos)
    torch.testing.assert_close(t2, target[:, pos])
    torch.testing.assert_close(mu2, mu[:, pos])
    torch.testing.assert_close(kl2, kl[:, pos])


def test_zero_init_starts_from_flow_matchings_gaussian():
    from types import SimpleNamespace

    from gigatron.core.family import get_family
    from gigatron.parallel.parallelize import init_weights

    family = get_family("crossflow")
    cfg = CrossFlowConfig(**{**CFG, "zero_init": True})
    model = CrossFlow(cfg)
    init_weights(model, family, SimpleNamespace(model=cfg), seed=0)
    x = _inputs()
    _, target, kl, _ = model(**x)
    torch.testing.assert_close(target, x["x1"] - (1 - cfg.sigma_min) * x["eps"])  # z0 = eps: mu 0, sigma 1
    assert kl.abs().max() == 0


def test_objective_draws_are_keyed_by_sample():
    from types import SimpleNamespace

    from gigatron.core.objectives.crossflow import CrossFlowObjective

    m = CrossFlowConfig(**{**CFG, "text_dropout": 0.5, "align_weight": 0.5})
    obj = CrossFlowObjective(SimpleNamespace(model=m, train=SimpleNamespace(seed=3)))
    g = torch.Generator().manual_seed(0)
    batch = {"images": torch.randn(6, 3, 16, 16, generator=g), "text_embeddings": torch.randn(6, 5, 8, generator=g),
             "text_lengths": torch.tensor([5, 4, 3, 5, 2, 1]), "sample_index": torch.arange(10, 16)}
    whole = obj.prepare(batch)
    half = obj.prepare({k: v[3:] for k, v in batch.items()})  # the same samples in another micro-batch
    for key in ("eps", "t", "indicator", "x1", "text", "text_lengths"):
        torch.testing.assert_close(whole[key][3:], half[key])
    assert whole["x1"].shape == (6, 4, 12) and whole["eps"].std() > 0.5
    dropped = whole["indicator"] == 0
    assert 0 < dropped.sum() < 6  # p = 0.5 over 6 rows: both kinds present for this seed
    assert (whole["text_lengths"][dropped] == 1).all() and (whole["text"][dropped] == 0).all()
    assert torch.equal(whole["text"][~dropped], batch["text_embeddings"][~dropped])
    assert obj.count(whole) == 6 * 4 * 12
    x1 = whole["x1"]
    loss = obj.loss((x1 + 1, x1, torch.full_like(x1, 2.0), x1 - 3), whole)  # flow 1, KL 2, align 9 per element
    assert math.isclose(loss.item(), 6 * 4 * 12 * (1 + m.kl_weight * 2.0 + 0.5 * 9.0), rel_tol=1e-6)


@pytest.mark.parametrize("override, key", [(["data.image_size=16"], "data.image_size"),
                                           (["train.seq_len=64"], "train.seq_len"),
                                           (["data.text_embeddings=false"], "data.text_embeddings"),
                                           (["model.kl_weight=-1"], "model.kl_weight"),
                                           (["parallel.tp=3"], "parallel.tp")])
def test_recipe_checks_name_the_key(override, key):
    import os

    from gigatron.core.config import load_config
    from gigatron.core.config_loader import ConfigError

    recipe = os.path.join(os.path.dirname(__file__), "../../recipes/crossflow_debug.yaml")
    with pytest.raises(ConfigError) as err:
        load_config(recipe, override, world_size=3 if key == "parallel.tp" else 1)
    assert key in str(err.value)


def test_guidance_mixes_the_branches_predicted_images_each_on_its_own_source():
    """One Euler step from t = 0 (a step of 1 reaches the predicted image): the guided result is
    x1_u + w (x1_c - x1_u), x1_c = z0 + v_c(z0, 1) and x1_u = z0_empty + v_u(z0_empty, 0): the
    unconditional branch runs on the empty prompt's source, not on the conditional one."""
    from gigatron.core.families.crossflow import flow, sources
    from gigatron.core.models.patch_embed import unpatchify
    from gigatron.core.objectives.flow_matching import grid_positions

    model, x = _model(), _inputs()
    z0, z0_empty = sources(model, x["text"], x["text_lengths"], seed=4)
    assert not torch.allclose(z0, z0_empty)
    t0, pos = torch.zeros(3), grid_positions((1, 2, 2), 3)
    with torch.no_grad():
        x1_c = z0 + model.velocity(z0, t0, torch.ones(3, dtype=torch.long), pos)
        x1_u = z0_empty + model.velocity(z0_empty, t0, torch.zeros(3, dtype=torch.long), pos)
    w = 2.5
    got = flow(model, z0, z0_empty, guidance=w, steps=1)
    m = model.cfg
    torch.testing.assert_close(got, unpatchify(x1_u + w * (x1_c - x1_u), (1, 2, 2), m.patch, m.latent_channels))
    torch.testing.assert_close(flow(model, z0, z0_empty, guidance=1.0, steps=1),
                               unpatchify(x1_c, (1, 2, 2), m.patch, m.latent_channels))
