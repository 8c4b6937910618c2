"""`smallbms-bus demo`: the real service with an embedded configuration, against virtual batteries.

The same `Service` as `smallbms-bus run`, configured for a machine with no hardware: a python-can
`virtual` bus, a `memory` relay board and a throwaway store in a temporary directory. A simulated
bank in a thread sends the frames of PROTOCOL.md on that bus and its charger and load obey the
BMS_STATE the service sends back. An instant readout is printed every few seconds: the status page
(SoC, allowed to charge/discharge, alarms and warnings with reasons), the relays as the board holds
them, and the bank. Ctrl-C (or SIGTERM) stops it the way the service stops: outputs off, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import threading
import time
from typing import TextIO

import can

from smallbms_bus.config import parse_config
from smallbms_bus.outputs.memory import MemoryBoard
from smallbms_bus.preflight import check
from smallbms_bus.readout import format_bank, format_decision
from smallbms_bus.service import Service
from smallbms_bus.sim.bank import DEFAULT_BANK, BankShape
from smallbms_bus.sim.runner import Simulator
from smallbms_bus.sim.scenarios import DEFAULT_SCENARIO, SCENARIOS

METRICS_PORT = 9108  # the [metrics] port default
MODBUS_PORT = 5020  # not 502: the demo runs without the privilege to bind below 1024
ROLES = {"load_disconnect": "load", "charge_disconnect": "charge", "pre_alarm": "pre-alarm"}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("demo", help="the service against virtual batteries, no hardware needed",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("--bank", default=DEFAULT_BANK, help=f"bank shape or preset (default {DEFAULT_BANK})")
    parser.add_argument("--scenario", default=DEFAULT_SCENARIO, choices=sorted(SCENARIOS),
                        help=f"simulator scenario (default {DEFAULT_SCENARIO})")
    parser.add_argument("--speed", type=float, default=1.0, help="physics speed-up of the virtual batteries")
    parser.add_argument("--duration", type=float, default=None, help="stop after this many seconds (default: Ctrl-C)")
    parser.add_argument("--every", type=float, default=2.0, help="seconds between readouts (default 2)")
    parser.add_argument("--metrics-port", type=int, default=METRICS_PORT,
                        help=f"Prometheus /metrics on 127.0.0.1:PORT (default {METRICS_PORT}, 0 = off)")
    parser.add_argument("--modbus-port", type=int, default=MODBUS_PORT,
                        help=f"Modbus TCP on 127.0.0.1:PORT (default {MODBUS_PORT}, 0 = off)")
    parser.add_argument("--soc", type=float, default=None,
                        help="set the SoC to this %% once the bank is learned, as an installer would (MON-6); "
                             "default: unknown until the first full charge, as at a real first start")
    return parser


def demo_config(channel: str, store: str, metrics_port: int = 0, modbus_port: int = 0) -> str:
    return (f'[bus]\ninterface = "virtual"\nchannel = "{channel}"\n'
            f'[store]\npath = "{store}"\n'
            '[outputs]\nbackend = "memory"\n'
            f'[metrics]\nhost = "127.0.0.1"\nport = {metrics_port}\n'
            f'[modbus]\nhost = "127.0.0.1"\nport = {modbus_port}\n')


def run(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    try:
        shape = BankShape.parse(args.bank)
    except ValueError as error:
        print(f"demo: --bank {args.bank!r}: {error}", file=sys.stderr)
        return 2
    if args.speed <= 0 or args.every <= 0 or (args.duration is not None and args.duration <= 0):
        print("demo: --speed, --every and --duration must be positive", file=sys.stderr)
        return 2
    if (not 0 <= args.metrics_port <= 65535 or not 0 <= args.modbus_port <= 65535
            or (args.soc is not None and not 0 <= args.soc <= 100)):
        print("demo: --metrics-port and --modbus-port must be 0..65535, --soc 0..100", file=sys.stderr)
        return 2
    channel = f"smallbms-demo-{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix="smallbms-demo-") as tmp:
        board = MemoryBoard()
        text = demo_config(channel, f"{tmp}/state.db", args.metrics_port, args.modbus_port)
        config = parse_config(text, "<demo>")
        check(config)  # what run checks: a demo config is held to the same rules
        service = Service(config, board=board)
        simulator = Simulator.from_scenario(args.scenario, shape, speed=args.speed)
        sim_bus = can.Bus(interface="virtual", channel=channel)
        sim_stop = threading.Event()
        sim_thread = threading.Thread(target=simulator.run, args=(sim_bus,), kwargs={"stop_event": sim_stop},
                                      name="virtual-batteries", daemon=True)
        print(f"smallbms-bus demo: {shape.describe()}, scenario {args.scenario}, bus virtual:{channel},\n"
              "  memory relay board (channel 1 load, 2 charge, 3 pre-alarm), a throwaway store. Ctrl-C stops.",
              file=out, flush=True)
        if args.metrics_port:
            print(f"metrics: http://127.0.0.1:{args.metrics_port}/metrics (curl it, or point Prometheus at it: "
                  "deploy/prometheus/)", file=out, flush=True)
        if args.modbus_port:
            print(f"modbus:  127.0.0.1:{args.modbus_port}, unit 1 (native map and SunSpec), unit 225 (Victron "
                  f"GX); try `smallbms-bus status --port {args.modbus_port}` or\n"
                  f"         `mbpoll -m tcp -a 1 -0 -r 0 -c 40 -p {args.modbus_port} 127.0.0.1 -1` "
                  "(docs/registers.md)",
                  file=out, flush=True)
        sim_thread.start()
        try:
            return asyncio.run(_serve(service, board, args, out))
        finally:
            sim_stop.set()
            sim_thread.join(timeout=2)
            sim_bus.shutdown()
            print("demo: stopped", file=out, flush=True)


async def _serve(service: Service, board: MemoryBoard, args: argparse.Namespace, out: TextIO) -> int:
    stop = asyncio.Event()
    started = time.monotonic()

    async def readouts() -> None:
        while True:
            await asyncio.sleep(args.every)
            print(_readout(service, board, time.monotonic() - started), file=out, flush=True)

    async def deadline() -> None:
        if args.duration is not None:
            await asyncio.sleep(args.duration)
            print(_readout(service, board, time.monotonic() - started), file=out, flush=True)
            stop.set()

    async def set_soc() -> None:
        while args.soc is not None:  # MON-6 needs the bank capacity: wait until the bank is learned
            await asyncio.sleep(0.2)
            if service.decision is not None and service.decision.started:
                service.core.set_soc(args.soc)
                return

    tasks = [asyncio.create_task(readouts()), asyncio.create_task(deadline()), asyncio.create_task(set_soc())]
    try:
        return await service.run(stop)
    finally:
        for task in tasks:
            task.cancel()


def _readout(service: Service, board: MemoryBoard, elapsed: float) -> str:
    c = service.link.counters()
    malformed = sum(v for k, v in c.items() if k.startswith("malformed_"))
    link = service.link
    lines = [f"--- t={elapsed:6.1f} s  link {'up' if link.up else 'DOWN: ' + link.reason}  "
             f"frames {c['frames_received']} decoded {c['frames_decoded']} malformed {malformed}"]
    decision = service.decision
    if decision is None:
        return lines[0]
    channels = service.config.output_channels()
    relays = ", ".join(f"{label} {'on' if board.relays[channels[role]] else 'off'}" for role, label in ROLES.items())
    lines += [format_decision(decision), f"relays   {relays} (as the board holds them)", format_bank(decision.bank)]
    return "\n".join(lines)
