"""`smallbms-bus simulate`: virtual batteries, a charger and a load on a real (or virtual) CAN bus.

The main CLI calls `add_parser(subparsers)` and dispatches to `run(args)`. Values are checked
while parsing, so a bad one exits 2 with argparse's message naming the option; a bus that cannot
be opened exits 2 as well (it is a bad --interface/--channel). Ctrl-C and SIGTERM stop the loop,
shut the bus down and exit 0.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import threading
from collections.abc import Callable
from typing import Any

import can
import can.interfaces

from smallbms_bus.link.bus import BusConfig, open_bus
from smallbms_bus.signals import stop_on_signals
from smallbms_bus.sim.bank import DEFAULT_BANK, BankShape, preset_list
from smallbms_bus.sim.runner import Simulator
from smallbms_bus.sim.scenarios import DEFAULT_SCENARIO, SCENARIOS

DEFAULT_INTERFACE = "socketcan"
DEFAULT_CHANNEL = "vcan0"
DEFAULT_BITRATE = 500000
STATUS_EVERY_S = 5.0


def _number(name: str, low: float, high: float, *, integer: bool = False) -> Callable[[str], Any]:
    """An argparse type that accepts a finite number in [low, high]."""

    def parse(text: str) -> float | int:
        try:
            value: float | int = int(text) if integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if integer else 'a number'}") from None
        if not math.isfinite(value) or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text} is outside {low:g}..{high:g}")
        return value

    parse.__name__ = name
    return parse


def _bank(text: str) -> BankShape:
    try:
        return BankShape.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _interface(text: str) -> str:
    if text not in can.interfaces.VALID_INTERFACES:
        raise argparse.ArgumentTypeError(
            f"unknown python-can interface {text!r}; e.g. socketcan, slcan, virtual")
    return text


def _scenario(text: str) -> str:
    if text not in SCENARIOS:
        raise argparse.ArgumentTypeError(f"unknown scenario {text!r}; known: {', '.join(SCENARIOS)}")
    return text


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "simulate",
        help="run virtual Lithium NG batteries, a charger and a load on a CAN bus",
        description="Virtual batteries send the Lithium NG frames (PROTOCOL.md) on a CAN bus; a virtual"
                    " charger and load obey the BMS_STATE frames of smallbms-bus.",
    )
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    bus = parser.add_argument_group("bus")
    bus.add_argument("--interface", type=_interface, default=DEFAULT_INTERFACE,
                     help=f"python-can interface: socketcan, slcan, virtual, ... (default {DEFAULT_INTERFACE})")
    bus.add_argument("--channel", default=DEFAULT_CHANNEL,
                     help=f"channel: vcan0, /dev/ttyACM0, ... (default {DEFAULT_CHANNEL})")
    bus.add_argument("--bitrate", type=_number("bitrate", 10_000, 1_000_000, integer=True),
                     default=DEFAULT_BITRATE, help=f"bit/s (default {DEFAULT_BITRATE})")
    bus.add_argument("--slcan-wait", action="store_true",
                     help="slcan: wait 2 s after opening the port (some Arduino-based adapters reset on open)")
    sim = parser.add_argument_group("simulation")
    sim.add_argument("--bank", type=_bank, default=BankShape.parse(DEFAULT_BANK),
                     help=f"shape like 2s2p-12v100 (S series, P strings, 12v/24v/48v, Ah) or a preset"
                          f" (default {DEFAULT_BANK}; see --list)")
    sim.add_argument("--scenario", type=_scenario, default=DEFAULT_SCENARIO,
                     help=f"one of {', '.join(SCENARIOS)} (default {DEFAULT_SCENARIO})")
    sim.add_argument("--speed", type=_number("speed", 0.01, 10_000), default=1.0,
                     help="physics speed-up; frame periods stay real time (default 1.0)")
    sim.add_argument("--duration", type=_number("duration", 0.001, 1e9), default=None,
                     help="seconds of real time to run (default: until Ctrl-C)")
    sim.add_argument("--soc", type=_number("soc", 0.0, 100.0), default=None,
                     help="starting state of charge in %% (default: the scenario's)")
    sim.add_argument("--ambient", type=_number("ambient", -40.0, 85.0), default=None,
                     help="ambient temperature in degC (default: the scenario's)")
    sim.add_argument("--seed", type=_number("seed", 0, 2**31 - 1, integer=True), default=0,
                     help="seed of the cell spreads and serial numbers (default 0)")
    sim.add_argument("--ignore-bms", action="store_true",
                     help="charger and load run without BMS_STATE (bench check only: NEVER with real hardware)")
    parser.add_argument("--list", action="store_true", help="print bank presets and scenarios and exit")


def print_list(out: Any = None) -> None:
    out = out or sys.stdout
    print("bank presets (or any shape <S>s<P>p-<12|24|48>v<Ah>):", file=out)
    for name, shape in preset_list():
        print(f"  {name:<12} {shape.describe()}", file=out)
    print("scenarios:", file=out)
    for scenario in SCENARIOS.values():
        print(f"  {scenario.name:<16} {scenario.summary}", file=out)
        for expectation in scenario.expect:
            print(f"  {'':<16}   by {expectation.by:>7.0f} s: {expectation.what}", file=out)


def bus_config(args: argparse.Namespace) -> BusConfig:
    return BusConfig.of(args.interface, args.channel, args.bitrate, slcan_wait=args.slcan_wait)


def run(args: argparse.Namespace, stop_event: threading.Event | None = None) -> int:
    if args.list:
        print_list()
        return 0
    shape = args.bank if isinstance(args.bank, BankShape) else _bank(args.bank)
    simulator = Simulator.from_scenario(
        args.scenario, shape, soc=args.soc, ambient=args.ambient, seed=args.seed,
        ignore_bms=args.ignore_bms, speed=args.speed,
    )
    stop = stop_event or threading.Event()
    # Handlers first: a signal at any moment from here on is a clean stop, never a traceback.
    with stop_on_signals(stop):
        try:
            bus = open_bus(bus_config(args))
        except (can.CanError, OSError, ValueError, ImportError) as error:
            print(f"simulate: cannot open --interface {args.interface} --channel {args.channel}: {error}",
                  file=sys.stderr)
            return 2
        try:
            print(f"simulate: bank {shape.describe()}; scenario {args.scenario}; interface {args.interface};"
                  f" channel {args.channel}; speed {args.speed:g}"
                  + ("; IGNORING BMS_STATE (unsafe with real chargers and loads)" if args.ignore_bms else ""),
                  file=sys.stderr, flush=True)
            simulator.run(
                bus, duration=args.duration, stop_event=stop, status_every=STATUS_EVERY_S,
                on_status=lambda sim: print(sim.status_line(), file=sys.stderr, flush=True),
            )
        except KeyboardInterrupt:  # only when not in the main thread (no handler of ours)
            pass
        finally:
            with contextlib.suppress(can.CanError, OSError):  # the port may be gone (adapter unplugged)
                bus.shutdown()
    stats = simulator.stats
    print(f"simulate: stopped after {simulator.sim_time:.1f} simulated s; frames sent {stats.frames_sent},"
          f" send errors {stats.send_errors}, BMS_STATE received {stats.bms_states}", file=sys.stderr)
    return 0
