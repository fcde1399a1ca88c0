"""Tied input/output embeddings (Llama 3.2 1B and 3B tie lm_head to the embedding), end to end:

a tied LlamaForCausalLM made by transformers -> `gigatron convert from-hf` -> trains 3 steps under
tp2 (tensor parallelism distributes the embedding and the output apart; the plan re-ties them) with
the two names still one tensor in the checkpoint -> `gigatron convert to-hf` given the run's
checkpoints folder (resolved to its latest step) -> transformers loads it with no missing,
unexpected or mismatched key, and its float32 logits equal ours within 1e-4 (measured ~1e-6).
Also: convert refuses a missing path and a non-checkpoint folder with one message, exit 2."""

import json
import os

import torch
import transformers

from gigatron.core.checkpoint.reader import CheckpointReader
from gigatron.core.convert.cli import main as convert_main
from gigatron.core.models.llama import Llama, LlamaConfig
from gigatron.core.train import main as train_main
from tests.distributed import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPE = os.path.join(ROOT, "recipes/llama3_debug.yaml")


def _train(rank, world_size, run_dir, overrides):
    args = [RECIPE, "--set", f"run.dir={run_dir}"] + sum((["--set", o] for o in overrides), [])
    return train_main(args)


def test_tied_embeddings_convert_both_ways_and_train(tmp_path, capsys):
    hf_cfg = transformers.LlamaConfig(vocab_size=258, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                      max_position_embeddings=256, rope_theta=500000.0)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(hf_cfg).save_pretrained(tmp_path / "hf_in")
    assert convert_main(["from-hf", str(tmp_path / "hf_in"), str(tmp_path / "start"), "--tokenizer", "bytes"]) == 0
    overrides = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=128",
                 "model.vocab_size=258", "model.tie_embeddings=true", "model.rope_scaling=false",
                 "model.max_seq_len=256", "train.seq_len=64", "train.steps=3", "train.warmup_steps=1",
                 "train.dtype=float32", "data.tokenizer=bytes", "data.max_mb=0.2", f"data.path={tmp_path}/data/bytes",
                 "run.tensorboard=false", "run.progress=false", "parallel.tp=2", "parallel.dp=1",
                 f"checkpoint.load={tmp_path / 'start'}"]
    assert run_distributed(_train, 2, str(tmp_path / "run"), overrides) == [0, 0]
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert losses[-1] < losses[0]
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000003"
    reader = CheckpointReader(str(ckpt))
    assert torch.equal(reader.read("model.output.weight"), reader.read("model.tok_embeddings.weight"))

    assert convert_main(["to-hf", str(tmp_path / "run" / "checkpoints"), str(tmp_path / "hf_out"),
                         "--no-tokenizer"]) == 0
    hf, info = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf_out", dtype=torch.float32,
                                                             output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with open(ckpt / "config.json") as f:
        ours = Llama(LlamaConfig(**json.load(f)["model"])).eval()
    ours.load_state_dict({k[len("model."):]: reader.read(k) for k in reader.keys("model.")}, strict=False)
    ours.reset_buffers()
    assert ours.output.weight is ours.tok_embeddings.weight
    tokens = torch.randint(0, 258, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(tokens) - hf.eval()(input_ids=tokens).logits).abs().max().item()
    assert diff <= 1e-4, diff

    capsys.readouterr()
    assert convert_main(["to-hf", str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 2
    assert convert_main(["to-hf", str(tmp_path / "hf_in"), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "neither a checkpoint" in err and "Traceback" not in err
