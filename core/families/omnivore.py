"""Omnivore on the family seam: the ViT family's pieces (init, no-decay names, TP tables, planner
shape, validation) composed with the RGB-D stem and the per-dataset heads of core/models/omnivore.py
and the objective of core/objectives/omnivore.py. Nothing in the trainer or the parallel plans
changes: the depth projection sits inside `embed` (replicated over tp like the RGB stem) and the
joined head is the ViT's column-parallel `head`.

FSDP: a micro-batch comes from one mixture source, chosen from (seed, micro-batch index) alone
(data_pipeline/mixture.py), so every dp rank runs the depth projection in the same micro-batches,
and every micro-batch touches every head (the objective masks the logits, it does not skip heads).
"""

from __future__ import annotations

from gigatron.core.config_loader import ConfigError
from gigatron.core.families import vit
from gigatron.core.family import ModelFamily, ParallelPlan, register_family
from gigatron.core.models.omnivore import Omnivore, OmnivoreConfig, backbone_parameters


def validate(cfg) -> None:
    m, p, d = cfg.model, cfg.parallel, cfg.data
    if m.stem != "patchify":
        raise ConfigError("model.stem", "omnivore's depth embedding is a patch embedding; set model.stem=patchify")
    if m.objective != "classification":
        raise ConfigError("model.objective", "omnivore trains its classifiers; set model.objective=classification")
    if not m.classes or any(k < 1 for k in m.classes):
        raise ConfigError("model.classes", f"one positive class count per dataset, got {m.classes}")
    if m.datasets and len(m.datasets) != len(m.classes):
        raise ConfigError("model.datasets", f"{len(m.datasets)} names for {len(m.classes)} heads; give one per head")
    if m.depth_channels < 1:
        raise ConfigError("model.depth_channels", f"must be >= 1, got {m.depth_channels}")
    n_sources = len(d.mixture) if d.format == "mixture" else 1
    if len(m.classes) != n_sources:
        raise ConfigError("model.classes", f"{len(m.classes)} heads for {n_sources} data source(s); list one class "
                                           f"count per data.mixture source, in order")
    if p.pp != 1:
        raise ConfigError("parallel.pp", "batches of images, clips and RGB-D change the input shape between "
                                         "micro-batches, which a pipeline's fixed shapes refuse; set parallel.pp=1")
    vit.validate(cfg)


def _objective(cfg, mesh):
    from gigatron.core.objectives.omnivore import OmnivoreObjective

    return OmnivoreObjective(mesh, cfg.model.classes, cfg.model.head_names())


def _source_tokens(cfg) -> list[tuple[float, int]]:
    """(weight, patch tokens) per data source: clips have num_frames / patch_frames temporal patches."""
    m, d = cfg.model, cfg.data
    side = (m.image_size // m.patch) ** 2
    sources = d.mixture if d.format == "mixture" else []
    if not sources:
        return [(1.0, side * (max(1, d.num_frames // m.patch_frames) if d.modality == "video" else 1))]
    total = sum(s.weight for s in sources) or 1.0
    return [(s.weight / total, side * (max(1, d.num_frames // m.patch_frames)
                                       if (s.modality or d.modality) == "video" else 1)) for s in sources]


def flops_per_sample(cfg) -> float:
    """Training FLOPs of one sample, averaged over the sources by their weights (6 per weight per
    token, 12 d T per token for attention; the depth stem counted on every image-like sample)."""
    m = cfg.model
    total = 0.0
    for weight, n in _source_tokens(cfg):
        t = n + m.n_cls
        block = (6 * (4 * m.dim ** 2 + 2 * m.dim * m.mlp_dim) + 12 * m.dim * t) * t
        stem = 6 * (m.channels + m.depth_channels) * m.patch_frames * m.patch ** 2 * m.dim * n
        total += weight * (m.blocks * block + stem + 6 * m.dim * m.num_classes)
    return total


OMNIVORE = register_family(ModelFamily(
    name="omnivore",
    config=OmnivoreConfig,
    build=Omnivore,
    init=vit.init,
    plan=ParallelPlan(blocks="blocks", first_stage=("embed",), last_stage=("norm", "head"),
                      tp_model=vit._tp_model, tp_block=vit._tp_block, cp_attention=(), causal=False,
                      block_cost=vit.block_flops, first_cost=vit.first_flops, last_cost=vit.last_flops),
    objective=_objective,
    validate=validate,
    n_blocks=lambda m: m.blocks,
    parameters=backbone_parameters,  # heads excluded, as published (gigatron plan)
    no_decay=vit.no_decay,
    flops_per_sample=flops_per_sample,
    samples_unit="images",
    units_per_sample=lambda cfg: 1,
    data_format="mixture",
    planner_shape=vit._planner_shape,
))
