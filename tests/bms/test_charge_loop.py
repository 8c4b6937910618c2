"""CHG-2's goal, shown on the simulator's batteries: an imbalanced bank charged at full current by a charger that
obeys CVL and CCL (constant current up to CCL, then constant voltage at CVL) tapers instead of stopping hard,
its highest cell never reaches 3.65 V (far from ATC-1's 3.75 V) and it ends in float. Pure: the core and the
virtual batteries on one injected clock, no bus (the BMS-CAN loop with the virtual inverter is tested with it)."""

from __future__ import annotations

from smallbms_bus.bms.charge import ChargeState
from smallbms_bus.bms.core import BmsCore
from smallbms_bus.sim.battery import VirtualBattery
from tests.bms.rig import WALL0

DT = 1.0
CHARGER_MAX_A = 150.0  # more than the bank's 1C: CCL is what limits it


def reports(battery: VirtualBattery) -> list:
    return [battery.info(), battery.serial_fragment(0), battery.serial_fragment(1), battery.temps(),
            *battery.cell_reports(), battery.status()]


def test_an_imbalanced_bank_charged_at_full_current_tapers_stays_below_3_65_v_and_ends_in_float():
    batteries = [VirtualBattery(node=n, units=1, capacity_ah=100, serial=f"HQ{n:012d}", series_index=n, soc=70.0,
                                seed="chg-loop") for n in (1,)]
    batteries[0].cells[1].charge_ah += 0.06 * batteries[0].cells[1].capacity_ah  # one cell 6 % ahead
    core = BmsCore(0.0, WALL0, discovery_window=1.0)
    core.set_settings(absorption_time_min=10)
    t, current, highest, currents = 0.0, 0.0, 0.0, []
    d = None
    for _ in range(int(3 * 3600 / DT)):
        t += DT
        for b in batteries:
            b.step(current, DT)
            for report in reports(b):
                core.on_report(report, t)
        d = core.evaluate(t, WALL0 + t)
        if d.started and core.monitor.soc_known is False:
            core.set_soc(70.0)
        highest = max(highest, max(c for b in batteries for c in b.cell_voltages()))
        # A CC/CV charger that obeys the BMS: at most CCL, and no more than brings the bank to CVL.
        ocv = sum(b.ocv for b in batteries)
        resistance = sum(b.resistance for b in batteries)
        current = max(0.0, min(CHARGER_MAX_A, d.charge.ccl, (d.charge.cvl - ocv) / resistance)) \
            if d.atc and d.charge.known else 0.0
        currents.append(current)
        if d.charge.state is ChargeState.FLOAT:
            break
    assert d is not None and d.charge.state is ChargeState.FLOAT, "the bank did not reach float in 3 h"
    assert highest < 3.65, highest
    assert not d.alarms and d.atc  # ATC-1 never fired: the charge was never stopped hard
    assert max(currents) >= 90.0  # it charged at nearly 1C (CHG-3's cell factor starts at 3.45 V under load) ...
    tail = currents[-600:]
    assert 0.0 < min(c for c in tail if c > 0) < 20.0  # ... and tapered towards the end
