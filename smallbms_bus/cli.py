"""The `smallbms-bus` command.

Each command's module is imported only when that command runs (`check-config` does not pay for the
simulator, a bad config is refused in a fraction of a second); `smallbms-bus --help` imports them all
to list them. Errors are one line on stderr, never a traceback: exit 2 for a bad argument or
configuration (naming it), 1 for a failure of something else (a server, a device).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from smallbms_bus import __version__
from smallbms_bus.config import Config, ConfigError

Runner = Callable[[argparse.Namespace], int]

# command -> module with add_parser(subparsers) and run(args); None = defined in this module
COMMANDS: dict[str, str | None] = {"demo": "smallbms_bus.demo", "simulate": "smallbms_bus.sim.cli",
                                   "regmap": "smallbms_bus.modbus.cli", "status": "smallbms_bus.modbus.status",
                                   "check-config": None, "run": None}
# the installer's commands against a running service (docs/cli.md); module:name = add_parser_name / run_name
COMMANDS |= {name: f"smallbms_bus.modbus.control:{name.replace('-', '_')}"
             for name in ("settings", "set", "mode", "command", "set-soc", "history")}
COMMANDS["events"] = "smallbms_bus.web_cli"  # the event log is only on the web JSON API
COMMANDS["completion"] = "smallbms_bus.completion"


def _load_config(path: str, command: str) -> Config | None:
    """The checked config (preflight.load: what run checks before opening any device), or None after
    printing the one line that names the key (the caller exits 2)."""
    from smallbms_bus.preflight import load

    try:
        return load(path)
    except ConfigError as error:
        print(f"{command}: {error}", file=sys.stderr)
        return None


def check_config(args: argparse.Namespace) -> int:
    """Validate a configuration file exactly as `run` does before it opens a device: 0 when good, 2 naming the key."""
    config = _load_config(args.file, "check-config")
    if config is None:
        return 2
    print(f"{config.source}: ok")
    return 0


def _stopped_during_start_up(signum: int, frame: object) -> None:
    logging.getLogger("smallbms_bus.service").info("stopped by %s during start-up: no output was switched on",
                                                   signal.Signals(signum).name)
    raise SystemExit(0)


def run_service(args: argparse.Namespace) -> int:
    """`smallbms-bus run --config FILE`: exit 2 on a bad config or store (or the store held by another run), 0 after
    a clean stop, 1 when the final save failed."""
    # Until the service's own handlers take over in Service.run (which first switches every output off): a stray
    # SIGHUP/SIGUSR1/SIGUSR2 during start-up must not kill it, and SIGTERM/SIGINT end it quietly with status 0.
    for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stopped_during_start_up)
    config = _load_config(args.config, "run")
    if config is None:
        return 2
    import asyncio

    from smallbms_bus.outputs.base import OutputError
    from smallbms_bus.service import Service
    from smallbms_bus.store import StoreError

    if args.log_level is None:
        logging.getLogger().setLevel(config["log"]["level"])
    try:
        service = Service(config)
    except (StoreError, OutputError, ValueError) as error:  # the store's content; the config was checked above
        print(f"run: {error}", file=sys.stderr)
        return 2
    return asyncio.run(service.run())


def _add_check_config(subparsers: argparse._SubParsersAction) -> None:
    checker = subparsers.add_parser("check-config", help="validate a configuration file as run does, and exit "
                                    "(2 = invalid, naming the key)")
    checker.add_argument("file", help="TOML configuration file")


def _add_run(subparsers: argparse._SubParsersAction) -> None:
    runner = subparsers.add_parser("run", help="run the BMS service")
    runner.add_argument("--config", required=True, help="TOML configuration file (deploy/smallbms-bus.toml)")


LOCAL: dict[str, tuple[Callable[[Any], Any], Runner]] = {"check-config": (_add_check_config, check_config),
                                                         "run": (_add_run, run_service)}


def _command(name: str) -> tuple[Callable[[Any], Any], Runner]:
    module = COMMANDS[name]
    if module is None:
        return LOCAL[name]
    module, _, suffix = module.partition(":")
    loaded = importlib.import_module(module)
    tail = f"_{suffix}" if suffix else ""
    return getattr(loaded, f"add_parser{tail}"), getattr(loaded, f"run{tail}")


def _command_in(argv: list[str]) -> str | None:
    """The command named on the command line, found without importing anything (None: --help, --version, typo)."""
    args = iter(argv)
    for arg in args:
        if arg == "--log-level":
            next(args, None)
        elif not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with `command` alone (what running it needs), or with every command (help, errors)."""
    parser = argparse.ArgumentParser(prog="smallbms-bus",
                                     description="A software smallBMS NG for Lithium NG battery banks.")
    parser.add_argument("--version", action="version", version=f"smallbms-bus {__version__}")
    parser.add_argument("--log-level", default=None, type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="log level on stderr (default: [log] level of the config, else INFO)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in [command] if command else COMMANDS:
        _command(name)[0](subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = _command_in(argv)
    args = build_parser(command).parse_args(argv)
    # No timestamps: journald and container runtimes add their own.
    logging.basicConfig(level=args.log_level or "INFO", stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _command(args.command)[1](args)
    except BrokenPipeError:  # the reader went away (`smallbms-bus regmap | head`): nothing left to say to it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the interpreter's final flush is quiet
        return 1


if __name__ == "__main__":
    sys.exit(main())
