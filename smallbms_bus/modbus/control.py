"""`settings`, `set`, `mode`, `command`, `set-soc` and `history`: a running service's settings and commands
over Modbus, by name and in engineering units (docs/cli.md).

Nothing here knows a limit of its own: the settings, their units, defaults and ranges are the core's
`SPECS` (smallbms_bus/bms/settings.py), the registers and scales register_maps/native.toml. The service
decides; a write it refuses is explained from what it reads back (the range, the other setting of a
cross-check, the permission) and the command exits 1. Bad arguments exit 2, an unreachable service 1,
each with one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from pymodbus.constants import ExcCodes

from smallbms_bus.bms.settings import DEFAULT_SETTINGS, SettingError, Settings, SettingSpec
from smallbms_bus.modbus.client import Client, Refused, add_target_arguments, series_units, target
from smallbms_bus.modbus.regmap import Register, load_map
from smallbms_bus.modbus.setting_registers import BY_TARGET, SettingRegister
from smallbms_bus.modbus.status import STATES, StatusError
from smallbms_bus.modbus.writes import COMMAND_CODES
from smallbms_bus.protocol import PER_UNIT

# what a busy refusal (06) of a command means (modbus/writes.py refuses it for that reason only)
BUSY_MEANS = {"relearn": "no battery is heard on the bus now, and a re-learn would learn an empty bank (BANK-4)"}
# asked for on a terminal (or --yes): what they lose or switch off
DESTRUCTIVE = {"reset-history": "erase the history counters",
               "reset-settings": "put every setting back to its default",
               "relearn": "accept the bank as it is now (a battery no longer heard is forgotten)",
               "firmware-begin": "switch charging off until the update is completed or aborted"}


@dataclass(frozen=True)
class Setting:
    """A setting as the register map shows it: per bank for the voltages the core keeps per 12.8 V unit."""

    register: Register
    descriptor: SettingRegister  # the one descriptor of this setting register (modbus/setting_registers.py)

    @property
    def name(self) -> str:
        return self.register.name

    @property
    def spec(self) -> SettingSpec:
        return self.descriptor.spec

    @property
    def per_unit(self) -> bool:
        return self.descriptor.per_unit

    @property
    def digits(self) -> int:
        return max(0, -math.floor(math.log10(self.register.scale) + 1e-9))

    def text(self, value: float | None) -> str:
        if value is None:
            return "unknown"
        if self.spec.choices:
            return "on (1)" if value else "off (0)"
        return f"{value:.{self.digits}f} {self.spec.unit}".rstrip()

    def bank(self, value: float, units: int | None) -> float | None:
        """A core value (per unit for voltages) as the register shows it."""
        return self.descriptor.to_bank(value, units)

    def allowed(self, units: int | None) -> str:
        spec, d = self.spec, self.digits
        if spec.choices:
            return "0 off, 1 on"
        per = f"{spec.minimum:.{d}f}-{spec.maximum:.{d}f} {spec.unit}".rstrip()
        if not self.per_unit:
            return per
        if units is None:
            return f"{per} {PER_UNIT} in series (the bank is not learned yet)"
        bank = f"{spec.minimum * units:.{d}f}-{spec.maximum * units:.{d}f} {spec.unit}"
        return f"{bank} ({per} {PER_UNIT} x {units})"


def settings_table() -> dict[str, Setting]:
    """Block B's settings in map order, each with the core's spec."""
    block = next(b for b in load_map("native").blocks if b.name == "B")
    return {r.name: Setting(r, BY_TARGET[r.target]) for r in block.registers if r.target in BY_TARGET}


SETTINGS = settings_table()


def setting_list() -> str:
    """Every setting name with its unit and range (the help of `set`)."""
    def span(s: Setting) -> str:
        if s.per_unit:  # written per bank: the range scales with the 12.8 V units in series
            return (f"{s.allowed(None).split(' per ')[0]} {PER_UNIT} in series; write the bank's voltage "
                    f"(24 V bank: {s.allowed(2).split(' (')[0]})")
        return s.allowed(1) + (" per cell" if s.register.target == "pre_alarm_level" else "")

    return "\n".join(f"  {s.name:<24}{span(s)}\n  {'':<24}{s.spec.label}: {s.spec.description}"
                     for s in SETTINGS.values())


def _fail(command: str, message: str, code: int = 1) -> int:
    print(f"{command}: {message}", file=sys.stderr)
    return code


def _session(args: argparse.Namespace, command: str, work: Callable[[Client], int]) -> int:
    where = target(args)
    if isinstance(where, str):
        return _fail(command, where, 2)
    try:
        with Client(*where, args.timeout) as client:
            return work(client)
    except StatusError as error:
        return _fail(command, str(error))


# -- settings ----------------------------------------------------------------------------------------------
def _current(client: Client) -> tuple[dict[str, Any], dict[str, Any], int | None]:
    status, values = client.block("A"), client.block("B")
    return status, values, series_units(status)


def _rows(values: dict[str, Any], units: int | None) -> list[dict[str, Any]]:
    return [{"name": s.name, "value": values.get(s.name), "unit": s.spec.unit,
             "default": s.bank(s.spec.default, units), "range": s.allowed(units), "label": s.spec.label,
             "description": s.spec.description} for s in SETTINGS.values()]


def add_parser_settings(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("settings", help="print every setting of a running service: value, unit, "
                                   "default, range", description="Every setting with its value, default and range.")
    add_target_arguments(parser)
    parser.add_argument("--json", action="store_true", help="JSON: one object per setting")
    return parser


def run_settings(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout

    def work(client: Client) -> int:
        _, values, units = _current(client)
        rows = _rows(values, units)
        if args.json:
            print(json.dumps(rows, indent=1, ensure_ascii=False), file=out)
            return 0
        print(f"{'setting':<24}{'value':<12}{'default':<12}range", file=out)
        for row, s in zip(rows, SETTINGS.values(), strict=True):
            print(f"{s.name:<24}{s.text(row['value']):<12}{s.text(row['default']):<12}{row['range']}", file=out)
        if units is None:
            print("(voltages are per bank: unknown until the bank is learned)", file=out)
        return 0

    return _session(args, "settings", work)


# -- set ---------------------------------------------------------------------------------------------------
def add_parser_set(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "set", help="change one setting of a running service, in engineering units (set discharge_floor 15)",
        description="Change one setting, in the unit shown (voltages per bank). Settings and ranges:\n"
                    + setting_list(), formatter_class=argparse.RawDescriptionHelpFormatter)
    name = parser.add_argument("name", metavar="NAME", help="setting name: " + ", ".join(SETTINGS))
    name.completions = tuple(SETTINGS)  # type: ignore[attr-defined]  # for `smallbms-bus completion bash`
    parser.add_argument("value", metavar="VALUE", help="new value in the setting's unit (0/1 or off/on for switches)")
    add_target_arguments(parser)
    return parser


def _number(text: str) -> float | None:
    text = {"on": "1", "off": "0"}.get(text.lower(), text)
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def explain(setting: Setting, value: float, values: dict[str, Any], units: int | None) -> str:
    """Why the core refuses `value` for `setting`, given the settings read back (bank units: `units`)."""
    spec = setting.spec
    core = value / units if setting.per_unit and units else value
    if (spec.choices and core not in spec.choices) or not spec.minimum - 1e-9 <= core <= spec.maximum + 1e-9:
        return f"allowed {setting.allowed(units)}"
    current: dict[str, float] = {}
    for s in SETTINGS.values():
        got = values.get(s.name)
        if got is not None and (not s.per_unit or units):
            current[s.spec.name] = got / units if s.per_unit and units else got
    try:
        base = Settings.from_dict(current)
    except SettingError:
        base = DEFAULT_SETTINGS
    try:
        base.replace_checked(**{spec.name: core})
    except SettingError as error:
        return f"{_register_name(error.name)} must be {_bank_text(error.allowed, values)}"
    return "the service refused it for a reason not visible from here (see its event log)"


def _register_name(core_name: str) -> str:
    return next((s.name for s in SETTINGS.values() if s.spec.name == core_name), core_name)


def _bank_text(text: str, values: dict[str, Any]) -> str:
    """The core's "other_setting_pct (15 %)" as the register map shows it: "discharge_floor (15.0 %)"."""
    def swap(match: re.Match[str]) -> str:
        name = _register_name(match.group(1))
        setting = SETTINGS.get(name)
        if setting is None or values.get(name) is None:
            return f"{name} ({match.group(2)})"
        return f"{name} ({setting.text(values[name])})"

    return re.sub(r"\b([a-z_]+_(?:pct|per_unit|per_cell|min))\b \(([^)]*)\)", swap, text)


def run_set(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    setting = SETTINGS.get(args.name)
    if setting is None:
        hint = " (use `smallbms-bus mode on|off`)" if args.name == "mode" else ""
        return _fail("set", f"unknown setting {args.name!r}{hint}; one of: {', '.join(SETTINGS)}", 2)
    value = _number(args.value)
    if value is None:
        return _fail("set", f"{args.name} {args.value!r}: not a number", 2)
    reg = setting.register

    def work(client: Client) -> int:
        _, before, units = _current(client)
        raw = round(value / reg.scale)
        if not 0 <= raw <= 0xFFFF:  # cannot be written at all: the service would refuse it too
            why = explain(setting, value, before, units)
            return _fail("set", f"{setting.name} = {value:g} refused (not sent): {why}")
        try:
            client.write(setting.name, raw)
        except Refused as refused:
            why = explain(setting, value, before, units) if refused.code == 3 else str(refused)
            if refused.code == 6 and setting.per_unit:
                why += ": the bank is not learned yet, so its units in series are unknown"
            return _fail("set", f"{setting.name} = {value:g} {setting.spec.unit} refused: {why}".replace("  ", " "))
        after = client.block("B")[setting.name]
        print(f"{setting.name} = {setting.text(after)} (was {setting.text(before.get(setting.name))})", file=out)
        return 0

    return _session(args, "set", work)


# -- mode, set-soc, command ----------------------------------------------------------------------------------
def add_parser_mode(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("mode", help="switch a running service's mode on or off (off: loads and chargers "
                                   "off)", description="Mode on or off (REM-3): off switches both disconnects off.")
    parser.add_argument("state", choices=("on", "off"))
    add_target_arguments(parser)
    return parser


def _state_text(client: Client) -> str:
    status = client.block("A")
    return str(STATES.get(status["state"], status["state"]))


def run_mode(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout

    def work(client: Client) -> int:
        try:
            client.write("mode", int(args.state == "on"))
        except Refused as refused:
            return _fail("mode", f"mode {args.state} refused: {refused}")
        print(f"mode {args.state}: state {_state_text(client)}", file=out)
        return 0

    return _session(args, "mode", work)


def add_parser_set_soc(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("set-soc", help="set the state of charge of a running service (%%)",
                                   description="Set the bank's state of charge, in %% (needs a learned bank).")
    parser.add_argument("soc", metavar="PERCENT", help="new state of charge, 0-100 %%")
    add_target_arguments(parser)
    return parser


def run_set_soc(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    soc = _number(args.soc)
    if soc is None:
        return _fail("set-soc", f"{args.soc!r}: not a number (0-100 %)", 2)

    def work(client: Client) -> int:
        reg = client.registers["set_soc"]
        low, high = reg.range or (0.0, 100.0)
        raw = round(soc / reg.scale)
        try:
            if not 0 <= raw <= 0xFFFF:
                raise Refused(3, "")
            client.write("set_soc", raw)
        except Refused as refused:
            why = (f"allowed {low:g}-{high:g} %" if refused.code == 3 else
                   f"{refused}: the bank capacity is not known yet (state: {_state_text(client)})"
                   if refused.code == 6 else str(refused))
            return _fail("set-soc", f"{soc:g} % refused: {why}")
        now = client.block("A")["soc"]
        print(f"state of charge {'unknown' if now is None else f'{now:.1f} %'}", file=out)
        return 0

    return _session(args, "set-soc", work)


def add_parser_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("command", help="send a command to a running service: " + ", ".join(COMMAND_CODES),
                                   description="Send a command (docs/cli.md). " + "; ".join(
                                       f"{k} {v}" for k, v in DESTRUCTIVE.items()) + ": these ask first.")
    parser.add_argument("name", choices=tuple(COMMAND_CODES), metavar="NAME", help=", ".join(COMMAND_CODES))
    parser.add_argument("--yes", action="store_true", help="do not ask (scripts; needed without a terminal for "
                        + ", ".join(DESTRUCTIVE) + ")")
    add_target_arguments(parser)
    return parser


def _confirmed(name: str, where: str) -> bool | None:
    """True to go on; False when the user said no; None: no terminal to ask on."""
    if not sys.stdin.isatty():
        return None
    try:
        answer = input(f"command {name} on {where}: {DESTRUCTIVE[name]}? [y/N] ")
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


def run_command(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    name = args.name
    if name in DESTRUCTIVE and not args.yes:
        where = target(args)
        if isinstance(where, str):
            return _fail("command", where, 2)
        ok = _confirmed(name, f"{where[0]}:{where[1]}")
        if ok is None:
            return _fail("command", f"{name} would {DESTRUCTIVE[name]}: confirm with --yes (no terminal to ask on)", 2)
        if not ok:
            return _fail("command", f"{name}: not confirmed, nothing sent")

    def work(client: Client) -> int:
        try:
            client.write("command", COMMAND_CODES[name])
        except Refused as refused:
            hint = f"; {BUSY_MEANS[name]}" if refused.code == ExcCodes.DEVICE_BUSY and name in BUSY_MEANS else ""
            return _fail("command", f"{name} refused: {refused}{hint}")
        print(f"command {name}: done; state {_state_text(client)}", file=out)
        return 0

    return _session(args, "command", work)


# -- history -------------------------------------------------------------------------------------------------
def add_parser_history(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("history", help="print the history counters of a running service (over Modbus)",
                                   description="The history (manual 5.1.3), read from block D of the native map.")
    add_target_arguments(parser)
    parser.add_argument("--json", action="store_true", help="JSON: register name -> value (null = unknown)")
    return parser


def run_history(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout

    def work(client: Client) -> int:
        values = client.block("D")
        if args.json:
            print(json.dumps(values, indent=1), file=out)
            return 0
        for reg in next(b for b in client.map.blocks if b.name == "D").registers:
            value = values.get(reg.name)
            if reg.name == "time_since_last_full_charge":
                text = "never" if value is None else f"{value / 86400:.1f} days ({value} s)"
            elif value is None:
                text = "unknown"
            else:
                digits = max(0, -math.floor(math.log10(reg.scale) + 1e-9))
                text = f"{value:.{digits}f} {reg.unit}".rstrip()
            print(f"{reg.name.replace('_', ' '):<30}{text}", file=out)
        return 0

    return _session(args, "history", work)
