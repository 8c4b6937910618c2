"""History counters (HIS) and balancer status (BAL-1)."""

from __future__ import annotations

import pytest

from smallbms_bus.bms.alarms import BalancerStatus, BmsWarning
from smallbms_bus.bms.history import History, balancer_status
from tests.bms.rig import WALL0, Rig

DAY = 24 * 3600.0


def test_cycles_full_discharges_and_extremes():
    h = History()
    common = dict(wall=0.0, depth_change_ah=0.0, voltage=26.0, charged_ah=0.0, discharged_ah=0.0, synchronised=False,
                  serials=[], cell_range=(3.2, 3.4), temperature_range=(10.0, 30.0))
    before = None
    for soc in (80, 64.9, 80, 90, 90.1, 50, 95, 0.0, 0.0, 5.0, 10.5, 0.0):
        h.record(soc_before=before, soc=soc, **common)
        before = soc
    assert h.charge_cycles == 2  # below 65 then above 90, twice
    assert h.full_discharges == 2  # 0 % reached, re-armed above 10 %, reached again
    h.record(soc_before=None, soc=None,
             **(common | {"voltage": 30.0, "cell_range": (2.9, 3.7), "temperature_range": (-5.0, 41.0)}))
    assert (h.min_bank_voltage, h.max_bank_voltage) == (26.0, 30.0)
    assert (h.min_cell_voltage, h.max_cell_voltage) == (2.9, 3.7)
    assert (h.min_battery_temperature, h.max_battery_temperature) == (-5.0, 41.0)


def test_energy_and_ah_integrals_and_synchronisation():
    h = History()
    h.record(wall=100.0, soc_before=95.0, soc=90.0, depth_change_ah=20.0, voltage=25.0, charged_ah=2.0,
             discharged_ah=4.0, synchronised=False, serials=["A"], cell_range=None, temperature_range=None)
    h.record(wall=200.0, soc_before=98.0, soc=100.0, depth_change_ah=-15.0, voltage=28.0, charged_ah=1.0,
             discharged_ah=0.0, synchronised=True, serials=["B", "A"], cell_range=None, temperature_range=None)
    assert h.cumulative_ah_drawn == 4.0 and h.deepest_discharge_ah == 20.0
    assert h.discharge_depth_ah == 0.0 and h.last_discharge_ah == 0.0  # a synchronisation: full again
    assert h.discharged_energy_kwh == pytest.approx(25.0 * 4.0 / 1000)
    assert h.charged_energy_kwh == pytest.approx((25.0 * 2.0 + 28.0 * 1.0) / 1000)
    assert h.synchronisations == 1 and h.last_full_charge_wall == 200.0 and h.serials_at_full_charge == ["A", "B"]
    assert h.time_since_full_charge(260.0) == 60.0
    assert History.from_dict(h.to_dict()) == h


def status(**kw) -> BalancerStatus:
    h = History(last_full_charge_wall=0.0, serials_at_full_charge=["A", "B"])
    args = dict(soc_known=True, history=h, wall=DAY, serials=["A", "B"], charging=False, any_balancing=False,
                any_imbalance_flag=False, max_cell_spread=0.02) | kw
    return balancer_status(**args)


def test_balancer_status_rules():
    assert status() == BalancerStatus.BALANCED
    assert status(soc_known=False) == BalancerStatus.UNKNOWN
    assert status(wall=30 * DAY + 1) == BalancerStatus.UNKNOWN
    assert status(wall=30 * DAY) == BalancerStatus.BALANCED
    assert status(serials=["A", "B", "C"]) == BalancerStatus.UNKNOWN  # a battery joined since the full charge
    assert status(history=History()) == BalancerStatus.UNKNOWN  # never fully charged
    assert status(charging=True, any_balancing=True) == BalancerStatus.BALANCING
    assert status(charging=False, any_balancing=True) == BalancerStatus.BALANCED
    assert status(any_imbalance_flag=True) == BalancerStatus.IMBALANCED
    assert status(max_cell_spread=0.101) == BalancerStatus.IMBALANCED
    assert status(max_cell_spread=0.100) == BalancerStatus.BALANCED


def test_balancer_and_imbalance_warning_in_the_core():
    rig = Rig(2, 1)
    rig.start()
    assert rig.tick().balancer == BalancerStatus.UNKNOWN
    rig.set_cells(3.55)  # 2 x 4 x 3.55 = 28.4 V >= 28.0 V charged voltage
    rig.set_current(3.0)  # below the tail current (4 % of 100 Ah = 4 A)
    d = rig.run(181)
    assert d.history.synchronisations == 1 and d.soc == 100.0 and d.balancer == BalancerStatus.BALANCED
    rig.battery(1).cells[2] = 3.44  # spread 0.11 V: exceeds 0.10 V
    d = rig.tick()
    assert d.balancer == BalancerStatus.IMBALANCED and BmsWarning.CELL_IMBALANCE in d.warnings
    rig.battery(1).cells[2] = 3.55
    rig.battery(2).flags["balancing"] = True
    assert rig.tick().balancer == BalancerStatus.BALANCING


def test_not_fully_charged_for_30_days_warning():
    rig = Rig(comm_timeout=60.0)
    rig.start()
    assert BmsWarning.NOT_FULLY_CHARGED_30_DAYS not in rig.tick().warnings
    rig.core.first_start_wall = WALL0 + rig.t - 30 * DAY - 1
    d = rig.tick()
    assert BmsWarning.NOT_FULLY_CHARGED_30_DAYS in d.warnings and "since the first start" in d.reasons[
        "NOT_FULLY_CHARGED_30_DAYS"]
    rig.core.history.last_full_charge_wall = WALL0 + rig.t - 29 * DAY
    assert BmsWarning.NOT_FULLY_CHARGED_30_DAYS not in rig.tick().warnings


def test_reset_history_command():
    rig = Rig()
    rig.start()
    rig.set_current(-20.0)
    d = rig.run(60)
    assert d.history.cumulative_ah_drawn > 0
    revision = rig.core.state_revision
    rig.core.reset_history()
    d = rig.tick()
    assert d.history.cumulative_ah_drawn == pytest.approx(20.0 * 0.1 / 3600) and rig.core.state_revision > revision


def test_a_decision_keeps_its_own_picture_of_the_history():
    rig = Rig()
    rig.start()
    rig.set_current(-20.0)
    first = rig.run(10)
    drawn = first.history.cumulative_ah_drawn
    assert drawn > 0
    rig.run(10)
    assert first.history.cumulative_ah_drawn == drawn and rig.last.history.cumulative_ah_drawn > drawn


def test_nothing_is_counted_before_the_core_starts():
    rig = Rig(discovery_window=5.0)
    rig.set_current(-50.0)
    d = rig.run(4.0)
    assert not d.started and d.consumed_ah is None and d.history.cumulative_ah_drawn == 0.0
    assert rig.core.monitor.consumed_ah == 0.0
