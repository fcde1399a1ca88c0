"""ImageBind on the family seam: the encoders of core/models/imagebind.py, the contrastive objective of
core/objectives/contrastive.py (InfoNCE, negatives all-gathered with gradients over the batch mesh),
initialisation, validation rules and FLOPs. Nothing in the trainer or the parallel plans changes.

Two stages, through the seam's multi-stage recipes (recipes/imagebind_debug.yaml):
1. image-text: `modalities: [image, text]`, `pairs: [[image, text]]`, learnable temperature;
2. binding: `modalities: [image, text, audio]`, `frozen: [image, text]`, `pairs: [[image, audio]]`,
   fixed temperature; it starts from stage 1's checkpoint by parameter name (the audio encoder starts
   fresh) and trains the audio encoder alone against the frozen image embeddings.

Layout: FSDP (dp) only; tp, cp and pp are refused by `validate` (the blocks of three encoders of
different widths share no tensor-parallel table yet, and a contrastive batch is a few hundred tokens
per sample).
"""

from __future__ import annotations

import math

from gigatron.core.families import vit
from gigatron.core.families.vit import _require
from gigatron.core.family import InitRule, ModelFamily, ParallelPlan, register_family
from gigatron.core.models.imagebind import MODALITIES, ImageBind, ImageBindConfig, encoder_parameters


def validate(cfg) -> None:
    m, p, d = cfg.model, cfg.parallel, cfg.data
    for key in ("modalities", "frozen"):
        bad = [x for x in getattr(m, key) if x not in MODALITIES]
        _require(not bad, f"model.{key}", f"unknown modalities {bad}; choose from {list(MODALITIES)}")
    _require(bool(m.modalities), "model.modalities", "build at least one encoder, e.g. [image, text]")
    _require(all(x in m.modalities for x in m.frozen), "model.frozen",
             f"{m.frozen} freezes encoders not in model.modalities={m.modalities}")
    _require(bool(m.pairs), "model.pairs", "give at least one pair to bind, e.g. [[image, text]]")
    for pair in m.pairs:
        _require(len(pair) == 2 and pair[0] != pair[1] and all(x in m.modalities for x in pair), "model.pairs",
                 f"{pair}: a pair is two different modalities of model.modalities={m.modalities}")
        _require(not all(x in m.frozen for x in pair), "model.pairs",
                 f"{pair}: both encoders are frozen, nothing would train; drop one from model.frozen")
    for key, value in (("embed_dim", m.embed_dim), ("text_dim", m.text_dim), ("audio_dim", m.audio_dim)):
        _require(value >= 1, f"model.{key}", f"must be a positive integer, got {value}")
    for key, dim, heads in (("model.text_heads", m.text_dim, m.text_heads), ("model.audio_heads", m.audio_dim, m.audio_heads)):
        _require(heads >= 1 and dim % heads == 0, key, f"width {dim} is not divisible by {heads} heads")
    _require(0.0 < m.init_temperature and 0.0 < m.fixed_temperature, "model.fixed_temperature",
             "temperatures must be positive")
    for name in ("tp", "cp", "pp"):
        _require(getattr(p, name) == 1, f"parallel.{name}",
                 f"imagebind trains with data parallelism (FSDP) only; set parallel.{name}=1 and use parallel.dp")
    used = {x for pair in m.pairs for x in pair}
    _require(d.format not in ("webdataset", "dali", "mds", "mixture", "tokens"), "data.format",
             f"the {d.format} reader does not decode captions into text_tokens nor mel.npy into audio yet; "
             f"register a reader that yields images, text_tokens, text_lengths and audio (as tests/imagebind/harness.py)")
    if "text" in used:
        _require(d.text_tokens == m.text_tokens, "data.text_tokens",
                 f"{d.text_tokens} but model.text_tokens={m.text_tokens}; make them equal")
    if "audio" in used:
        _require(d.audio, "data.audio", "the audio encoder needs spectrograms; set data.audio=true")
        for key, value in (("model.n_mels", m.n_mels), ("model.audio_frames", m.audio_frames)):
            _require(value % m.audio_patch == 0, key, f"{value} is not divisible by model.audio_patch={m.audio_patch}")
    if "image" in m.modalities:
        vit.validate(cfg)


def init(m: ImageBindConfig, name: str) -> InitRule:
    """The ViT's rules (norms 1/0, biases 0, weights and positions N(0, init_std)), with each residual
    output scaled by 1/sqrt(2 x its own encoder's depth), and the logit scale at log(1 / 0.07)."""
    if name == "logit_scale":
        return InitRule("constant", value=math.log(1.0 / m.init_temperature))
    if "norm" in name:
        return InitRule("ones") if name.endswith("weight") else InitRule("zeros")
    if name.endswith("bias"):
        return InitRule("zeros")
    std = m.init_std
    if name.startswith("blocks.") and name.endswith(("attn.proj.weight", "mlp.fc2.weight")):
        index = int(name.split(".")[1])
        depth = next(len(r) for r in m.block_ranges().values() if index in r)
        std /= math.sqrt(2 * depth)
    return InitRule("normal", std)


def no_decay(name: str) -> bool:
    return vit.no_decay(name) or name == "logit_scale"


def flops_per_sample(cfg) -> float:
    """Training FLOPs of one sample over the encoders the pairs use: 6 per weight per token (2 for a
    frozen encoder: forward only), + 12 d T per token for attention (4 frozen)."""
    m = cfg.model
    used = {x for pair in m.pairs for x in pair}
    shapes = {"image": (m.dim, m.mlp_dim, m.blocks, (m.image_size // m.patch) ** 2 + 1),
              "text": (m.text_dim, m.text_mlp_dim, m.text_depth, m.text_tokens),
              "audio": (m.audio_dim, m.audio_mlp_dim, m.audio_depth,
                        (m.n_mels // m.audio_patch) * (m.audio_frames // m.audio_patch) + 1)}
    total = 0.0
    for name in used:
        dim, mlp, depth, t = shapes[name]
        weight, attention = (2, 4) if name in m.frozen else (6, 12)
        total += depth * (weight * (4 * dim ** 2 + 2 * dim * mlp) + attention * dim * t) * t
        total += weight * dim * m.embed_dim
    return total


def _objective(cfg, mesh):
    from gigatron.core.objectives.contrastive import ContrastiveObjective

    return ContrastiveObjective(mesh, cfg.model)


IMAGEBIND = register_family(ModelFamily(
    name="imagebind",
    config=ImageBindConfig,
    build=ImageBind,
    init=init,
    plan=ParallelPlan(blocks="blocks", first_stage=(), last_stage=(), causal=False),
    objective=_objective,
    validate=validate,
    n_blocks=lambda m: m.total_blocks,
    parameters=encoder_parameters,
    no_decay=no_decay,
    flops_per_sample=flops_per_sample,
    samples_unit="samples",
    units_per_sample=lambda cfg: 1,
    data_format="webdataset",
))
