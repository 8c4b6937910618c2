"""The `smallbms-bus` command."""

from __future__ import annotations

import argparse
import logging
import sys

from smallbms_bus import __version__, demo
from smallbms_bus.sim import cli as simulate

COMMANDS = {"demo": demo.run, "simulate": simulate.run}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smallbms-bus",
                                     description="A software smallBMS NG for Lithium NG battery banks.")
    parser.add_argument("--version", action="version", version=f"smallbms-bus {__version__}")
    parser.add_argument("--log-level", default="INFO", type=str.upper,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log level on stderr (default INFO)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo.add_parser(subparsers)
    simulate.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # No timestamps: journald and container runtimes add their own.
    logging.basicConfig(level=args.log_level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
