"""Pipeline parallelism end to end: the real trainer on real gloo processes, fp32, 5 steps, against
one process. Layouts share launches (spawning costs more than training the small model):
1 process: the references; 2: pp2 1F1B, pp2 interleaved (v=2) with 4 and 3 micro-batches, GPipe,
interleaved zero bubble (v=2); 4: pp4
1F1B, pp4 interleaved (v=2, 6 micro-batches, empty end chunks as in 405B), pp2 x dp2; 8: pp2 x tp2
(sequence parallel) x dp2."""

import json
import os

import pytest

from tests.distributed import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# the debug recipe, small and fp32, on byte tokens; 6 layers so that pp4 x v2 has 8 chunks
SMALL = ["model.dim=64", "model.n_layers=6", "model.n_heads=8", "model.n_kv_heads=2", "model.ffn_dim=128",
         "model.vocab_size=258", "train.seq_len=64", "train.micro_batch_size=1", "train.steps=5",
         "train.warmup_steps=2", "train.dtype=float32", "data.tokenizer=bytes", "data.max_mb=0.2",
         "run.tensorboard=false", "run.progress=false", "parallel.sequence_parallel=false"]
NO_TIMELINE = "parallel.pp_timeline_step=0"
INTERLEAVED = ["parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=2"]


def _train(rank, world_size, runs, data_dir):
    from gigatron.core.config import load_config
    from gigatron.core.train import Trainer
    from gigatron.parallel.mesh import init_distributed

    out = []
    for i, (overrides, save) in enumerate(runs):
        cfg = load_config(os.path.join(ROOT, "recipes/llama3_debug.yaml"),
                          SMALL + [f"data.path={data_dir}/bytes"] + overrides, world_size=world_size)
        cfg.run.dir = os.path.join(data_dir, f"ws{world_size}_run{i}")
        trainer = Trainer(cfg, init_distributed(cfg.parallel))
        steps = [trainer.train_step() for _ in range(5)]
        if save:
            trainer.save()
            trainer.checkpointer.wait()
        pipeline = trainer.pipeline
        out.append({"loss": [s["loss"] for s in steps], "grad_norm": [s["grad_norm"] for s in steps],
                    "run_dir": trainer.cfg.run.dir, "timeline": pipeline.timeline if pipeline else None,
                    "n_params": sum(p.numel() for p in trainer.model.parameters())})
    return out


def _layout(world_size, *runs):
    return [([f"parallel.dp={world_size // (r.get('pp', 1) * r.get('tp', 1))}",
              f"parallel.pp={r.get('pp', 1)}", f"parallel.tp={r.get('tp', 1)}",
              f"train.global_batch_size={r['gbs']}", *r.get("extra", [])], r.get("save", False)) for r in runs]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    data = str(tmp_path_factory.mktemp("pipeline"))
    single = run_distributed(_train, 1, _layout(1, {"gbs": 4, "save": True}, {"gbs": 3}, {"gbs": 6}, {"gbs": 8}), data)[0]
    pp2 = run_distributed(_train, 2, _layout(2, {"pp": 2, "gbs": 4, "save": True},
                                             {"pp": 2, "gbs": 4, "extra": INTERLEAVED},
                                             {"pp": 2, "gbs": 3, "extra": INTERLEAVED + [NO_TIMELINE]},
                                             {"pp": 2, "gbs": 4, "extra": ["parallel.pp_schedule=gpipe", NO_TIMELINE]},
                                             {"pp": 2, "gbs": 4, "extra": ["parallel.pp_schedule=zero_bubble",
                                                                          "parallel.pp_virtual_stages=2", NO_TIMELINE]}),
                           data)[0]
    pp4 = run_distributed(_train, 4, _layout(4, {"pp": 4, "gbs": 4, "extra": [NO_TIMELINE]},
                                             {"pp": 4, "gbs": 6, "extra": INTERLEAVED + [NO_TIMELINE]},
                                             {"pp": 2, "gbs": 8, "extra": [NO_TIMELINE]}), data)[0]
    pp2tp2dp2 = run_distributed(_train, 8, _layout(8, {"pp": 2, "tp": 2, "gbs": 8,
                                                       "extra": [NO_TIMELINE, "parallel.sequence_parallel=true"]}),
                                data)[0]
    ref = dict(zip((4, 3, 6, 8), single))
    return {"single": ref, "pp2_1f1b": (pp2[0], ref[4]), "pp2_interleaved_m4": (pp2[1], ref[4]),
            "pp2_interleaved_m3": (pp2[2], ref[3]), "pp2_gpipe": (pp2[3], ref[4]), "pp2_zero_bubble": (pp2[4], ref[4]),
            "pp4_1f1b": (pp4[0], ref[4]),
            "pp4_interleaved_m6": (pp4[1], ref[6]), "pp2_dp2": (pp4[2], ref[8]), "pp2_tp2_dp2": (pp2tp2dp2[0], ref[8])}


@pytest.mark.parametrize("layout", ["pp2_1f1b", "pp2_interleaved_m4", "pp2_interleaved_m3", "pp2_gpipe",
                                    "pp2_zero_bubble", "pp4_1f1b",
                                    "pp4_interleaved_m6", "pp2_dp2", "pp2_tp2_dp2"])
def test_losses_match_single_process(runs, layout):
    """fp32; the pipeline computes the same per-token terms in the same micro-batches, so only
    summation order differs (measured <= 1e-7 relative); 1e-5 as for FSDP."""
    got, ref = runs[layout]
    for a, b in zip(got["loss"], ref["loss"]):
        assert abs(a - b) <= 1e-5 * abs(b), (layout, got["loss"], ref["loss"])
    for a, b in zip(got["grad_norm"], ref["grad_norm"]):  # grad norm summed over pp ranks before clipping
        assert abs(a - b) <= 1e-4 * abs(b), (layout, got["grad_norm"], ref["grad_norm"])


def test_rank_holds_only_its_stages(runs):
    got, ref = runs["pp2_1f1b"]
    assert 0 < got["n_params"] < ref["n_params"]  # rank 0: embedding + first half of the layers


def test_checkpoint_keys_do_not_depend_on_the_split(runs):
    """Stage modules keep the full model's names: a pp=2 checkpoint (both ranks) holds exactly the
    keys of the single-process one, with the same shapes."""
    from torch.distributed.checkpoint import FileSystemReader

    def model_keys(run):
        path = os.path.join(run["run_dir"], "checkpoints", "step_00000005")
        meta = FileSystemReader(path).read_metadata().state_dict_metadata
        return {k: tuple(v.size) for k, v in meta.items() if k.startswith("model.")}

    single, pp2 = model_keys(runs["single"][4]), model_keys(runs["pp2_1f1b"][0])
    assert single and single == pp2
    assert "model.layers.5.feed_forward.w2.weight" in pp2 and "model.tok_embeddings.weight" in pp2


@pytest.mark.parametrize("layout", ["pp2_1f1b", "pp2_interleaved_m4"])
def test_timeline_written_with_bubble(runs, layout):
    got, _ = runs[layout]
    stats = got["timeline"]
    assert os.path.getsize(os.path.join(got["run_dir"], "pipeline_timeline.png")) > 10_000
    with open(os.path.join(got["run_dir"], "pipeline_timeline.json")) as f:
        record = json.load(f)
    v = 2 if "interleaved" in layout else 1
    per_rank = record["events"]
    assert len(per_rank) == 2
    for rank, events in enumerate(per_rank):  # every (stage, micro-batch) ran forward and backward once
        stages = {rank + k * 2 for k in range(v)}
        for kind in ("F", "B"):
            assert sorted((e["stage"], e["mb"]) for e in events if e["kind"] == kind) == \
                sorted((s, m) for s in stages for m in range(4))
    assert stats["bubble_theory"] == pytest.approx(1 / (v * 4 + 1))
    for key in ("bubble_wall", "bubble_replay"):
        assert 0 < stats[key] < 1
