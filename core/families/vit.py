"""The ViT of MAWS and SWAG on the family seam: the model (core/models/vit.py, conv stem, MAE
decoder), its TP tables (parallel/plans/vit.py), two objectives (core/objectives/classification.py:
soft multi-hot targets, vocabulary-parallel; core/objectives/mae.py: masked patches from the
layout-invariant generator), initialisation, validation rules, FLOPs, the planner's shape and the
Hugging Face / timm converter (core/convert/hf_vit.py).

`model.objective` picks the head: a MAWS recipe's MAE stage builds the decoder, its weakly
supervised stage the classifier; the second stage starts from the first's checkpoint matched by
parameter name (core/train.py run_stages), so the encoder carries over, the decoder is left behind
and the classifier starts fresh.
"""

from __future__ import annotations

import math

from gigatron.core.config_loader import ConfigError
from gigatron.core.family import InitRule, ModelFamily, ParallelPlan, register_family
from gigatron.core.models.vit import ViT, ViTConfig, encoder_parameters


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def validate(cfg) -> None:
    m, p, d = cfg.model, cfg.parallel, cfg.data
    for key in ("dim", "depth", "heads", "mlp_dim", "patch", "patch_frames", "image_size", "max_frames", "channels"):
        _require(getattr(m, key) >= 1, f"model.{key}", f"must be a positive integer, got {getattr(m, key)}")
    _require(m.dim % m.heads == 0, "model.heads", f"model.dim={m.dim} is not divisible by heads={m.heads}")
    _require(m.image_size % m.patch == 0, "model.image_size",
             f"{m.image_size} px is not divisible by the patch {m.patch}; pick a multiple of {m.patch}")
    _require(m.blocks >= 1, "model.depth", f"{m.depth} leaves no transformer block (the conv stem takes one)")
    _require(p.cp == 1, "parallel.cp", f"cp={p.cp}: a ViT's few hundred tokens need no context parallelism; "
                                       f"set parallel.cp=1 and use tp / dp")
    _require(p.tp == 1 or not p.sequence_parallel, "parallel.sequence_parallel",
             "the vit plan has no sequence-parallel table; set parallel.sequence_parallel=false")
    tp_split = [("model.heads", m.heads), ("model.mlp_dim", m.mlp_dim)]
    if m.objective == "mae":
        _require(m.decoder_dim % m.decoder_heads == 0, "model.decoder_heads",
                 f"model.decoder_dim={m.decoder_dim} is not divisible by decoder_heads={m.decoder_heads}")
        _require(0.0 <= m.mask_ratio < 1.0 and 0.0 <= m.video_mask_ratio < 1.0, "model.mask_ratio",
                 f"mask ratios must lie in [0, 1), got {m.mask_ratio} / {m.video_mask_ratio}")
        tp_split += [("model.decoder_heads", m.decoder_heads), ("model.decoder_mlp_dim", m.decoder_mlp_dim)]
    for key, value in tp_split:
        _require(value % p.tp == 0, "parallel.tp", f"{key}={value} is not divisible by tp={p.tp}")
    if m.objective == "classification":
        _require(m.num_classes >= 1, "model.num_classes", f"must be >= 1, got {m.num_classes}")
        chunk = -(-m.num_classes // p.tp)
        _require(chunk * (p.tp - 1) < m.num_classes, "model.num_classes",
                 f"{m.num_classes} classes split over tp={p.tp} leave a rank without classes; lower parallel.tp")
        _require(d.num_labels in (0, m.num_classes), "data.num_labels",
                 f"multi-hot labels of width {d.num_labels} but model.num_classes={m.num_classes}; make them equal")
    if m.stem == "conv":
        strides = m.conv_strides()
        _require(bool(strides) and math.prod(strides) == m.patch, "model.stem_strides",
                 f"the conv stem's strides {strides} must multiply to the patch {m.patch} "
                 f"(e.g. [2, 7] for 14)")
        _require(len(m.conv_widths()) == len(strides), "model.stem_widths",
                 f"{len(m.conv_widths())} widths for {len(strides)} strides")
        _require(m.patch_frames == 1, "model.stem", "the conv stem takes images only; use stem=patchify for "
                                                    "spatio-temporal patches (patch_frames > 1)")
    if d.format in ("webdataset", "dali", "mds", "mixture"):
        _require(d.image_size == m.image_size, "data.image_size",
                 f"{d.image_size} but model.image_size={m.image_size}; make them equal")
        if d.modality == "video" or any(s.modality == "video" for s in d.mixture):
            _require(d.num_frames % m.patch_frames == 0 and d.num_frames <= m.max_frames, "data.num_frames",
                     f"{d.num_frames} frames must be a multiple of model.patch_frames={m.patch_frames} "
                     f"and at most model.max_frames={m.max_frames}")
            _require(p.pp == 1, "parallel.pp", "video batches change the token count between micro-batches, "
                                               "which a pipeline's fixed shapes refuse; set parallel.pp=1")


def init(m: ViTConfig, name: str) -> InitRule:
    """Norms (LayerNorm, BatchNorm) 1 and 0; biases 0; tokens, positions and linear weights
    N(0, init_std) (timm); conv stem weights N(0, sqrt(2 / fan_out)) (He); residual-branch outputs
    (attn.proj, mlp.fc2) scaled by 1/sqrt(2 * blocks) (GPT-2)."""
    if ".norm" in name or name.startswith("norm") or ("convs." in name and _is_bn(name)):
        return InitRule("ones") if name.endswith("weight") else InitRule("zeros")
    if name.endswith("bias"):
        return InitRule("zeros")
    if "stem.convs." in name:
        width = m.conv_widths()[int(name.split("convs.")[1].split(".")[0]) // 3]
        return InitRule("normal", math.sqrt(2.0 / (9 * width)))
    if "stem.proj" in name and m.stem == "conv":
        return InitRule("normal", math.sqrt(2.0 / m.dim))
    std = m.init_std
    if name.endswith(("attn.proj.weight", "mlp.fc2.weight")):
        std /= math.sqrt(2 * (m.decoder_depth if name.startswith("decoder.") else m.blocks))
    return InitRule("normal", std)


def _is_bn(name: str) -> bool:
    """BatchNorm parameters of the conv stem: convs.<3i+1>.weight / bias (conv, BN, ReLU triples)."""
    index = int(name.split("convs.")[1].split(".")[0])
    return index % 3 == 1


def no_decay(name: str) -> bool:
    return (name.endswith("bias") or "norm" in name or name.endswith(("pos_embed", "time_embed", "cls_token",
                                                                      "mask_token"))
            or ("convs." in name and _is_bn(name)))


# -- training FLOPs per sample (6 per weight per token, + 12 d T per token for attention) ----------
def _tokens(cfg) -> tuple[int, int]:
    """(encoder tokens, patch tokens) of one image."""
    m = cfg.model
    n = (m.image_size // m.patch) ** 2
    seen = int(n * (1 - m.mask_ratio)) if m.objective == "mae" else n
    return m.n_cls + seen, n


def block_flops(cfg) -> float:
    m, (t, _) = cfg.model, _tokens(cfg)
    return (6 * (4 * m.dim ** 2 + 2 * m.dim * m.mlp_dim) + 12 * m.dim * t) * t


def first_flops(cfg) -> float:
    m, (_, n) = cfg.model, _tokens(cfg)
    return 6 * m.channels * m.patch_frames * m.patch ** 2 * m.dim * n


def last_flops(cfg) -> float:
    m, (_, n) = cfg.model, _tokens(cfg)
    if m.objective == "classification":
        return 6 * m.dim * m.num_classes
    if m.objective == "mae":
        t, dd = m.n_cls + n, m.decoder_dim
        per_block = (6 * (4 * dd ** 2 + 2 * dd * m.decoder_mlp_dim) + 12 * dd * t) * t
        return m.decoder_depth * per_block + 6 * (m.dim * dd + dd * m.channels * m.patch_frames * m.patch ** 2) * t
    return 0.0


def flops_per_sample(cfg) -> float:
    return cfg.model.blocks * block_flops(cfg) + first_flops(cfg) + last_flops(cfg)


def _planner_shape(cfg):
    from gigatron.cluster.planner.model_shape import vit

    """The planner's ViT shape, heads excluded (as the published counts are): the classifier
    (dim x num_classes, ~5% of ViT-H/14 at 27K hashtags) and the MAE decoder are not modelled."""
    m = cfg.model
    label = f"ViT-{m.dim}w{m.blocks}L/{m.patch}" + (" conv stem" if m.stem == "conv" else "") + ", heads excluded"
    return vit(m.blocks, m.dim, m.mlp_dim, m.heads, image=m.image_size, patch=m.patch, classes=0, name=label)


def _tp_model(cfg):
    from gigatron.parallel.plans.vit import model_plan

    return model_plan(cfg)


def _tp_block(cfg):
    from gigatron.parallel.plans.vit import block_plan

    return block_plan(cfg)


def _objective(cfg, mesh):
    if cfg.model.objective == "mae":
        from gigatron.core.objectives.mae import MAEObjective

        return MAEObjective(cfg.model, cfg.train.seed)
    if cfg.model.objective == "classification":
        from gigatron.core.objectives.classification import ClassificationObjective

        return ClassificationObjective(mesh, cfg.model.num_classes)
    raise ConfigError("model.objective", "'none' builds a feature extractor (export, inference) and has no loss; "
                                         "train with classification or mae")


VIT = register_family(ModelFamily(
    name="vit",
    config=ViTConfig,
    build=ViT,
    init=init,
    plan=ParallelPlan(blocks="blocks", first_stage=("embed",), last_stage=("norm", "head", "decoder"),
                      tp_model=_tp_model, tp_block=_tp_block, cp_attention=(), causal=False,
                      block_cost=block_flops, first_cost=first_flops, last_cost=last_flops),
    objective=_objective,
    validate=validate,
    n_blocks=lambda m: m.blocks,
    parameters=encoder_parameters,  # heads excluded, as published (gigatron plan)
    no_decay=no_decay,
    flops_per_sample=flops_per_sample,
    samples_unit="images",
    units_per_sample=lambda cfg: 1,
    data_format="webdataset",
    converters={"hf": "gigatron.core.convert.hf_vit"},
    planner_shape=_planner_shape,
))
