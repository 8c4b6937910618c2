"""The charge-control scenarios (docs/inverter.md "Scenarios"): `smallbms-bus demo` through the virtual inverter on
the simulation's clock. Every fact is read from the service's own readout (one decision per readout: the charge
limits, ATC/ATD and the cells it printed together) and its event log, never from wall-clock timing."""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
from dataclasses import dataclass

from smallbms_bus.bms.charge import temperature_factor

RATING_A = 100.0  # single-12v: 1 x 100 Ah at 1C (CHG-3, CHG-4)
READOUT = re.compile(
    r"--- t=\s*([\d.]+) s.*?\n"
    r"bms      allowed to charge (\w+)  allowed to discharge ([\w-]+).*?\n"
    r"charge   (\w+)  CVL ([\d.]+) V  CCL ([\d.]+) A  DCL ([\d.]+) A.*?\n"
    r".*?cells    min ([\d.]+) V .*?max ([\d.]+) V .*?temperature ([-\d.]+) °C \.\. ([-\d.]+) °C", re.S)


@dataclass(frozen=True)
class Readout:
    t: float
    atc: bool
    atd: str
    state: str
    cvl: float
    ccl: float
    dcl: float
    min_cell: float
    max_cell: float
    min_temp: float


def run_demo(scenario: str, duration: float, soc: float | None) -> tuple[list[Readout], str]:
    known = [] if soc is None else ["--soc", str(soc)]
    out = subprocess.run([sys.executable, "-m", "smallbms_bus.cli", "demo", "--scenario", scenario, "--bank",
                          "single-12v", "--speed", "25", "--duration", str(duration), "--every", "0.25",
                          "--metrics-port", "0", "--modbus-port", "0", "--web-port", "0", *known],
                         capture_output=True, text=True, timeout=duration / 5 + 120)
    assert out.returncode == 0, out.stderr[-2000:]
    readouts = [Readout(float(m[0]), m[1] == "yes", m[2], m[3], float(m[4]), float(m[5]), float(m[6]), float(m[7]),
                        float(m[8]), float(m[9])) for m in READOUT.findall(out.stdout)]
    assert len(readouts) > 20, out.stdout[-3000:]
    return readouts, out.stdout


def test_imbalanced_charge_tapers_never_reaches_3v65_and_ends_in_float():
    readouts, text = run_demo("imbalanced-charge", 1000, 95)
    started = [r for r in readouts if r.t > 15]
    assert max(r.max_cell for r in started) < 3.65, max(r.max_cell for r in started)
    assert all(r.atc for r in started)  # no ATC-1 trip (nor any other)
    assert "CELL_HIGH_VOLTAGE" not in text and "ATC -> no: cell" not in text
    assert any(r.ccl < 0.5 * RATING_A and r.max_cell > 3.45 for r in started)  # CCL tapers (CHG-3 cell factor)
    assert "held down: a cell reached 3.55 V" in text  # CHG-2 held CVL down on the way
    assert "absorption time 120 min -> 10 min by scenario imbalanced-charge" in text
    assert started[-1].state == "float", started[-1]
    floated = next(r.t for r in started if r.state == "float")
    assert 600 <= floated <= 1000  # the 10 min absorption time has to run first


def test_cold_morning_allows_no_charge_below_5_degrees_then_ramps_up_as_it_warms():
    readouts, text = run_demo("cold-morning", 750, 50)
    started = [r for r in readouts if r.t > 15]
    cold = [r for r in started if not r.atc]
    assert cold and all(r.ccl == 0.0 for r in cold)  # CCL 0 in the very decision that has ATC false
    assert min(r.min_temp for r in cold) < 5.0
    assert re.search(r"event t=\s*[\d.]+ s  LOW_TEMPERATURE_CHARGE -> raised", text)
    warm = [r for r in started if r.atc]
    assert warm and warm[0].t > cold[-1].t - 1e-6  # ATC comes back once, as it warms
    for r in warm:  # CCL follows the temperature factor (a reading may lag the decision by one frame: 0.5 degC)
        assert r.ccl <= RATING_A * temperature_factor(r.min_temp + 0.5, 25.0) + 0.1, r
    assert any(0 < r.ccl < RATING_A for r in warm)  # ramping
    assert warm[-1].ccl == RATING_A and warm[-1].min_temp >= 10.0, warm[-1]


def test_deep_discharge_derates_dcl_as_cells_fall_and_gives_0_once_atd_is_off():
    # SoC unknown (no --soc, as at a first start): with it known, the discharge floor (10 %) would stop the load
    # first (LOW_SOC), before the cells fall far
    readouts, text = run_demo("deep-discharge", 1150, None)
    started = [r for r in readouts if r.t > 25]  # after the rise from 0 at the start (CHG-7)
    on = [r for r in started if r.atd != "no"]
    off = [r for r in started if r.atd == "no"]
    assert off, started[-1]
    assert all(r.dcl == 0.0 for r in off)  # DCL 0 in the very decision that has ATD false
    assert re.search(r"event t=\s*[\d.]+ s  ATD -> no: CELL_LOW_VOLTAGE", text), text[-3000:]
    derated = [r for r in on if r.min_cell < 3.10]
    assert derated and all(r.dcl < RATING_A for r in derated)
    dcls = [r.dcl for r in on]
    assert all(b <= a + 0.1 for a, b in itertools.pairwise(dcls))  # only ever down as the cells fall
    assert min(dcls) <= 0.2 * RATING_A + 0.5  # down to the 0.2 factor at 2.90 V (CHG-4)
