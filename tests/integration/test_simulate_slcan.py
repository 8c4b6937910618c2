"""`smallbms-bus simulate` on an SLCAN pseudo-terminal, read by a plain SLCAN reader.

The reader here is deliberately not python-can: it parses the Lawicel lines itself, answers the
adapter commands like a USB adapter, and decodes with the committed dbc/lithium_ng.dbc through
cantools, as an integrator's own tooling would.
"""

from __future__ import annotations

import itertools
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import cantools
import pytest

REPO = Path(__file__).resolve().parents[2]
DURATION = 6.0
# PROTOCOL.md periods in seconds by message kind.
PERIODS = {"BAT_STATUS": 0.1, "BAT_CELLS_1_4": 0.5, "BAT_TEMPS": 1.0, "BAT_INFO": 1.0, "BAT_SERIAL": 1.0}


def read_slcan(master: int, seconds: float) -> tuple[list[tuple[float, int, bytes]], list[bytes]]:
    """Frames (time, id, data) and adapter commands seen on the adapter side of the pty."""
    frames: list[tuple[float, int, bytes]] = []
    commands: list[bytes] = []
    buffer = b""
    deadline = time.monotonic() + seconds
    os.set_blocking(master, False)
    while time.monotonic() < deadline:
        try:
            chunk = os.read(master, 4096)
        except BlockingIOError:
            time.sleep(0.002)
            continue
        except OSError:  # the simulator closed the port
            break
        buffer += chunk
        *lines, buffer = buffer.split(b"\r")
        now = time.monotonic()
        for line in lines:
            if line.startswith(b"t"):
                can_id, dlc = int(line[1:4], 16), int(line[4:5])
                frames.append((now, can_id, bytes.fromhex(line[5:5 + 2 * dlc].decode())))
            elif line:
                commands.append(line)
            os.write(master, b"\r")  # acknowledge, as an adapter does
    return frames, commands


@pytest.fixture
def pty_pair():
    master, slave = os.openpty()
    yield master, os.ttyname(slave)
    os.close(master)
    os.close(slave)


def test_simulate_frames_decode_with_the_committed_dbc_at_protocol_periods(pty_pair):
    master, channel = pty_pair
    process = subprocess.Popen(
        [sys.executable, "-m", "smallbms_bus.cli", "simulate", "--interface", "slcan", "--channel", channel,
         "--bank", "2s2p-12v100", "--scenario", "discharge", "--ignore-bms", "--duration", str(DURATION)],
        cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        frames, commands = read_slcan(master, DURATION + 3)
    finally:
        stderr = process.communicate(timeout=15)[1]
    assert process.returncode == 0, stderr
    assert b"O" in commands and b"S6" in commands  # opened at 500 kbit/s

    db = cantools.database.load_file(str(REPO / "dbc" / "lithium_ng.dbc"))
    by_kind: dict[str, list[tuple[float, int, dict]]] = defaultdict(list)
    for t, can_id, data in frames:
        message = db.get_message_by_frame_id(can_id)
        kind, _, node = message.name.rpartition("_")
        by_kind[kind].append((t, int(node), message.decode(data, decode_choices=False)))
    assert set(by_kind) == set(PERIODS)  # 12.8 V batteries send cells 1-4 only

    # Periods: the median gap between a battery's frames of one kind is the protocol's period.
    for kind, period in PERIODS.items():
        times: dict[int, list[float]] = defaultdict(list)
        for t, node, _ in by_kind[kind]:
            times[node].append(t)
        assert sorted(times) == [1, 2, 3, 4]
        for node, ts in times.items():
            gaps = [b - a for a, b in itertools.pairwise(ts)]
            assert statistics.median(gaps) == pytest.approx(period, rel=0.15), (kind, node, gaps)

    # Values: a 2S2P bank of 12.8 V 100 Ah batteries discharging at 0.5C from about 13 %.
    infos = {node: v for _, node, v in by_kind["BAT_INFO"]}
    assert {(v["StringIndex"], v["SeriesIndex"]) for v in infos.values()} == {(1, 1), (1, 2), (2, 1), (2, 2)}
    assert all(v["NominalVoltage"] == 1 and v["NominalCapacity"] == 100 for v in infos.values())
    serial: dict[int, dict[int, bytes]] = defaultdict(dict)
    for _, node, v in by_kind["BAT_SERIAL"]:
        part = v["SerialPart"]
        serial[node][part] = v[("SerialChars1to7", "SerialChars8to14")[part]].to_bytes(7, "little")
    serials = {node: (p[0] + p[1]).decode() for node, p in serial.items()}
    assert all(len(s) == 14 and s.isalnum() for s in serials.values()) and len(set(serials.values())) == 4

    statuses = [v for _, _, v in by_kind["BAT_STATUS"]]
    # cantools returns scaled values (A, V). The first status of each battery may precede the load.
    assert all(-55 <= v["Current"] <= -45 for v in statuses[8:])  # 50 A per string, discharging
    assert all(11.5 < v["Voltage"] < 13.2 for v in statuses)
    cells = [v[f"Cell{i}"] for _, _, v in by_kind["BAT_CELLS_1_4"] for i in range(1, 5)]
    assert all(2.9 < c < 3.3 for c in cells)
    alive = defaultdict(list)
    for _, node, v in by_kind["BAT_STATUS"]:
        alive[node].append(v["AliveCounter"])
    for counters in alive.values():
        assert all((b - a) % 256 == 1 for a, b in itertools.pairwise(counters))
