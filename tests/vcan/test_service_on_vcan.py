"""One service on a steady bank, as deployed (`python -m smallbms_bus.cli run` in a fresh interpreter, and
`simulate`, on vcan0): start-up and bank learning, the candump-style log decoded by cantools, and vcan0
taken down and up (COM-4). The rig is shared by the three tests, which run in this order."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from pymodbus.client import ModbusTcpClient

from smallbms_bus.bms.alarms import BmsAlarm
from smallbms_bus.link.codec import default_dbc_path
from smallbms_bus.reports import BatteryInfo, BatteryStatus, BmsState, SerialFragment
from tests.ports import free_port
from tests.vcan.rig import (
    CHANNEL,
    CHARGE,
    CLOCK_TOL_S,
    LOAD,
    PRE_ALARM,
    REACT_S,
    START_S,
    WAIT_S,
    Rig,
    figures,
    follows,
)

# Start-ups under emulation on a loaded host take minutes (fresh interpreters): more than pytest's default 300 s.
pytestmark = [pytest.mark.vcan, pytest.mark.timeout(900)]
DISCOVERY_S = 4.0


@pytest.fixture(scope="module")
def steady(tmp_path_factory, forks) -> Iterator[Rig]:
    # The service in a fresh interpreter here: the console entry as deployed.
    r = Rig(tmp_path_factory.mktemp("steady"), "steady", "2s2p-12v100", 1.0, discovery_window=DISCOVERY_S,
            modbus_port=free_port(), forks=forks, fresh_service=True)
    yield r
    r.close()


def test_start_up_learns_the_bank_then_switches_on(steady):
    r = steady
    before = [s for at, s in r.recorder.of(BmsState) if at < r.first_frame]
    assert before, "the service sends BMS_STATE before any battery is heard"
    assert not any(s.allowed_to_charge or s.allowed_to_discharge or s.battery_count for s in before)
    on = r.wait_relays({LOAD: True, CHARGE: True})
    allowed = r.event("ATC", "yes")
    # OUT-4, BANK-2: nothing allowed and every output off until the discovery window after the first frame has
    # closed (the service hears that frame at the earliest when it is sent). Identity (both halves of BAT_SERIAL,
    # 1 s apart) is complete inside the window, so the bank is learned as it closes.
    assert DISCOVERY_S - CLOCK_TOL_S <= allowed.wall - r.first_frame <= DISCOVERY_S + REACT_S, allowed
    first_allowing = r.first(BmsState, where=lambda s: s.allowed_to_charge or s.allowed_to_discharge)
    assert first_allowing is not None and first_allowing >= allowed.wall - CLOCK_TOL_S
    first_on = min(t for c in (LOAD, CHARGE, PRE_ALARM) for t in r.recorder.switched(c, True))
    follows(first_on, allowed, "first output on")
    follows(on, allowed, "load and charge on")
    figures("start-up", window_s=allowed.wall - r.first_frame, relay_after_decision_s=on - allowed.wall)
    state = r.state_from(first_allowing)
    assert state.allowed_to_charge and state.allowed_to_discharge
    assert (state.battery_count, state.alarms, state.pre_alarm, state.mode_on) == (4, 0, False, True)
    # The learned bank as a PLC reads it, against what the batteries said on the bus.
    serial: dict[int, dict[int, str]] = {}
    for _, fragment in r.recorder.of(SerialFragment):
        serial.setdefault(fragment.node, {})[fragment.part] = fragment.chars
    info = {i.node: i for _, i in r.recorder.of(BatteryInfo)}
    client = ModbusTcpClient("127.0.0.1", port=r.modbus_port, timeout=10)
    assert client.connect()
    try:
        block_a = client.read_input_registers(0, count=34, device_id=1).registers
        assert block_a[1] == 1  # state: on
        assert block_a[26:32] == [4, 16, 2, 2, 200, 2560]  # batteries, cells, series, parallel, Ah, 25.60 V
        for node in (1, 2, 3, 4):
            regs = client.read_input_registers(1000 + 40 * (node - 1), count=15, device_id=1).registers
            text = b"".join(v.to_bytes(2, "big") for v in regs[:7]).rstrip(b"\0").decode()
            assert text == serial[node][0] + serial[node][1]
            assert (regs[13], regs[14]) == (info[node].string_index, info[node].series_index)
    finally:
        client.close()
    # The simulated charger and load run because BMS_STATE allows them (its status line, every 5 s).
    r.wait(lambda: re.search(r"charger on, load on \|", r.sim_log.read_text()), WAIT_S,
           "simulator: charger and load on")


def test_candump_log_of_the_bus_decodes_with_cantools(steady, tmp_path):
    r = steady
    r.wait_relays({LOAD: True, CHARGE: True})
    log = tmp_path / "candump.log"
    log.write_text(r.recorder.log_text())
    lines = log.read_text().splitlines()
    assert len(lines) > 100
    candump = re.compile(r"\(\d+\.\d{6}\) vcan0 [0-9A-F]{3}#[0-9A-F]{16}( [RT])?")  # candump -L (+ direction)
    assert all(candump.fullmatch(line) for line in lines), lines[:3]
    with log.open() as stdin:
        result = subprocess.run([sys.executable, "-m", "cantools", "decode", "--single-line", str(default_dbc_path())],
                                stdin=stdin, capture_output=True, text=True, timeout=START_S)
    assert result.returncode == 0, result.stderr
    decoded = result.stdout.splitlines()
    assert len(decoded) == len(lines)
    undecoded = [line for line in decoded if not re.search(r" :: \w+\(", line)]
    assert not undecoded, undecoded[:3]
    names = {m.group(1) for line in decoded if (m := re.search(r" :: (\w+)\(", line))}
    assert {"BMS_STATE", "BAT_STATUS_04", "BAT_CELLS_1_4_04", "BAT_TEMPS_04", "BAT_INFO_04", "BAT_SERIAL_04"} <= names
    # cantools reads the same values as the service's decoder: the last BMS_STATE and battery 4's BAT_INFO.
    last_state = [line for line in decoded if ":: BMS_STATE(" in line][-1]
    assert "BatteryCount: 4" in last_state and "AllowedToCharge: 1" in last_state
    info = r.recorder.of(BatteryInfo, node=4)[-1][1]
    last_info = [line for line in decoded if ":: BAT_INFO_04(" in line][-1]
    assert f"StringIndex: {info.string_index}," in last_info and f"SeriesIndex: {info.series_index}" in last_info


def test_interface_down_is_a_comms_loss_and_the_service_recovers(steady):
    """COM-4: `ip link set vcan0 down` takes the bus away; outputs off, then back on by themselves after up."""
    if os.geteuid() != 0:
        pytest.skip("taking vcan0 down needs root (CAP_NET_ADMIN); run-in-vm runs the suite as root")
    r = steady
    r.wait_relays({LOAD: True, CHARGE: True})
    down = time.time()
    subprocess.run(["ip", "link", "set", CHANNEL, "down"], check=True)
    try:
        # The link notices at its next send (100 ms) or interface check (1 s): comms lost, everything off.
        lost = r.event("BATTERY_COMMS_LOST", "raised", after=down)
        assert lost.wall - down <= 1.0 + REACT_S, lost
        off = r.wait_relays({LOAD: False, CHARGE: False, PRE_ALARM: True}, after=down)
        follows(off, lost, "outputs off, pre-alarm on")
        was_down = time.time()
        time.sleep(1.0)
        assert not r.recorder.of(BatteryStatus, after=was_down), "frames while vcan0 is down"
    finally:
        up = time.time()
        subprocess.run(["ip", "link", "set", CHANNEL, "up"], check=True)
    # Back: the link re-opens (back-off up to 5 s) and reports the loss until every battery is fresh for 2 s.
    reported = r.wait(lambda: r.first(BmsState, up, lambda s: s.alarms & BmsAlarm.BATTERY_COMMS_LOST), WAIT_S,
                      "BMS_STATE with BATTERY_COMMS_LOST after vcan0 came up")
    assert reported - up <= 5.0 + REACT_S  # the longest back-off, then the first BMS_STATE
    lost_state = r.state_from(reported)
    assert not lost_state.allowed_to_charge and not lost_state.allowed_to_discharge
    cleared = r.event("BATTERY_COMMS_LOST", "cleared", after=up)
    fresh_again = r.first(BatteryStatus, up)
    assert fresh_again is not None and cleared.wall - fresh_again >= 2.0 - CLOCK_TOL_S  # COM-2: fresh for 2 s first
    on = r.wait_relays({LOAD: True, CHARGE: True, PRE_ALARM: False}, after=up)
    follows(on, cleared, "outputs back on")
    figures("vcan0 down/up", lost_after_down_s=lost.wall - down, off_after_decision_s=off - lost.wall,
            reported_after_up_s=reported - up, cleared_after_fresh_s=cleared.wall - fresh_again,
            on_after_decision_s=on - cleared.wall)
    assert r.service is not None and r.service.poll() is None  # recovered without a restart
    log = r.service_log.read_text()
    assert re.search(r"bus socketcan:vcan0 down: ", log) and "Traceback" not in log, log[-2000:]
