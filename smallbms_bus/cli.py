"""The `smallbms-bus` command."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from smallbms_bus import __version__, demo
from smallbms_bus.config import Config, ConfigError, load_config
from smallbms_bus.modbus import cli as regmap
from smallbms_bus.modbus import status
from smallbms_bus.sim import cli as simulate


def _load_config(path: str, command: str) -> Config | None:
    """The config, or None after printing the error that names the key (the caller exits 2)."""
    try:
        return load_config(path)
    except ConfigError as error:
        print(f"{command}: {error}", file=sys.stderr)
        return None


def check_config(args: argparse.Namespace) -> int:
    """Validate a configuration file and nothing else: exit 0 when it is good, 2 naming the bad key."""
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
    import asyncio

    from smallbms_bus.outputs.base import OutputError
    from smallbms_bus.service import Service
    from smallbms_bus.store import StoreError

    config = _load_config(args.config, "run")
    if config is None:
        return 2
    if args.log_level is None:
        logging.getLogger().setLevel(config["log"]["level"])
    try:
        service = Service(config)
    except (StoreError, OutputError, ValueError) as error:
        print(f"run: {error}", file=sys.stderr)
        return 2
    return asyncio.run(service.run())


COMMANDS = {"demo": demo.run, "simulate": simulate.run, "check-config": check_config, "run": run_service,
            "regmap": regmap.run, "status": status.run}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smallbms-bus",
                                     description="A software smallBMS NG for Lithium NG battery banks.")
    parser.add_argument("--version", action="version", version=f"smallbms-bus {__version__}")
    parser.add_argument("--log-level", default=None, type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="log level on stderr (default: [log] level of the config, else INFO)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo.add_parser(subparsers)
    simulate.add_parser(subparsers)
    regmap.add_parser(subparsers)
    status.add_parser(subparsers)
    checker = subparsers.add_parser("check-config", help="validate a configuration file and exit (2 = invalid)")
    checker.add_argument("file", help="TOML configuration file")
    runner = subparsers.add_parser("run", help="run the BMS service")
    runner.add_argument("--config", required=True, help="TOML configuration file (deploy/smallbms-bus.toml)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # No timestamps: journald and container runtimes add their own.
    logging.basicConfig(level=args.log_level or "INFO", stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
