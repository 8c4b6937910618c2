"""The native map over a real socket with the pymodbus client: values, writes, commands, exceptions."""

from __future__ import annotations

import ipaddress
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from smallbms_bus.bms.settings import DEFAULT_SETTINGS
from smallbms_bus.modbus.regmap import load_maps
from smallbms_bus.modbus.server import ModbusOptions
from tests.bms.rig import Rig
from tests.modbus.conftest import raw_request
from tests.modbus.harness import RunningServer, s32, signed, u32
from tests.ports import hung_up, recv_exact


def read(client, address: int, count: int, unit: int = 1, fc: int = 3) -> list[int]:
    call = client.read_holding_registers if fc == 3 else client.read_input_registers
    reply = call(address, count=count, device_id=unit)
    assert not reply.isError(), reply
    return reply.registers


def exception_of(reply) -> int:
    assert reply.isError(), f"expected an exception, got {reply}"
    return reply.exception_code


# -- block A: the instant readout ------------------------------------------------------------------------
def test_block_a_is_the_instant_readout_of_the_latest_decision(server, client):
    server.on_loop(server.rig.set_current, -20.0)
    server.on_loop(server.rig.battery(1).cells.__setitem__, 0, 3.25)
    server.tick(0.5)
    d = server.rig.last
    a = read(client, 0, 40)
    assert a[0] == 1  # map version
    assert a[1] == 1  # on
    assert a[2] == round(d.bank.aggregates.voltage * 100)
    assert a[3] == 0xFFFF  # SoC unknown at a first start (MON-3)
    assert s32(a, 4) == -2000  # -20.00 A: positive = charging
    assert s32(a, 6) == round(d.bank.aggregates.power)
    assert u32(a, 10) == 0xFFFFFFFF  # time remaining unknown without SoC
    assert signed(a[12]) == 210  # 21.0 degC, highest battery temperature
    assert a[13] == 3250 and a[14] == 3300
    assert (signed(a[15]), signed(a[16])) == (200, 210)
    assert a[17:20] == [1, 1, 0b011]  # ATC, ATD yes; load and charge disconnect high, pre-alarm low
    assert a[20] == 0 and a[21] == int(d.warnings)
    assert a[22] == 1  # remote on
    assert a[26:33] == [4, 16, 2, 2, 200, 2560, 0]  # 2S2P of 12.8 V 100 Ah: 200 Ah, 25.60 V
    assert u32(a, 34) == int(server.rig.t)
    assert a[33] == int(server.rig.t) & 0xFFFF
    assert a[36:40] == [0, 1, 0, 0]  # bus up, balancer unknown because the SoC is (BAL-1), reserved


def test_fc3_and_fc4_return_the_same_words_everywhere(client):
    for address, count in ((0, 40), (100, 6), (120, 2), (200, 22), (1000, 40), (1040, 40), (2960, 40)):
        assert read(client, address, count, fc=3) == read(client, address, count, fc=4)


def test_a_read_of_125_registers_across_batteries_is_one_request(client):
    words = read(client, 1000, 125)
    assert len(words) == 125
    assert words[7] == 1 and words[47] == 1  # batteries 1 and 2 present and fresh


def test_block_e_shows_each_battery_and_a_silent_one_goes_stale(server, client):
    b1 = read(client, 1000, 40)
    serial = b"".join(w.to_bytes(2, "big") for w in b1[0:7]).rstrip(b"\0").decode()
    assert serial == server.rig.battery(1).serial
    assert b1[7] == 1 and b1[8] == 1280 and b1[9] == 100
    assert b1[10:13] == [1, 2, 3] and b1[13:15] == [1, 1]
    assert b1[15] == 13200 and b1[21] == 4
    assert b1[22:26] == [3300] * 4 and b1[26:38] == [0xFFFF] * 12  # 4 cells; 12 slots absent
    assert read(client, 1000 + 40 * 4, 40)[7] == 0  # battery 5 does not exist: absent
    server.on_loop(setattr, server.rig.battery(2), "silent", True)
    server.tick(6.0)  # past the 5 s comm_timeout
    b2 = read(client, 1040, 40)
    assert b2[7] == 2  # stale
    assert b2[15] == 0xFFFF and b2[22] == 0xFFFF  # a stale battery's readings are not shown as if current
    assert b2[38] >= 50  # data age in 0.1 s
    assert read(client, 0, 40)[32] == 1


# -- settings, mode and commands ---------------------------------------------------------------------------
def test_settings_write_through_the_core_and_read_back(server, client):
    assert read(client, 100, 6) == [2800, 40, 3, 200, 100, 1]  # 14.00 V x 2 in series; defaults
    assert not client.write_registers(100, [2840, 50, 5, 300, 150], device_id=1).isError()
    s = server.rig.core.settings
    assert (s.charged_voltage_per_unit, s.tail_current_pct, s.charged_detection_time_min,
            s.low_soc_warning_pct, s.discharge_floor_pct) == (14.2, 5.0, 5.0, 30.0, 15.0)
    assert read(client, 100, 5) == [2840, 50, 5, 300, 150]


def test_the_settings_of_behaviour_md_are_block_b_100_to_119(server, client):
    """PRE-1's pre-alarm level and the charge-control settings (106-111); 112-119 reserved."""
    assert read(client, 100, 20) == [2800, 40, 3, 200, 100, 1, 3100, 2840, 2700, 120, 900, 0] + [0] * 8
    assert not client.write_registers(106, [3150, 2860, 2720, 240, 800, 1], device_id=1).isError()
    s = server.rig.core.settings
    assert (s.pre_alarm_level_per_cell, s.absorption_voltage_per_unit, s.float_voltage_per_unit,
            s.absorption_time_min, s.rebulk_soc_pct, s.dcl_zero_at_pre_alarm) == (3.15, 14.3, 13.6, 240, 80, 1)
    assert read(client, 106, 6) == [3150, 2860, 2720, 240, 800, 1]
    assert not client.write_register(106, 2850, device_id=1).isError()
    assert server.rig.core.settings.pre_alarm_level_per_cell == 2.85
    for address in range(112, 120):
        assert exception_of(client.write_register(address, 0, device_id=1)) == 2
    assert exception_of(client.write_registers(110, [900, 0, 0], device_id=1)) == 2  # runs into 112: nothing changes
    assert read(client, 110, 2) == [800, 1]


@pytest.mark.parametrize(("address", "value"), [
    (106, 2849), (106, 3151), (107, 2758), (107, 2882), (108, 2658), (108, 2762),
    (108, 2840),  # float at the absorption voltage (14.20 x 2)
    (109, 9), (109, 481), (110, 499), (110, 991), (111, 2),
])
def test_out_of_range_charge_settings_are_exception_03_and_change_nothing(server, client, address, value):
    before = read(client, 100, 12)
    assert exception_of(client.write_register(address, value, device_id=1)) == 3
    assert read(client, 100, 12) == before
    assert server.rig.core.settings == DEFAULT_SETTINGS


@pytest.mark.parametrize(("address", "value"), [
    (100, 2500), (100, 2930),  # 12.50 / 14.65 V x 2: outside 13.00-14.60 per unit
    (101, 4), (101, 101), (102, 0), (102, 51), (103, 991), (104, 991),
    (104, 250),  # discharge floor above the low-SoC warning level (20 %)
    (105, 2), (120, 0), (120, 8), (121, 1001),
])
def test_out_of_range_writes_are_exception_03_and_change_nothing(server, client, address, value):
    before = read(client, 100, 6)
    assert exception_of(client.write_register(address, value, device_id=1)) == 3
    assert read(client, 100, 6) == before
    assert server.rig.core.settings == DEFAULT_SETTINGS


def test_a_multi_register_write_is_applied_whole_or_not_at_all(server, client):
    assert exception_of(client.write_registers(100, [2840, 50, 5, 300, 150, 7], device_id=1)) == 3  # mode 7
    assert server.rig.core.settings == DEFAULT_SETTINGS and server.rig.core.mode_on
    assert exception_of(client.write_registers(110, [800, 1, 0], device_id=1)) == 2  # 112 is reserved
    assert exception_of(client.write_registers(99, [1, 2800], device_id=1)) == 2


def test_mode_off_switches_both_disconnects_off_within_the_request(server, client):
    decisions = server.decisions
    assert not client.write_register(105, 0, device_id=1).isError()
    assert server.decisions == decisions + 1  # decided at once, not at the next tick
    d = server.rig.last
    assert not d.outputs.load_disconnect and not d.outputs.charge_disconnect
    a = read(client, 0, 40)
    assert a[1] == 2 and a[19] & 0b11 == 0
    assert not client.write_register(105, 1, device_id=1).isError()
    assert read(client, 0, 40)[1] == 1


def test_commands_reach_the_core(server, client):
    assert not client.write_register(121, 555, device_id=1).isError()  # set SoC 55.5 %
    assert read(client, 3, 1) == [555] and read(client, 121, 1) == [555]
    assert not client.write_register(120, 1, device_id=1).isError()  # synchronise to 100 %
    assert read(client, 3, 1) == [1000]
    assert read(client, 120, 1) == [0]  # the command register reads 0
    server.on_loop(server.rig.set_current, -50.0)
    server.tick(60.0)
    assert u32(read(client, 202, 2), 0) > 0  # cumulative Ah drawn counts
    assert not client.write_register(120, 2, device_id=1).isError()  # reset history
    assert u32(read(client, 202, 2), 0) == 0
    client.write_registers(101, [50, 5], device_id=1)
    assert not client.write_register(120, 3, device_id=1).isError()  # reset settings
    assert server.rig.core.settings == DEFAULT_SETTINGS
    assert not client.write_register(120, 5, device_id=1).isError()  # begin firmware update
    assert read(client, 1, 1) == [3] and not server.rig.last.outputs.charge_disconnect
    assert not client.write_register(120, 6, device_id=1).isError()  # completed
    assert read(client, 1, 1) == [1]
    learned = server.rig.core.bank.learned_revision
    assert not client.write_register(120, 4, device_id=1).isError()  # re-learn the bank
    assert server.rig.core.bank.learned_revision == learned + 1


def test_set_soc_and_charged_voltage_wait_for_a_learned_bank_with_exception_06():
    running = RunningServer(Rig(series=2), start=False)
    try:
        running.on_loop(running.rig.evaluate)
        c = running.client()
        assert exception_of(c.write_register(121, 500, device_id=1)) == 6
        assert exception_of(c.write_register(100, 2800, device_id=1)) == 6
        assert read(c, 100, 1) == [0xFFFF]  # the charged voltage of an unknown bank is unknown
        assert not c.write_register(101, 50, device_id=1).isError()  # a setting that needs no bank
        c.close()
    finally:
        running.close()


def test_relearn_with_no_battery_heard_is_refused_with_exception_06_and_changes_nothing():
    """BANK-4 with the bus down would learn an empty bank (every battery unknown once it is back): refused."""
    running = RunningServer(Rig(series=2))
    try:
        for battery in running.rig.batteries:
            battery.silent = True
        running.tick(6.0)  # past comm_timeout (5 s)
        learned = running.on_loop(lambda: running.rig.core.bank.learned)
        c = running.client()
        reply = c.write_register(120, 4, device_id=1)
        assert exception_of(reply) == 6
        c.close()
        cli = subprocess.run([sys.executable, "-m", "smallbms_bus.cli", "command", "relearn", "--yes", "--port",
                              str(running.port)], capture_output=True, text=True, timeout=60)
        assert cli.returncode == 1 and cli.stderr.strip() == (
            "command: relearn refused: the service cannot take it yet (Modbus exception 06); no battery is heard on "
            "the bus now, and a re-learn would learn an empty bank (BANK-4)"), cli.stderr
        assert running.on_loop(lambda: running.rig.core.bank.learned) == learned
    finally:
        running.close()


# -- exceptions ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("address", "count"), [(40, 1), (36, 10), (99, 2), (120, 3), (122, 1), (199, 1), (222, 1),
                                                (999, 2), (3000, 1), (2990, 20), (39999, 1), (65535, 1)])
def test_reads_touching_unmapped_addresses_are_exception_02(client, address, count):
    assert exception_of(client.read_holding_registers(address, count=count, device_id=1)) == 2
    assert exception_of(client.read_input_registers(address, count=count, device_id=1)) == 2


@pytest.mark.parametrize("address", [0, 2, 33, 200, 1000, 1015, 40000])
def test_writes_to_read_only_registers_are_exception_02(server, client, address):
    assert exception_of(client.write_register(address, 1, device_id=1)) == 2


@pytest.mark.parametrize(("pdu", "code"), [
    (struct.pack(">BHH", 1, 0, 1), 1),  # read coils
    (struct.pack(">BHH", 2, 0, 1), 1),  # read discrete inputs
    (struct.pack(">BHH", 5, 0, 0xFF00), 1),  # write coil
    (struct.pack(">BHHB", 15, 0, 1, 1) + b"\x01", 1),
    (struct.pack(">BHHH", 22, 105, 0xFFFF, 0), 1),  # mask write
    (struct.pack(">BHHHHB", 23, 0, 1, 105, 1, 2) + b"\x00\x00", 1),  # read/write multiple
    (bytes([0x2B, 0x0E, 0x01, 0x00]), 1),  # read device identification
    (bytes([0x41]), 1),  # no such function
    (struct.pack(">BHH", 3, 0, 126), 3),  # over 125 registers
    (struct.pack(">BHH", 4, 0, 0), 3),  # zero registers
    (struct.pack(">BHHB", 16, 100, 124, 240) + bytes(240), 3),  # over 123 registers (248 bytes exceed an ADU)
    (struct.pack(">BHHB", 16, 100, 2, 3) + bytes(4), 3),  # byte count does not match
])
def test_every_bad_request_class_gets_its_exception(server, pdu, code):
    answer = raw_request(server.port, pdu)
    assert answer[0] == pdu[0] | 0x80 and answer[1] == code, answer.hex()
    assert server.rig.core.settings == DEFAULT_SETTINGS and server.rig.core.mode_on


@pytest.mark.parametrize("header", [struct.pack(">HHHB", 1, 0, 300, 1), struct.pack(">HHHB", 1, 5, 6, 1),
                                    struct.pack(">HHHB", 1, 0, 0, 1)])
def test_a_stream_that_is_not_modbus_tcp_is_hung_up_and_others_are_served(server, client, header):
    with socket.create_connection(("127.0.0.1", server.port), timeout=3) as s:
        s.sendall(header + bytes(10))
        assert s.recv(16) == b""
    assert server.server.stats.connections_bad_frame_closed == 1
    assert read(client, 0, 1) == [1]


def test_an_unknown_unit_is_exception_0b_and_the_gx_unit_answers(client):
    assert exception_of(client.read_holding_registers(0, count=1, device_id=7)) == 0x0B
    assert not client.read_holding_registers(259, count=1, device_id=225).isError()


def test_pipelined_requests_in_one_segment_all_get_answers_in_order(server):
    tids = range(1, 101)  # 1200 bytes at once: more than pymodbus's own 260-byte receive buffer
    frames = b"".join(struct.pack(">HHHBBHH", tid, 0, 6, 1, 3, 0, 2) for tid in tids)
    with socket.create_connection(("127.0.0.1", server.port), timeout=3) as s:
        s.sendall(frames)
        data = b""
        while len(data) < len(tids) * 13:
            chunk = s.recv(4096)
            assert chunk
            data += chunk
    assert [struct.unpack(">H", data[i * 13:i * 13 + 2])[0] for i in range(len(tids))] == list(tids)


# -- who may write, and how many may connect ----------------------------------------------------------
def test_writes_from_outside_allow_write_from_are_exception_01_logged_and_counted(caplog):
    options = ModbusOptions(port=0, allow_write_from=(ipaddress.ip_network("10.0.0.0/8"),))
    running = RunningServer(Rig(series=2), options)
    try:
        c = running.client()
        assert read(c, 0, 40)[0] == 1  # reading is for everyone
        assert exception_of(c.write_register(105, 0, device_id=1)) == 1
        assert exception_of(c.write_registers(100, [2800, 40], device_id=1)) == 1
        assert running.rig.core.mode_on and running.rig.core.settings == DEFAULT_SETTINGS
        assert running.server.stats.refused_writes == 2
        assert any("refused a write from 127.0.0.1" in r.getMessage() for r in caplog.records)
        c.close()
    finally:
        running.close()


def test_a_connection_over_the_cap_is_served_and_the_longest_idle_one_makes_room():
    """Issue 12: refusing newcomers locked operators out; a full server now evicts the longest-idle connection
    (tests/modbus/test_connections.py covers floods, per-address caps and timeouts)."""
    running = RunningServer(Rig(), ModbusOptions(port=0, max_connections=2))
    try:
        first = socket.create_connection(("127.0.0.1", running.port), timeout=5)
        second = running.client()
        assert raw_request(running.port, struct.pack(">BHH", 3, 0, 1), sock=first)[0] == 3
        assert read(second, 0, 2)[0] == 1  # first is now the longest-idle
        third = running.client()
        assert read(third, 0, 1) == [1]
        assert hung_up(first)  # evicted
        assert running.server.stats.connections_evicted == 1 and running.server.stats.connections_refused == 0
        assert read(second, 0, 2)[0] == 1
        first.close()
        second.close()
        third.close()
    finally:
        running.close()


def test_idle_connections_are_closed_after_the_idle_timeout():
    running = RunningServer(Rig(), ModbusOptions(port=0, idle_timeout=1.0))
    try:
        with socket.create_connection(("127.0.0.1", running.port), timeout=5) as idle:
            assert raw_request(running.port, struct.pack(">BHH", 3, 0, 1), sock=idle)[0] == 3  # polled once
            busy = running.client()
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                assert read(busy, 0, 1) == [1]
                time.sleep(0.2)
            assert hung_up(idle)  # the server closed it
            assert read(busy, 0, 1) == [1]  # the active client stays
            busy.close()
        assert running.server.stats.connections_idle_closed == 1
    finally:
        running.close()


def test_a_client_that_never_reads_its_answers_does_not_stall_the_others_and_is_closed():
    running = RunningServer(Rig(), ModbusOptions(port=0, idle_timeout=1.0))
    try:
        _flood_without_reading(running)
        stats = running.server.stats
        assert stats.connections_slow_closed + stats.connections_idle_closed == 1
    finally:
        running.close()


def _flood_without_reading(server: RunningServer) -> None:
    request = struct.pack(">HHHBBHH", 1, 0, 6, 1, 3, 1000, 125)
    hog = socket.create_connection(("127.0.0.1", server.port), timeout=0.5)
    hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sent = 0
    try:
        try:
            for _ in range(20000):  # ~ 50 MB of answers it never reads; stops when the server stops reading
                hog.sendall(request * 16)
                sent += 1
        except TimeoutError:
            pass  # the server paused reading from it (its answers are not being read)
        other = server.client()
        started = time.perf_counter()
        for _ in range(20):
            assert read(other, 0, 40)[0] == 1
        assert time.perf_counter() - started < 2.0
        other.close()
        deadline = time.monotonic() + 3.0  # past the 1 s idle timeout, the hog still connected
        while server.server.stats.connections_open > 0 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        hog.close()
    assert sent > 0


def test_a_client_that_does_not_read_its_answers_costs_at_most_the_high_water_mark_and_loses_nothing():
    """Flow control holds for requests already received, too: once the client stops reading, the server
    stops answering (not only reading), so at most asyncio's 64 KiB high-water mark (plus one answer) of its
    answers waits in the service, whatever it pipelined; when it reads again every answer comes, in order."""
    running = RunningServer(Rig())
    total = 30_000  # x 259-byte answers = 7.8 MB: far more than the socket buffers hold
    hog = socket.socket()
    hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    hog.connect(("127.0.0.1", running.port))
    try:
        data = b"".join(struct.pack(">HHHBBHH", i & 0xFFFF, 0, 6, 1, 3, 40000, 125) for i in range(total))
        hog.setblocking(False)
        sent = 0
        try:
            while sent < len(data):
                sent += hog.send(data[sent:])
        except BlockingIOError:
            pass
        time.sleep(1.0)

        def buffered() -> list[int]:
            return [c.transport.get_write_buffer_size() for c in running.server.connections if c.transport]

        assert max(running.on_loop(buffered)) <= 64 * 1024 + 259
        answered = sum(running.server.stats.requests.values())
        assert answered < total // 2  # it stopped answering a client that does not read
        hog.setblocking(True)
        hog.settimeout(5)
        if sent < len(data):
            threading.Thread(target=hog.sendall, args=(data[sent:],), daemon=True).start()
        for i in range(total):
            head = recv_exact(hog, 9)
            tid, _, length, unit, fc, count = struct.unpack(">HHHBBB", head)
            assert (tid, length, unit, fc, count) == (i & 0xFFFF, 253, 1, 3, 250), f"answer {i}: {head.hex()}"
            recv_exact(hog, 250)
    finally:
        hog.close()
        running.close()


def test_a_modbus_request_makes_the_status_led_solid(server, client):
    """LED-2: blinking until a Modbus client is seen, solid afterwards."""
    assert read(client, 24, 1) == [1]  # this very request is the first one the core hears of
    server.tick(0.1)
    assert read(client, 24, 1) == [2]
    assert server.rig.last.status_led.value == "solid"


def test_the_whole_map_of_both_units_reads_without_exceptions(server, client):
    """Every placed block of every map, in chunks of up to 125, by FC3 and FC4 (SunSpec laid out for 4 batteries)."""
    maps = load_maps()
    nodes = (1, 2, 3, 4)
    units = {1: [maps["native"], maps["sunspec"]], 225: [maps["gx"]]}
    total = 0
    for unit, unit_maps in units.items():
        for regmap in unit_maps:
            for placed in regmap.layout(nodes, dict.fromkeys(nodes, 4)):  # 12.8 V batteries: 4 cells each
                for start in range(placed.start, placed.end, 125):
                    count = min(125, placed.end - start)
                    words = read(client, start, count, unit=unit, fc=3)
                    assert words == read(client, start, count, unit=unit, fc=4)
                    total += count
    assert total == 40 + 20 + 2 + 22 + 10 + 50 * 40 + 2 + 68 + 64 + 4 * (44 + 4 * 4) + 2 + 76 + 62


def test_a_setting_written_in_tenths_is_stored_as_written(server, client):
    assert not client.write_register(103, 222, device_id=1).isError()
    assert server.rig.core.settings.low_soc_warning_pct == 22.2
    assert repr(server.rig.core.settings.to_dict()["low_soc_warning_pct"]) == "22.2"
