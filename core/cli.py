"""The `gigatron` command.

    gigatron train RECIPE [--set k=v]       train in this process (torchrun: -m gigatron.core.train)
    gigatron validate RECIPE [--world-size N] [--set k=v]   check a recipe, start nothing
    gigatron layout RECIPE [--set k=v]      print world_size and degrees (used by cluster/launch.sh)
    gigatron plan RECIPE [--gpus N] [--gpu h100-sxm] [--search] [--json]
                                            parameters, memory per GPU, step time and MFU at full scale
    gigatron status RUN_DIR                 one screen: progress, loss trend, throughput, stragglers, restarts
    gigatron report RUN_DIR                 a self-contained HTML report of a run
    gigatron prepare-images SRC OUT         image folder / labelled arrays -> WebDataset shards (+ DALI index)
    gigatron prepare-videos SRC OUT         video clips -> WebDataset shards (frames or clips, captions)
    gigatron prepare-text SOURCES --out P   tokenize text into token shards
    gigatron convert to-hf CKPT OUT         checkpoint -> Hugging Face Llama (safetensors, config, tokenizer)
    gigatron convert from-hf HF_DIR CKPT    Hugging Face Llama -> model-only checkpoint (checkpoint.load=CKPT)
    gigatron sample CKPT --prompt TEXT      Movie Gen: videos from a checkpoint (EMA weights), PNG grid + mp4
"""

from __future__ import annotations

import argparse
import sys

from gigatron.core.config import ConfigError, load_config


def _recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="YAML recipe, e.g. recipes/llama3_debug.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field, e.g. --set parallel.dp=4 (repeatable)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    routes = {"prepare-images": "gigatron.data_pipeline.prepare_images", "prepare-videos": "gigatron.data_pipeline.prepare_videos",
              "plan": "gigatron.cluster.planner.cli", "status": "gigatron.cluster.monitor.cli",
              "report": "gigatron.cluster.monitor.cli"}
    if argv and argv[0] in routes:  # each tool parses its own arguments and reports its own errors
        import importlib

        module = importlib.import_module(routes[argv[0]])
        return module.main(argv if argv[0] in ("plan", "status", "report") else argv[1:]) or 0
    if argv and argv[0] == "prepare-text":
        from gigatron.data_pipeline.prepare import main as prepare_main

        return prepare_main(argv[1:]) or 0
    if argv and argv[0] == "convert":  # its own parser; transformers is imported only for tokenizer files
        from gigatron.core.convert.cli import main as convert_main

        return convert_main(argv[1:])
    if argv and argv[0] == "sample":  # its own parser and one-line errors
        from gigatron.core.sample import main as sample_main

        return sample_main(argv[1:])
    if argv and argv[0] == "train":
        from gigatron.core.train import main as train_main

        return train_main(argv[1:])
    parser = argparse.ArgumentParser(prog="gigatron", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("train", help="train in this process")
    sub.add_parser("prepare-text", help="tokenize text into token shards")
    sub.add_parser("convert", help="checkpoints to and from Hugging Face (convert to-hf|from-hf -h)")
    sub.add_parser("sample", help="Movie Gen: videos from a checkpoint (gigatron sample -h)")
    p_validate = sub.add_parser("validate", help="check a recipe without starting anything")
    _recipe_args(p_validate)
    p_validate.add_argument("--world-size", type=int, default=None, help="processes the job will have")
    p_layout = sub.add_parser("layout", help="print the world size and degrees of a recipe")
    _recipe_args(p_layout)
    for name, text in [("plan", "memory, step time and MFU at full scale (gigatron plan -h)"),
                       ("status", "one screen on a run directory"), ("report", "HTML report of a run directory"),
                       ("prepare-images", "images -> WebDataset shards"), ("prepare-videos", "videos -> WebDataset shards")]:
        sub.add_parser(name, help=text)
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.recipe, args.overrides, world_size=getattr(args, "world_size", None))
    except ConfigError as err:
        print(f"gigatron: {err}", file=sys.stderr)
        return 2
    p = cfg.parallel
    if args.command == "validate":
        print(f"ok: {args.recipe} (world size {p.world_size})")
    elif args.command == "layout":
        print(f"world_size={p.world_size} tp={p.tp} cp={p.cp} pp={p.pp} dp={p.dp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
