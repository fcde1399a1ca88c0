"""Which transformer layers each pipeline stage holds (Llama 3, section 3.3.2), and what it costs.

The model is cut into C = pp * v chunks ("virtual stages"). Chunk c runs on pipeline rank c % pp as
that rank's virtual stage c // pp, so rank r owns chunks r, r + pp, r + 2pp, ... (the interleaved
layout of Narayanan et al. 2021, used by Llama 3). Chunk 0 also holds the token embedding; chunk C-1
holds the final norm, the output projection and the loss.

Balancing (Llama 3: "we reduce one Transformer layer each from the first and the last stages"):
the first and the last chunk count as if they held `fewer` extra layers, standing in for the
embedding and the output/loss. With S = n_layers + 2 * fewer slots, every chunk gets S // C slots;
the S % C extra slots go to interior chunks, spread evenly (the ends already carry extra work);
then the two ends give back `fewer` layers. 405B: 126 layers, pp 16, v 8, fewer 1 -> S = 128 = C:
every chunk one layer, chunk 0 only the embedding, chunk 127 only norm + output + loss.

Costs come from the model family's plan (core/family.py: training FLOPs of one block, of the
first-stage and of the last-stage modules). Pure Python: `gigatron plan` and `validate()` use it
without torch.distributed.
"""

from __future__ import annotations


def assign_layers(n_layers: int, pp: int, virtual_stages: int, fewer: int) -> list[list[int]]:
    """Layer indices of each chunk, chunk 0 first. Raises ValueError when some chunk would be empty
    (an interior chunk needs a layer; the ends may hold only the embedding or the loss)."""
    chunks = pp * virtual_stages
    if chunks == 1:
        return [list(range(n_layers))]
    # lighten the ends by `fewer`, but never below zero layers
    f = max(0, fewer)
    while f > 0 and (n_layers + 2 * f) // chunks < f:
        f -= 1
    base, extra = divmod(n_layers + 2 * f, chunks)
    if base < 1:
        raise ValueError(f"{n_layers} layers cannot fill {chunks} pipeline chunks "
                         f"(pp={pp} x virtual_stages={virtual_stages}, ends lightened by {fewer})")
    counts = [base] * chunks
    interior = list(range(1, chunks - 1))
    if extra <= len(interior):
        for i in range(extra):  # evenly spaced over the interior
            counts[interior[(2 * i + 1) * len(interior) // (2 * extra)]] += 1
    else:  # only possible with 2 chunks, or one slot more than interior chunks
        for c in interior:
            counts[c] += 1
        for c in (0, chunks - 1)[: extra - len(interior)]:
            counts[c] += 1
    counts[0] -= f
    counts[-1] -= f
    out, start = [], 0
    for n in counts:
        out.append(list(range(start, start + n)))
        start += n
    assert start == n_layers, (counts, n_layers)
    return out


def chunk_owner(chunk: int, pp: int) -> tuple[int, int]:
    """(pipeline rank, virtual stage) that runs `chunk`."""
    return chunk % pp, chunk // pp


def rank_chunks(rank: int, pp: int, virtual_stages: int) -> list[int]:
    """The chunks pipeline rank `rank` runs, in order: r, r + pp, r + 2pp, ..."""
    return [rank + k * pp for k in range(virtual_stages)]


def theoretical_bubble(pp: int, virtual_stages: int, micro_batches: int) -> float:
    """(p - 1) / (v m + p - 1): idle share of a step with equal stage costs and free P2P."""
    return (pp - 1) / (virtual_stages * micro_batches + pp - 1)


# -- cost per chunk ----------------------------------------------------------------------------
# The family's plan prices one block, the first-stage modules and the last-stage modules
# (ParallelPlan.block_cost / first_cost / last_cost, training FLOPs per sample); a chunk costs the
# sum of what it holds.

def chunk_costs(costs: tuple[float, float, float], assignment: list[list[int]]) -> list[float]:
    """Training FLOPs of each chunk; costs = (one block, first-stage modules, last-stage modules)."""
    block, first, last = costs
    out = [len(layers) * block for layers in assignment]
    out[0] += first
    out[-1] += last
    return out


def describe(costs: tuple[float, float, float], n_blocks: int, pp: int, virtual_stages: int, fewer: int,
             first_name: str = "embedding", last_name: str = "output+loss") -> list[dict]:
    """One row per chunk for `gigatron plan`: owner, layer range, extras, cost in layers."""
    assignment = assign_layers(n_blocks, pp, virtual_stages, fewer)
    rows = []
    for c, (layers, cost) in enumerate(zip(assignment, chunk_costs(costs, assignment))):
        rank, virtual = chunk_owner(c, pp)
        extras = ([first_name] if c == 0 else []) + ([last_name] if c == len(assignment) - 1 else [])
        rows.append({"chunk": c, "rank": rank, "virtual_stage": virtual,
                     "layers": [layers[0], layers[-1]] if layers else [], "n_layers": len(layers),
                     "extras": extras, "cost_in_layers": round(cost / costs[0], 3)})
    return rows


def format_rows(rows: list[dict], max_rows: int = 12) -> list[str]:
    """Printable lines: `rank r / virtual k: layers a-b (+embedding), cost x layers`."""
    def line(row: dict) -> str:
        layers = f"layers {row['layers'][0]}-{row['layers'][1]}" if row["layers"] else "no layers"
        extras = f" +{'+'.join(row['extras'])}" if row["extras"] else ""
        return (f"  chunk {row['chunk']:>3} rank {row['rank']:>2} virtual {row['virtual_stage']}: "
                f"{layers} ({row['n_layers']}){extras}, cost {row['cost_in_layers']} layers")
    if len(rows) <= max_rows:
        return [line(r) for r in rows]
    half = max_rows // 2
    return [line(r) for r in rows[:half]] + [f"  ... {len(rows) - 2 * half} more chunks ..."] + \
        [line(r) for r in rows[-half:]]
