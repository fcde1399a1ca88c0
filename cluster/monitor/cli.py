"""`gigatron status RUN_DIR [--gpu KIND] [--threshold F] [--json]` and
`gigatron report RUN_DIR [--out FILE] [--gpu KIND] [--threshold F]`.

Both read files only and never raise: any failure prints `gigatron: ...` and returns 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gigatron", description="run monitoring")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("status", "one screen on a run"), ("report", "a self-contained HTML page on a run")):
        p = sub.add_parser(name, help=text)
        p.add_argument("run_dir", help="the run directory (run.dir)")
        p.add_argument("--gpu", default="h100-sxm", help="GPU kind of the planner's projection")
        p.add_argument("--threshold", type=float, default=None,
                       help="straggler threshold: slower than the median by this fraction (default: the "
                            "recipe's run.straggler_threshold, else 0.10)")
        if name == "status":
            p.add_argument("--json", action="store_true", help="machine-readable output")
        else:
            p.add_argument("--out", default=None, help="output file (default RUN_DIR/report.html)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point; `argv` starts with the subcommand name ("status" or "report")."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    try:
        if args.command == "status":
            from gigatron.cluster.monitor.status import build_status, format_status

            status = build_status(args.run_dir, gpu=args.gpu, threshold=args.threshold)
            print(json.dumps(status, indent=2, default=str) if args.json else format_status(status))
            return 0 if status.get("state") != "missing" else 2
        from gigatron.cluster.monitor.report import write_report

        if not os.path.isdir(args.run_dir):
            print(f"gigatron: {args.run_dir} is not a run directory", file=sys.stderr)
            return 2
        print(write_report(args.run_dir, args.out, gpu=args.gpu, threshold=args.threshold))
        return 0
    except Exception as err:  # noqa: BLE001 - no traceback for any run directory
        print(f"gigatron: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
