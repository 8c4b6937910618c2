"""A pure test rig for the BMS core: batteries whose cells, flags, temperatures and current the test
sets, fed as reports every tick, with the clock injected (no sleeping anywhere)."""

from __future__ import annotations

from dataclasses import dataclass, field

from smallbms_bus.bms.core import BmsCore, Decision, Event
from smallbms_bus.reports import BatteryInfo, BatteryStatus, BatteryTemps, CellVoltages, SerialFragment

WALL0 = 1_790_000_000.0  # an arbitrary epoch second for wall-clock stamps


@dataclass
class FakeBattery:
    node: int
    string: int
    series: int
    units: int = 1
    capacity: int = 100
    cells: list[float | None] = field(default_factory=list)
    temps: tuple[float, float] = (20.0, 21.0)
    current: float = 0.0
    flags: dict[str, bool] = field(default_factory=dict)
    alive: int = 0
    silent: bool = False
    alive_frozen: bool = False
    serial: str = ""

    def __post_init__(self) -> None:
        if not self.cells:
            self.cells = [3.30] * (4 * self.units)
        self.serial = self.serial or f"HQ{self.node:012d}"

    def reports(self) -> list:
        if self.silent:
            return []
        if not self.alive_frozen:
            self.alive = (self.alive + 1) % 256
        flags = {f: False for f in ("cell_high_voltage", "cell_low_voltage", "cell_low_pre_alarm", "balancing",
                                    "cell_imbalance", "hardware_fault", "firmware_updating")} | self.flags
        voltage = round(sum(c for c in self.cells if c is not None), 3)
        out: list = [
            BatteryInfo(self.node, self.units, self.capacity, (1, 2, 3), self.string, self.series),
            SerialFragment(self.node, 0, self.serial[:7]), SerialFragment(self.node, 1, self.serial[7:]),
            BatteryTemps(self.node, *self.temps),
        ]
        out += [CellVoltages(self.node, 4 * g + 1, tuple(self.cells[4 * g:4 * g + 4])) for g in range(self.units)]
        out.append(BatteryStatus(self.node, voltage, self.current, self.temps[1], **flags, alive_counter=self.alive))
        return out


class Rig:
    """`Rig(series=2, parallel=2)` is a 2S2P bank of 12.8 V 100 Ah batteries, nodes string by string."""

    def __init__(self, series: int = 1, parallel: int = 1, *, units: int = 1, capacity: int = 100,
                 discovery_window: float = 1.0, **core_options) -> None:
        self.t = 0.0
        self.core = BmsCore(self.t, WALL0, discovery_window=discovery_window, **core_options)
        self.batteries = [FakeBattery(node=(s - 1) * series + p, string=s, series=p, units=units, capacity=capacity)
                          for s in range(1, parallel + 1) for p in range(1, series + 1)]
        self.events: list[Event] = []
        self.last: Decision | None = None

    def battery(self, node: int) -> FakeBattery:
        return self.batteries[node - 1]

    def set_cells(self, volts: float, node: int | None = None) -> None:
        for b in self.batteries if node is None else [self.battery(node)]:
            b.cells = [volts] * len(b.cells)

    def set_current(self, bank_amps: float) -> None:
        """Bank current split evenly over the strings (every battery of a string carries its current)."""
        strings = max(b.string for b in self.batteries)
        for b in self.batteries:
            b.current = round(bank_amps / strings, 1)

    def tick(self, dt: float = 0.1) -> Decision:
        self.t = round(self.t + dt, 6)
        for b in self.batteries:
            for report in b.reports():
                self.core.on_report(report, self.t)
        return self.evaluate()

    def evaluate(self) -> Decision:
        self.last = self.core.evaluate(self.t, WALL0 + self.t)
        self.events += self.last.events
        return self.last

    def run(self, seconds: float, dt: float = 0.1) -> Decision:
        end = self.t + seconds - 1e-9
        decision = self.tick(dt)
        while self.t < end:
            decision = self.tick(dt)
        return decision

    def start(self) -> Decision:
        """Run until the core has started (bank learned, everything fresh)."""
        for _ in range(200):
            d = self.tick()
            if d.started:
                return d
        raise AssertionError(f"core did not start: {d.reasons}")

    def event_names(self) -> list[tuple[str, str]]:
        return [(e.name, e.value) for e in self.events]
