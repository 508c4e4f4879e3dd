"""The ``mvcckv`` command: ``serve``, ``snapshot save|restore|status``, ``repair``.

Each subcommand's flags and code live with the module that owns the
concept (``mvcckv.server.config``, ``mvcckv.snapshot``, ``mvcckv.repair``); this module only
dispatches, so importing it stays cheap.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from mvcckv import __version__

    parser = argparse.ArgumentParser(
        prog="mvcckv",
        description="An MVCC key-value store with etcd's v3 storage semantics and gRPC API.",
    )
    parser.add_argument("--version", action="version", version=f"mvcckv {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    from mvcckv.server import config

    config.add_serve_parser(sub)

    from mvcckv import snapshot

    snapshot.add_parser(sub)
    __import__("mvcckv.testing.cli", fromlist=["add_parser"]).add_parser(sub)

    from mvcckv import repair

    repair.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
