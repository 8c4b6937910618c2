"""History (HIS) and balancer status (BAL).

History survives restarts (the service persists `History.to_dict()`) and is reset by command.
Counters follow the manual's history page. They count what was *measured* (MON-6): a command (set SoC,
synchronise) moves SoC and consumed Ah only, and no counter changes because of it.

- discharge depth (a tracker): the Ah below the last measured full charge, integrated from the bank
  current exactly as consumed Ah is (charge efficiency, Peukert) but never moved by a command; 0 at a
  synchronisation (MON-2). Before the first synchronisation it counts from the level at the first start,
  a lower bound of the real depth (the bank was at that level or deeper);
- deepest discharge: the largest discharge depth seen;
- last discharge: the largest discharge depth since the last synchronisation (a BMV's "last discharge");
- cumulative Ah drawn, discharged and charged energy: raw integrals of the bank current and power;
- synchronisations: MON-2 events (a manual "synchronise" command is not counted: nothing was measured);
- charge cycles: counted when a measured SoC change crosses below 65 % and a later one crosses above 90 %;
- full discharges: counted when a measured SoC change reaches 0 %; re-armed once SoC is above 10 %
  (project choice, so a SoC hovering at 0 counts once);
- last full charge (wall-clock time of the last synchronisation) and the serial numbers of the
  batteries present then, which the balancer status needs;
- minimum and maximum bank voltage, cell voltage and battery temperature from fresh data.
A crossing is judged on one measured step (the SoC before and after it): a command acts between steps,
so the jump it makes crosses nothing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from smallbms_bus.bms.alarms import BalancerReason, BalancerStatus
from smallbms_bus.bms.rules import CELL_SPREAD_IMBALANCED_V

CYCLE_LOW_SOC = 65.0
CYCLE_HIGH_SOC = 90.0
FULL_DISCHARGE_REARM_SOC = 10.0
BALANCE_INFO_MAX_AGE_S = 30 * 24 * 3600.0


@dataclass
class History:
    deepest_discharge_ah: float = 0.0
    last_discharge_ah: float = 0.0
    cumulative_ah_drawn: float = 0.0
    discharged_energy_kwh: float = 0.0
    charged_energy_kwh: float = 0.0
    synchronisations: int = 0
    charge_cycles: int = 0
    full_discharges: int = 0
    last_full_charge_wall: float | None = None
    min_bank_voltage: float | None = None
    max_bank_voltage: float | None = None
    min_cell_voltage: float | None = None
    max_cell_voltage: float | None = None
    min_battery_temperature: float | None = None
    max_battery_temperature: float | None = None
    # Trackers that make the counters above survive a restart in the middle of an episode.
    cycle_armed: bool = False
    full_discharge_armed: bool = True
    discharge_depth_ah: float = 0.0
    serials_at_full_charge: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> History:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def time_since_full_charge(self, wall: float) -> float | None:
        return None if self.last_full_charge_wall is None else max(0.0, wall - self.last_full_charge_wall)

    def record(self, *, wall: float, soc_before: float | None, soc: float | None, depth_change_ah: float,
               voltage: float | None, charged_ah: float, discharged_ah: float, synchronised: bool, serials: list[str],
               cell_range: tuple[float, float] | None, temperature_range: tuple[float, float] | None) -> None:
        """One measured step, from `soc_before` to `soc`. `depth_change_ah`: what the step added to consumed Ah
        before clamping (discharge Peukert-weighted, positive; charge times the charge efficiency, negative)."""
        self.discharge_depth_ah = max(0.0, self.discharge_depth_ah + depth_change_ah)
        if synchronised:
            self.discharge_depth_ah = self.last_discharge_ah = 0.0
        self.deepest_discharge_ah = max(self.deepest_discharge_ah, self.discharge_depth_ah)
        self.last_discharge_ah = max(self.last_discharge_ah, self.discharge_depth_ah)
        self.cumulative_ah_drawn += discharged_ah
        if voltage is not None:
            self.discharged_energy_kwh += voltage * discharged_ah / 1000.0
            self.charged_energy_kwh += voltage * charged_ah / 1000.0
            self.min_bank_voltage = _min(self.min_bank_voltage, voltage)
            self.max_bank_voltage = _max(self.max_bank_voltage, voltage)
        if cell_range is not None:
            self.min_cell_voltage = _min(self.min_cell_voltage, cell_range[0])
            self.max_cell_voltage = _max(self.max_cell_voltage, cell_range[1])
        if temperature_range is not None:
            self.min_battery_temperature = _min(self.min_battery_temperature, temperature_range[0])
            self.max_battery_temperature = _max(self.max_battery_temperature, temperature_range[1])
        if synchronised:
            self.synchronisations += 1
            self.last_full_charge_wall = wall
            self.serials_at_full_charge = sorted(serials)
        before = soc_before
        if soc is None or before is None:
            return
        if soc < CYCLE_LOW_SOC <= before:
            self.cycle_armed = True
        elif soc > CYCLE_HIGH_SOC >= before and self.cycle_armed:
            self.cycle_armed = False
            self.charge_cycles += 1
        if soc <= 0.0 < before and self.full_discharge_armed:
            self.full_discharge_armed = False
            self.full_discharges += 1
        elif soc > FULL_DISCHARGE_REARM_SOC:
            self.full_discharge_armed = True


def _min(a: float | None, b: float) -> float:
    return b if a is None else min(a, b)


def _max(a: float | None, b: float) -> float:
    return b if a is None else max(a, b)


def balancer_unknown_reason(*, soc_known: bool, history: History, wall: float,
                            serials: list[str]) -> BalancerReason:
    """BAL-1's `unknown` conditions, in the order the rule lists them: the first that holds, or NONE."""
    age = history.time_since_full_charge(wall)
    if not soc_known:
        return BalancerReason.SOC_UNKNOWN
    if age is None:
        return BalancerReason.NEVER_FULLY_CHARGED
    if age > BALANCE_INFO_MAX_AGE_S:
        return BalancerReason.NO_FULL_CHARGE_30_DAYS
    if set(serials) - set(history.serials_at_full_charge):
        return BalancerReason.BATTERY_JOINED
    return BalancerReason.NONE


def balancer_status(*, soc_known: bool, history: History, wall: float, serials: list[str], charging: bool,
                    any_balancing: bool, any_imbalance_flag: bool, max_cell_spread: float | None) -> BalancerStatus:
    """BAL-1, in the order the rule lists its conditions."""
    if balancer_unknown_reason(soc_known=soc_known, history=history, wall=wall, serials=serials) \
            is not BalancerReason.NONE:
        return BalancerStatus.UNKNOWN
    if charging and any_balancing:
        return BalancerStatus.BALANCING
    if any_imbalance_flag or (max_cell_spread is not None and max_cell_spread > CELL_SPREAD_IMBALANCED_V):
        return BalancerStatus.IMBALANCED
    return BalancerStatus.BALANCED
