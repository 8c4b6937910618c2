"""`smallbms-bus demo`: virtual batteries and smallbms-bus's bus side and BMS core in one process.

A simulated bank sends the frames of PROTOCOL.md on a python-can `virtual` bus; the link decodes
them through the shipped DBC, the BMS core decides (ATC, ATD, pre-alarm, outputs, alarms) every
100 ms and on every frame batch, and sends BMS_STATE back on the bus, which the virtual charger and
load obey. An instant readout is printed every few seconds. No hardware, no configuration. Relay
outputs, Modbus and metrics join the demo with the service issue; the outputs shown are the ones
the core wants.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from typing import TextIO

import can

from smallbms_bus.bms.core import BmsCore, Decision, bms_state_report
from smallbms_bus.link.bus import BusConfig, Link
from smallbms_bus.link.codec import FrameEncoder
from smallbms_bus.readout import format_bank, format_decision
from smallbms_bus.signals import stop_on_signals
from smallbms_bus.sim.bank import DEFAULT_BANK, BankShape
from smallbms_bus.sim.runner import Simulator
from smallbms_bus.sim.scenarios import DEFAULT_SCENARIO, SCENARIOS

POLL_S = 0.05
TICK_S = 0.1  # evaluation tick and BMS_STATE period (PROTOCOL.md)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("demo", help="virtual batteries and the bus side, no hardware needed",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("--bank", default=DEFAULT_BANK, help=f"bank shape or preset (default {DEFAULT_BANK})")
    parser.add_argument("--scenario", default=DEFAULT_SCENARIO, choices=sorted(SCENARIOS),
                        help=f"simulator scenario (default {DEFAULT_SCENARIO})")
    parser.add_argument("--speed", type=float, default=1.0, help="physics speed-up of the virtual batteries")
    parser.add_argument("--duration", type=float, default=None, help="stop after this many seconds (default: Ctrl-C)")
    parser.add_argument("--every", type=float, default=2.0, help="seconds between readouts (default 2)")
    return parser


def run(args: argparse.Namespace, out: TextIO = sys.stdout, stop: threading.Event | None = None) -> int:
    try:
        shape = BankShape.parse(args.bank)
    except ValueError as error:
        print(f"demo: --bank {args.bank!r}: {error}", file=sys.stderr)
        return 2
    if args.speed <= 0 or args.every <= 0 or (args.duration is not None and args.duration <= 0):
        print("demo: --speed, --every and --duration must be positive", file=sys.stderr)
        return 2
    stop = stop or threading.Event()
    channel = f"smallbms-demo-{os.getpid()}"
    simulator = Simulator.from_scenario(args.scenario, shape, speed=args.speed)
    sim_bus = can.Bus(interface="virtual", channel=channel)
    sim_thread = threading.Thread(target=simulator.run, args=(sim_bus,), kwargs={"stop_event": stop},
                                  name="virtual-batteries", daemon=True)
    core = BmsCore(time.monotonic(), time.time())
    link = Link(BusConfig("virtual", channel), on_state=core.set_link)
    encoder = FrameEncoder(link.decoder.db)
    print(f"smallbms-bus demo: {shape.describe()}, scenario {args.scenario}, bus virtual:{channel}\n"
          "  (outputs shown are what the BMS core wants; relay boards, Modbus and metrics come with the\n"
          "   service. Ctrl-C stops.)", file=out, flush=True)
    # Handlers first: Ctrl-C or SIGTERM at any moment from here on is a clean stop.
    with stop_on_signals(stop):
        sim_thread.start()
        started = time.monotonic()
        next_readout = started + args.every
        next_state = started
        alive = 0
        previous: tuple | None = None
        decision = core.evaluate(started, time.time())
        try:
            while not stop.is_set():
                reports = link.poll(POLL_S)
                now = time.monotonic()
                if args.duration is not None and now - started >= args.duration:
                    break
                for report in reports:
                    core.on_report(report, now)
                if reports or now >= next_state:
                    decision = core.evaluate(now, time.time())
                    state = (decision.atc, decision.atd, decision.pre_alarm, decision.alarms, decision.warnings)
                    if now >= next_state or state != previous:  # every 100 ms and on change
                        alive += 1
                        link.send(encoder.bms_state(bms_state_report(decision, alive)))
                        next_state, previous = now + TICK_S, state
                if now >= next_readout:
                    next_readout = now + args.every
                    print(_readout(decision, link, now - started), file=out, flush=True)
            print(_readout(decision, link, time.monotonic() - started), file=out, flush=True)
        finally:
            stop.set()
            sim_thread.join(timeout=2)
            link.close()
            sim_bus.shutdown()
    print("demo: stopped", file=out, flush=True)
    return 0


def _readout(decision: Decision, link: Link, elapsed: float) -> str:
    c = link.counters()
    malformed = sum(v for k, v in c.items() if k.startswith("malformed_"))
    header = (f"--- t={elapsed:6.1f} s  link {'up' if link.up else 'DOWN: ' + link.reason}  "
              f"frames {c['frames_received']} decoded {c['frames_decoded']} malformed {malformed}")
    return "\n".join((header, format_decision(decision), format_bank(decision.bank)))
