"""`smallbms-bus demo`: the real service with an embedded configuration, against virtual batteries.

The same `Service` as `smallbms-bus run`, configured for a machine with no hardware: a python-can
`virtual` bus, a `memory` relay board and a throwaway store in a temporary directory. A simulated
bank in a thread sends the frames of the wire protocol on that bus. Its charger and load are wired to the
relay board like real ones (the charge relay switches the charger's remote input, the load relay the
load) or follow BMS_STATE like CAN-controlled devices (`--devices`). Service and simulation run on ONE
simulation clock (smallbms_bus/sim/clock.py): at `--speed 20` the batteries, the BMS's coulomb counting
and every delay of the BMS run 20 times faster together, so every figure and delay shown is what it is
at speed 1. An instant readout is printed every few (real) seconds; when the demo stops, the service's
event log in simulated seconds and a summary. Ctrl-C (or SIGTERM) stops it the way the service stops:
outputs off, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import TextIO

import can

from smallbms_bus.bms.core import Decision
from smallbms_bus.commit import Change
from smallbms_bus.config import parse_config
from smallbms_bus.modbus.status import MODBUS_DEMO_PORT
from smallbms_bus.outputs.memory import MemoryBoard
from smallbms_bus.preflight import check
from smallbms_bus.protocol import CELLS_PER_FRAME, CELLS_PER_UNIT
from smallbms_bus.readout import format_bank, format_decision
from smallbms_bus.service import TICK_S, Service
from smallbms_bus.sim.bank import DEFAULT_BANK, BankShape
from smallbms_bus.sim.clock import SimClock
from smallbms_bus.sim.devices import CONTROLS, parse_controls
from smallbms_bus.sim.inverter import InverterPeer, VirtualInverter
from smallbms_bus.sim.runner import CELLS_PERIOD_S, SLOW_PERIOD_S, STATUS_PERIOD_S, Simulator
from smallbms_bus.sim.scenarios import DEFAULT_SCENARIO, SCENARIOS
from smallbms_bus.store import Store
from smallbms_bus.vocabulary import RELAY_ROLES, ROLE_LABELS

METRICS_PORT = 9108  # the [metrics] port default
MODBUS_PORT = MODBUS_DEMO_PORT
WEB_PORT = 8080  # the [web] port default: the commissioning page
# How fast the demo may run. Service and simulation share one process (one GIL); measured on a 2-core machine
# (docs/simulator.md "Demo speed"), the cost follows the frames per real second: ~2.5 % of a core per 100
# frames/s (2s2p: 9 % at speed 1, 35 % at 20, 75 % at 50). The budget keeps the process under ~45 % of a core,
# so a shared machine has room and the governor (sim/clock.py) rarely has to slow the simulation down.
MAX_SPEED = 25.0
FRAME_BUDGET = 1700.0  # frames per real second
SLOW_STREAMS = 3  # BAT_TEMPS, BAT_INFO, BAT_SERIAL


def frames_per_second(shape: BankShape) -> float:
    """Frames a bank sends per simulated second (BAT_STATUS 10/s, each BAT_CELLS_x 2/s, 3 slow frames 1/s)."""
    groups = math.ceil(CELLS_PER_UNIT * shape.units / CELLS_PER_FRAME)
    return shape.count * (1.0 / STATUS_PERIOD_S + groups / CELLS_PERIOD_S + SLOW_STREAMS / SLOW_PERIOD_S)


def max_speed(shape: BankShape) -> float:
    """The highest --speed the demo accepts for this bank."""
    return max(1.0, min(MAX_SPEED, math.floor(FRAME_BUDGET / frames_per_second(shape))))


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo", help="the service against virtual batteries, no hardware needed",
        description="The real service (as `run`) against virtual batteries on an in-process bus, a memory relay"
                    " board and a throwaway store. Service and batteries run on one simulation clock: at --speed N"
                    " both run N times faster, so every figure and delay shown is the one real time gives; times"
                    " are simulated seconds. The simulated charger and load are switched by the charge and load"
                    " relays (or follow BMS_STATE: --devices). Prints a readout every --every s, and the event log"
                    " and a summary when it stops (Ctrl-C).")
    parser.add_argument("--bank", default=DEFAULT_BANK, help=f"bank shape or preset (default {DEFAULT_BANK})")
    parser.add_argument("--scenario", default=DEFAULT_SCENARIO, choices=sorted(SCENARIOS),
                        help=f"simulator scenario (default {DEFAULT_SCENARIO})")
    parser.add_argument("--speed", type=float, default=1.0,
                        help="simulated seconds per real second, for the batteries and the BMS alike (one clock: "
                             "every figure and delay holds at any speed); at most "
                             f"{MAX_SPEED:g}, less for large banks (default 1)")
    parser.add_argument("--duration", type=float, default=None,
                        help="stop after this many simulated seconds (default: Ctrl-C)")
    parser.add_argument("--every", type=float, default=2.0, help="real seconds between readouts (default 2)")
    parser.add_argument("--devices", default="relays", metavar="CONTROL",
                        help=f"how the simulated charger and load are controlled: {', '.join(CONTROLS)} (relays: "
                             "switched by the charge and load relays, as the smallBMS NG wires them; bms-state: "
                             "CAN devices following BMS_STATE; both), or charger=CONTROL,load=CONTROL "
                             "(default relays)")
    parser.add_argument("--metrics-port", type=int, default=METRICS_PORT,
                        help=f"Prometheus /metrics on 127.0.0.1:PORT (default {METRICS_PORT}, 0 = off)")
    parser.add_argument("--modbus-port", type=int, default=MODBUS_PORT,
                        help=f"Modbus TCP on 127.0.0.1:PORT (default {MODBUS_PORT}, 0 = off)")
    parser.add_argument("--web-port", type=int, default=WEB_PORT,
                        help=f"the commissioning page and JSON API on 127.0.0.1:PORT (default {WEB_PORT}, 0 = off)")
    parser.add_argument("--web-password", default=None, metavar="PASSWORD",
                        help="password for writes from the page and API (8-256 characters; default: read-only)")
    parser.add_argument("--inverter", action="store_true",
                        help="the charger and the load are an inverter/charger on BMS-CAN ([inverter] on a virtual "
                             "channel): it obeys CVL/CCL/DCL (0x351) as a Victron GX's DVCC does, not the relays "
                             "(docs/inverter.md)")
    parser.add_argument("--soc", type=float, default=None,
                        help="set the SoC to this %% once the bank is learned, as an installer would (MON-6); "
                             "default: unknown until the first full charge, as at a real first start")
    return parser


def demo_config(channel: str, store: str, metrics_port: int = 0, modbus_port: int = 0, web_port: int = 0,
                web_password: str | None = None) -> str:
    password = "" if web_password is None else f"password = {json.dumps(web_password)}\n"  # a TOML basic string
    return (f'[bus]\ninterface = "virtual"\nchannel = "{channel}"\n'
            f'[store]\npath = "{store}"\n'
            '[outputs]\nbackend = "memory"\n'
            f'[metrics]\nhost = "127.0.0.1"\nport = {metrics_port}\n'
            f'[modbus]\nhost = "127.0.0.1"\nport = {modbus_port}\n'
            f'[web]\nhost = "127.0.0.1"\nport = {web_port}\n{password}')


def check_args(args: argparse.Namespace) -> str | None:
    """What is wrong with the options (the message for exit 2), or None."""
    try:
        shape = BankShape.parse(args.bank)
    except ValueError as error:
        return f"--bank {args.bank!r}: {error}"
    for name in ("speed", "every", "duration"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            return f"--{name} {value:g}: must be a positive number"
    limit = max_speed(shape)
    if args.speed > limit:
        return (f"--speed {args.speed:g}: at most {limit:g} for {shape.name} ({shape.count} batteries send "
                f"{frames_per_second(shape):.0f} frames per simulated second; the BMS and the batteries share one "
                f"clock, so at speed {args.speed:g} this process would have to handle "
                f"{args.speed * frames_per_second(shape):.0f} frames and {10 * args.speed:.0f} BMS evaluations per "
                "real second; docs/simulator.md \"Demo speed\")")
    if not all(0 <= port <= 65535 for port in (args.metrics_port, args.modbus_port, getattr(args, "web_port", 0))):
        return "--metrics-port, --modbus-port and --web-port must be 0..65535"
    password = getattr(args, "web_password", None)
    if password is not None and not (8 <= len(password) <= 256 and password.isprintable()):
        return "--web-password: 8 to 256 printable characters"
    if args.soc is not None and not 0 <= args.soc <= 100:
        return f"--soc {args.soc:g}: must be 0..100"
    try:
        parse_controls(args.devices)
    except ValueError as error:
        return f"--devices {error}"
    return None


class Demo:
    """The demo's parts in one process: the clock, the service, its memory relay board, the simulated bank."""

    def __init__(self, args: argparse.Namespace, directory: str, out: TextIO = sys.stdout,
                 stop_requested: threading.Event | None = None) -> None:
        self.args, self.out = args, out
        self.stop_requested = stop_requested or threading.Event()
        self.shape = BankShape.parse(args.bank)
        self.channel = f"smallbms-demo-{os.getpid()}-{id(self)}"
        self.store_path = f"{directory}/state.db"
        self.clock = SimClock(args.speed, running=False)  # time starts with the simulation
        self.board = MemoryBoard()
        wanted = getattr(args, "inverter", False) or SCENARIOS[args.scenario].inverter  # a scenario may need one
        self.inverter_channel = f"{self.channel}-bms-can" if wanted else None
        inverter = ("" if self.inverter_channel is None else
                    f'[inverter]\ninterface = "virtual"\nchannel = "{self.inverter_channel}"\nkeepalive_timeout = 10\n')
        config = parse_config(demo_config(self.channel, self.store_path, args.metrics_port, args.modbus_port,
                                          getattr(args, "web_port", 0), getattr(args, "web_password", None))
                              + inverter, "<demo>")
        check(config)  # what run checks: a demo config is held to the same rules
        self.service = Service(config, board=self.board, clock=self.clock.monotonic, wall=self.clock.wall,
                               sleep=self.clock.sleep, rate=args.speed)
        self.simulator = Simulator.from_scenario(args.scenario, self.shape)  # speed 1: the clock carries it
        channels = config.output_channels()
        charge, load = channels["charge_disconnect"], channels["load_disconnect"]
        charger_control, load_control = parse_controls(args.devices)
        # The relays' contacts as the board holds them (a write that failed leaves them as they were).
        self.simulator.devices.wire(charger_control, load_control, charge_relay=lambda: self.board.relays[charge],
                                    load_relay=lambda: self.board.relays[load])
        self.clock.watch("simulation", lambda: self.simulator.last_now)
        self.clock.watch("BMS_STATE", lambda: self.simulator.last_bms_state_at)
        self.virtual_inverter: VirtualInverter | None = None
        if self.inverter_channel is not None and self.service.inverter is not None:
            # the scenario's charger and load become the inverter's own, limited by 0x351 (sim/devices.py)
            self.virtual_inverter = self.simulator.devices.inverter = VirtualInverter(charge_a=0.0)
            link = self.service.inverter
            self.clock.watch("BMS-CAN", lambda: link.progress)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._last_readout = (0.0, 0.0)  # (simulated, real) elapsed at the last readout
        self._stopped_at: tuple[float, float] | None = None  # (simulated, real) elapsed when asked to stop

    def header(self) -> str:
        a = self.args
        devices = (_controls_text(a.devices) if self.virtual_inverter is None else
                   f"an inverter/charger on BMS-CAN (virtual:{self.inverter_channel}) obeying 0x351, not the relays")
        lines = [f"smallbms-bus demo: {self.shape.describe()}, scenario {a.scenario}, bus virtual:{self.channel},",
                 "  memory relay board (channel 1 load, 2 charge, 3 pre-alarm), a throwaway store. Ctrl-C stops.",
                 f"  simulated charger and load: {devices}; speed {a.speed:g}: the BMS runs on the "
                 "simulation's clock, times below are simulated seconds."]
        if a.metrics_port:
            lines.append(f"metrics: http://127.0.0.1:{a.metrics_port}/metrics (curl it, or point Prometheus at it: "
                         "deploy/prometheus/)")
        if a.modbus_port:
            lines.append(f"modbus:  127.0.0.1:{a.modbus_port}, unit 1 (native map and SunSpec), unit 225 (Victron "
                         f"GX); try `smallbms-bus status --port {a.modbus_port}` or\n"
                         f"         `mbpoll -m tcp -a 1 -0 -r 0 -c 40 -p {a.modbus_port} 127.0.0.1 -1` "
                         "(docs/registers.md)")
        if getattr(a, "web_port", 0):
            writes = ("writes with the password given by --web-password" if getattr(a, "web_password", None)
                      else "read-only: give --web-password to change settings from it")
            lines.append(f"web:     http://127.0.0.1:{a.web_port}/ (the commissioning page and JSON API, docs/api.md; "
                         f"{writes})")
        return "\n".join(lines)

    def run(self) -> int:
        """Run until --duration (simulated), Ctrl-C/SIGTERM or `stop()`; the service's exit status."""
        sim_bus = can.Bus(interface="virtual", channel=self.channel)
        sim_stop = threading.Event()
        sim_thread = threading.Thread(
            target=self.simulator.run, args=(sim_bus,),
            kwargs={"stop_event": sim_stop, "clock": self.clock.monotonic, "rate": self.args.speed},
            name="virtual-batteries", daemon=True)
        peer = None if self.virtual_inverter is None else InverterPeer(
            can.Bus(interface="virtual", channel=self.inverter_channel), self.virtual_inverter,
            clock=self.clock.monotonic, rate=self.args.speed)
        self.clock.start()
        sim_thread.start()
        if peer is not None:
            peer.start()
        try:
            return asyncio.run(self._serve())
        finally:
            if peer is not None:
                peer.close()
            sim_stop.set()
            sim_thread.join(timeout=2)
            sim_bus.shutdown()
            self._print_events()
            print(self.summary(), file=self.out, flush=True)

    def stop(self) -> None:
        """Stop from another thread or a signal handler (before or while it runs)."""
        self.stop_requested.set()
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)

    async def _serve(self) -> int:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        stop, args, clock, service = self._stop, self.args, self.clock, self.service
        if self.stop_requested.is_set():  # asked before the loop ran
            stop.set()

        async def readouts() -> None:
            while True:
                await asyncio.sleep(args.every)
                self._print(self.readout())

        async def deadline() -> None:
            if args.duration is not None:
                await clock.sleep(args.duration - clock.elapsed())
                self._print(self.readout())
                stop.set()

        async def set_soc() -> None:
            while args.soc is not None:  # MON-6 needs the bank capacity: wait until the bank is learned
                await clock.sleep(TICK_S / 2)
                if service.decision is not None and service.decision.started:
                    service.core.set_soc(args.soc)
                    return

        async def scenario_settings() -> None:  # through the one write path, as an installer's write would go
            writes = tuple((name, name, value) for name, value in SCENARIOS[args.scenario].settings)
            while writes:
                await clock.sleep(TICK_S / 2)
                if service.decision is not None and service.decision.started:
                    await service.commit(Change(writes, source=f"scenario {args.scenario}", reason="demo scenario"))
                    return

        async def stopping() -> None:  # the speed achieved while running, not while shutting down
            await stop.wait()
            self._stopped_at = (clock.elapsed(), clock.real_elapsed())

        tasks = [asyncio.create_task(coroutine) for coroutine in (readouts(), deadline(), set_soc(),
                                                                 scenario_settings(), stopping())]
        try:
            return await service.run(stop)
        finally:
            for task in tasks:
                task.cancel()

    def _print(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def readout(self) -> str:
        service, clock = self.service, self.clock
        elapsed, real = clock.elapsed(), clock.real_elapsed()
        last_sim, last_real = self._last_readout
        self._last_readout = (elapsed, real)
        rate = (elapsed - last_sim) / (real - last_real) if real > last_real else clock.speed
        c = service.link.counters()
        malformed = sum(v for k, v in c.items() if k.startswith("malformed_"))
        link = service.link
        speed = f"speed {clock.speed:g}" + ("" if clock.speed == 1 else f", achieved {rate:.1f}")
        lines = [f"--- t={elapsed:7.1f} s ({speed})  link {'up' if link.up else 'DOWN: ' + link.reason}  "
                 f"frames {c['frames_received']} decoded {c['frames_decoded']} malformed {malformed}"]
        skipped = self.simulator.scheduler.skipped
        if skipped:
            lines.append(f"late     the simulated batteries fell behind and skipped {skipped} frame periods so far "
                         "(each stream sends its latest frame, never a burst; the BMS sees the gap)")
        if rate < 0.9 * clock.speed and real > last_real:
            lines.append(f"slow     this machine kept up with speed {rate:.1f} only: the simulation waited for its "
                         f"slowest part ({clock.held_s:.1f} simulated s so far); every figure still holds")
        decision = service.decision
        if decision is not None:
            channels = service.config.output_channels()
            relays = ", ".join(f"{label} {'on' if self.board.relays[channels[role]] else 'off'}"
                               for role, label in ((r, ROLE_LABELS[r]) for r in RELAY_ROLES))
            lines += [format_decision(decision), charge_limits_text(decision),
                      f"relays   {relays} (as the board holds them)",
                      format_bank(decision.bank)]
        lines.append(f"devices  {self.devices_text()} (the simulation)")
        return "\n".join(lines)

    def devices_text(self) -> str:
        sim = self.simulator
        now = sim.last_now if sim.last_now is not None else self.clock.monotonic()
        charger, load = sim.devices.charger, sim.devices.load
        if self.virtual_inverter is not None:  # the relays switch nothing here: 0x351 limits the inverter's own
            return (f"inverter {self.virtual_inverter.state_text(now)}: its charger "
                    f"{charger.available_current(sim.sim_time) if charger.enabled else 0.0:.1f} A available, its "
                    f"loads {load.current_a if load.enabled else 0.0:.1f} A, bank {sim.bank.current:+.1f} A")
        parts = []
        for name, device, amps in (("charger", charger, charger.max_current), ("load", load, load.current_a)):
            why = device.stopped_by(now)
            parts.append(f"no {name} in this scenario" if amps <= 0 else f"{name} {'on' if why is None else 'off'}"
                         + ("" if why is None else f" ({why})"))
        return ", ".join(parts) + f", bank {sim.bank.current:+.1f} A"

    def _print_events(self) -> None:
        """The service's own event log, in simulated seconds since the start (read after the final save)."""
        if not Path(self.store_path).exists():
            return
        try:
            with Store.open(self.store_path, create=False) as store:
                events = list(reversed(store.events(limit=None)))
        except Exception as error:  # the log is a bonus; the demo's exit must not depend on it
            self._print(f"demo: cannot read the event log: {error}")
            return
        if events:
            self._print("events (the service's event log; t = simulated seconds since the start):")
        for event in events:
            self._print(f"event t={event['now'] - self.clock.origin:9.3f} s  {event['name']} -> {event['value']}: "
                        f"{event['reason']}")

    def summary(self) -> str:
        clock, decision = self.clock, self.service.decision
        consumed = "" if decision is None or decision.consumed_ah is None else \
            f"; consumed {decision.consumed_ah:.3f} Ah"
        simulated, real = self._stopped_at or (clock.elapsed(), clock.real_elapsed())
        achieved = simulated / real if real > 0 else clock.speed
        return (f"demo: stopped after {simulated:.1f} simulated s ({real:.1f} s real at speed {clock.speed:g}, "
                f"achieved {achieved:.1f}){consumed}")


def charge_limits_text(d: Decision) -> str:
    """CHG: what the BMS allows a charger/inverter now (BMS-CAN 0x351, GX 305-308)."""
    c = d.charge
    if not c.known:
        return "limits   CVL/CCL/DCL 0: the bank is not known (CHG-6)"
    return (f"limits   CVL {c.cvl:.2f} V  CCL {c.ccl:.1f} A  DCL {c.dcl:.1f} A  DVL {c.dvl:.2f} V  "
            f"charge state {c.state.name.lower()}")


def _controls_text(devices: str) -> str:
    charger, load = parse_controls(devices)
    what = {"relays": "switched by the {} relay", "bms-state": "following BMS_STATE",
            "both": "switched by the {} relay and following BMS_STATE"}
    return f"charger {what[charger].format('charge')}, load {what[load].format('load')}"


def run(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    problem = check_args(args)
    if problem is not None:
        print(f"demo: {problem}", file=sys.stderr)
        return 2
    # Ctrl-C or SIGTERM before the service's own handlers take over (start-up on a slow machine) is a stop request
    # too: the demo stops as it always does, never with a traceback.
    requested = threading.Event()
    demo: Demo | None = None

    def request_stop(signum: int, frame: object) -> None:
        requested.set()
        if demo is not None:
            demo.stop()

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, request_stop)
    with tempfile.TemporaryDirectory(prefix="smallbms-demo-") as tmp:
        demo = Demo(args, tmp, out, stop_requested=requested)
        print(demo.header(), file=out, flush=True)
        return demo.run()
