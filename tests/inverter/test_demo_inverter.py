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
    assert "inverter obeys 0x351" in out.stdout.split("--- t=")[-1]
    assert "INVERTER_SILENT" not in out.stdout  # its keep-alive arrives (keepalive_timeout 10 s in the demo)
