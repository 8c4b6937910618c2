"""The `smallbms-bus` command as a user runs it (real subprocesses).

The demo tests read the readouts as they are printed and stop the demo once what they wait for has been seen
(a generous deadline only bounds a hang): what they assert is the order of events in the readouts, never how
many seconds the demo took, which depends on the machine's load."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import pytest

import smallbms_bus

CMD = [sys.executable, "-m", "smallbms_bus.cli"]
BLOCK = "--- t="  # each readout starts with this line


class Demo:
    """`smallbms-bus demo ARGS` with its stdout read line by line by a thread, split into readouts."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen([*CMD, "demo", "--web-port", "0", *args], stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def out(self) -> str:
        return "".join(self.lines)

    def readouts(self) -> list[str]:
        """The readouts printed so far (the last one possibly still being printed)."""
        return self.out.split(BLOCK)[1:]

    def wait(self, until: Callable[[list[str]], int | None], timeout: float, what: str) -> int:
        """The index of the readout `until` picks, once printed completely (a later readout has begun)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            blocks = self.readouts()[:-1]  # the last one may be incomplete
            found = until(blocks)
            if found is not None:
                return found
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{what}: not seen in {timeout:g} s (demo exit {self.process.poll()})\n"
                             f"{self.out[-3000:]}")

    def stop(self, signum: int = signal.SIGINT) -> tuple[str, str]:
        """Signal it and wait for the end: (stdout, stderr)."""
        self.process.send_signal(signum)
        try:
            self.process.wait(timeout=30)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
        self._reader.join(timeout=10)
        assert self.process.stderr is not None
        return self.out, self.process.stderr.read()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def first(blocks: list[str], where: Callable[[str], bool], after: int = -1) -> int | None:
    return next((i for i, b in enumerate(blocks) if i > after and where(b)), None)


def test_version_and_help():
    out = subprocess.run([*CMD, "--version"], capture_output=True, text=True, check=True, timeout=60).stdout
    assert out.strip() == f"smallbms-bus {smallbms_bus.__version__}"
    helptext = subprocess.run([*CMD, "--help"], capture_output=True, text=True, check=True, timeout=60).stdout
    assert "demo" in helptext and "simulate" in helptext


def test_demo_reads_the_virtual_bank_and_stops_cleanly():
    demo = Demo("--every", "0.5")
    try:
        seen = demo.wait(lambda blocks: first(blocks, lambda b: b.count("fresh") == 4), 60, "4 batteries fresh")
        out, err = demo.stop()
    finally:
        demo.close()
    assert demo.process.returncode == 0, err
    block = demo.readouts()[seen]
    assert "2S2P 25.6 V 200 Ah, 4 batteries, 16 cells" in block
    assert "STALE" not in block and "link up" in block and "malformed 0" in block
    assert out.rstrip().splitlines()[-1].startswith("demo: stopped") and "Traceback" not in err


def test_demo_stops_by_itself_after_duration():
    result = subprocess.run([*CMD, "demo", "--web-port", "0", "--duration", "1.5", "--every", "0.5"],
                            capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr
    assert BLOCK in result.stdout and result.stdout.rstrip().splitlines()[-1].startswith("demo: stopped")


def test_demo_overcharge_is_stopped_by_the_core_through_bms_state():
    """Virtual battery -> bus -> link -> core -> relay and BMS_STATE -> the virtual charger stops. The overcharge
    scenario's charger aims too high (15.2 V per unit); a cell passes 3.75 V about 390 simulated s after the
    charger starts (10 s discovery): 16 s at speed 25. Asserted: the order of what the readouts show, up to the
    charger stopped."""
    demo = Demo("--scenario", "overcharge", "--bank", "1s1p-12v100", "--speed", "25", "--every", "0.5")
    try:
        def charging(b: str) -> bool:
            return "allowed to charge yes" in b and "+30.0 A" in b  # 0.3C into a 100 Ah battery while allowed

        def stopped(b: str) -> bool:
            return "allowed to charge no" in b and "CELL_HIGH_VOLTAGE" in b

        on = demo.wait(lambda blocks: first(blocks, charging), 90, "charging at 30 A")
        off = demo.wait(lambda blocks: first(blocks, stopped, on), 90, "charging stopped with CELL_HIGH_VOLTAGE")
        still = demo.wait(lambda blocks: first(blocks, lambda b: "relays   load on, charge off" in b and "+0.0 A" in b,
                                               off - 1), 30, "the charge relay off and the charger stopped")
        out, err = demo.stop()
    finally:
        demo.close()
    assert demo.process.returncode == 0, err
    blocks = demo.readouts()
    assert "relays   load on, charge on" in blocks[on]  # the memory board's relays, not only the wish
    assert all(stopped(b) and "charge off" in b for b in blocks[off:still + 1])  # no re-allowing on the way
    assert "cells min" in blocks[still]
    assert all("link up" in b for b in blocks[:still + 1])
    assert out.rstrip().splitlines()[-1].startswith("demo: stopped") and "Traceback" not in err


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_demo_stops_cleanly_on_ctrl_c_and_sigterm(signum):
    demo = Demo("--every", "0.5")
    try:
        demo.wait(lambda blocks: 0 if blocks else None, 60, "a readout: the demo is running")
        out, err = demo.stop(signum)
    finally:
        demo.close()
    assert demo.process.returncode == 0, err
    assert "Traceback" not in err and out.rstrip().splitlines()[-1].startswith("demo: stopped")


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
