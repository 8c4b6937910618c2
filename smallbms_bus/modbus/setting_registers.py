"""One descriptor per setting register: read (sources.py), write (writes.py) and the documented range all go
through it, and it is derived from the core's `SettingSpec`s, so a new setting needs no Modbus table edit.

A register's target (its `source`/`target` in register_maps/) is the setting's name without its unit suffix
(`tail_current_pct` -> `tail_current`). Settings kept per 12.8 V unit in series (`*_per_unit`) are shown and
written for the whole bank: unknown until the bank's units in series are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from smallbms_bus.bms.settings import SPECS, SettingSpec

UNIT_SUFFIXES = ("_per_unit", "_per_cell", "_pct", "_min")


def register_target(setting: str) -> str:
    """The register maps' name for a setting: its name without the unit suffix."""
    for suffix in UNIT_SUFFIXES:
        if setting.endswith(suffix):
            return setting[: -len(suffix)]
    return setting


@dataclass(frozen=True)
class SettingRegister:
    target: str
    spec: SettingSpec

    @property
    def per_unit(self) -> bool:
        return self.spec.name.endswith("_per_unit")

    def to_bank(self, value: float, series_units: int | None) -> float | None:
        """A core value as the register shows it: per-unit voltages for the whole bank (None until it is known)."""
        if self.per_unit:
            return None if series_units is None else value * series_units
        return value

    def read(self, settings: Any, series_units: int | None) -> float | int | None:
        """The register's value in the map's units (before scaling to words)."""
        value = getattr(settings, self.spec.name)
        if self.spec.choices and not self.per_unit:
            return int(value)
        return self.to_bank(value, series_units)


SETTING_REGISTERS = tuple(SettingRegister(register_target(spec.name), spec) for spec in SPECS)
BY_TARGET = {r.target: r for r in SETTING_REGISTERS}
