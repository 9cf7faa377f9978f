"""The `flowact` command. Each subcommand lives with its code; this file only wires them."""

from __future__ import annotations

import argparse
import importlib
import sys

# module that defines add_parser(subparsers) for each group of subcommands
SUBCOMMAND_MODULES = ("flowact.generate", "flowact.serving.cli", "flowact.client.cli")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flowact", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
