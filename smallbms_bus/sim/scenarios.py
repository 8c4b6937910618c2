"""Named scenarios: a starting point and timed actions, as data.

Theory of operation
-------------------
A `Scenario` gives the bank's starting SoC and temperatures, the charger and load (sized in
C-rates of the bank capacity, voltages per 12.8 V unit in series, so one scenario fits every bank
shape) and a list of actions at simulated seconds. `ScenarioPlayer` applies each action once
when simulated time reaches it. Fault actions name a battery by node number; a negative number
counts from the end of the chain (-1 = the last battery), so the same scenario works on 1 or 50
batteries.

What a BMS should see, and when, is in docs/simulator.md; tests/sim/test_sim_scenarios.py holds
the simulator to those times.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from smallbms_bus.sim.bank import BankShape, VirtualBank
from smallbms_bus.sim.battery import CELL_SOC_MAX, CELL_SOC_MIN
from smallbms_bus.sim.devices import DEFAULT_ABSORPTION_PER_UNIT, Devices, SolarProfile

Fault = Literal["silent", "alive_frozen", "hardware_fault", "firmware_updating"]
FAULTS: tuple[Fault, ...] = ("silent", "alive_frozen", "hardware_fault", "firmware_updating")


def resolve_node(bank: VirtualBank, node: int) -> int:
    """1-based node number; negative counts from the end of the chain (-1 = last)."""
    count = len(bank.batteries)
    resolved = node if node > 0 else count + node + 1
    if not 1 <= resolved <= count:
        raise ValueError(f"node {node} does not exist in a bank of {count} batteries")
    return resolved


@dataclass(frozen=True)
class SetFault:
    at: float  # simulated seconds
    fault: Fault
    on: bool = True
    node: int = -1

    def apply(self, bank: VirtualBank, devices: Devices) -> None:
        if self.fault not in FAULTS:
            raise ValueError(f"unknown fault {self.fault!r}")
        setattr(bank.battery(resolve_node(bank, self.node)), self.fault, self.on)


@dataclass(frozen=True)
class SetLoad:
    at: float
    c_rate: float  # of the bank capacity

    def apply(self, bank: VirtualBank, devices: Devices) -> None:
        devices.load.current_a = self.c_rate * bank.shape.capacity_total_ah


@dataclass(frozen=True)
class SetCharger:
    at: float
    c_rate: float | None = None  # None = unchanged
    absorption_per_unit: float | None = None
    enabled: bool | None = None

    def apply(self, bank: VirtualBank, devices: Devices) -> None:
        charger = devices.charger
        if self.c_rate is not None:
            charger.max_current = self.c_rate * bank.shape.capacity_total_ah
        if self.absorption_per_unit is not None:
            charger.absorption_voltage = self.absorption_per_unit * bank.shape.units_in_series
        if self.enabled is not None:
            charger.enabled = self.enabled


@dataclass(frozen=True)
class SetAmbient:
    at: float
    celsius: float

    def apply(self, bank: VirtualBank, devices: Devices) -> None:
        bank.set_ambient(self.celsius)


@dataclass(frozen=True)
class SetInverter:
    """The virtual inverter on BMS-CAN (`demo --inverter`, sim/inverter.py): its keep-alive on or off."""

    at: float
    keepalive: bool

    def apply(self, bank: VirtualBank, devices: Devices) -> None:
        if devices.inverter is not None:  # without --inverter there is no inverter to silence
            devices.inverter.keepalive = self.keepalive


@dataclass(frozen=True)
class ShiftCell:
    """Imbalance: one cell of a battery holds `soc_pct` percentage points more (or less) charge than it did."""

    at: float
    soc_pct: float
    node: int = -1
    cell: int = 1  # 1-based, within the battery

    def apply(self, bank: VirtualBank, devices: Devices) -> None:
        battery = bank.battery(resolve_node(bank, self.node))
        if not 1 <= self.cell <= len(battery.cells):
            raise ValueError(f"cell {self.cell} does not exist in a battery of {len(battery.cells)} cells")
        target = battery.cells[self.cell - 1]
        soc = target.charge_ah / target.capacity_ah + self.soc_pct / 100.0
        target.charge_ah = target.capacity_ah * min(CELL_SOC_MAX, max(CELL_SOC_MIN, soc))


Action = SetFault | SetLoad | SetCharger | SetAmbient | SetInverter | ShiftCell


@dataclass(frozen=True)
class Expectation:
    """What a BMS watching the bus sees, and the window of simulated time in which it first sees it."""

    after: float  # simulated seconds: not before
    by: float  # simulated seconds: at the latest
    what: str


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    soc: float = 60.0  # %
    ambient: float = 25.0  # degC
    temperature: float | None = None  # degC of the batteries at start; None = ambient
    load_c: float = 0.05
    charge_c: float = 0.06
    absorption_per_unit: float = DEFAULT_ABSORPTION_PER_UNIT
    solar: bool = False
    inverter: bool = False  # the demo runs it with --inverter (the charger and load on BMS-CAN)
    # Settings (the core's names, SettingSpec) the demo commits once the bank is learned, as an installer would.
    settings: tuple[tuple[str, float], ...] = ()
    actions: tuple[Action, ...] = ()
    expect: tuple[Expectation, ...] = ()

    def build(
        self,
        shape: BankShape | str,
        soc: float | None = None,
        ambient: float | None = None,
        seed: int = 0,
        ignore_bms: bool = False,
    ) -> tuple[VirtualBank, Devices]:
        """The bank and devices at the start of this scenario (`soc`/`ambient` override its own)."""
        ambient = self.ambient if ambient is None else ambient
        bank = VirtualBank(shape, soc=self.soc if soc is None else soc, ambient=ambient,
                           temperature=self.temperature, seed=seed)
        devices = Devices.for_bank(
            bank.shape.units_in_series, bank.shape.capacity_total_ah, charge_c=self.charge_c,
            load_c=self.load_c, absorption_per_unit=self.absorption_per_unit,
            solar=SolarProfile() if self.solar else None, ignore_bms=ignore_bms,
        )
        return bank, devices


class ScenarioPlayer:
    """Applies a scenario's actions once each, in time order."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self._pending = sorted(scenario.actions, key=lambda a: a.at)
        self.applied: list[Action] = []

    def next_at(self) -> float | None:
        return self._pending[0].at if self._pending else None

    def apply_due(self, sim_time: float, bank: VirtualBank, devices: Devices) -> list[Action]:
        due = []
        while self._pending and self._pending[0].at <= sim_time:
            action = self._pending.pop(0)
            action.apply(bank, devices)
            due.append(action)
        self.applied.extend(due)
        return due


# The fault scenarios share a healthy background (60 % SoC, 25 degC, small load and charge) so
# that the injected fault is the only thing a BMS has to notice. Faults hit the last battery (node N).
FAULT_AT = 60.0
FAULT_CLEARED_AT = 180.0
FIRMWARE_UPDATE_S = 150.0
# Frames from a battery are due at most one slow period (1 s) after a change: the window a BMS gets.
FRAME_LAG_S = 1.0

SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario(
        "steady",
        "healthy bank at 60 % and 25 degC, 0.05C load and a 0.06C charger: nothing to report",
        expect=(Expectation(0.0, 3600.0,
                            "for the whole hour: no battery flag, every cell 3.25-3.40 V, SoC rising ~1 %/h"),),
    ),
    Scenario(
        "discharge",
        "13 % SoC, 0.5C load, no charger: cells fall to the pre-alarm, then to the low-voltage level",
        soc=13.0, load_c=0.5, charge_c=0.0,
        expect=(
            Expectation(240.0, 330.0, "CellLowPreAlarm and a cell <= 3.10 V (PRE-1), at about 285 s"),
            Expectation(720.0, 900.0, "CellLowVoltage and a cell <= 2.80 V (ATD-1), at about 790 s"),
        ),
    ),
    Scenario(
        "heavy-load",
        "6.3 % SoC, a 2C load (an inverter at full power on a nearly empty bank), no charger: a cell under"
        " the pre-alarm level at once and under 2.80 V within about 20 s, before the 30 s lead of PRE-3",
        soc=6.3, load_c=2.0, charge_c=0.0,
        expect=(
            Expectation(0.0, 1.0, "CellLowPreAlarm and a cell <= 3.10 V as soon as the load runs (PRE-1)"),
            Expectation(3.0, 27.0, "CellLowVoltage and a cell <= 2.80 V (ATD-1) at about 5-23 s (bank, seed), before"
                                   " the pre-alarm is 30 s old: the load goes off 30 s after the pre-alarm (PRE-3)"),
        ),
    ),
    Scenario(
        "overcharge",
        "97 % SoC, 0.3C charger set to a wrong absorption of 15.2 V per 12.8 V unit: a cell passes 3.75 V",
        soc=97.0, load_c=0.0, charge_c=0.3, absorption_per_unit=15.2,
        expect=(Expectation(330.0, 450.0, "CellHighVoltage and a cell >= 3.75 V (ATC-1), at about 390 s"),),
    ),
    Scenario(
        "cold-charge",
        "batteries at 7 degC in 0 degC air, charging at 0.3C from 30 %: they cool below 5 degC",
        soc=30.0, ambient=0.0, temperature=7.0, load_c=0.0, charge_c=0.3,
        expect=(Expectation(450.0, 900.0,
                            "lowest cell temperature < 5.0 degC (ATC-2), at about 550-750 s (seed)"),),
    ),
    Scenario(
        "solar-day",
        "a day of solar charging (0.2C peak, sun 06:00-20:00, starting at 06:00) into a 0.03C load from 40 %",
        soc=40.0, load_c=0.03, charge_c=0.2, solar=True,
        expect=(
            Expectation(21600.0, 25200.0, "Balancing as the bank nears full, at about 22950 s (12:22)"),
            Expectation(21600.0, 25200.0, "charged: bank >= 14.0 V per unit and current < 4 % of capacity"
                                          " (MON-2 synchronisation), at about 23450 s (12:30)"),
            Expectation(0.0, 86400.0, "no CellHighVoltage all day; no charge current from 20:00 (50400 s)"),
        ),
    ),
    Scenario(
        "comms-loss",
        f"the last battery of the chain stops sending at {FAULT_AT:.0f} s and comes back at"
        f" {FAULT_CLEARED_AT:.0f} s",
        actions=(SetFault(FAULT_AT, "silent"), SetFault(FAULT_CLEARED_AT, "silent", on=False)),
        expect=(
            Expectation(FAULT_AT, FAULT_AT, "last frame of node N"),
            Expectation(FAULT_AT + 5.0, FAULT_AT + 5.0, "node N stale (COM-1, comm_timeout 5 s): BATTERY_COMMS_LOST"),
            Expectation(FAULT_CLEARED_AT, FAULT_CLEARED_AT + FRAME_LAG_S,
                        "node N sends again (all its frames); the BMS recovers 2 s later (COM-2)"),
        ),
    ),
    Scenario(
        "alive-freeze",
        f"the last battery's AliveCounter stops advancing at {FAULT_AT:.0f} s (frames keep coming),"
        f" until {FAULT_CLEARED_AT:.0f} s",
        actions=(SetFault(FAULT_AT, "alive_frozen"), SetFault(FAULT_CLEARED_AT, "alive_frozen", on=False)),
        expect=(
            Expectation(FAULT_AT, FAULT_AT + FRAME_LAG_S, "AliveCounter of node N constant, its frames still arrive"),
            Expectation(FAULT_AT + 5.0, FAULT_AT + 5.0 + FRAME_LAG_S, "node N stale (COM-1): BATTERY_COMMS_LOST"),
            Expectation(FAULT_CLEARED_AT, FAULT_CLEARED_AT + FRAME_LAG_S,
                        "AliveCounter advances again; the BMS recovers 2 s later"),
        ),
    ),
    Scenario(
        "firmware-update",
        f"the last battery reports FirmwareUpdating from {FAULT_AT:.0f} s for {FIRMWARE_UPDATE_S:.0f} s",
        actions=(SetFault(FAULT_AT, "firmware_updating"),
                 SetFault(FAULT_AT + FIRMWARE_UPDATE_S, "firmware_updating", on=False)),
        expect=(
            Expectation(FAULT_AT, FAULT_AT + FRAME_LAG_S, "FirmwareUpdating on node N: ATC false (ATC-4, FW-1)"),
            Expectation(FAULT_AT + 120.0, FAULT_AT + 120.0 + FRAME_LAG_S,
                        "update not done within 120 s: FIRMWARE_UPDATE_FAILED, ATD false too (FW-2)"),
            Expectation(FAULT_AT + FIRMWARE_UPDATE_S, FAULT_AT + FIRMWARE_UPDATE_S + FRAME_LAG_S,
                        "FirmwareUpdating cleared: update complete, ATC and ATD back"),
        ),
    ),
    Scenario(
        "hardware-fault",
        f"the last battery reports HardwareFault from {FAULT_AT:.0f} s on (it does not heal)",
        actions=(SetFault(FAULT_AT, "hardware_fault"),),
        expect=(Expectation(FAULT_AT, FAULT_AT + FRAME_LAG_S,
                            "HardwareFault on node N: BATTERY_FAULT, ATC and ATD false (ATC-5, ATD-3)"),),
    ),
    Scenario(
        "inverter-silent",
        f"the steady background through an inverter on BMS-CAN (the demo turns --inverter on) whose keep-alive "
        f"stops at {FAULT_AT:.0f} s and comes back at {FAULT_CLEARED_AT:.0f} s",
        inverter=True,
        actions=(SetInverter(FAULT_AT, keepalive=False), SetInverter(FAULT_CLEARED_AT, keepalive=True)),
        expect=(
            Expectation(FAULT_AT, FAULT_AT, "the inverter's last keep-alive (0x305)"),
            Expectation(FAULT_AT + 10.0, FAULT_AT + 11.0, "INVERTER_SILENT (keepalive_timeout 10 s in the demo); "
                        "the limits keep coming and the inverter keeps obeying them; ATC and ATD unchanged"),
            Expectation(FAULT_CLEARED_AT, FAULT_CLEARED_AT + 2.0, "keep-alive again: INVERTER_SILENT cleared"),
        ),
    ),
)}
# The charge-control scenarios (CHG, docs/inverter.md) run through the virtual inverter on BMS-CAN.
IMBALANCE_PCT = 3.0  # the last battery's first cell this many points fuller than the rest
SCENARIOS.update({s.name: s for s in (
    Scenario(
        "imbalanced-charge",
        f"a full charge through the inverter at 0.5C from 95 % with one cell {IMBALANCE_PCT:g} points fuller than the"
        " rest and the absorption time at its 10 min minimum: CVL held down and CCL tapering as that cell nears"
        " 3.55 V (CHG-2, CHG-3), never 3.65 V, no ATC-1 trip, float once the absorption time has run (CHG-1)",
        soc=95.0, load_c=0.0, charge_c=0.5, inverter=True,
        actions=(ShiftCell(0.0, IMBALANCE_PCT),),
        settings=(("absorption_time_min", 10.0),),
        expect=(Expectation(0.0, 1800.0, "highest cell < 3.65 V throughout, ATC never false, CCL tapers"),
                Expectation(600.0, 1800.0, "charge state float (absorption time 10 min)")),
    ),
    Scenario(
        "cold-morning",
        "batteries at 2 degC in 0 degC air, a 0.3C charger waiting from 50 %; the heating comes on at 60 s (air"
        " 30 degC) and the batteries warm: CCL 0 (ATC false) below 5 degC, rising to the full rating at 10 degC",
        soc=50.0, ambient=0.0, temperature=2.0, load_c=0.0, charge_c=0.3, inverter=True,
        actions=(SetAmbient(60.0, 30.0),),
        expect=(Expectation(0.0, 260.0, "lowest cell < 5 degC: ATC false, CCL 0 (ATC-2, CHG-3)"),
                Expectation(200.0, 400.0, "lowest cell >= 5 degC: ATC back, CCL rising with the temperature factor"),
                Expectation(550.0, 800.0, "lowest cell >= 10 degC: CCL = the rating (1C) x the cell factor")),
    ),
    Scenario(
        "deep-discharge",
        "13 % SoC, a 0.5C load through the inverter, no charger: DCL derates as the lowest cell falls below 3.15 V"
        " (CHG-4), and is 0 once ATD goes false",
        soc=13.0, load_c=0.5, charge_c=0.0, inverter=True,
        expect=(Expectation(0.0, 900.0, "DCL below the rating once the lowest cell is under 3.15 V"),
                Expectation(0.0, 1800.0, "ATD false (pre-alarm, ATD-1): DCL 0 in the same evaluation")),
    ),
)})
DEFAULT_SCENARIO = "steady"


def get_scenario(name: str) -> Scenario:
    try:
        return SCENARIOS[name]
    except KeyError:
        raise ValueError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}") from None
