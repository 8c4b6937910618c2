"""`smallbms-bus status`: the instant readout of a running service, read over Modbus like a PLC would.

Reads block A (the manual's status page), block F (charge control) and block D (history) of the native map
and prints them;
the addresses and scales come from register_maps/native.toml, so this command is also a check that
the map and the server agree.

The two requests are plain Modbus TCP (MBAP + function 3) on one socket with one deadline each, read
and checked here rather than through a client library: whatever the other end does (refuses, resets,
closes, never answers, trickles, speaks HTTP, answers short) the command says so in one line and
exits 1, and a bad argument or config exits 2 naming it. No traceback reaches an installer.
"""

from __future__ import annotations

import argparse
import json
import math
import socket
import struct
import sys
import time
from typing import Any, TextIO

from smallbms_bus.bms.alarms import BalancerReason, BalancerStatus, BmsAlarm, BmsWarning, BusState, balancer_text
from smallbms_bus.bms.charge import ChargeState
from smallbms_bus.config import ConfigError, defaults, load_config
from smallbms_bus.modbus.codes import ATD_TEXT, BALANCER_BY_CODE, LED_BY_CODE, STATE_TEXT, exception_text
from smallbms_bus.readout import charge_text, consumed_text, time_remaining_text
from smallbms_bus.vocabulary import RELAY_ROLES, ROLE_LABELS

MODBUS_DEMO_PORT = 5020  # the demo's Modbus port (not 502: it runs without the privilege to bind below 1024)
STATES = STATE_TEXT
ATD = ATD_TEXT
CHARGE_STATES = {int(s): s.name.lower() for s in ChargeState}
LEDS = {code: led.value for code, led in LED_BY_CODE.items()}
BALANCER = BALANCER_BY_CODE
OUTPUT_BITS = tuple(ROLE_LABELS[role] for role in RELAY_ROLES)  # bit n of the outputs register
READ_HOLDING = 3


RESET = "connection reset by the server (it refused this client: its connection limit, or a firewall?)"


class StatusError(Exception):
    """What went wrong talking to the service, as the one line the command prints (exit 1)."""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("status", help="print the instant readout of a running service (over Modbus)",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="take host, port and unit from this configuration file's [modbus]")
    default = defaults()["modbus"]  # what a service without a config file serves
    parser.add_argument("--host", default=None, help=f"service address (default {default['host']})")
    parser.add_argument("--port", type=int, default=None,
                        help=f"Modbus TCP port (default {default['port']}; the demo uses {MODBUS_DEMO_PORT})")
    parser.add_argument("--unit", type=int, default=None, help=f"unit id of the native map (default {default['unit']})")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the service (default 3)")
    parser.add_argument("--json", action="store_true", help="JSON: register name -> value (null = unknown); with "
                        "--cells a `per_battery` list")
    parser.add_argument("--cells", action="store_true", help="also every battery and its cells (block E)")
    parser.add_argument("--watch", type=float, nargs="?", const=2.0, default=None, metavar="SECONDS",
                        help="print it again every SECONDS (default 2) until Ctrl-C")
    return parser


def _arguments(args: argparse.Namespace) -> str | None:
    """The first bad argument, named (argparse checks the types, not the ranges)."""
    if args.port is not None and not 1 <= args.port <= 65535:
        return f"--port {args.port}: allowed 1..65535"
    if args.unit is not None and not 0 <= args.unit <= 255:
        return f"--unit {args.unit}: allowed 0..255"
    if not (math.isfinite(args.timeout) and 0 < args.timeout <= 3600):
        return f"--timeout {args.timeout}: allowed seconds, more than 0 up to 3600"
    return None


def _target(args: argparse.Namespace) -> tuple[str, int, int] | str:
    if (bad := _arguments(args)) is not None:
        return bad
    default = defaults()["modbus"]
    host, port, unit = default["host"], default["port"], default["unit"]
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
    if args.watch is not None and not (math.isfinite(args.watch) and 0.1 <= args.watch <= 86400):
        print(f"status: --watch {args.watch}: allowed seconds, 0.1 up to 86400", file=sys.stderr)
        return 2
    try:
        return _show(args, target, out)
    except KeyboardInterrupt:  # Ctrl-C ends --watch: a clean stop
        return 0


def _show(args: argparse.Namespace, target: tuple[str, int, int], out: TextIO) -> int:
    host, port, unit = target
    shown = 0
    while True:
        started = time.monotonic()
        try:
            text = _readout(args, host, port, unit)
        except StatusError as error:
            print(f"status: {error}", file=sys.stderr, flush=True)
            if args.watch is None or not shown:  # --watch goes on once it has shown the service (a restart)
                return 1
        else:
            if args.watch is not None and out.isatty():
                out.write("\033[H\033[J")  # the readout in place, like top
            print(text, file=out, flush=True)
            shown += 1
        if args.watch is None:
            return 0
        time.sleep(max(0.0, args.watch - (time.monotonic() - started)))


def _readout(args: argparse.Namespace, host: str, port: int, unit: int) -> str:
    from smallbms_bus.modbus.client import Client  # it builds on this module

    with Client(host, port, unit, args.timeout) as client:
        values = client.block("A") | _charge_block(client) | {f"history.{k}": v for k, v in client.block("D").items()}
        batteries = client.batteries() if args.cells else None
    if args.json:
        return json.dumps(values | ({"per_battery": batteries} if batteries is not None else {}), ensure_ascii=False)
    text = format_status(values, f"{host}:{port} unit {unit}")
    return text if batteries is None else text + "\n" + format_cells(batteries)


def _charge_block(client: Any) -> dict[str, Any]:
    """Block F (charge control); a service from before charge control answers exception 02: shown as absent."""
    try:
        return client.block("F")
    except StatusError as error:
        if "exception 02" in str(error):
            return {}
        raise


def _charge(v: dict[str, Any]) -> str:
    if "charge_state" not in v:
        return "not served by this service version"
    state = CHARGE_STATES.get(v["charge_state"], f"state {v['charge_state']}")
    known = v["charge_voltage_limit"] is not None
    return charge_text(known, state, v["charge_voltage_limit"], v["charge_current_limit"],
                       v["discharge_current_limit"], v["discharge_voltage_limit"], bool(v["cell_voltage_limiting"]))


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    where = f"{host}:{port}"
    try:
        return socket.create_connection((host, port), timeout=timeout)
    except ConnectionRefusedError:
        raise StatusError(f"no Modbus server at {where} (connection refused: is smallbms-bus running? "
                          "see --config/--port)") from None
    except ConnectionResetError:
        raise StatusError(f"{where}: {RESET}") from None
    except TimeoutError:
        raise StatusError(f"no Modbus server at {where}: no answer within {timeout:g} s to connect") from None
    except (socket.gaierror, UnicodeError) as error:  # idna refuses names like "a..b" with UnicodeError
        raise StatusError(f"cannot resolve --host {host!r}: {error}") from None
    except OSError as error:
        raise StatusError(f"no Modbus server at {where}: {error.strerror or error}") from None


def read_registers(sock: socket.socket, tid: int, unit: int, start: int, count: int, timeout: float, where: str,
                   what: str) -> list[int]:
    """Function 3 over MBAP: the `count` words from `start`, or StatusError saying what the server did."""
    deadline = time.monotonic() + timeout
    pdu = struct.pack(">BHH", READ_HOLDING, start, count)
    try:
        sock.sendall(struct.pack(">HHHB", tid, 0, len(pdu) + 1, unit) + pdu)
        header = _receive(sock, 7, deadline, where, timeout)
        rtid, protocol, length, runit = struct.unpack(">HHHB", header)
        if protocol != 0 or rtid != tid or not 3 <= length <= 254:
            raise StatusError(f"{where}: not a Modbus answer to {what} (header {header.hex(' ')}: wrong "
                              f"{'protocol id' if protocol else 'transaction id' if rtid != tid else 'length'})")
        body = _receive(sock, length - 1, deadline, where, timeout)
    except ConnectionResetError:
        raise StatusError(f"{where}: {RESET} ({what})") from None
    except OSError as error:  # a broken pipe on send, and the like
        raise StatusError(f"{where}: {what}: {error.strerror or error}") from None
    if runit != unit:
        raise StatusError(f"{where}: not a Modbus answer to {what} (unit {runit}, asked {unit})")
    fc = body[0]
    if fc == READ_HOLDING | 0x80 and len(body) == 2:
        raise StatusError(f"{where} unit {unit} answered {what} with Modbus exception {body[1]:02d} "
                          f"({exception_text(body[1])})")
    if fc != READ_HOLDING or len(body) != 2 + 2 * count or body[1] != 2 * count:
        raise StatusError(f"{where}: not a Modbus answer to {what} (function {fc}, {len(body) - 2} data bytes, "
                          f"{2 * count} expected)")
    return list(struct.unpack(f">{count}H", body[2:]))


def _receive(sock: socket.socket, n: int, deadline: float, where: str, timeout: float) -> bytes:
    data = b""
    while len(data) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise StatusError(f"{where}: no answer within {timeout:g} s (got {len(data)} of {n} bytes)")
        sock.settimeout(left)
        try:
            chunk = sock.recv(n - len(data))
        except TimeoutError:
            continue  # the loop reports it with what arrived
        if not chunk:
            raise StatusError(f"{where}: the server closed the connection without answering")
        data += chunk
    return data


def _v(value: Any, fmt: str, unit: str, unknown: str = "unknown") -> str:
    return unknown if value is None else f"{value:{fmt}} {unit}".rstrip()


def _balancer(v: dict[str, Any]) -> str:
    status = BALANCER.get(v["balancer_status"])
    if status is None:
        return f"state {v['balancer_status']}"
    code = v.get("balancer_reason") or 0  # 0 from a service older than the register, too
    reason = BalancerReason(code) if code in tuple(BalancerReason) else BalancerReason.NONE
    return balancer_text(status, reason if status is BalancerStatus.UNKNOWN else BalancerReason.NONE)


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
        f"state of charge    {_v(v['soc'], '.1f', '%')}    consumed {consumed_text(v['consumed_ah'])}",
        f"time remaining     {time_remaining_text(remaining, v['soc'] is not None)}",
        f"temperature        battery {_v(v['battery_temperature'], '.1f', '°C')}, cells "
        f"{_v(v['min_cell_temperature'], '.1f', '°C')} .. {_v(v['max_cell_temperature'], '.1f', '°C')}",
        f"cell voltage       {_v(v['min_cell_voltage'], '.3f', 'V')} .. {_v(v['max_cell_voltage'], '.3f', 'V')}",
        f"allowed to charge  {'yes' if v['allowed_to_charge'] else 'no'}    allowed to discharge "
        f"{ATD.get(v['allowed_to_discharge'], '?')}",
        f"charge control     {_charge(v)}",
        "outputs            " + ", ".join(f"{name} {'high' if outputs >> bit & 1 else 'low'}"
                                          for bit, name in enumerate(OUTPUT_BITS)),
        f"alarms             {', '.join(alarms) or 'none'}",
        f"warnings           {', '.join(warnings) or 'none'}",
        f"remote {'on' if v['remote'] else 'off'}, error LED {LEDS.get(v['error_led'])}, status LED "
        f"{LEDS.get(v['status_led'])}, balancer {_balancer(v)}",
        f"bank               {bank}",
        f"history            deepest discharge {_v(v['history.deepest_discharge'], '.1f', 'Ah')}, "
        f"{v['history.charge_cycles']} cycles, {v['history.synchronisations']} synchronisations, "
        f"{v['history.full_discharges']} full discharges, "
        f"{_v(v['history.discharged_energy'], '.2f', 'kWh')} out, {_v(v['history.charged_energy'], '.2f', 'kWh')} in",
    ]
    return "\n".join(lines)


PRESENCE = {1: "fresh", 2: "STALE"}


def format_cells(batteries: list[dict[str, Any]]) -> str:
    """Every battery on one line and its cells on the next, the lowest and highest cell of the bank marked."""
    cells = [c for b in batteries for c in b["cells"] if c is not None]
    low, high = (min(cells), max(cells)) if cells else (None, None)
    lines = [f"batteries          {len(batteries)}; cells {_v(low, '.3f', 'V')} (v) .. {_v(high, '.3f', 'V')} (^)"
             + (f", spread {1000 * (high - low):.0f} mV" if cells else "")]
    for b in batteries:
        where = f"string {b['string_index']} position {b['series_index']}" if b.get("string_index") else "not placed"
        lines.append(f"  battery {b['node']:<3} {b['serial'] or '?':<14} {PRESENCE.get(b['presence'], '?'):<6} "
                     f"{_v(b['voltage'], '.2f', 'V')}  {_v(b['current'], '+.1f', 'A')}  "
                     f"{_v(b['temperature'], '.1f', '°C')}  {where}")
        marks = ["unknown" if c is None else f"{c:.3f}" + ("v" if c == low else "^" if c == high else " ")
                 for c in b["cells"]]
        lines.append("    cells " + " ".join(marks))
    return "\n".join(lines)
