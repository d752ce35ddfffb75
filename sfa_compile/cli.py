"""The ``sfa-compile`` command line. Subcommands read their defaults from SFAConfig and the library."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from .demo import format_demo, run_demo

    identity_error, rows = run_demo(length=args.length, head_dim=args.head_dim)
    print(format_demo(identity_error, rows, args.head_dim))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sfa-compile", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="SFA vs dense attention on a built-in default problem (no downloads)")
    demo.add_argument("--length", type=int, default=512, help="sequence length (default: 512)")
    demo.add_argument("--head-dim", type=int, default=64, choices=[32, 64, 128], help="head dim (default: 64)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
