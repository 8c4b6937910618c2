"""`smallbms-bus status`: the instant readout of a running service, read over Modbus like a PLC would.

Reads block A (the manual's status page) and block D (history) of the native map and prints them;
the addresses and scales come from register_maps/native.toml, so this command is also a check that
the map and the server agree.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from pymodbus.client import ModbusTcpClient
from pymodbus.exceptions import ModbusException

from smallbms_bus.bms.alarms import BmsAlarm, BmsWarning, BusState
from smallbms_bus.config import ConfigError, load_config
from smallbms_bus.modbus.regmap import decode_block, load_map
from smallbms_bus.readout import time_remaining_text

STATES = {0: "waiting for batteries", 1: "on", 2: "off (mode or remote)", 3: "firmware update", 4: "fault"}
ATD = {0: "no", 1: "yes", 2: "pre-alarm"}
LEDS = {0: "off", 1: "blinking", 2: "solid"}
BALANCER = {0: "unknown", 1: "balanced", 2: "balancing", 3: "imbalanced"}
OUTPUT_BITS = ("load", "charge", "pre-alarm")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("status", help="print the instant readout of a running service (over Modbus)",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="take host, port and unit from this configuration file's [modbus]")
    parser.add_argument("--host", default=None, help="service address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="Modbus TCP port (default 502; the demo uses 5020)")
    parser.add_argument("--unit", type=int, default=None, help="unit id of the native map (default 1)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the service (default 3)")
    return parser


def _target(args: argparse.Namespace) -> tuple[str, int, int] | str:
    host, port, unit = "127.0.0.1", 502, 1
    if args.config:
        try:
            modbus = load_config(args.config)["modbus"]
        except ConfigError as error:
            return str(error)
        if not modbus["port"]:
            return f"{args.config}: modbus.port = 0: this service serves no plain Modbus TCP"
        listen = modbus["host"]
        host = "127.0.0.1" if listen in ("0.0.0.0", "") else "::1" if listen == "::" else listen
        port, unit = modbus["port"], modbus["unit"]
    return args.host or host, args.port or port, args.unit or unit


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    target = _target(args)
    if isinstance(target, str):
        print(f"status: {target}", file=sys.stderr)
        return 2
    host, port, unit = target
    regmap = load_map("native")
    blocks = {b.name: b for b in regmap.blocks}
    client = ModbusTcpClient(host, port=port, timeout=args.timeout, retries=1)
    try:
        if not client.connect():
            print(f"status: no Modbus server at {host}:{port} (is smallbms-bus running? see --config/--port)",
                  file=sys.stderr)
            return 1
        values: dict[str, Any] = {}
        for name in ("A", "D"):
            block = blocks[name]
            reply = client.read_holding_registers(block.start or 0, count=block.length, device_id=unit)
            if reply.isError():
                print(f"status: {host}:{port} unit {unit} answered block {name} with {reply}", file=sys.stderr)
                return 1
            values |= {(k if name == "A" else f"history.{k}"): v
                       for k, v in decode_block(regmap, name, reply.registers).items()}
    except ModbusException as error:
        print(f"status: {host}:{port}: {error}", file=sys.stderr)
        return 1
    finally:
        client.close()
    print(format_status(values, f"{host}:{port} unit {unit}"), file=out)
    return 0


def _v(value: Any, fmt: str, unit: str, unknown: str = "unknown") -> str:
    return unknown if value is None else f"{value:{fmt}} {unit}".rstrip()


def format_status(v: dict[str, Any], where: str) -> str:
    """The manual's status page (section 5.1.1) from block A's values, plus the history counters."""
    alarms = [f.name for f in BmsAlarm if v["alarms"] and v["alarms"] & f]
    warnings = [f.name for f in BmsWarning if v["warnings"] and v["warnings"] & f]
    outputs = v["outputs"] or 0
    remaining = v["time_remaining"]
    state = str(STATES.get(v["state"], v["state"]))
    code = v.get("bus_state") or 0  # 0 from a service older than the register, too
    bus = "up"
    if code:  # why the bank is waiting, or what the comms loss is; the detail is in the log and the metrics
        text = BusState(code).text if code in tuple(BusState) else f"state {code}"
        state += f" (bus down: {text})"
        bus = f"down: {text} (why: the service's log, or the metric smallbms_bus_down_reason_info)"
    bank = (f"{v['batteries']} batteries ({v['batteries_in_series']}S{v['batteries_in_parallel']}P), "
            f"{v['cells']} cells, {_v(v['capacity'], 'd', 'Ah')}, {_v(v['nominal_voltage'], '.2f', 'V')} nominal, "
            f"{v['stale_batteries']} stale")
    lines = [
        f"smallBMS at {where}: up {v['uptime']} s, heartbeat {v['heartbeat']}, map version {v['map_version']}",
        f"state              {state}",
        f"bus                {bus}",
        f"voltage            {_v(v['voltage'], '.2f', 'V')}    current {_v(v['current'], '.2f', 'A')}"
        f"    power {_v(v['power'], 'd', 'W')}",
        f"state of charge    {_v(v['soc'], '.1f', '%')}    consumed {_v(v['consumed_ah'], '.1f', 'Ah')}",
        f"time remaining     {time_remaining_text(remaining) if remaining is not None else 'not discharging'}",
        f"temperature        battery {_v(v['battery_temperature'], '.1f', '°C')}, cells "
        f"{_v(v['min_cell_temperature'], '.1f', '°C')} .. {_v(v['max_cell_temperature'], '.1f', '°C')}",
        f"cell voltage       {_v(v['min_cell_voltage'], '.3f', 'V')} .. {_v(v['max_cell_voltage'], '.3f', 'V')}",
        f"allowed to charge  {'yes' if v['allowed_to_charge'] else 'no'}    allowed to discharge "
        f"{ATD.get(v['allowed_to_discharge'], '?')}",
        "outputs            " + ", ".join(f"{name} {'high' if outputs >> bit & 1 else 'low'}"
                                          for bit, name in enumerate(OUTPUT_BITS)),
        f"alarms             {', '.join(alarms) or 'none'}",
        f"warnings           {', '.join(warnings) or 'none'}",
        f"remote {'on' if v['remote'] else 'off'}, error LED {LEDS.get(v['error_led'])}, status LED "
        f"{LEDS.get(v['status_led'])}, balancer {BALANCER.get(v['balancer_status'])}",
        f"bank               {bank}",
        f"history            deepest discharge {_v(v['history.deepest_discharge'], '.1f', 'Ah')}, "
        f"{v['history.charge_cycles']} cycles, {v['history.synchronisations']} synchronisations, "
        f"{v['history.full_discharges']} full discharges, "
        f"{_v(v['history.discharged_energy'], '.2f', 'kWh')} out, {_v(v['history.charged_energy'], '.2f', 'kWh')} in",
    ]
    return "\n".join(lines)
