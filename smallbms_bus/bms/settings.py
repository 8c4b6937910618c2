"""The five user settings (SET): defaults, ranges and cross-checks, defined once.

Modbus writes, the config file and the CLI all go through `Settings.replace_checked`, so an
out-of-range or inconsistent value is refused the same way everywhere (SET-1) and names the
setting, the value and what is allowed. `DEFAULT_SETTINGS` is what "reset to defaults" restores
(SET-2): exactly these five, nothing else (mode, history and SoC are not settings).

The charged voltage is stored per 12.8 V unit in series, so it stays right when the bank shape is
learned or changes: a 2S 25.6 V bank of 12.8 V batteries syncs at 2 x 14.0 = 28.0 V by default.
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

    def allowed(self) -> str:
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
)
SPEC_BY_NAME = {s.name: s for s in SPECS}


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

    def __post_init__(self) -> None:
        check(self)

    def replace_checked(self, **changes: Any) -> Settings:
        """A copy with `changes` applied, or SettingError and nothing changed (SET-1)."""
        for name in changes:
            if name not in SPEC_BY_NAME:
                raise SettingError(name, changes[name], "one of " + ", ".join(SPEC_BY_NAME))
        values = asdict(self) | {k: _number(k, v) for k, v in changes.items()}
        # Name the key the client wrote when only the other side of the cross-check stayed put.
        if ("discharge_floor_pct" in changes and "low_soc_warning_pct" not in changes
                and values["low_soc_warning_pct"] < values["discharge_floor_pct"]):
            raise SettingError("discharge_floor_pct", changes["discharge_floor_pct"],
                               f"<= low_soc_warning_pct ({values['low_soc_warning_pct']:g} %)")
        return Settings(**values)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Settings:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise SettingError(sorted(unknown)[0], data[sorted(unknown)[0]], "one of " + ", ".join(sorted(known)))
        return cls(**{k: _number(k, v) for k, v in data.items()})

    @property
    def charged_detection_time_s(self) -> float:
        return self.charged_detection_time_min * 60.0


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SettingError(name, value, f"a number, {SPEC_BY_NAME[name].allowed()}" if name in SPEC_BY_NAME
                           else "a number")
    return float(value)


def check(settings: Settings) -> None:
    for spec in SPECS:
        value = getattr(settings, spec.name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise SettingError(spec.name, value, spec.allowed())
        if not spec.minimum <= value <= spec.maximum:
            raise SettingError(spec.name, value, spec.allowed())
    if settings.low_soc_warning_pct < settings.discharge_floor_pct:
        raise SettingError("low_soc_warning_pct", settings.low_soc_warning_pct,
                           f">= discharge_floor_pct ({settings.discharge_floor_pct:g} %)")


DEFAULT_SETTINGS = Settings()
