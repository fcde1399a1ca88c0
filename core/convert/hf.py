"""Llama checkpoints to and from Hugging Face `LlamaForCausalLM` (safetensors, sharded).

Name mapping (gigatron = Meta's names; RoPE is already in HF's half-split layout, see
core/models/llama.py, so conversion renames and never permutes q/k):

    tok_embeddings.weight                       model.embed_tokens.weight
    layers.{i}.attention.{wq,wk,wv,wo}.weight   model.layers.{i}.self_attn.{q,k,v,o}_proj.weight
    layers.{i}.feed_forward.w1.weight           model.layers.{i}.mlp.gate_proj.weight
    layers.{i}.feed_forward.w3.weight           model.layers.{i}.mlp.up_proj.weight
    layers.{i}.feed_forward.w2.weight           model.layers.{i}.mlp.down_proj.weight
    layers.{i}.attention_norm.weight            model.layers.{i}.input_layernorm.weight
    layers.{i}.ffn_norm.weight                  model.layers.{i}.post_attention_layernorm.weight
    norm.weight                                 model.norm.weight
    output.weight                               lm_head.weight

`to_hf` streams: it reads one tensor from the DCP checkpoint (any layout), writes it, frees it, so
peak memory is about one tensor (benchmarks/bench_convert.py measures it). `from_hf` memory-maps
the safetensors files and writes a model-only DCP checkpoint, committed like a training one.
config.json carries both transformers-5 (`rope_parameters`, `dtype`) and transformers-4
(`rope_theta`, `rope_scaling`, `torch_dtype`) keys: 4.x silently ignores the former.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil

import torch

from gigatron.core.checkpoint.reader import CheckpointReader
from gigatron.core.config import Config
from gigatron.core.models.llama import LlamaConfig
from gigatron.core.convert.safetensors_io import map_file, nbytes, write_streaming

TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
       "output.weight": "lm_head.weight"}
LAYER = {"attention.wq.weight": "self_attn.q_proj.weight", "attention.wk.weight": "self_attn.k_proj.weight",
         "attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
         "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w3.weight": "mlp.up_proj.weight",
         "feed_forward.w2.weight": "mlp.down_proj.weight", "attention_norm.weight": "input_layernorm.weight",
         "ffn_norm.weight": "post_attention_layernorm.weight"}
_LAYER_BACK = {v: k for k, v in LAYER.items()}
_TOP_BACK = {v: k for k, v in TOP.items()}
LLAMA3_BOS, LLAMA3_EOS = 128000, 128001


def to_hf_name(name: str) -> str:
    if name in TOP:
        return TOP[name]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if not m or m.group(2) not in LAYER:
        raise KeyError(f"no Hugging Face name for gigatron parameter {name!r}")
    return f"model.layers.{m.group(1)}.{LAYER[m.group(2)]}"


def from_hf_name(name: str) -> str:
    if name in _TOP_BACK:
        return _TOP_BACK[name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if not m or m.group(2) not in _LAYER_BACK:
        raise KeyError(f"no gigatron name for Hugging Face tensor {name!r}")
    return f"layers.{m.group(1)}.{_LAYER_BACK[m.group(2)]}"


def _order(name: str) -> tuple:
    """embed, layer 0..L-1 (in HF's file order), norm, lm_head."""
    m = re.match(r"layers\.(\d+)\.", name)
    return (1, int(m.group(1)), name) if m else ({"tok_embeddings.weight": 0, "norm.weight": 2}.get(name, 3), 0, name)


def hf_config(m: LlamaConfig, dtype: torch.dtype, bos: int = LLAMA3_BOS, eos: int = LLAMA3_EOS) -> dict:
    dtype_name = str(dtype).removeprefix("torch.")
    rope = {"rope_type": "default", "rope_theta": m.rope_theta}
    scaling = None
    if m.rope_scaling:
        scaling = {"rope_type": "llama3", "factor": m.rope_scaling_factor, "low_freq_factor": m.rope_low_freq_factor,
                   "high_freq_factor": m.rope_high_freq_factor,
                   "original_max_position_embeddings": m.rope_original_max_len}
        rope = {**scaling, "rope_theta": m.rope_theta}
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": m.dim, "intermediate_size": m.ffn_dim, "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads, "num_key_value_heads": m.n_kv_heads, "head_dim": m.head_dim,
        "vocab_size": m.vocab_size, "rms_norm_eps": m.norm_eps, "hidden_act": "silu",
        "max_position_embeddings": max(m.max_seq_len, 131072 if m.rope_scaling else 0),
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "pretraining_tp": 1,
        "tie_word_embeddings": m.tie_embeddings, "bos_token_id": bos, "eos_token_id": eos,
        "initializer_range": m.init_std, "use_cache": True,
        "rope_theta": m.rope_theta, "rope_scaling": scaling, "rope_parameters": rope,  # transformers 4 and 5
        "torch_dtype": dtype_name, "dtype": dtype_name,
    }


def model_config_from_hf(hf: dict) -> LlamaConfig:
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type") == "llama3" else None)
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    if head_dim * hf["num_attention_heads"] != hf["hidden_size"]:
        raise ValueError(f"head_dim={head_dim} x heads != hidden_size={hf['hidden_size']}: gigatron derives "
                         f"head_dim = dim / n_heads")
    m = LlamaConfig(dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
                    n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                    ffn_dim=hf["intermediate_size"], vocab_size=hf["vocab_size"], norm_eps=hf["rms_norm_eps"],
                    rope_theta=hf.get("rope_theta") or rope.get("rope_theta", 10000.0),
                    rope_scaling=scaling is not None, max_seq_len=hf.get("max_position_embeddings", 131072),
                    tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
    if scaling:
        m.rope_scaling_factor = scaling["factor"]
        m.rope_low_freq_factor = scaling["low_freq_factor"]
        m.rope_high_freq_factor = scaling["high_freq_factor"]
        m.rope_original_max_len = scaling["original_max_position_embeddings"]
    return m


def to_hf(ckpt: str, out: str, max_shard_bytes: int = 5 * 10**9, dtype: torch.dtype | None = None,
          tokenizer: bool = True) -> dict:
    """Write `ckpt` (a gigatron DCP checkpoint folder) as a Hugging Face Llama folder `out`.
    dtype: cast on the way (default: as stored, fp32 for training checkpoints)."""
    with open(os.path.join(ckpt, "config.json")) as f:
        recipe = json.load(f)
    m = LlamaConfig(**recipe["model"])
    reader = CheckpointReader(ckpt)
    names = sorted((k[len("model."):] for k in reader.keys("model.")), key=_order)
    if m.tie_embeddings:  # one tensor under two names: Hugging Face stores the embedding and ties lm_head
        names = [n for n in names if n != "output.weight"]
    entries = [(to_hf_name(n), reader.shape("model." + n), dtype or reader.dtype("model." + n)) for n in names]
    shards, size = [[]], 0
    for entry in entries:  # greedy: a new file once the current one would pass max_shard_bytes
        b = nbytes(entry[1], entry[2])
        if shards[-1] and size + b > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += b
    os.makedirs(out, exist_ok=True)
    back = {to_hf_name(n): "model." + n for n in names}
    weight_map, total = {}, 0
    for k, shard in enumerate(shards, 1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        total += write_streaming(os.path.join(out, file), shard,
                                 lambda name: reader.read(back[name]).to(dtype or reader.dtype(back[name])))
        weight_map.update({name: file for name, _, _ in shard})
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    tok_name = recipe.get("data", {}).get("tokenizer", "llama3")
    bos, eos = LLAMA3_BOS, LLAMA3_EOS
    if tok_name != "llama3":
        from gigatron.data_pipeline.tokenizer import build_tokenizer

        t = build_tokenizer(tok_name)
        bos, eos = t.bos_id, t.eos_id
    config = hf_config(m, entries[0][2], bos, eos)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": bos, "eos_token_id": eos, "do_sample": False}, f, indent=2)
    if tokenizer and tok_name == "llama3":
        from gigatron.core.convert.tokenizer import write_llama3_tokenizer

        write_llama3_tokenizer(out)
    return {"files": len(shards), "tensors": len(entries), "bytes": total}


def from_hf(hf_dir: str, ckpt: str, tokenizer: str = "llama3") -> dict:
    """Write the Hugging Face Llama folder `hf_dir` as a model-only gigatron checkpoint folder
    `ckpt` (load it with checkpoint.load=CKPT: fresh optimizer, step 0, any layout)."""
    import torch.distributed.checkpoint as dcp

    from gigatron.core.checkpoint.store import commit

    with open(os.path.join(hf_dir, "config.json")) as f:
        m = model_config_from_hf(json.load(f))
    files = sorted(n for n in os.listdir(hf_dir) if n.endswith(".safetensors"))
    model = {}
    for file in files:
        for name, tensor in map_file(os.path.join(hf_dir, file)).items():
            model[from_hf_name(name)] = tensor
    missing = {n for n, _ in _expected(m)} - set(model)
    if missing:
        raise ValueError(f"{hf_dir} lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
    if m.tie_embeddings:  # the trainer's state dict names the shared tensor twice
        model["output.weight"] = model["tok_embeddings.weight"]
    ckpt = os.path.abspath(ckpt)
    tmp = ckpt.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    dcp.save({"model": model}, checkpoint_id=tmp, no_dist=True)
    recipe = dataclasses.asdict(Config(model=m))
    recipe["data"]["tokenizer"] = tokenizer
    commit(tmp, ckpt, None, {"step": 0, "world_size": 1, "source": os.path.abspath(hf_dir)}, recipe, {})
    return {"tensors": len(model)}


def _expected(m: LlamaConfig):
    with torch.device("meta"):
        from gigatron.core.models.llama import Llama

        return list(Llama(m).named_parameters())
