"""What a write does: every writable register's `target`, applied whole or not at all.

`plan_writes` checks a whole request first (ranges, the core's own setting checks, whether the bank is
known well enough) and only then returns the steps; nothing is changed when any word is refused
(REGISTERS.md: "a multi-register write is applied whole or not at all"). Settings are checked and set
through `BmsCore.set_settings`, the single place that knows their limits (SET-1).

Each step names the snapshot parts it changes, so the write path (smallbms_bus/commit.py) can put them
back when the store cannot commit the change (SET-3); "mode off" is `kept`: it stays in effect anyway.
The targets are not Modbus-specific: any front end that names (name, target, value) can use them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from smallbms_bus.bms.core import BmsCore
from smallbms_bus.bms.settings import SPEC_BY_NAME, SettingError
from smallbms_bus.modbus.sources import GX_MODE_ON, GX_MODE_STANDBY

# Refusal codes are Modbus exception numbers; other front ends map them (e.g. HTTP 400 / 503 / 409).
ILLEGAL_VALUE = 3  # Modbus exception 03
STORE_FAILED = 4  # Modbus exception 04 (SERVER_DEVICE_FAILURE): the store could not commit the change (SET-3)
BUSY = 6  # Modbus exception 06: valid, but not possible yet (the bank is not learned, the service is stopping)

# register target -> the core's setting name (block B; SunSpec's SoCRsvMin is the discharge floor)
SETTING_TARGETS = {
    "charged_voltage": "charged_voltage_per_unit",
    "tail_current": "tail_current_pct",
    "charged_detection_time": "charged_detection_time_min",
    "low_soc_warning": "low_soc_warning_pct",
    "discharge_floor": "discharge_floor_pct",
    "pre_alarm_level": "pre_alarm_level_per_cell",
    "absorption_voltage": "absorption_voltage_per_unit",
    "float_voltage": "float_voltage_per_unit",
    "absorption_time": "absorption_time_min",
    "rebulk_soc": "rebulk_soc_pct",
    "dcl_zero_at_pre_alarm": "dcl_zero_at_pre_alarm",
}
PER_UNIT_TARGETS = frozenset({"charged_voltage", "absorption_voltage", "float_voltage"})  # per bank on the wire
COMMANDS = {1: "synchronise SoC", 2: "reset history", 3: "reset settings", 4: "re-learn bank",
            5: "begin firmware update", 6: "firmware update completed", 7: "abort firmware update"}
TARGETS = frozenset({*SETTING_TARGETS, "mode", "command", "set_soc", "gx_mode"})


class WriteRefused(Exception):
    """A write the server answers with a Modbus exception; `code` is the exception code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Step:
    describe: str
    apply: Callable[[], object]
    parts: tuple[str, ...]  # the snapshot parts (BmsCore.snapshot) this step changes
    kept: bool = False  # stays in effect when the store cannot commit it ("mode off": the safe direction)


def target_range(target: str) -> str:
    """The documented range of a write target (settings: from the core's SPECS)."""
    if target in PER_UNIT_TARGETS:
        spec = SPEC_BY_NAME[SETTING_TARGETS[target]]
        extra = ", < absorption_voltage" if target == "float_voltage" else ""
        return f"{spec.minimum:.2f}-{spec.maximum:.2f} V x 12.8 V units in series{extra}"
    if target in SETTING_TARGETS:
        spec = SPEC_BY_NAME[SETTING_TARGETS[target]]
        if spec.choices:
            return "0 off, 1 on"
        extra = ", >= discharge_floor" if target == "low_soc_warning" else ""
        return f"{spec.minimum:g}-{spec.maximum:g} {spec.unit}{extra}".rstrip()
    if target == "gx_mode":
        return f"{GX_MODE_ON} on, {GX_MODE_STANDBY} standby"
    return ""


def plan_writes(core: BmsCore, writes: Sequence[tuple[str, str, float]], now: float,
                reason: str = "Modbus write") -> list[Step]:
    """`writes` are (register name, target, engineering value); raises WriteRefused and changes nothing.
    `reason` is what the core's MODE event says."""
    settings: dict[str, float] = {}
    steps: list[Step] = []
    for name, target, value in writes:
        if target in SETTING_TARGETS:
            if target in PER_UNIT_TARGETS:
                units = core.bank.topology().series_units
                if not units:
                    raise WriteRefused(BUSY, f"{name}: the bank is not learned yet, so the units in series "
                                             "are unknown")
                value = round(value / units, 6)
            settings[SETTING_TARGETS[target]] = value
        elif target == "mode":
            on = bool(value)
            steps.append(Step(f"mode {'on' if on else 'off'}", lambda on=on: core.set_mode(on, reason),
                              ("mode_on",), kept=not on))  # type: ignore[misc]
        elif target == "gx_mode":
            if value not in (GX_MODE_ON, GX_MODE_STANDBY):
                raise WriteRefused(ILLEGAL_VALUE, f"{name} = {value:g}: {target_range('gx_mode')}")
            on = value == GX_MODE_ON
            steps.append(Step(f"mode {'on' if on else 'off'} (GX)",
                              lambda on=on: core.set_mode(on, f"{reason} (GX)"),  # type: ignore[misc]
                              ("mode_on",), kept=not on))
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
        steps.insert(0, Step("settings " + ", ".join(f"{k}={v:g}" for k, v in settings.items()),
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
    action, part = actions[code]
    return Step(f"command {code} ({COMMANDS[code]})", action, (part,))
