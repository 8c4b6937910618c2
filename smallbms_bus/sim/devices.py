"""A virtual charger and a virtual load, switched by relays and/or obeying BMS_STATE, as real devices are.

Theory of operation
-------------------
How a device is controlled is its `control` (the installation's wiring):

- ``relays``: its remote on/off input (charger) or its supply (load) goes through a relay of the BMS's
  relay board: the charge relay (charge_disconnect) for the charger, the load relay (load_disconnect)
  for the load. It runs while that relay's contact is closed. This is how the smallBMS NG's own
  outputs are wired, and it makes mode off, remote off and a relay that did not switch (a board fault)
  visible on the bank current. The contact is read through a callable (`RelayContact`): the demo's
  in-process memory board, or a Modbus I/O module that `simulate` reads; None (not read yet) counts as open.
- ``bms-state``: a CAN-controlled device (a charger or inverter on the battery bus). It keeps the last
  BMS_STATE it received and when (`BmsWatch`): the charger runs only while that state has
  AllowedToCharge, the load only while it has AllowedToDischarge, and both stop once no BMS_STATE
  arrived for 1.0 s (PROTOCOL.md). Before the first BMS_STATE they stay off. Such a device does not see
  the relays: mode off (which opens the relays and leaves AllowedToCharge/Discharge as they are) does
  not stop it.
- ``both``: a CAN-controlled device that is also switched by a relay: it runs only when both allow.

The charger is CC/CV: it gives its available current while the bank is below the absorption
voltage minus a small regulation band, tapering linearly to zero at the absorption voltage. That
is a static characteristic I(V); the bank finds where it meets the batteries
(`VirtualBank.operating_current`), so constant-voltage charging settles the way it does on real
hardware, at any time step. The available current is the charger's maximum, or with a
`SolarProfile` a daylight curve of simulated time (half a sine between sunrise and sunset).

The load draws a constant current.

`ignore_bms=True` makes a device run whatever the BMS says (or whether there is one at all), relays
and BMS_STATE alike. It exists for bench checks of the simulator without a BMS on the bus. **Never wire
a real charger or load that way: a device that ignores the BMS is what ruins batteries.**

Clocks: `now` is the clock BMS_STATE arrives on (the protocol's periods; the demo's simulation clock;
a fake clock in tests), `sim_time` is the physics clock (only the solar curve uses it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, cast

from smallbms_bus.reports import BmsState
from smallbms_bus.sim.inverter import VirtualInverter

BMS_STATE_TIMEOUT_S = 1.0
DEFAULT_ABSORPTION_PER_UNIT = 14.2  # V per 12.8 V unit in series
CV_BAND_FRACTION = 0.0025  # full current at 0.25 % below the absorption voltage, none at it

Control = Literal["relays", "bms-state", "both"]
CONTROLS: tuple[Control, ...] = ("relays", "bms-state", "both")
RelayContact = Callable[[], bool | None]  # True = the relay's contact is closed; None = not known (open)


def parse_controls(text: str) -> tuple[Control, Control]:
    """`--devices`: one control for both devices (`relays`), or each (`charger=bms-state,load=relays`).
    Returns (charger, load); ValueError names what is wrong."""
    allowed = ", ".join(CONTROLS)
    text = text.strip()
    if text in CONTROLS:
        return cast(Control, text), cast(Control, text)
    chosen: dict[str, str] = {}
    for part in text.split(","):
        device, _, control = part.partition("=")
        device, control = device.strip(), control.strip()
        if device not in ("charger", "load") or control not in CONTROLS or device in chosen:
            raise ValueError(f"{text!r}: give one of {allowed} for both devices, or charger=CONTROL,load=CONTROL")
        chosen[device] = control
    if len(chosen) != 2:
        raise ValueError(f"{text!r}: name both devices (charger=CONTROL,load=CONTROL), CONTROL one of {allowed}")
    return cast(Control, chosen["charger"]), cast(Control, chosen["load"])


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
    control: Control = "bms-state"
    relay: RelayContact | None = None  # the charge relay's contact, when `control` includes relays

    def available_current(self, sim_time: float) -> float:
        if self.solar is None:
            return self.max_current
        return self.max_current * self.solar.fraction(sim_time)

    def running(self, now: float) -> bool:
        return self.stopped_by(now) is None

    def stopped_by(self, now: float) -> str | None:
        """Why the charger is off now (None = it runs)."""
        return _stopped_by(self.enabled, self.ignore_bms, self.control, self.relay, "charge relay", self.bms,
                           self.bms.allows_charge, now)

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
    control: Control = "bms-state"
    relay: RelayContact | None = None  # the load relay's contact, when `control` includes relays

    def running(self, now: float) -> bool:
        return self.current_a > 0 and self.stopped_by(now) is None

    def stopped_by(self, now: float) -> str | None:
        """Why the load is off now (None = it runs, or would if it drew any current)."""
        return _stopped_by(self.enabled, self.ignore_bms, self.control, self.relay, "load relay", self.bms,
                           self.bms.allows_discharge, now)

    def current(self, now: float) -> float:
        """Current drawn from the bank (>= 0)."""
        return self.current_a if self.running(now) else 0.0


def _stopped_by(enabled: bool, ignore_bms: bool, control: Control, relay: RelayContact | None, relay_name: str,
                bms: BmsWatch, allows: Callable[[float], bool], now: float) -> str | None:
    if not enabled:
        return "switched off by the scenario"
    if ignore_bms:
        return None
    if control != "bms-state":
        closed = relay() if relay is not None else None
        if closed is None:
            return f"{relay_name} not read yet"
        if not closed:
            return f"{relay_name} open"
    if control != "relays" and not allows(now):
        if bms.last is None:
            return "no BMS_STATE yet"
        return "BMS_STATE missing for 1 s" if not bms.fresh(now) else "BMS_STATE forbids"
    return None


@dataclass
class Devices:
    """The charger and the load on the bank's DC bus, and optionally an inverter/charger on BMS-CAN (inverter.py)."""

    charger: Charger
    load: Load
    # An inverter/charger on BMS-CAN (inverter.py): when set, the charger and the load above are its own, limited by
    # 0x351 (CVL/CCL/DCL) instead of being switched by relays or BMS_STATE.
    inverter: VirtualInverter | None = None

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

    def wire(self, charger: Control, load: Control, charge_relay: RelayContact | None = None,
             load_relay: RelayContact | None = None) -> None:
        """How each device is controlled (see the module's docstring); relays are needed by relays/both."""
        for name, control, relay in (("charger", charger, charge_relay), ("load", load, load_relay)):
            if control not in CONTROLS:
                raise ValueError(f"{name}: control {control!r}, allowed {', '.join(CONTROLS)}")
            if control != "bms-state" and relay is None:
                raise ValueError(f"{name}: control {control!r} needs a relay to follow")
        self.charger.control, self.charger.relay = charger, charge_relay
        self.load.control, self.load.relay = load, load_relay

    def on_bms_state(self, state: BmsState, now: float) -> None:
        self.charger.bms.update(state, now)
        self.load.bms.update(state, now)

    def characteristic(self, now: float, sim_time: float | None = None) -> Callable[[float], float]:
        """Bank current (positive = charging) as a function of the bank voltage, at this moment."""
        if self.inverter is not None:  # the charger and the load are the inverter's own: it limits them by 0x351
            when = now if sim_time is None else sim_time
            available = self.charger.available_current(when) if self.charger.enabled else 0.0
            return self.inverter.characteristic(now, available, self.load.current_a if self.load.enabled else 0.0)
        charge, load = self.charger.characteristic(now, sim_time), self.load.current(now)
        return lambda bank_voltage: charge(bank_voltage) - load

    def net_current(self, bank_voltage: float, now: float, sim_time: float | None = None) -> float:
        """Bank current at `bank_voltage` (positive = charging)."""
        return self.characteristic(now, sim_time)(bank_voltage)
