"""The layer assignment and the cost model of pipeline stages (single process, no torch.distributed)."""

import os

import pytest

from gigatron.cluster.plan import format_plan, plan
from gigatron.core.config import load_config
from gigatron.core.family import get_family, pipeline_costs
from gigatron.parallel.pipeline_split import assign_layers, chunk_costs, chunk_owner, rank_chunks, theoretical_bubble

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("n_layers,pp,v,fewer", [(6, 2, 1, 1), (6, 4, 1, 1), (8, 2, 2, 1), (6, 4, 2, 1), (32, 4, 2, 1),
                                                 (126, 16, 8, 1), (80, 8, 5, 1), (8, 4, 1, 0), (7, 3, 1, 2), (1, 2, 1, 1)])
def test_assignment_covers_every_layer_in_order(n_layers, pp, v, fewer):
    chunks = assign_layers(n_layers, pp, v, fewer)
    assert len(chunks) == pp * v
    assert [i for c in chunks for i in c] == list(range(n_layers))
    assert all(len(c) >= 1 for c in chunks[1:-1])  # interior chunks are never empty
    sizes = [len(c) for c in chunks]
    assert max(sizes[1:-1] or [0]) - min(sizes[1:-1] or [0]) <= 1  # interior balanced to one layer
    if fewer and pp * v > 2:
        assert sizes[0] <= min(sizes[1:-1]) and sizes[-1] <= min(sizes[1:-1])


def test_too_few_layers_is_refused():
    with pytest.raises(ValueError, match="cannot fill"):
        assign_layers(5, 4, 2, 1)


def test_interleaved_ownership():
    assert rank_chunks(1, 4, 3) == [1, 5, 9]
    assert [chunk_owner(c, 4) for c in (0, 5, 11)] == [(0, 0), (1, 1), (3, 2)]


def test_405b_assignment_is_balanced():
    """126 layers over pp 16 x 8 virtual stages: one layer per chunk, chunk 0 only the embedding,
    chunk 127 only norm + output + loss; every chunk within one layer's FLOPs of every other."""
    cfg = load_config(os.path.join(ROOT, "recipes/llama3_405b.yaml"))
    m, p = cfg.model, cfg.parallel
    chunks = assign_layers(m.n_layers, p.pp, p.pp_virtual_stages, p.pp_first_last_fewer_layers)
    assert len(chunks) == 128 and chunks[0] == [] and chunks[-1] == []
    assert all(len(c) == 1 for c in chunks[1:-1])
    per_block = pipeline_costs(get_family("llama3"), cfg)
    costs = chunk_costs(per_block, chunks)
    one_layer = per_block[0]
    assert max(costs) - min(costs) <= one_layer
    assert 0.5 * one_layer < costs[-1] < one_layer  # the output projection + loss weigh ~0.6 of a layer


def test_plan_shows_assignment():
    cfg = load_config(os.path.join(ROOT, "recipes/llama3_405b.yaml"))
    info = plan(cfg)
    rows = info["pipeline"]["chunks"]
    assert rows[0]["extras"] == ["embedding"] and rows[-1]["extras"] == ["output+loss"]
    assert (rows[-1]["rank"], rows[-1]["virtual_stage"]) == (15, 7)
    assert info["pipeline"]["bubble_theory"] == pytest.approx(theoretical_bubble(16, 8, 16))
    text = format_plan(info)
    assert "chunk 127 rank 15 virtual 7" in text and "+embedding" in text


def _one_f_one_b(pp, m, forward=1.0, backward=2.0):
    """Synthetic records of torch's 1F1B order (pp - r warm-up forwards), uniform action costs."""
    ranks = []
    for r in range(pp):
        order, f, b = [], 0, 0
        for _ in range(min(m, pp - r)):
            order, f = order + [("F", f)], f + 1
        while b < m:
            order, b = order + [("B", b)], b + 1
            if f < m:
                order, f = order + [("F", f)], f + 1
        ranks.append([{"kind": k, "stage": r, "mb": i, "cpu": forward if k == "F" else backward, "start": 0.0,
                       "end": 0.0} for k, i in order])
    return ranks


@pytest.mark.parametrize("pp,m", [(2, 4), (4, 8), (4, 4), (3, 7)])
def test_replay_of_uniform_1f1b_gives_the_theoretical_bubble(pp, m):
    from gigatron.parallel.pipeline_timeline import bubble_stats, replay

    recorded = replay(_one_f_one_b(pp, m), pp)  # wall times as if run with one core per rank
    stats = bubble_stats(recorded, pp, {"pp": pp, "virtual_stages": 1, "micro_batches": m})
    assert stats["bubble_wall"] == pytest.approx(theoretical_bubble(pp, 1, m))
    assert stats["bubble_replay"] == pytest.approx(theoretical_bubble(pp, 1, m))
    assert stats["bubble_replay_median"] == pytest.approx(theoretical_bubble(pp, 1, m))
