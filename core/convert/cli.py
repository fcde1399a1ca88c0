"""`gigatron convert to-hf CKPT OUT` and `gigatron convert from-hf HF_DIR CKPT`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gigatron convert", description="Llama checkpoints to and from Hugging Face")
    sub = parser.add_subparsers(dest="direction", required=True)
    to = sub.add_parser("to-hf", help="gigatron DCP checkpoint folder -> Hugging Face folder (safetensors)")
    to.add_argument("ckpt", help="checkpoint folder, e.g. runs/x/checkpoints/step_00001000 (any layout)")
    to.add_argument("out", help="output folder for LlamaForCausalLM.from_pretrained")
    to.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="cast on the way; default: as stored (float32 for training checkpoints)")
    to.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors file (GB)")
    to.add_argument("--no-tokenizer", action="store_true", help="skip tokenizer.json (saves ~20 s)")
    back = sub.add_parser("from-hf", help="Hugging Face Llama folder -> model-only gigatron checkpoint")
    back.add_argument("hf_dir")
    back.add_argument("ckpt", help="checkpoint folder to create; train from it with --set checkpoint.load=CKPT")
    back.add_argument("--tokenizer", choices=["llama3", "bytes"], default="llama3", help="recorded in config.json")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    warnings.filterwarnings("ignore", message=".*single process.*")
    import torch

    from gigatron.core.convert.hf import from_hf, to_hf

    start = time.perf_counter()
    try:
        if args.direction == "to-hf":
            dtype = getattr(torch, args.dtype) if args.dtype else None
            ckpt = resolve_checkpoint(args.ckpt)
            if _model_name(ckpt) == "vit":  # ViT / ViTMAE (core/convert/hf_vit.py)
                from gigatron.core.convert.hf_vit import to_hf as vit_to_hf

                info = vit_to_hf(ckpt, args.out, dtype)
            else:
                info = to_hf(ckpt, args.out, int(args.max_shard_gb * 1e9), dtype, tokenizer=not args.no_tokenizer)
            print(f"wrote {args.out} from {ckpt}: {info['tensors']} tensors, {info['bytes'] / 1e9:.2f} GB in "
                  f"{info['files']} files ({time.perf_counter() - start:.1f} s)")
        else:
            if not os.path.isfile(os.path.join(args.hf_dir, "config.json")):
                raise ConvertError(f"{args.hf_dir} is not a Hugging Face model folder (no config.json)")
            with open(os.path.join(args.hf_dir, "config.json")) as f:
                model_type = json.load(f).get("model_type")
            if model_type in ("vit", "vit_mae"):
                from gigatron.core.convert.hf_vit import from_hf as vit_from_hf

                info = vit_from_hf(args.hf_dir, args.ckpt)
            else:
                info = from_hf(args.hf_dir, args.ckpt, tokenizer=args.tokenizer)
            print(f"wrote {args.ckpt}: {info['tensors']} tensors ({time.perf_counter() - start:.1f} s)")
    except (ConvertError, ValueError, KeyError, OSError) as err:
        print(f"gigatron convert: {err}", file=sys.stderr)
        return 2
    return 0


def _model_name(ckpt: str) -> str:
    with open(os.path.join(ckpt, "config.json")) as f:
        return json.load(f).get("model", {}).get("name", "llama3")


class ConvertError(ValueError):
    """A refusal with a complete message for the user."""


def resolve_checkpoint(path: str) -> str:
    """A step folder as given; a run's checkpoints folder (or the run folder itself) resolves to its
    `latest` committed step. Anything else is refused with a message, not a traceback."""
    from gigatron.core.checkpoint import latest

    if os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(os.path.join(path, ".metadata")):
        return path
    for root in (path, os.path.join(path, "checkpoints")):
        if os.path.isdir(root):
            found = latest(root)
            if found:
                return found
    if not os.path.exists(path):
        raise ConvertError(f"{path} does not exist")
    raise ConvertError(f"{path} is neither a checkpoint step folder (with .metadata and config.json) nor a "
                       f"checkpoints folder with a committed step")


if __name__ == "__main__":
    sys.exit(main())
