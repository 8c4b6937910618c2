"""The `smallbms-bus` command as a user runs it (real subprocesses)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

import smallbms_bus

CMD = [sys.executable, "-m", "smallbms_bus.cli"]


def test_version_and_help():
    out = subprocess.run([*CMD, "--version"], capture_output=True, text=True, check=True, timeout=60).stdout
    assert out.strip() == f"smallbms-bus {smallbms_bus.__version__}"
    helptext = subprocess.run([*CMD, "--help"], capture_output=True, text=True, check=True, timeout=60).stdout
    assert "demo" in helptext and "simulate" in helptext


def test_demo_reads_the_virtual_bank_and_stops_cleanly():
    result = subprocess.run([*CMD, "demo", "--duration", "3.5", "--every", "1.5"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "2S2P 25.6 V 200 Ah, 4 batteries, 16 cells" in out
    assert out.count("fresh") >= 4 and "STALE" not in out.split("---")[-1]
    assert "malformed 0" in out and out.rstrip().splitlines()[-1].startswith("demo: stopped after 3.5 simulated s")


def test_demo_overcharge_is_stopped_by_the_core_through_bms_state():
    """Virtual battery -> bus -> link -> core -> charge relay -> the virtual charger stops. The overcharge
    scenario's charger aims too high (15.2 V per unit); a cell passes 3.75 V about 390 simulated s after the
    charger starts (10 s discovery): 16 s at speed 25."""
    result = subprocess.run([*CMD, "demo", "--scenario", "overcharge", "--bank", "1s1p-12v100", "--speed", "25",
                             "--duration", "470", "--every", "0.5"], capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr
    blocks = result.stdout.split("--- t=")[1:]
    charging = [b for b in blocks if "allowed to charge yes" in b]
    stopped = [b for b in blocks if "allowed to charge no" in b and "CELL_HIGH_VOLTAGE" in b]
    assert charging and stopped, result.stdout[-3000:]
    assert "+30.0 A" in charging[-1]  # 0.3C into a 100 Ah battery while allowed
    assert all("charge off" in b for b in stopped)
    assert "relays   load on, charge on" in charging[-1]  # the memory board's relays, not only the wish
    assert "relays   load on, charge off" in stopped[-1]
    assert "+0.0 A" in stopped[-1] and "cells min" in stopped[-1]  # the charger obeyed BMS_STATE


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_demo_stops_cleanly_on_ctrl_c_and_sigterm(signum):
    process = subprocess.Popen([*CMD, "demo", "--every", "0.5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    time.sleep(2.0)
    process.send_signal(signum)
    out, err = process.communicate(timeout=15)
    assert process.returncode == 0, err
    assert "Traceback" not in err and out.rstrip().splitlines()[-1].startswith("demo: stopped after")


def test_bad_options_exit_2_naming_the_option():
    result = subprocess.run([*CMD, "demo", "--bank", "9s1p-12v100"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--bank" in result.stderr and "51.2 V" in result.stderr
    result = subprocess.run([*CMD, "demo", "--speed", "30"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--speed 30: at most 25 for 2s2p-12v100" in result.stderr
    result = subprocess.run([*CMD, "demo", "--bank", "max-chain", "--speed", "3"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and "--speed 3: at most 2 for 2s25p-12v100" in result.stderr
    result = subprocess.run([*CMD, "demo", "--devices", "relay"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--devices 'relay'" in result.stderr
    assert "relays, bms-state, both" in result.stderr
    result = subprocess.run([*CMD, "simulate", "--speed", "-1"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--speed" in result.stderr
    result = subprocess.run([*CMD, "simulate", "--interface", "slcan", "--channel", "/nonexistent/tty",
                             "--duration", "1"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--channel /nonexistent/tty" in result.stderr
