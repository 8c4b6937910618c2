"""`smallbms-bus simulate --pty --inverter pty`: the simulated charger and load are a virtual inverter on a second
SLCAN wire, obeying the 0x351 that `smallbms-bus run` sends from `[inverter]` (docs/simulator.md). Two real
processes, two pseudo-terminal wires; what the simulator's status lines say (its bank current, what it obeys)."""

from __future__ import annotations

import re
import signal
import subprocess
import threading
import time
from pathlib import Path

from tests.integration.test_run_process import CMD, start, wait_for

OBEYS = re.compile(r"V\s+([+-][\d.]+) A .*\| inverter obeys 0x351: CVL ([\d.]+) V CCL ([\d.]+) A DCL ([\d.]+) A")


class Lines:
    """Every stderr line of a process, collected by a thread (so a test can wait for one without blocking)."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self.thread.start()

    def _read(self, process: subprocess.Popen) -> None:
        assert process.stderr is not None
        for line in process.stderr:
            self.lines.append(line)

    def since(self, n: int) -> list[str]:
        return self.lines[n:]


def test_the_simulated_inverter_obeys_the_limits_run_sends_and_stops_without_them(tmp_path: Path):
    wires = tmp_path / "wires"
    simulator = subprocess.Popen([*CMD, "simulate", "--pty", "--pty-dir", str(wires), "--inverter", "pty",
                                  "--bank", "2s1p-12v100", "--scenario", "steady", "--status-every", "0.5"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err = Lines(simulator)
    service = None
    try:
        wait_for(lambda: (wires / "bms").exists() and (wires / "inverter-bms").exists(), 30, "both wires", simulator)
        config = tmp_path / "smallbms-bus.toml"
        config.write_text(f'[bus]\ninterface = "slcan"\nchannel = "{wires / "bms"}"\n[bms]\ndiscovery_window = 1.0\n'
                          f'[store]\npath = "{tmp_path / "state.db"}"\n[outputs]\nbackend = "memory"\n'
                          f'[metrics]\nport = 0\n[web]\nport = 0\n[modbus]\nport = 0\n'
                          f'[inverter]\ninterface = "slcan"\nchannel = "{wires / "inverter-bms"}"\n')
        service = start(config)
        # 2S1P 12.8 V 100 Ah: CVL 28.4 V; the inverter's charger (0.06C) feeds its loads (0.05C) first: +1 A
        wait_for(lambda: any((m := OBEYS.search(line)) and float(m[1]) > 0.5 for line in err.since(0)), 60,
                 "the simulator charging through the inverter, limited by 0x351", simulator)
        obeyed = [m for line in err.since(0) if (m := OBEYS.search(line))][-1]
        assert float(obeyed[2]) == 28.4 and float(obeyed[3]) > 0 and float(obeyed[4]) > 0, obeyed[0]
        # run stops: its last frame set says every limit 0; then nothing, and 3 s later the inverter stops
        service.send_signal(signal.SIGTERM)
        assert service.wait(timeout=30) == 0
        mark = len(err.lines)
        wait_for(lambda: any("inverter stopped (no 0x351 for 3 s)" in line for line in err.since(mark)), 20,
                 "the inverter stopped without 0x351", simulator)
        stopped = next(line for line in err.since(mark) if "inverter stopped (no 0x351" in line)
        assert re.search(r"V\s+[+-]0\.0 A", stopped), stopped
    finally:
        if service is not None and service.poll() is None:
            service.kill()
        simulator.send_signal(signal.SIGINT)
        simulator.communicate(timeout=20)
        err.thread.join(5)
    assert simulator.returncode == 0
    text = "".join(err.lines)
    assert "Traceback" not in text
    assert "charger and load: an inverter/charger on BMS-CAN (slcan:" in text
    assert not (wires / "inverter-bms").exists()  # the simulator removes the ports it made


def test_inverter_refuses_relay_wiring_and_an_ignored_bms():
    for extra in (["--ignore-bms"], ["--devices", "bms-state"], ["--relay-board", "modbus-tcp:127.0.0.1:1"]):
        result = subprocess.run([*CMD, "simulate", "--interface", "virtual", "--channel", f"x-{time.time_ns()}",
                                 "--inverter", "pty", *extra], capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, result.stderr
        assert "--inverter: the charger and load are the inverter's" in result.stderr
