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
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import can
import can.interfaces

from smallbms_bus.config import SCHEMA
from smallbms_bus.link.bus import BusConfig, open_bus
from smallbms_bus.signals import stop_on_signals
from smallbms_bus.sim.bank import DEFAULT_BANK, BankShape, preset_list
from smallbms_bus.sim.devices import CONTROLS, Control, parse_controls
from smallbms_bus.sim.inverter import InverterPeer, VirtualInverter
from smallbms_bus.sim.runner import Simulator
from smallbms_bus.sim.scenarios import DEFAULT_SCENARIO, SCENARIOS
from smallbms_bus.sim.slcan_hub import SlcanHub
from smallbms_bus.sim.wiring import RelayBoardSpec, RelayReader

DEFAULT_INTERFACE = "socketcan"
DEFAULT_CHANNEL = "vcan0"
DEFAULT_BITRATE = 500000
STATUS_EVERY_S = 5.0
INVERTER_BITRATE = SCHEMA["inverter"]["bitrate"].default  # BMS-CAN, as `run` opens it by default


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


def _relay_board(text: str) -> RelayBoardSpec:
    try:
        return RelayBoardSpec.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _inverter(text: str) -> tuple[str, str]:
    """`--inverter`: ("pty", "") or (python-can interface, channel)."""
    if text == "pty":
        return "pty", ""
    interface, _, channel = text.partition(":")
    if not channel:
        raise argparse.ArgumentTypeError(f"{text!r}: give pty or INTERFACE:CHANNEL, e.g. socketcan:vcan1")
    return _interface(interface), channel


def _controls(text: str) -> tuple[Control, Control]:
    try:
        return parse_controls(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _scenario(text: str) -> str:
    if text not in SCENARIOS:
        raise argparse.ArgumentTypeError(f"unknown scenario {text!r}; known: {', '.join(SCENARIOS)}")
    return text


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "simulate",
        help="run virtual Lithium NG batteries, a charger and a load on a CAN bus",
        description="Virtual batteries send the Lithium NG frames (docs/simulator.md) on a CAN bus; a virtual"
                    " charger and load follow the relays of the Modbus TCP module smallbms-bus run drives"
                    " (--relay-board) and/or the BMS_STATE frames it sends (--devices). Everything runs in real"
                    " time: only at --speed 1 do the BMS's figures match the batteries'.",
    )
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _add_bus_arguments(parser.add_argument_group("bus"))
    _add_simulation_arguments(parser.add_argument_group("simulation"))
    _add_wiring_arguments(parser.add_argument_group("charger and load wiring"))
    parser.add_argument("--status-every", type=_number("status-every", 0.1, 86400), default=STATUS_EVERY_S,
                        metavar="SECONDS", help=f"real seconds between status lines (default {STATUS_EVERY_S:g})")
    parser.add_argument("--list", action="store_true", help="print bank presets and scenarios and exit")


def _add_bus_arguments(bus: argparse._ArgumentGroup) -> None:
    bus.add_argument("--interface", type=_interface, default=DEFAULT_INTERFACE,
                     help=f"python-can interface: socketcan, slcan, virtual, ... (default {DEFAULT_INTERFACE})")
    bus.add_argument("--channel", default=DEFAULT_CHANNEL,
                     help=f"channel: vcan0, /dev/ttyACM0, ... (default {DEFAULT_CHANNEL})")
    bus.add_argument("--bitrate", type=_number("bitrate", 10_000, 1_000_000, integer=True),
                     default=DEFAULT_BITRATE, help=f"bit/s (default {DEFAULT_BITRATE})")
    bus.add_argument("--pty", action="store_true",
                     help="make an SLCAN wire of pseudo-terminals and play the batteries on it: prints the port to "
                          "give `smallbms-bus run` ([bus] interface = \"slcan\", channel = PATH); no hardware needed")
    bus.add_argument("--pty-dir", default=None, metavar="DIR",
                     help="--pty: put the ports in DIR as DIR/bms (for run) and DIR/simulator, so the path stays the "
                          "same between runs (default: a new temporary directory); --inverter pty adds "
                          "DIR/inverter-bms (for run's [inverter]) and DIR/inverter-simulator")
    bus.add_argument("--slcan-wait", action="store_true",
                     help="slcan: wait 2 s after opening the port (some Arduino-based adapters reset on open)")


def _add_simulation_arguments(sim: argparse._ArgumentGroup) -> None:
    sim.add_argument("--bank", type=_bank, default=BankShape.parse(DEFAULT_BANK),
                     help=f"shape like 2s2p-12v100 (S series, P strings, 12v/24v/48v, Ah) or a preset"
                          f" (default {DEFAULT_BANK}; see --list)")
    sim.add_argument("--scenario", type=_scenario, default=DEFAULT_SCENARIO,
                     help=f"one of {', '.join(SCENARIOS)} (default {DEFAULT_SCENARIO})")
    sim.add_argument("--speed", type=_number("speed", 0.01, 10_000), default=1.0,
                     help="physics speed-up; frame periods stay real time. The BMS on the bus counts real time, so"
                          " only at 1 do its consumed Ah, time remaining and delays match the batteries (default 1;"
                          " `demo` runs the BMS on the simulation's clock)")
    sim.add_argument("--start-at", type=_number("start-at", 0.0, 1e7), default=0.0, metavar="SECONDS",
                     help="run the scenario's first SECONDS off-line (charger and load running, no frames), then"
                          " put the bank on the bus: reach a scenario's event sooner with every figure true"
                          " (default 0)")
    sim.add_argument("--duration", type=_number("duration", 0.001, 1e9), default=None,
                     help="seconds of real time to run (default: until Ctrl-C)")
    sim.add_argument("--soc", type=_number("soc", 0.0, 100.0), default=None,
                     help="starting state of charge in %% (default: the scenario's)")
    sim.add_argument("--ambient", type=_number("ambient", -40.0, 85.0), default=None,
                     help="ambient temperature in degC (default: the scenario's)")
    sim.add_argument("--seed", type=_number("seed", 0, 2**31 - 1, integer=True), default=0,
                     help="seed of the cell spreads and serial numbers (default 0)")
    sim.add_argument("--ignore-bms", action="store_true",
                     help="charger and load run without BMS_STATE and relays (bench check only: NEVER with real"
                          " hardware)")


def _add_wiring_arguments(wiring: argparse._ArgumentGroup) -> None:
    wiring.add_argument("--relay-board", type=_relay_board, default=None, metavar="modbus-tcp:HOST:PORT[:UNIT]",
                        help="the Modbus TCP relay module `smallbms-bus run` drives: the simulated charger and load"
                             " follow its charge and load relays (read as a second client, every 0.1 s)")
    wiring.add_argument("--load-relay", type=_number("load-relay", 1, 64, integer=True), default=1, metavar="N",
                        help="the load relay's channel on that board ([outputs] load_disconnect; default 1)")
    wiring.add_argument("--charge-relay", type=_number("charge-relay", 1, 64, integer=True), default=2, metavar="N",
                        help="the charge relay's channel ([outputs] charge_disconnect; default 2)")
    wiring.add_argument("--devices", type=_controls, default=None, metavar="CONTROL",
                        help=f"how the charger and load are controlled: {', '.join(CONTROLS)}, or"
                             " charger=CONTROL,load=CONTROL (relays: switched by the relays of --relay-board;"
                             " bms-state: CAN devices following BMS_STATE; both). Default: relays with"
                             " --relay-board, else bms-state")
    wiring.add_argument("--inverter", type=_inverter, default=None, metavar="pty|INTERFACE:CHANNEL",
                        help="the charger and load are an inverter/charger on BMS-CAN that obeys the 0x351 limits"
                             " `smallbms-bus run` sends from [inverter] (as a Victron GX's DVCC does,"
                             " docs/inverter.md) and sends its keep-alive: `pty` makes an SLCAN wire and prints the"
                             " port for [inverter], or a bus such as socketcan:vcan1 or slcan:/dev/ttyACM1. Not with"
                             " --relay-board, --devices or --ignore-bms")


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


def _control_text(control: str, relay: str) -> str:
    return {"relays": f"switched by the {relay} relay", "bms-state": "follows BMS_STATE",
            "both": f"switched by the {relay} relay and follows BMS_STATE"}[control]


def _run_on_pty(args: argparse.Namespace, stop_event: threading.Event | None) -> int:
    """`--pty`: an SLCAN wire of two pseudo-terminals (SlcanHub); the batteries on one, `run` on the other."""
    if args.interface != DEFAULT_INTERFACE or args.channel != DEFAULT_CHANNEL:
        print("simulate: --pty makes its own wire: leave out --interface and --channel", file=sys.stderr)
        return 2
    try:
        wire = PtyWire(("simulator", "bms"), args.pty_dir, "smallbms-slcan-")
    except OSError as error:
        print(f"simulate: --pty-dir {args.pty_dir}: {error.strerror or error}", file=sys.stderr)
        return 2
    hub = wire.hub
    try:
        channel = hub.path("bms")
        print(f"SLCAN wire ready. Give smallbms-bus run this port: {channel}\n"
              f"  [bus]\n  interface = \"slcan\"\n  channel = \"{channel}\"\n  bitrate = {args.bitrate}\n"
              "(Ctrl-C stops the batteries and removes the port)", flush=True)
        args = argparse.Namespace(**{**vars(args), "pty": False, "interface": "slcan",
                                     "channel": hub.path("simulator")})
        return run(args, stop_event)
    except KeyboardInterrupt:  # Ctrl-C before run's own handlers: a clean stop all the same
        return 0
    finally:
        wire.close()


class PtyWire:
    """An SLCAN wire of pseudo-terminals (SlcanHub) in `directory` when given (kept), else in a new temporary
    directory that `close` removes with the ports."""

    def __init__(self, names: tuple[str, ...], directory: str | None, prefix: str) -> None:
        self.made = None if directory else Path(tempfile.mkdtemp(prefix=prefix))
        try:
            path = self.made or Path(str(directory))
            path.mkdir(parents=True, exist_ok=True)
            self.hub = SlcanHub(names, str(path))
        except BaseException:
            self._remove()
            raise

    def _remove(self) -> None:
        if self.made is not None:
            shutil.rmtree(self.made, ignore_errors=True)

    def close(self) -> None:
        self.hub.close()
        self._remove()


class BmsCanInverter:
    """`--inverter`: a virtual inverter/charger (sim/inverter.py) on its own BMS-CAN bus, in real time like the
    rest of `simulate`; the simulation's charger and load become its own, limited by the 0x351 it receives."""

    def __init__(self, peer: InverterPeer, where: str, wire: PtyWire | None) -> None:
        self.peer, self.where, self.wire = peer, where, wire

    @classmethod
    def open(cls, spec: tuple[str, str] | None, pty_dir: str | None, simulator: Simulator) -> BmsCanInverter | None:
        if spec is None:
            return None
        (interface, channel), wire = spec, None
        if interface == "pty":  # an SLCAN wire of its own, beside --pty's (in --pty-dir when given)
            wire = PtyWire(("inverter-simulator", "inverter-bms"), pty_dir, "smallbms-bms-can-")
            interface, channel, port = "slcan", wire.hub.path("inverter-simulator"), wire.hub.path("inverter-bms")
            print(f"BMS-CAN wire ready. Give smallbms-bus run this port for the inverter: {port}"
                  f"\n  [inverter]\n  interface = \"slcan\"\n  channel = \"{port}\"", flush=True)
        try:
            bus = open_bus(BusConfig.of(interface, channel, INVERTER_BITRATE))
        except BaseException:
            if wire is not None:
                wire.close()
            raise
        simulator.devices.inverter = VirtualInverter(charge_a=0.0)
        return cls(InverterPeer(bus, simulator.devices.inverter).start(), f"{interface}:{channel}", wire)

    def describe(self) -> str:
        inverter, now = self.peer.inverter, time.monotonic()
        limits, state = inverter.obeying(now), inverter.state_text(now)
        if limits is None:
            return f"inverter {state}"
        return (f"inverter {state}: CVL {limits.cvl:.2f} V CCL {limits.ccl:.1f} A DCL {limits.dcl:.1f} A "
                f"({self.peer.received} received)")

    def close(self) -> None:
        self.peer.close()
        if self.wire is not None:
            self.wire.close()


def bus_config(args: argparse.Namespace) -> BusConfig:
    return BusConfig.of(args.interface, args.channel, args.bitrate, slcan_wait=args.slcan_wait)


def _print_start(args: argparse.Namespace, shape: BankShape, controls: tuple[Control, Control],
                 inverter: BmsCanInverter | None = None) -> None:
    """What runs, on stderr (stdout stays free), and what a speed-up does to a BMS in another process."""
    if inverter is not None:
        devices = f"; charger and load: an inverter/charger on BMS-CAN ({inverter.where}) obeying 0x351"
    elif args.ignore_bms:
        devices = "; IGNORING BMS_STATE and relays (unsafe with real chargers and loads)"
    else:
        devices = (f"; charger: {_control_text(controls[0], 'charge')}, load: {_control_text(controls[1], 'load')}"
                   + (f" of {args.relay_board.describe()}" if args.relay_board is not None else ""))
    print(f"simulate: bank {shape.describe()}; scenario {args.scenario}; interface {args.interface};"
          f" channel {args.channel}; speed {args.speed:g}"
          + (f"; started at {args.start_at:g} simulated s" if args.start_at else "") + devices,
          file=sys.stderr, flush=True)
    if args.speed != 1:
        print(f"simulate: WARNING speed {args.speed:g}: the batteries change {args.speed:g} x faster than"
              " real time, the BMS on the bus counts real time: its consumed Ah and time remaining will"
              f" be 1/{args.speed:g} of the batteries' (the status lines here show theirs), and its delays"
              " (30 s pre-alarm lead, comm timeout, discovery) last longer in the batteries' time. Figures"
              " hold at --speed 1 (--start-at skips ahead); `smallbms-bus demo` runs the BMS on the"
              " simulation's clock.", file=sys.stderr, flush=True)


def _refusal(args: argparse.Namespace, controls: tuple[Control, Control]) -> str | None:
    """Options that cannot go together, in words (exit 2), or None."""
    if args.relay_board is None and controls != ("bms-state", "bms-state"):
        return (f"--devices charger={controls[0]},load={controls[1]} follows relays: give --relay-board"
                " modbus-tcp:HOST:PORT (the relay module smallbms-bus run drives)")
    if args.load_relay == args.charge_relay:
        return f"--load-relay and --charge-relay are both {args.load_relay}"
    if getattr(args, "inverter", None) is not None and (args.relay_board or args.devices or args.ignore_bms):
        return ("--inverter: the charger and load are the inverter's, limited by 0x351; leave out --relay-board,"
                " --devices and --ignore-bms")
    return None


def run(args: argparse.Namespace, stop_event: threading.Event | None = None) -> int:
    if args.list:
        print_list()
        return 0
    if getattr(args, "pty", False):
        return _run_on_pty(args, stop_event)
    shape = args.bank if isinstance(args.bank, BankShape) else _bank(args.bank)
    controls = args.devices or (("relays", "relays") if args.relay_board is not None else ("bms-state", "bms-state"))
    refusal = _refusal(args, controls)
    if refusal is not None:
        print(f"simulate: {refusal}", file=sys.stderr)
        return 2
    simulator = Simulator.from_scenario(
        args.scenario, shape, soc=args.soc, ambient=args.ambient, seed=args.seed,
        ignore_bms=args.ignore_bms, speed=args.speed,
    )
    reader = None
    if args.relay_board is not None:
        reader = RelayReader(args.relay_board, {"load": args.load_relay, "charge": args.charge_relay})
        simulator.devices.wire(controls[0], controls[1], charge_relay=lambda: reader.contact("charge"),
                               load_relay=lambda: reader.contact("load"))
    if args.start_at:
        simulator.fast_forward(args.start_at)
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
            inverter = BmsCanInverter.open(getattr(args, "inverter", None), getattr(args, "pty_dir", None), simulator)
        except (can.CanError, OSError, ValueError, ImportError) as error:
            print(f"simulate: cannot open --inverter: {error}", file=sys.stderr)
            with contextlib.suppress(can.CanError, OSError):
                bus.shutdown()
            return 2
        _print_start(args, shape, controls, inverter)
        _play(args, simulator, bus, stop, reader, inverter)
    stats = simulator.stats
    print(f"simulate: stopped after {simulator.sim_time:.1f} simulated s; frames sent {stats.frames_sent},"
          f" send errors {stats.send_errors}, BMS_STATE received {stats.bms_states}", file=sys.stderr)
    return 0


def _play(args: argparse.Namespace, simulator: Simulator, bus: can.BusABC, stop: threading.Event,
          reader: RelayReader | None, inverter: BmsCanInverter | None) -> None:
    """The batteries on the bus until --duration or a stop, a status line every --status-every s; then closes
    what it was given."""
    def status(sim: Simulator) -> None:
        line = (sim.status_line() + (f" | {reader.describe()}" if reader is not None else "")
                + (f" | {inverter.describe()}" if inverter is not None else ""))
        print(line, file=sys.stderr, flush=True)

    try:
        if reader is not None:
            reader.start()
        simulator.run(bus, duration=args.duration, stop_event=stop, status_every=args.status_every,
                      on_status=status)
    except KeyboardInterrupt:  # only when not in the main thread (no handler of ours)
        pass
    finally:
        if reader is not None:
            reader.close()
        if inverter is not None:
            inverter.close()
        with contextlib.suppress(can.CanError, OSError):  # the port may be gone (adapter unplugged)
            bus.shutdown()
