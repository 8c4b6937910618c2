"""The user settings (SET): BEHAVIOUR.md's table with defaults, ranges and cross-checks, defined once.

Modbus writes, the config file and the CLI all go through `Settings.replace_checked`, so an
out-of-range or inconsistent value is refused the same way everywhere (SET-1) and names the
setting, the value and what is allowed. "Reset to defaults" restores every setting of `SPECS` (SET-2);
mode, history and SoC are not settings, and neither is the GX custom name, which `Settings` also
carries so it is persisted with them (a reset keeps it: a name is not a setting of the table).

Voltages of the bank are stored per 12.8 V unit in series, so they stay right when the bank shape is
learned or changes: a 2S 25.6 V bank of 12.8 V batteries syncs at 2 x 14.0 = 28.0 V by default. The
pre-alarm level is per cell (PRE-1). The charge-control settings (absorption and float voltage,
absorption time, re-bulk SoC, DCL 0 at pre-alarm) are persisted and validated here; they are used by
charge control (CVL/CCL/DCL, BEHAVIOUR.md CHG).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass(frozen=True, slots=True)
class SettingSpec:
    name: str
    label: str
    unit: str
    default: float
    minimum: float
    maximum: float
    resolution: float  # smallest step a client can set (Modbus scale, CLI rounding)
    description: str
    choices: tuple[float, ...] = ()  # an on/off setting: only these values

    def allowed(self) -> str:
        if self.choices:
            return " or ".join(f"{c:g}" for c in self.choices) + " (0 off, 1 on)"
        return f"{self.minimum:g}..{self.maximum:g} {self.unit}".rstrip()


SPECS: tuple[SettingSpec, ...] = (
    SettingSpec("charged_voltage_per_unit", "charged voltage", "V", 14.0, 13.0, 14.6, 0.01,
                "per 12.8 V unit in series; SoC synchronises to 100 % above it (MON-2)"),
    SettingSpec("tail_current_pct", "tail current", "%", 4.0, 0.5, 10.0, 0.1,
                "of bank capacity; charge current below it counts as charged (MON-2)"),
    SettingSpec("charged_detection_time_min", "charged detection time", "min", 3.0, 1.0, 50.0, 1.0,
                "how long voltage and tail current must hold before synchronising (MON-2)"),
    SettingSpec("low_soc_warning_pct", "low-SoC warning level", "%", 20.0, 0.0, 99.0, 0.1,
                "pre-alarm and warning LOW_SOC_WARNING at or below it (PRE-2); must be >= the discharge floor"),
    SettingSpec("discharge_floor_pct", "discharge floor", "%", 10.0, 0.0, 99.0, 0.1,
                "allowed-to-discharge off at or below it (ATD-2); 0 disables"),
    SettingSpec("pre_alarm_level_per_cell", "pre-alarm level", "V", 3.10, 2.85, 3.15, 0.001,
                "per cell: pre-alarm at or below it (PRE-1); it clears once every cell is at 3.20 V or more"),
    SettingSpec("absorption_voltage_per_unit", "absorption voltage", "V", 14.2, 13.8, 14.4, 0.01,
                "per 12.8 V unit in series; used by charge control (CVL, CHG-1)"),
    SettingSpec("float_voltage_per_unit", "float voltage", "V", 13.5, 13.3, 13.8, 0.01,
                "per 12.8 V unit in series, below the absorption voltage; used by charge control (CVL, CHG-1)"),
    SettingSpec("absorption_time_min", "absorption time", "min", 120.0, 10.0, 480.0, 1.0,
                "how long the bank holds the absorption voltage before float; used by charge control (CHG-1)"),
    SettingSpec("rebulk_soc_pct", "re-bulk SoC", "%", 90.0, 50.0, 99.0, 0.1,
                "back to absorption at or below it; used by charge control (CHG-1)"),
    SettingSpec("dcl_zero_at_pre_alarm", "DCL 0 at pre-alarm", "", 0.0, 0.0, 1.0, 1.0,
                "1: the discharge current limit is 0 while the pre-alarm is active; used by charge control (DCL, "
                "CHG-4)", choices=(0.0, 1.0)),
)
SPEC_BY_NAME = {s.name: s for s in SPECS}
CUSTOM_NAME_LENGTH = 16  # Victron's /CustomName is string[8]: 16 characters
NAMES = (*SPEC_BY_NAME, "custom_name")  # every key of Settings


class SettingError(ValueError):
    """A refused setting: names the key, the bad value and what is allowed."""

    def __init__(self, name: str, value: Any, allowed: str) -> None:
        super().__init__(f"{name} = {value!r} is not allowed: {allowed}")
        self.name = name
        self.value = value
        self.allowed = allowed


def _default(name: str) -> Any:
    return field(default=SPEC_BY_NAME[name].default)


@dataclass(frozen=True, slots=True)
class Settings:
    charged_voltage_per_unit: float = _default("charged_voltage_per_unit")
    tail_current_pct: float = _default("tail_current_pct")
    charged_detection_time_min: float = _default("charged_detection_time_min")
    low_soc_warning_pct: float = _default("low_soc_warning_pct")
    discharge_floor_pct: float = _default("discharge_floor_pct")
    pre_alarm_level_per_cell: float = _default("pre_alarm_level_per_cell")
    absorption_voltage_per_unit: float = _default("absorption_voltage_per_unit")
    float_voltage_per_unit: float = _default("float_voltage_per_unit")
    absorption_time_min: float = _default("absorption_time_min")
    rebulk_soc_pct: float = _default("rebulk_soc_pct")
    dcl_zero_at_pre_alarm: float = _default("dcl_zero_at_pre_alarm")
    custom_name: str = ""  # the installer's name for this BMS (GX /CustomName); not a setting of the table

    def __post_init__(self) -> None:
        check(self)

    def replace_checked(self, **changes: Any) -> Settings:
        """A copy with `changes` applied, or SettingError and nothing changed (SET-1)."""
        for name in changes:
            if name not in NAMES:
                raise SettingError(name, changes[name], "one of " + ", ".join(NAMES))
        values = asdict(self) | {k: _value(k, v) for k, v in changes.items()}
        # Name the key the client wrote when only the other side of a cross-check stayed put.
        if ("discharge_floor_pct" in changes and "low_soc_warning_pct" not in changes
                and values["low_soc_warning_pct"] < values["discharge_floor_pct"]):
            raise SettingError("discharge_floor_pct", changes["discharge_floor_pct"],
                               f"<= low_soc_warning_pct ({values['low_soc_warning_pct']:g} %)")
        if ("absorption_voltage_per_unit" in changes and "float_voltage_per_unit" not in changes
                and values["float_voltage_per_unit"] >= values["absorption_voltage_per_unit"]):
            raise SettingError("absorption_voltage_per_unit", changes["absorption_voltage_per_unit"],
                               f"> float_voltage_per_unit ({values['float_voltage_per_unit']:g} V)")
        return Settings(**values)

    def reset(self) -> Settings:
        """SET-2: every setting of the table at its default; what is not a setting (the name) stays."""
        return Settings(custom_name=self.custom_name)

    def to_dict(self) -> dict[str, float | str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Settings:
        """Settings as saved. A setting the data does not have (saved by an earlier version) takes its default."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise SettingError(sorted(unknown)[0], data[sorted(unknown)[0]], "one of " + ", ".join(sorted(known)))
        return cls(**{k: _value(k, v) for k, v in data.items()})

    @property
    def charged_detection_time_s(self) -> float:
        return self.charged_detection_time_min * 60.0


def _value(name: str, value: Any) -> float | str:
    return _text(name, value) if name == "custom_name" else _number(name, value)


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str) or len(value) > CUSTOM_NAME_LENGTH or not all(" " <= c <= "~" for c in value):
        raise SettingError(name, value, f"up to {CUSTOM_NAME_LENGTH} printable ASCII characters")
    return value


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SettingError(name, value, f"a number, {SPEC_BY_NAME[name].allowed()}" if name in SPEC_BY_NAME
                           else "a number")
    return float(value)


def check(settings: Settings) -> None:
    _text("custom_name", settings.custom_name)
    for spec in SPECS:
        value = getattr(settings, spec.name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise SettingError(spec.name, value, spec.allowed())
        if not spec.minimum <= value <= spec.maximum or (spec.choices and value not in spec.choices):
            raise SettingError(spec.name, value, spec.allowed())
    if settings.low_soc_warning_pct < settings.discharge_floor_pct:
        raise SettingError("low_soc_warning_pct", settings.low_soc_warning_pct,
                           f">= discharge_floor_pct ({settings.discharge_floor_pct:g} %)")
    if settings.float_voltage_per_unit >= settings.absorption_voltage_per_unit:
        raise SettingError("float_voltage_per_unit", settings.float_voltage_per_unit,
                           f"< absorption_voltage_per_unit ({settings.absorption_voltage_per_unit:g} V)")


DEFAULT_SETTINGS = Settings()
