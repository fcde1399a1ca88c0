"""`gigatron convert to-hf CKPT OUT` and `gigatron convert from-hf HF_DIR CKPT`."""

from __future__ import annotations

import argparse
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
    if args.direction == "to-hf":
        dtype = getattr(torch, args.dtype) if args.dtype else None
        info = to_hf(args.ckpt, args.out, int(args.max_shard_gb * 1e9), dtype, tokenizer=not args.no_tokenizer)
        print(f"wrote {args.out}: {info['tensors']} tensors, {info['bytes'] / 1e9:.2f} GB in {info['files']} "
              f"files ({time.perf_counter() - start:.1f} s)")
    else:
        info = from_hf(args.hf_dir, args.ckpt, tokenizer=args.tokenizer)
        print(f"wrote {args.ckpt}: {info['tensors']} tensors ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
