"""ViT checkpoints to and from Hugging Face `transformers`, and the timm key mapping.

Hugging Face (`gigatron convert to-hf CKPT OUT` on a vit checkpoint; `from-hf` back):
    objective classification -> ViTForImageClassification (prefix "vit.", + classifier)
    objective mae            -> ViTMAEForPreTraining (prefix "vit.", + decoder.*)
    objective none           -> ViTModel (no prefix; load with add_pooling_layer=False)
Names are the Hub's (transformers 4.x: encoder.layer.<i>.attention.attention.query, ...), which
transformers 4.57 reads as they are and 5.x converts on load to its own (layers.<i>.attention.q_proj).
Tensors change by reshape / permutation only:
  - the patchify stem's Linear (dim, C*p*p) is HF's Conv2d (dim, C, p, p) (the same (C, ph, pw) order);
  - HF's MAE predicts each patch as (p, p, C) values (its `patchify` puts channels last), ours as
    (C, p, p) (core/models/patch_embed.py): decoder_pred's rows are permuted; the loss, a per-patch
    mean over the normalised values, is the same.
Refused (no HF equivalent): the conv stem, average pooling, spatio-temporal patches (patch_frames > 1).
HF's ViTMAE takes `noise` (B, N) that fixes its mask: the same noise as core/objectives/mae.py gives
the same mask, so the exported model reproduces our reconstruction loss (tests/vit/test_vit_interop.py).

timm (`timm_state_dict` / `from_timm_state_dict`): VisionTransformer's names (cls_token, pos_embed,
patch_embed.proj, blocks.<i>.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, norm | fc_norm,
head), the fused qkv as our q, k, v stacked on dim 0; average pooling maps our `norm` to timm's
`fc_norm` (timm normalises the pooled token, as we do). MAWS releases its ViTs in this format.
timm cannot be imported beside the pinned CPU torch (shared notes): the mapping is tested against
timm only where timm imports, and by round trip everywhere.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch

from gigatron.core.models.vit import ViTConfig

_BLOCK = [("norm1", "layernorm_before"), ("attn.q", "attention.attention.query"), ("attn.k", "attention.attention.key"),
          ("attn.v", "attention.attention.value"), ("attn.proj", "attention.output.dense"),
          ("norm2", "layernorm_after"), ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense")]


def _check(m: ViTConfig) -> None:
    if m.stem != "patchify" or m.pool != "cls" or m.patch_frames != 1:
        raise ValueError(f"Hugging Face's ViT has a patchify stem, a class token and 2-D patches; this model has "
                         f"stem={m.stem}, pool={m.pool}, patch_frames={m.patch_frames} (use the timm mapping, or "
                         f"gigatron's own checkpoint)")


def _mae_pred_permutation(m: ViTConfig) -> torch.Tensor:
    """Index i of HF's (p, p, C) patch vector -> our (C, p, p) index."""
    p, C = m.patch, m.channels
    return torch.arange(C * p * p).reshape(C, p, p).permute(1, 2, 0).reshape(-1)


def name_map(m: ViTConfig) -> list[tuple[str, str]]:
    """(our parameter name, HF name) of every tensor of the model."""
    pre = "" if m.objective == "none" else "vit."
    out = [("embed.cls_token", f"{pre}embeddings.cls_token"), ("embed.pos_embed", f"{pre}embeddings.position_embeddings"),
           ("embed.stem.proj.weight", f"{pre}embeddings.patch_embeddings.projection.weight"),
           ("embed.stem.proj.bias", f"{pre}embeddings.patch_embeddings.projection.bias")]
    for i in range(m.blocks):
        for ours, hf in _BLOCK:
            out += [(f"blocks.{i}.{ours}.{w}", f"{pre}encoder.layer.{i}.{hf}.{w}") for w in ("weight", "bias")]
    out += [(f"norm.{w}", f"{pre}layernorm.{w}") for w in ("weight", "bias")]
    if m.objective == "classification":
        out += [(f"head.{w}", f"classifier.{w}") for w in ("weight", "bias")]
    if m.objective == "mae":
        out += [("decoder.input.mask_token", "decoder.mask_token"), ("decoder.input.pos_embed", "decoder.decoder_pos_embed")]
        out += [(f"decoder.input.embed.{w}", f"decoder.decoder_embed.{w}") for w in ("weight", "bias")]
        for i in range(m.decoder_depth):
            for ours, hf in _BLOCK:
                out += [(f"decoder.blocks.{i}.{ours}.{w}", f"decoder.decoder_layers.{i}.{hf}.{w}") for w in ("weight", "bias")]
        out += [(f"decoder.norm.{w}", f"decoder.decoder_norm.{w}") for w in ("weight", "bias")]
        out += [(f"decoder.pred.{w}", f"decoder.decoder_pred.{w}") for w in ("weight", "bias")]
    return out


def to_hf_tensor(m: ViTConfig, name: str, t: torch.Tensor) -> torch.Tensor:
    if name == "embed.stem.proj.weight":
        return t.reshape(t.shape[0], m.channels, m.patch, m.patch)
    if name.startswith("decoder.pred."):
        return t[_mae_pred_permutation(m)]
    return t


def from_hf_tensor(m: ViTConfig, name: str, t: torch.Tensor) -> torch.Tensor:
    if name == "embed.stem.proj.weight":
        return t.reshape(t.shape[0], -1)
    if name.startswith("decoder.pred."):
        return t[torch.argsort(_mae_pred_permutation(m))]
    return t


def hf_state_dict(m: ViTConfig, ours: dict) -> dict:
    _check(m)
    return {hf: to_hf_tensor(m, name, ours[name]).contiguous() for name, hf in name_map(m)}


def from_hf_state_dict(m: ViTConfig, hf: dict) -> dict:
    """HF tensors (4.x names, or 5.x names) -> our state dict; raises ValueError on a missing tensor."""
    hf = {_legacy_name(k): v for k, v in hf.items()}
    missing = [h for _, h in name_map(m) if h not in hf]
    if missing:
        raise ValueError(f"the Hugging Face checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    return {name: from_hf_tensor(m, name, hf[h]) for name, h in name_map(m)}


_V5 = [("attention.q_proj", "attention.attention.query"), ("attention.k_proj", "attention.attention.key"),
       ("attention.v_proj", "attention.attention.value"), ("attention.o_proj", "attention.output.dense"),
       ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense")]


def _legacy_name(name: str) -> str:
    """transformers 5's ViT names (vit.layers.<i>.attention.q_proj, ...) -> the Hub's 4.x names
    (vit.encoder.layer.<i>.attention.attention.query, ...); 4.x names pass unchanged."""
    name = re.sub(r"^(vit\.)?layers\.", r"\1encoder.layer.", name)
    name = name.replace("decoder.decoder_encoder.layer.", "decoder.decoder_layers.")  # what 5.24's save_pretrained writes
    for new, old in _V5:
        name = name.replace(new, old)
    return name


def hf_config(m: ViTConfig) -> dict:
    _check(m)
    common = {"hidden_size": m.dim, "num_hidden_layers": m.blocks, "num_attention_heads": m.heads,
              "intermediate_size": m.mlp_dim, "hidden_act": "gelu", "layer_norm_eps": m.norm_eps,
              "image_size": m.image_size, "patch_size": m.patch, "num_channels": m.channels, "qkv_bias": m.qkv_bias,
              "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "initializer_range": m.init_std,
              "torch_dtype": "float32", "dtype": "float32"}
    if m.objective == "mae":
        return {**common, "model_type": "vit_mae", "architectures": ["ViTMAEForPreTraining"],
                "decoder_hidden_size": m.decoder_dim, "decoder_num_hidden_layers": m.decoder_depth,
                "decoder_num_attention_heads": m.decoder_heads, "decoder_intermediate_size": m.decoder_mlp_dim,
                "mask_ratio": m.mask_ratio, "norm_pix_loss": m.norm_pix_loss}
    if m.objective == "classification":
        return {**common, "model_type": "vit", "architectures": ["ViTForImageClassification"],
                "id2label": {str(i): f"LABEL_{i}" for i in range(m.num_classes)},
                "label2id": {f"LABEL_{i}": i for i in range(m.num_classes)}}
    return {**common, "model_type": "vit", "architectures": ["ViTModel"]}


def model_config_from_hf(hf: dict) -> ViTConfig:
    mae = hf.get("model_type") == "vit_mae"
    archs = hf.get("architectures") or []
    objective = "mae" if mae else ("classification" if "ViTForImageClassification" in archs else "none")
    m = ViTConfig(dim=hf["hidden_size"], depth=hf["num_hidden_layers"], heads=hf["num_attention_heads"],
                  mlp_dim=hf["intermediate_size"], patch=hf["patch_size"], image_size=hf["image_size"],
                  channels=hf.get("num_channels", 3), norm_eps=hf.get("layer_norm_eps", 1e-12),
                  qkv_bias=hf.get("qkv_bias", True), objective=objective,
                  num_classes=len(hf.get("id2label") or {}) or 1000)
    if hf.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"hidden_act {hf['hidden_act']!r}: gigatron's ViT uses exact GELU")
    if mae:
        m.decoder_dim, m.decoder_depth = hf["decoder_hidden_size"], hf["decoder_num_hidden_layers"]
        m.decoder_heads, m.decoder_mlp_dim = hf["decoder_num_attention_heads"], hf["decoder_intermediate_size"]
        m.mask_ratio, m.norm_pix_loss = hf.get("mask_ratio", 0.75), hf.get("norm_pix_loss", False)
    return m


# -- checkpoint folders ------------------------------------------------------------------------------
def to_hf(ckpt: str, out: str, dtype: torch.dtype | None = None) -> dict:
    """A gigatron DCP checkpoint folder of a vit model -> a Hugging Face folder (model.safetensors)."""
    from gigatron.core.checkpoint.reader import CheckpointReader
    from gigatron.core.config_loader import build
    from gigatron.core.convert.safetensors_io import write_streaming

    with open(os.path.join(ckpt, "config.json")) as f:
        m = build(ViTConfig, json.load(f)["model"], "model.")
    _check(m)
    reader = CheckpointReader(ckpt)
    pairs = name_map(m)
    back = {hf: ours for ours, hf in pairs}
    produce = lambda hf: to_hf_tensor(m, back[hf], reader.read("model." + back[hf])).to(dtype or torch.float32)  # noqa: E731
    entries = [(hf, to_hf_tensor(m, ours, torch.empty(reader.shape("model." + ours), device="meta")).shape,
                dtype or torch.float32) for ours, hf in pairs]
    os.makedirs(out, exist_ok=True)
    total = write_streaming(os.path.join(out, "model.safetensors"), entries, lambda hf: produce(hf).contiguous())
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(hf_config(m), f, indent=2)
    return {"files": 1, "tensors": len(entries), "bytes": total}


def from_hf(hf_dir: str, ckpt: str) -> dict:
    """A Hugging Face ViT / ViTMAE folder -> a model-only gigatron checkpoint (checkpoint.load=CKPT)."""
    import dataclasses

    import torch.distributed.checkpoint as dcp

    from gigatron.core.checkpoint.store import commit
    from gigatron.core.config import Config
    from gigatron.core.convert.safetensors_io import map_file

    with open(os.path.join(hf_dir, "config.json")) as f:
        m = model_config_from_hf(json.load(f))
    hf = {}
    for file in sorted(n for n in os.listdir(hf_dir) if n.endswith(".safetensors")):
        hf.update(map_file(os.path.join(hf_dir, file)))
    model = from_hf_state_dict(m, hf)
    ckpt = os.path.abspath(ckpt)
    tmp = ckpt.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    dcp.save({"model": model}, checkpoint_id=tmp, no_dist=True)
    recipe = dataclasses.asdict(Config(model=m))
    recipe["data"]["format"], recipe["data"]["image_size"] = "webdataset", m.image_size
    commit(tmp, ckpt, None, {"step": 0, "world_size": 1, "source": os.path.abspath(hf_dir)}, recipe, {})
    return {"tensors": len(model)}


# -- timm --------------------------------------------------------------------------------------------
def timm_state_dict(m: ViTConfig, ours: dict) -> dict:
    """Our state dict -> timm VisionTransformer's (patchify stem, 2-D patches)."""
    if m.stem != "patchify" or m.patch_frames != 1:
        raise ValueError("timm's VisionTransformer has a 2-D patchify stem")
    out = {"pos_embed": ours["embed.pos_embed"],
           "patch_embed.proj.weight": ours["embed.stem.proj.weight"].reshape(m.dim, m.channels, m.patch, m.patch),
           "patch_embed.proj.bias": ours["embed.stem.proj.bias"]}
    if m.pool == "cls":
        out["cls_token"] = ours["embed.cls_token"]
    for i in range(m.blocks):
        b = f"blocks.{i}."
        for w in ("weight", "bias"):
            out[b + f"attn.qkv.{w}"] = torch.cat([ours[b + f"attn.{x}.{w}"] for x in "qkv"])
            for name in ("norm1", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
                out[b + f"{name}.{w}"] = ours[b + f"{name}.{w}"]
    norm = "norm" if m.pool == "cls" else "fc_norm"
    for w in ("weight", "bias"):
        out[f"{norm}.{w}"] = ours[f"norm.{w}"]
        if m.objective == "classification":
            out[f"head.{w}"] = ours[f"head.{w}"]
    return out


def from_timm_state_dict(m: ViTConfig, timm: dict) -> dict:
    """timm VisionTransformer's state dict -> ours (the inverse of `timm_state_dict`)."""
    out = {"embed.pos_embed": timm["pos_embed"], "embed.stem.proj.weight": timm["patch_embed.proj.weight"].reshape(m.dim, -1),
           "embed.stem.proj.bias": timm["patch_embed.proj.bias"]}
    if m.pool == "cls":
        out["embed.cls_token"] = timm["cls_token"]
    for i in range(m.blocks):
        b = f"blocks.{i}."
        for w in ("weight", "bias"):
            for x, part in zip("qkv", timm[b + f"attn.qkv.{w}"].chunk(3)):
                out[b + f"attn.{x}.{w}"] = part
            for name in ("norm1", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
                out[b + f"{name}.{w}"] = timm[b + f"{name}.{w}"]
    norm = "norm" if m.pool == "cls" else "fc_norm"
    for w in ("weight", "bias"):
        out[f"norm.{w}"] = timm[f"{norm}.{w}"]
        if m.objective == "classification":
            out[f"head.{w}"] = timm[f"head.{w}"]
    return out
