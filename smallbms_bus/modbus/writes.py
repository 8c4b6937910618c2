"""What a write does: every writable register's `target`, applied whole or not at all.

`plan_writes` checks a whole request first (ranges, the core's own setting checks, whether the bank is
known well enough) and only then returns the steps; nothing is changed when any word is refused
(REGISTERS.md: "a multi-register write is applied whole or not at all"). Settings are checked and set
through `BmsCore.set_settings`, the single place that knows their limits (SET-1).

Each step names the snapshot parts it changes, so the write path (smallbms_bus/commit.py) can put them
back when the store cannot commit the change (SET-3); "mode off" is `kept`: it stays in effect anyway.
A step that is not `durable` (the SunSpec controller heartbeat, written every second) is answered
without a store commit: it is not a setting, mode or command, and an fsync per second would wear an SD card.
The targets are not Modbus-specific: any front end that names (name, target, value) can use them; a
string register's value is a `StringPatch` (the words written, merged into the current text here).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeAlias

from pymodbus.constants import ExcCodes

from smallbms_bus.bms.core import BmsCore
from smallbms_bus.bms.settings import CUSTOM_NAME_LENGTH, SPEC_BY_NAME, SettingError
from smallbms_bus.modbus.setting_registers import SETTING_REGISTERS
from smallbms_bus.modbus.sources import (
    GX_MODE_ON,
    GX_MODE_STANDBY,
    SS_INVERTER_STANDBY,
    SS_INVERTER_STARTED,
    SS_INVERTER_STOPPED,
    SS_SET_OP_CONNECT,
    SS_SET_OP_DISCONNECT,
)
from smallbms_bus.protocol import UNIT_VOLTAGE

# Refusal codes are Modbus exception numbers; other front ends map them (e.g. HTTP 400 / 503 / 409).
ILLEGAL_VALUE = ExcCodes.ILLEGAL_VALUE  # 03
STORE_FAILED = ExcCodes.DEVICE_FAILURE  # 04: the store could not commit the change (SET-3)
BUSY = ExcCodes.DEVICE_BUSY  # 06: valid, but not possible yet (the bank is not learned, the service is stopping)

# register target -> the core's setting name (block B; SunSpec's SoCRsvMin is the discharge floor)
SETTING_TARGETS = {r.target: r.spec.name for r in SETTING_REGISTERS}
PER_UNIT_TARGETS = frozenset(r.target for r in SETTING_REGISTERS if r.per_unit)  # per bank on the wire
COMMANDS = {1: "synchronise SoC", 2: "reset history", 3: "reset settings", 4: "re-learn bank",
            5: "begin firmware update", 6: "firmware update completed", 7: "abort firmware update"}
# the command words of the CLI (`smallbms-bus command NAME`) and the web API (/api/v1/commands/NAME) -> code
COMMAND_CODES = {"sync": 1, "reset-history": 2, "reset-settings": 3, "relearn": 4, "firmware-begin": 5,
                 "firmware-done": 6, "firmware-abort": 7}
# SunSpec 802 SetOp / SetInvState value -> mode on (True) or off (False)
MODE_TARGETS: dict[str, dict[int, bool]] = {
    "mode": {0: False, 1: True},
    "gx_mode": {GX_MODE_ON: True, GX_MODE_STANDBY: False},
    "sunspec_set_operation": {SS_SET_OP_CONNECT: True, SS_SET_OP_DISCONNECT: False},
    "sunspec_inverter_state": {SS_INVERTER_STOPPED: False, SS_INVERTER_STANDBY: False, SS_INVERTER_STARTED: True},
}
MODE_VIA = {"gx_mode": " (GX)", "sunspec_set_operation": " (SunSpec SetOp)",
            "sunspec_inverter_state": " (SunSpec SetInvState)"}  # what the MODE event and the log say
ALARM_RESET = 1  # SunSpec AlmRst: 1 = reset (0 is accepted and does nothing)
TARGETS = frozenset({*SETTING_TARGETS, *MODE_TARGETS, "command", "set_soc", "alarm_reset", "controller_heartbeat",
                     "custom_name"})


@dataclass(frozen=True)
class StringPatch:
    """Words written into a string register of `words` words, from its word `offset` on. As Victron's
    dbus_modbustcp does, the words not written keep the current text and the result ends at the first NUL."""

    offset: int
    data: tuple[int, ...]
    words: int

    def apply(self, current: str) -> str:
        raw = bytearray(current.encode("latin-1", "replace")[: 2 * self.words].ljust(2 * self.words, b"\0"))
        for i, word in enumerate(self.data):
            raw[2 * (self.offset + i): 2 * (self.offset + i) + 2] = word.to_bytes(2, "big")
        return raw.split(b"\0", 1)[0].decode("latin-1")


WriteValue: TypeAlias = float | StringPatch


class Refused(Exception):
    """A request the server answers with a Modbus exception; `code` is the exception code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class WriteRefused(Refused):
    """A write refused: by the server (not writable, out of range) or by the write path (busy, store failed)."""


@dataclass(frozen=True)
class Step:
    describe: str
    apply: Callable[[], object]
    parts: tuple[str, ...]  # the snapshot parts (BmsCore.snapshot) this step changes
    kept: bool = False  # stays in effect when the store cannot commit it ("mode off": the safe direction)
    durable: bool = True  # committed to the store before the answer (SET-3)


def target_range(target: str) -> str:
    """The documented range of a write target (settings: from the core's SPECS)."""
    if target in SETTING_TARGETS:
        spec = SPEC_BY_NAME[SETTING_TARGETS[target]]
        if spec.choices:
            return "0 off, 1 on"
        digits = max(0, -math.floor(math.log10(spec.resolution) + 1e-9))  # as many decimals as a write can set
        span = f"{spec.minimum:.{digits}f}-{spec.maximum:.{digits}f} {spec.unit}"
        extra = {"low_soc_warning": ", >= discharge_floor", "float_voltage": ", < absorption_voltage",
                 "pre_alarm_level": " per cell"}.get(target, "")
        if target in PER_UNIT_TARGETS:
            span += f" x {UNIT_VOLTAGE} V units in series"
        return f"{span}{extra}".rstrip()
    if target == "gx_mode":
        return f"{GX_MODE_ON} on, {GX_MODE_STANDBY} standby"
    if target == "sunspec_set_operation":
        return f"{SS_SET_OP_CONNECT} connect (mode on), {SS_SET_OP_DISCONNECT} disconnect (mode off)"
    if target == "sunspec_inverter_state":
        return (f"{SS_INVERTER_STARTED} started (mode on), {SS_INVERTER_STOPPED} stopped or "
                f"{SS_INVERTER_STANDBY} standby (mode off)")
    if target == "alarm_reset":
        return f"{ALARM_RESET} reset, 0 nothing"
    if target == "controller_heartbeat":
        return "0-65535"
    if target == "custom_name":
        return f"up to {CUSTOM_NAME_LENGTH} printable ASCII characters, NUL padded"
    return ""


def plan_writes(core: BmsCore, writes: Sequence[tuple[str, str, WriteValue]], now: float,
                reason: str = "Modbus write") -> list[Step]:
    """`writes` are (register name, target, engineering value); raises WriteRefused and changes nothing.
    `reason` is what the core's MODE event says."""
    settings: dict[str, float | str] = {}
    steps: list[Step] = []
    for name, target, value in writes:
        if isinstance(value, StringPatch):
            if target != "custom_name":
                raise WriteRefused(ILLEGAL_VALUE, f"{name}: no text target {target!r}")
            settings["custom_name"] = value.apply(str(settings.get("custom_name", core.settings.custom_name)))
        elif target in SETTING_TARGETS:
            if target in PER_UNIT_TARGETS:
                units = core.bank.topology().series_units
                if not units:
                    raise WriteRefused(BUSY, f"{name}: the bank is not learned yet, so the units in series "
                                             "are unknown")
                value = round(value / units, 6)
            settings[SETTING_TARGETS[target]] = value
        elif target in SPEC_BY_NAME:  # a setting by the core's own name and unit (MQTT: per unit, per cell)
            settings[target] = value
        elif target in MODE_TARGETS:
            if value not in MODE_TARGETS[target]:
                raise WriteRefused(ILLEGAL_VALUE, f"{name} = {value:g}: {target_range(target) or '0 off, 1 on'}")
            on = MODE_TARGETS[target][int(value)]
            via = MODE_VIA.get(target, "")
            steps.append(Step(f"mode {'on' if on else 'off'}{via}",
                              lambda on=on, via=via: core.set_mode(on, reason + via),  # type: ignore[misc]
                              ("mode_on",), kept=not on))
        elif target == "alarm_reset":
            if value not in (0, ALARM_RESET):
                raise WriteRefused(ILLEGAL_VALUE, f"{name} = {value:g}: {target_range(target)}")
            if value == ALARM_RESET:
                steps.append(Step("alarm reset", lambda: core.reset_alarms(now), ("timers",)))
        elif target == "controller_heartbeat":
            steps.append(Step(f"controller heartbeat {value:g}",
                              lambda v=int(value): core.controller_heartbeat_seen(v),  # type: ignore[misc]
                              (), durable=False))
        elif target == "set_soc":
            if not core.bank.topology().bank_capacity_ah:
                raise WriteRefused(BUSY, f"{name}: the bank capacity is not known yet")
            steps.append(Step(f"SoC := {value:g} %", lambda v=value: core.set_soc(v), ("monitor",)))  # type: ignore[misc]
        elif target == "command":
            steps.append(_command(core, int(value), now))
        else:  # a map names a target this module does not know: refused, and a test catches the map
            raise WriteRefused(ILLEGAL_VALUE, f"{name}: no write target {target!r}")
    if settings:
        try:
            core.settings.replace_checked(**settings)  # the check only; set below, with the other steps
        except SettingError as error:
            raise WriteRefused(ILLEGAL_VALUE, str(error)) from None
        steps.insert(0, Step("settings " + ", ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v:g}"
                                                     for k, v in settings.items()),
                             lambda: core.set_settings(**settings), ("settings",)))
    return steps


def _command(core: BmsCore, code: int, now: float) -> Step:
    actions: dict[int, tuple[Callable[[], object], str]] = {
        1: (core.synchronise_soc, "monitor"),
        2: (core.reset_history, "history"),
        3: (core.reset_settings, "settings"),
        4: (lambda: core.relearn_bank(now), "learned_bank"),
        5: (lambda: core.firmware_update("start"), "timers"),
        6: (lambda: core.firmware_update("complete"), "timers"),
        7: (lambda: core.firmware_update("abort"), "timers"),
    }
    if code not in actions:
        raise WriteRefused(ILLEGAL_VALUE, f"command {code}: one of " +
                           ", ".join(f"{k} {v}" for k, v in COMMANDS.items()))
    if code == 4 and not core.bank.heard(now):  # BANK-4 would learn an empty bank: every battery unknown after
        raise WriteRefused(BUSY, f"command 4 ({COMMANDS[4]}): no battery heard within comm_timeout "
                                 f"({core.bank.comm_timeout:g} s), nothing to learn: is the bus connected?")
    action, part = actions[code]
    return Step(f"command {code} ({COMMANDS[code]})", action, (part,))
