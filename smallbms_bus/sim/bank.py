"""A virtual bank: batteries in series strings, strings in parallel.

Theory of operation
-------------------
A bank shape is written ``<S>s<P>p-<12|24|48>v<Ah>``: S batteries in series per string, P strings
in parallel, every battery 12.8/25.6/51.2 V (1/2/4 units) with the same capacity. Only shapes the
smallBMS NG manual allows exist: at most 4 x 12.8 V in series, at most 50 batteries at 12/24 V and
25 at 48 V; anything else is a ValueError that says which limit was hit.

Batteries take node numbers 1..N in daisy-chain order, string after string (string 1 holds
nodes 1..S), and learn StringIndex 1..P and SeriesIndex 1..S from that order.

Electrically every string is its batteries' open-circuit voltages and resistances in series
(a Thevenin source OCV_k, R_k). Strings share one bank voltage, so for a bank current I:

    V_bank = (I + sum(OCV_k / R_k)) / sum(1 / R_k)        I_k = (V_bank - OCV_k) / R_k

which sums to I exactly and lets a fuller or warmer string take less charge, as in a real bank.
`operating_current` finds where a charger/load characteristic I(V) meets the bank's line
V = OCV_eq + I * R_eq, which is how a CC/CV charger settles against a battery.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from smallbms_bus.protocol import MAX_BATTERIES_BY_UNITS, MAX_SERIES_UNITS, UNIT_VOLTAGE, VALID_UNITS, unit_voltage
from smallbms_bus.sim.battery import VirtualBattery

VOLTAGE_TO_UNITS = {12: 1, 24: 2, 48: 4}
UNITS_TO_VOLTAGE = {units: volts for volts, units in VOLTAGE_TO_UNITS.items()}
SERIAL_PREFIX = "HQ2234"

_SHAPE = re.compile(r"^\s*(\d+)s(\d+)p-(\d+)v(\d+)\s*$", re.IGNORECASE)

PRESETS: dict[str, str] = {
    "single-12v": "1s1p-12v100",
    "van-12v": "1s2p-12v200",
    "home-24v": "2s2p-12v100",
    "home-48v": "4s1p-12v100",
    "rack-48v": "1s4p-48v100",
    "max-12v": "1s50p-12v100",
    "max-48v": "1s25p-48v100",
    "max-chain": "2s25p-12v100",
}
DEFAULT_BANK = "2s2p-12v100"


@dataclass(frozen=True, slots=True)
class BankShape:
    series: int  # batteries in series per string, 1..4
    parallel: int  # strings
    units: int  # 12.8 V units per battery: 1, 2 or 4
    capacity_ah: int  # per battery

    def __post_init__(self) -> None:
        if self.units not in VALID_UNITS:
            raise ValueError(f"battery voltage must be 12v, 24v or 48v (units 1, 2, 4), not units={self.units}")
        if self.series < 1 or self.parallel < 1:
            raise ValueError("a bank needs at least 1 battery in series and 1 string")
        if self.series * self.units > MAX_SERIES_UNITS:
            raise ValueError(
                f"{self.series} x {unit_voltage(self.units):.1f} V in series is "
                f"{unit_voltage(self.series * self.units):.1f} V: the bank voltage is limited to "
                f"{MAX_SERIES_UNITS} x {UNIT_VOLTAGE} V = {unit_voltage(MAX_SERIES_UNITS)} V"
            )
        limit = MAX_BATTERIES_BY_UNITS[self.units]
        if self.count > limit:
            raise ValueError(
                f"{self.count} batteries of {unit_voltage(self.units):.1f} V: at most {limit} are allowed"
            )
        if not 1 <= self.capacity_ah <= 65535:
            raise ValueError(f"capacity must be 1..65535 Ah, not {self.capacity_ah}")

    @classmethod
    def parse(cls, text: str) -> BankShape:
        """A shape like `2s2p-12v100`, or the name of a preset (see PRESETS)."""
        text = PRESETS.get(text.strip().lower(), text)
        match = _SHAPE.match(text)
        if match is None:
            raise ValueError(
                f"bank {text!r} is neither a preset ({', '.join(PRESETS)}) nor a shape like 2s2p-12v100"
                " (S in series, P strings, 12v/24v/48v batteries, capacity in Ah)"
            )
        series, parallel, volts, capacity = (int(g) for g in match.groups())
        if volts not in VOLTAGE_TO_UNITS:
            raise ValueError(f"battery voltage must be 12v, 24v or 48v, not {volts}v")
        return cls(series, parallel, VOLTAGE_TO_UNITS[volts], capacity)

    @property
    def count(self) -> int:
        return self.series * self.parallel

    @property
    def name(self) -> str:
        return f"{self.series}s{self.parallel}p-{UNITS_TO_VOLTAGE[self.units]}v{self.capacity_ah}"

    @property
    def units_in_series(self) -> int:
        return self.series * self.units

    @property
    def nominal_voltage(self) -> float:
        return unit_voltage(self.units_in_series)

    @property
    def capacity_total_ah(self) -> int:
        return self.parallel * self.capacity_ah

    def describe(self) -> str:
        return (f"{self.name}: {self.count} x {unit_voltage(self.units):.1f} V {self.capacity_ah} Ah"
                f" ({self.series} in series, {self.parallel} parallel)"
                f" = {self.nominal_voltage} V {self.capacity_total_ah} Ah")


def preset_list() -> list[tuple[str, BankShape]]:
    """(name, shape) of every preset, for `simulate --list`."""
    return [(name, BankShape.parse(shape)) for name, shape in PRESETS.items()]


class VirtualBank:
    def __init__(
        self,
        shape: BankShape | str,
        soc: float = 50.0,
        ambient: float = 25.0,
        temperature: float | None = None,
        seed: int = 0,
        firmware: tuple[int, int, int] = (1, 2, 3),
    ) -> None:
        self.shape = shape if isinstance(shape, BankShape) else BankShape.parse(shape)
        base = random.Random(f"bank:{seed}").randrange(10**7)  # serial digits differ between seeds
        self.batteries: list[VirtualBattery] = []
        self.strings: list[list[VirtualBattery]] = []
        node = 0
        for string_index in range(1, self.shape.parallel + 1):
            string = []
            for series_index in range(1, self.shape.series + 1):
                node += 1
                battery = VirtualBattery(
                    node=node, units=self.shape.units, capacity_ah=self.shape.capacity_ah,
                    serial=f"{SERIAL_PREFIX}{base + node:08d}", string_index=string_index,
                    series_index=series_index, firmware=firmware, soc=soc, temperature=temperature,
                    ambient=ambient, seed=seed,
                )
                string.append(battery)
                self.batteries.append(battery)
            self.strings.append(string)
        self.current = 0.0
        self.string_currents = [0.0] * len(self.strings)

    def battery(self, node: int) -> VirtualBattery:
        return self.batteries[node - 1]

    def _thevenin(self) -> list[tuple[float, float]]:
        """(OCV, R) of every string."""
        return [(sum(b.ocv for b in s), sum(b.resistance for b in s)) for s in self.strings]

    def equivalent(self) -> tuple[float, float]:
        """The bank as one source: (open-circuit voltage, internal resistance)."""
        strings = self._thevenin()
        conductance = sum(1.0 / r for _, r in strings)
        return sum(v / r for v, r in strings) / conductance, 1.0 / conductance

    @property
    def open_circuit_voltage(self) -> float:
        return self.equivalent()[0]

    @property
    def resistance(self) -> float:
        return self.equivalent()[1]

    def share(self, current: float) -> tuple[float, list[float]]:
        """Bank voltage and each string's current for a bank current (positive = charging)."""
        strings = self._thevenin()
        conductance = sum(1.0 / r for _, r in strings)
        volts = (current + sum(v / r for v, r in strings)) / conductance
        return volts, [(volts - v) / r for v, r in strings]

    @property
    def voltage(self) -> float:
        """Bank terminal voltage with the present current flowing."""
        return self.share(self.current)[0]

    def operating_current(self, characteristic: Callable[[float], float], tolerance_v: float = 1e-7) -> float:
        """The bank current where `characteristic(bank_voltage) -> current` meets the bank.

        The characteristic must not increase with voltage (a CC/CV charger gives less as the
        voltage rises, a constant-current load is flat), so V - OCV - R * I(V) is increasing and
        bisection always finds the one crossing.
        """
        ocv, resistance = self.equivalent()

        def excess(volts: float) -> float:
            return volts - ocv - resistance * characteristic(volts)

        low, high = ocv - 1.0, ocv + 1.0
        # Widen the bracket until it holds the crossing (large currents through a large R).
        while excess(low) > 0:
            low -= 4 * (ocv - low)
        while excess(high) < 0:
            high += 4 * (high - ocv)
        while high - low > tolerance_v:
            mid = 0.5 * (low + high)
            if excess(mid) < 0:
                low = mid
            else:
                high = mid
        return characteristic(0.5 * (low + high))

    def step(self, current: float, dt_s: float) -> None:
        """Advance `dt_s` seconds with `current` into the bank (positive = charging)."""
        _, shares = self.share(current)
        for string, string_current in zip(self.strings, shares, strict=True):
            for battery in string:
                battery.step(string_current, dt_s)
        self.current = current
        self.string_currents = shares

    def set_ambient(self, celsius: float) -> None:
        for battery in self.batteries:
            battery.set_ambient(celsius)

    def soc_range(self) -> tuple[float, float]:
        socs = [b.soc for b in self.batteries]
        return min(socs), max(socs)

    def cell_voltage_range(self) -> tuple[float, float]:
        volts = [v for b in self.batteries for v in b.cell_voltages()]
        return min(volts), max(volts)

    def active_flags(self) -> dict[str, list[int]]:
        """Flag name -> nodes that report it now."""
        flags: dict[str, list[int]] = {}
        for battery in self.batteries:
            for name in battery.active_flags():
                flags.setdefault(name, []).append(battery.node)
        # Communication faults are not flags on the wire, but a status line should show them.
        for fault in ("silent", "alive_frozen"):
            nodes = [b.node for b in self.batteries if getattr(b, fault)]
            if nodes:
                flags[fault] = nodes
        return flags
