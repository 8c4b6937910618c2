"""A virtual charger and a virtual load that obey BMS_STATE, as CAN-controlled devices do.

Theory of operation
-------------------
Both devices keep the last BMS_STATE they received and when (`BmsWatch`). The charger runs only
while that state has AllowedToCharge, the load only while it has AllowedToDischarge, and both stop
once no BMS_STATE arrived for 1.0 s (PROTOCOL.md). Before the first BMS_STATE they stay off.

The charger is CC/CV: it gives its available current while the bank is below the absorption
voltage minus a small regulation band, tapering linearly to zero at the absorption voltage. That
is a static characteristic I(V); the bank finds where it meets the batteries
(`VirtualBank.operating_current`), so constant-voltage charging settles the way it does on real
hardware, at any time step. The available current is the charger's maximum, or with a
`SolarProfile` a daylight curve of simulated time (half a sine between sunrise and sunset).

The load draws a constant current.

`ignore_bms=True` makes a device run whatever the BMS says (or whether there is one at all). It
exists for bench checks of the simulator without a BMS on the bus. **Never wire a real charger or
load that way: a device that ignores the BMS is what ruins batteries.**

Clocks: `now` is the clock BMS_STATE arrives on (the protocol's wall-clock periods; a fake clock in
tests), `sim_time` is the accelerated physics clock (only the solar curve uses it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from smallbms_bus.reports import BmsState

BMS_STATE_TIMEOUT_S = 1.0
DEFAULT_ABSORPTION_PER_UNIT = 14.2  # V per 12.8 V unit in series
CV_BAND_FRACTION = 0.0025  # full current at 0.25 % below the absorption voltage, none at it


@dataclass
class BmsWatch:
    """The last BMS_STATE seen, and whether it is recent enough to obey."""

    timeout_s: float = BMS_STATE_TIMEOUT_S
    last: BmsState | None = None
    received_at: float | None = None

    def update(self, state: BmsState, now: float) -> None:
        self.last = state
        self.received_at = now

    def fresh(self, now: float) -> bool:
        return self.received_at is not None and now - self.received_at < self.timeout_s

    def allows_charge(self, now: float) -> bool:
        return self.fresh(now) and self.last is not None and self.last.allowed_to_charge

    def allows_discharge(self, now: float) -> bool:
        return self.fresh(now) and self.last is not None and self.last.allowed_to_discharge


@dataclass(frozen=True)
class SolarProfile:
    """Fraction of the charger's maximum current the panels give at a time of the simulated day."""

    sunrise_h: float = 6.0
    sunset_h: float = 20.0
    start_hour: float = 6.0  # time of day at simulated time 0

    def hour(self, sim_time: float) -> float:
        return (self.start_hour + sim_time / 3600.0) % 24.0

    def fraction(self, sim_time: float) -> float:
        h = self.hour(sim_time)
        if not self.sunrise_h < h < self.sunset_h:
            return 0.0
        return math.sin(math.pi * (h - self.sunrise_h) / (self.sunset_h - self.sunrise_h))


@dataclass
class Charger:
    max_current: float  # A
    absorption_voltage: float  # V at the bank terminals
    solar: SolarProfile | None = None
    ignore_bms: bool = False
    enabled: bool = True  # switched by scenarios (a charger that is simply off)
    cv_band: float | None = None  # V; default CV_BAND_FRACTION of the absorption voltage
    bms: BmsWatch = field(default_factory=BmsWatch)

    def available_current(self, sim_time: float) -> float:
        if self.solar is None:
            return self.max_current
        return self.max_current * self.solar.fraction(sim_time)

    def running(self, now: float) -> bool:
        return self.enabled and (self.ignore_bms or self.bms.allows_charge(now))

    def characteristic(self, now: float, sim_time: float | None = None) -> Callable[[float], float]:
        """Current into the bank (>= 0) as a function of the bank voltage, at this moment."""
        if not self.running(now):
            return lambda bank_voltage: 0.0
        available = self.available_current(now if sim_time is None else sim_time)
        absorption = self.absorption_voltage
        band = self.cv_band if self.cv_band is not None else CV_BAND_FRACTION * absorption
        return lambda bank_voltage: available * min(1.0, max(0.0, (absorption - bank_voltage) / band))

    def current(self, bank_voltage: float, now: float, sim_time: float | None = None) -> float:
        """Current into the bank (>= 0) at `bank_voltage`."""
        return self.characteristic(now, sim_time)(bank_voltage)


@dataclass
class Load:
    current_a: float  # A drawn while running
    ignore_bms: bool = False
    enabled: bool = True
    bms: BmsWatch = field(default_factory=BmsWatch)

    def running(self, now: float) -> bool:
        return self.enabled and self.current_a > 0 and (self.ignore_bms or self.bms.allows_discharge(now))

    def current(self, now: float) -> float:
        """Current drawn from the bank (>= 0)."""
        return self.current_a if self.running(now) else 0.0


@dataclass
class Devices:
    """The charger and the load on the bank's DC bus."""

    charger: Charger
    load: Load

    @classmethod
    def for_bank(
        cls,
        units_in_series: int,
        capacity_ah: float,
        charge_c: float = 0.3,
        load_c: float = 0.1,
        absorption_per_unit: float = DEFAULT_ABSORPTION_PER_UNIT,
        solar: SolarProfile | None = None,
        ignore_bms: bool = False,
    ) -> Devices:
        """Devices sized in C-rates of the bank capacity and volts per 12.8 V unit in series."""
        return cls(
            Charger(charge_c * capacity_ah, absorption_per_unit * units_in_series, solar=solar,
                    ignore_bms=ignore_bms),
            Load(load_c * capacity_ah, ignore_bms=ignore_bms),
        )

    def on_bms_state(self, state: BmsState, now: float) -> None:
        self.charger.bms.update(state, now)
        self.load.bms.update(state, now)

    def characteristic(self, now: float, sim_time: float | None = None) -> Callable[[float], float]:
        """Bank current (positive = charging) as a function of the bank voltage, at this moment."""
        charge, load = self.charger.characteristic(now, sim_time), self.load.current(now)
        return lambda bank_voltage: charge(bank_voltage) - load

    def net_current(self, bank_voltage: float, now: float, sim_time: float | None = None) -> float:
        """Bank current at `bank_voltage` (positive = charging)."""
        return self.characteristic(now, sim_time)(bank_voltage)
