"""The virtual inverter obeys 0x351 as a GX's DVCC does; the closed loop with the real service on a virtual bus."""

from __future__ import annotations

import time
import uuid

import can
import pytest

from smallbms_bus.bms.alarms import BmsWarning
from smallbms_bus.sim.inverter import LIMITS_TIMEOUT_S, InverterPeer, Limits, VirtualInverter
from tests.metrics_rig import RunningBms

LIMITS = Limits(cvl=28.4, ccl=50.0, dcl=80.0, dvl=22.4)


def test_charges_at_the_smaller_of_its_own_limit_and_ccl_tapering_to_cvl():
    inverter = VirtualInverter(charge_a=120.0)
    inverter.on_limits(LIMITS, 100.0)
    i = inverter.characteristic(100.5)
    assert i(26.0) == 50.0  # CCL, not its own 120 A
    assert i(28.4) == 0.0 and 0 < i(28.39) < 50.0  # CV towards CVL
    small = VirtualInverter(charge_a=20.0)
    small.on_limits(LIMITS, 100.0)
    assert small.characteristic(100.0)(26.0) == 20.0  # its own limit when that is smaller


def test_discharges_at_most_dcl_and_nothing_below_dvl():
    inverter = VirtualInverter(charge_a=0.0, load_a=200.0)
    inverter.on_limits(LIMITS, 0.0)
    i = inverter.characteristic(1.0)
    assert i(26.0) == -80.0 and i(22.4) == 0.0
    inverter.on_limits(Limits(28.4, 0.0, 0.0, 22.4), 2.0)  # CCL = DCL = 0 (CHG-6)
    assert inverter.characteristic(2.0)(26.0) == 0.0


def test_stops_without_0x351_for_3_s_and_before_the_first():
    inverter = VirtualInverter(charge_a=100.0, load_a=10.0)
    assert inverter.characteristic(0.0)(26.0) == 0.0 and inverter.stopped_by(0.0) == "no 0x351 yet"
    inverter.on_limits(LIMITS, 10.0)
    assert inverter.characteristic(10.0 + LIMITS_TIMEOUT_S)(26.0) == 50.0
    assert inverter.characteristic(10.0 + LIMITS_TIMEOUT_S + 0.01)(26.0) == 0.0
    assert inverter.stopped_by(14.0) == "no 0x351 for 3 s"


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} not reached within {timeout} s")


def test_closed_loop_the_service_limits_the_virtual_inverter(tmp_path):
    """The real service sends 0x351 on a virtual bus; the virtual inverter obeys it and charges the simulated bank
    at CCL (its own 500 A is far more); the keep-alive it sends keeps INVERTER_SILENT off; at the service's stop
    the limits go to 0 and the inverter stops charging."""
    channel = f"inv-loop-{uuid.uuid4().hex[:8]}"
    extra = f'[inverter]\ninterface = "virtual"\nchannel = "{channel}"\nperiod = 0.5\nkeepalive_timeout = 3\n'
    rig = RunningBms(tmp_path, metrics_extra=extra)
    inverter = VirtualInverter(charge_a=500.0)
    rig.sim.devices.charger.max_current = 500.0  # the inverter's own charger: far more than any CCL here
    rig.sim.devices.load.enabled = False
    rig.sim.devices.inverter = inverter
    peer = InverterPeer(can.Bus(interface="virtual", channel=channel), inverter).start()
    try:
        with rig:
            rig.started()
            wait_for(lambda: inverter.limits is not None and inverter.limits.ccl > 0, 30, "a CCL above 0")
            decision = rig.service.decision
            assert decision is not None and decision.charge.known
            limits = inverter.limits
            assert limits.cvl == pytest.approx(decision.charge.cvl, abs=0.1)
            now = time.monotonic()
            current = rig.sim.devices.characteristic(now)(rig.sim.bank.voltage)
            assert 0 < current <= limits.ccl + 1e-9 < 500.0
            assert rig.service.inverter.keepalives > 0
            assert BmsWarning.INVERTER_SILENT not in rig.service.decision.warnings
            assert rig.shutdown() == 0
            wait_for(lambda: inverter.limits.ccl == 0 and inverter.limits.dcl == 0, 10, "zero limits at the stop")
            assert rig.sim.devices.characteristic(time.monotonic())(rig.sim.bank.voltage) == 0.0
    finally:
        peer.close()
