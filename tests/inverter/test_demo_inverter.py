"""`smallbms-bus demo --inverter`: the charger and load are a virtual inverter on BMS-CAN obeying 0x351, on the
simulation's clock; the readout shows CVL/CCL/DCL/DVL and the charge state."""

from __future__ import annotations

import re
import subprocess
import sys


def test_demo_with_the_virtual_inverter_shows_the_limits_it_obeys():
    out = subprocess.run([sys.executable, "-m", "smallbms_bus.cli", "demo", "--inverter", "--speed", "20",
                          "--duration", "40", "--every", "0.5", "--metrics-port", "0", "--modbus-port", "0",
                          "--web-port", "0", "--soc", "50"], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    limits = re.findall(r"limits   CVL ([\d.]+) V  CCL ([\d.]+) A  DCL ([\d.]+) A  DVL ([\d.]+) V  charge state (\w+)",
                        out.stdout)
    assert limits, out.stdout[-3000:]
    cvl, ccl, dcl, dvl, state = limits[-1]
    assert float(cvl) > float(dvl) > 0 and float(ccl) > 0 and float(dcl) > 0 and state in ("absorption", "float")
    # the devices line speaks of the inverter and what it offers, not of relays that switch nothing here
    devices = re.findall(r"devices  inverter obeys 0x351: its charger ([\d.]+) A available, its loads ([\d.]+) A, "
                         r"bank ([-+][\d.]+) A", out.stdout.split("--- t=")[-1])
    assert devices, out.stdout[-3000:]
    assert "charger switched by the charge relay" not in out.stdout
    assert "INVERTER_SILENT" not in out.stdout  # its keep-alive arrives (keepalive_timeout 10 s in the demo)


def test_inverter_silent_scenario_raises_and_clears_the_warning_on_the_simulations_clock():
    """The scenario's keep-alive stops at 60 s: INVERTER_SILENT 10 s later (the demo's keepalive_timeout), with
    the limits still obeyed; it clears once the keep-alive is back at 180 s. The event log has the times."""
    out = subprocess.run([sys.executable, "-m", "smallbms_bus.cli", "demo", "--scenario", "inverter-silent",
                          "--speed", "10", "--duration", "200", "--every", "1", "--metrics-port", "0",
                          "--modbus-port", "0", "--web-port", "0", "--soc", "60"],
                         capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-2000:]
    events = re.findall(r"event t=\s*([\d.]+) s  INVERTER_SILENT -> (\w+)", out.stdout)
    assert [v for _, v in events] == ["raised", "cleared"], out.stdout[-3000:]
    raised, cleared = (float(t) for t, _ in events)
    # The last keep-alive comes at most one period (1 s) before 60 s, later by however long the loaded machine kept
    # the peer's thread waiting: at speed 10 a quarter of a real second is 2.5 simulated seconds (seen: 68.6 at 20).
    assert 66.0 <= raised <= 73.0 and 180.0 <= cleared <= 184.0
    assert "inverter obeys 0x351" in out.stdout
