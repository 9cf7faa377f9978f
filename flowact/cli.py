"""The `flowact` command. Each subcommand lives with its code; this file only wires them.

Only the chosen subcommand's module is imported, so light commands (`probe`, `drain`, used by
Kubernetes probes and preStop hooks) start without importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module whose add_parser(subparsers) defines it (one module may define several)
COMMANDS = {
    "generate": "flowact.generate",
    "serve": "flowact.serving.cli",
    "drain": "flowact.serving.cli",
    "probe": "flowact.serving.cli",
    "gateway": "flowact.serving.gateway",
    "stream": "flowact.client.cli",
    "web": "flowact.web.cli",
    "demo": "flowact.serving.demo",
    "export": "flowact.serving.repository_cli",  # flowact.export.cli's steps, plus `repository`
    "bench": "flowact.benchmarks.serve_bench",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="flowact", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    chosen = argv[0] if argv and argv[0] in COMMANDS else None
    modules = [COMMANDS[chosen]] if chosen else list(dict.fromkeys(COMMANDS.values()))
    for module in modules:
        importlib.import_module(module).add_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
