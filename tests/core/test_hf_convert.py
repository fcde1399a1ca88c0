"""Conversion to and from Hugging Face, proven against transformers: a checkpoint trained by
gigatron (tp=2 x pp=2, Llama 3 tokenizer, tiny dims) -> `to_hf` -> `LlamaForCausalLM.from_pretrained`
loads every tensor, gives the same float32 logits (also at positions past 8,192, where the llama3
RoPE scaling acts) and the same greedy generation; the tokenizer files encode like gigatron's
tokenizer; from_hf -> to_hf is bit-exact; and the converted checkpoint starts a dp=2 run."""

import json
import os
import subprocess
import sys

import pytest
import torch

import transformers

from gigatron.core.checkpoint.reader import CheckpointReader
from gigatron.core.models.llama import LlamaConfig
from gigatron.core.convert.hf import from_hf, to_hf
from gigatron.core.models.llama import Llama
from gigatron.core.train import main as train_main
from tests.distributed import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPE = os.path.join(ROOT, "recipes/llama3_debug.yaml")
TINY = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=128",
        "train.seq_len=64", "model.max_seq_len=16384", "train.warmup_steps=1", "run.tensorboard=false"]
TRAINED_LAYOUT = ["parallel.tp=2", "parallel.pp=2", "parallel.dp=1"]  # the converter reads any layout


def _train(rank, world_size, run_dir, overrides):
    args = [RECIPE, "--set", f"run.dir={run_dir}", "--set", "run.progress=false"]
    assert train_main(args + sum((["--set", o] for o in overrides), [])) == 0


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf")
    data = [f"data.path={tmp}/data/l3", "data.max_mb=0.2"]
    run_distributed(_train, 4, str(tmp / "run"), TINY + data + ["train.steps=3", *TRAINED_LAYOUT])
    ckpt = str(tmp / "run" / "checkpoints" / "step_00000003")
    info = to_hf(ckpt, str(tmp / "hf"), max_shard_bytes=20_000_000)  # several shards on purpose
    assert info["files"] > 1
    return tmp, ckpt, str(tmp / "hf")


def _gigatron_model(ckpt: str) -> Llama:
    with open(os.path.join(ckpt, "config.json")) as f:
        model = Llama(LlamaConfig(**json.load(f)["model"]))
    reader = CheckpointReader(ckpt)
    model.load_state_dict({k[len("model."):]: reader.read(k) for k in reader.keys("model.")}, strict=False)
    return model.eval()


def _text() -> str:
    from pydoc_data.topics import topics

    return "\n".join(topics[k] for k in sorted(topics))


@pytest.fixture(scope="module")
def hf_model(converted):
    _, _, out = converted
    model, info = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    return model.eval(), info


def test_loads_every_tensor_and_config(converted, hf_model):
    _, info = hf_model
    assert info["missing_keys"] == set() or not info["missing_keys"], info
    assert not info["unexpected_keys"] and not info["mismatched_keys"], info
    cfg = json.load(open(os.path.join(converted[2], "config.json")))
    assert cfg["bos_token_id"] == 128000 and cfg["eos_token_id"] == 128001
    assert cfg["rope_scaling"]["original_max_position_embeddings"] == 8192
    assert cfg["rope_parameters"]["rope_theta"] == cfg["rope_theta"] == 500000.0


def test_logits_match_including_positions_past_8192(converted, hf_model):
    from gigatron.data_pipeline.tokenizer import Llama3Tokenizer

    ids = torch.tensor([Llama3Tokenizer().encode(_text())[:384]])
    ours_model, (hf, _) = _gigatron_model(converted[1]), hf_model
    for start in (0, 8000, 16000):  # llama3 scaling: wavelengths beyond 8192/1 are slowed 8x
        positions = torch.arange(start, start + ids.shape[1])
        with torch.no_grad():
            ours = ours_model(ids, positions=positions)
            theirs = hf(ids, position_ids=positions[None]).logits
        diff = (ours - theirs).abs().max().item()
        print(f"positions {start}..{start + ids.shape[1] - 1}: logits max abs diff {diff:.2e}")
        assert diff < 1e-4, (start, diff)
        assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_greedy_generation_matches(converted, hf_model):
    from gigatron.data_pipeline.tokenizer import Llama3Tokenizer

    prompt = torch.tensor([Llama3Tokenizer().encode("def fibonacci(n):\n    ", bos=True)])
    ours_model, (hf, _) = _gigatron_model(converted[1]), hf_model
    ids = prompt
    with torch.no_grad():
        for _ in range(20):
            ids = torch.cat([ids, ours_model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
        theirs = hf.generate(prompt, max_new_tokens=20, do_sample=False, attention_mask=torch.ones_like(prompt),
                             pad_token_id=0)
    assert theirs.tolist() == ids.tolist()


def test_tokenizer_files_encode_like_gigatron(converted):
    from gigatron.data_pipeline.tokenizer import Llama3Tokenizer

    hf_tok = transformers.AutoTokenizer.from_pretrained(converted[2])
    ours = Llama3Tokenizer()
    text = _text()[:200_000] + "\nünïcødé 日本語 emoji 🙂 tabs\t\t and   spaces  \r\n 12345678"
    assert hf_tok.encode(text, add_special_tokens=False) == ours.encode(text)
    assert hf_tok.encode("hello world") == ours.encode("hello world", bos=True)
    assert hf_tok.convert_tokens_to_ids("<|eot_id|>") == 128009 and len(hf_tok) == 128256


def test_round_trip_is_bit_exact_and_trainable(converted):
    from safetensors.torch import load_file

    tmp, ckpt, out = converted
    from_hf(out, str(tmp / "from_hf"))
    cli = [sys.executable, "-m", "gigatron.core.cli", "convert", "to-hf", str(tmp / "from_hf"), str(tmp / "hf2"),
           "--max-shard-gb", "0.02", "--no-tokenizer"]  # the command line, as users run it
    subprocess.run(cli, check=True, cwd=ROOT)
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert index == json.load(open(tmp / "hf2" / "model.safetensors.index.json"))
    for file in sorted(set(index["weight_map"].values())):
        a, b = load_file(os.path.join(out, file)), load_file(str(tmp / "hf2" / file))
        assert a.keys() == b.keys()
        for name in a:
            assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    assert json.load(open(os.path.join(out, "config.json"))) == json.load(open(tmp / "hf2" / "config.json"))
    # a model-only checkpoint starts a run: fresh optimizer, step 0
    data = [f"data.path={tmp}/data/l3", "data.max_mb=0.2"]
    run_distributed(_train, 2, str(tmp / "run2"), TINY + data + ["train.steps=1", "parallel.dp=2",
                                                                  f"checkpoint.load={tmp}/from_hf"])
    metrics = [json.loads(line) for line in open(tmp / "run2" / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == [1]
