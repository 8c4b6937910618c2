"""Debian's mbpoll, an independent Modbus client, against the real server: the settings of block B, the GX
custom name and a large bank's GX limits."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.bms.rig import Rig
from tests.modbus.harness import RunningServer

MBPOLL = shutil.which("mbpoll")
pytestmark = pytest.mark.skipif(MBPOLL is None, reason="mbpoll is not installed (tests/run installs it as root)")


def mbpoll(port: int, unit: int, address: int, *values: int, count: int = 1) -> subprocess.CompletedProcess:
    args = [MBPOLL, "-m", "tcp", "-a", str(unit), "-0", "-r", str(address), "-p", str(port), "127.0.0.1", "-1"]
    if not values:
        args[-2:-2] = ["-c", str(count)]
    return subprocess.run([*args, *map(str, values)], capture_output=True, text=True, timeout=20)


def words(result: subprocess.CompletedProcess) -> dict[int, int]:
    assert result.returncode == 0, result.stdout + result.stderr
    return {int(a): int(v) for a, v in re.findall(r"^\[(\d+)\]:\s+(-?\d+)", result.stdout, re.M)}


@pytest.fixture
def server():
    running = RunningServer(Rig(series=2, parallel=2))
    yield running
    running.close()


def test_mbpoll_reads_and_writes_the_pre_alarm_level_and_the_charge_settings(server):
    block_b = words(mbpoll(server.port, 1, 100, count=20))
    assert [block_b[a] for a in range(100, 120)] == [2800, 40, 3, 200, 100, 1, 3100, 2840, 2700, 120, 900, 0] + [0] * 8
    written = mbpoll(server.port, 1, 106, 3050)
    assert written.returncode == 0 and "Written 1 references" in written.stdout, written.stdout + written.stderr
    assert server.rig.core.settings.pre_alarm_level_per_cell == 3.05
    low = mbpoll(server.port, 1, 106, 2800)  # below 2.850 V
    assert low.returncode != 0 and "Illegal data value" in low.stdout + low.stderr
    reserved = mbpoll(server.port, 1, 115, 1)
    assert reserved.returncode != 0 and "Illegal data address" in reserved.stdout + reserved.stderr
    assert words(mbpoll(server.port, 1, 106, count=1))[106] == 3050


def test_mbpoll_writes_and_reads_the_gx_custom_name(server):
    name = b"Van bank".ljust(16, b"\0")
    written = mbpoll(server.port, 225, 1336, *(name[i] << 8 | name[i + 1] for i in range(0, 16, 2)))
    assert written.returncode == 0 and "Written 8 references" in written.stdout, written.stdout + written.stderr
    assert server.rig.core.settings.custom_name == "Van bank"
    back = words(mbpoll(server.port, 225, 1336, count=8))
    assert b"".join(back[a].to_bytes(2, "big") for a in range(1336, 1344)) == name


def test_mbpoll_reads_a_50_battery_bank_clamped_where_victrons_registers_end_never_0():
    running = RunningServer(Rig(series=1, parallel=50, capacity=300))
    try:
        running.tick(10.0)  # CHG-7: the limits rise from 0 to 1C over 10 s after the start
        limits = words(mbpoll(running.port, 225, 307, count=3))
        assert [limits[a] for a in (307, 308, 309)] == [65534] * 3  # 15,000 A and Ah do not fit uint16 x 10
        assert words(mbpoll(running.port, 225, 1297, count=2)) == {1297: 1, 1298: 1}
        assert words(mbpoll(running.port, 1, 30, count=1))[30] == 15000  # native capacity: fits
    finally:
        running.close()
