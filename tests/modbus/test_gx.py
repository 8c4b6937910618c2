"""The Victron-GX-compatible unit (225): what a SCADA template written for a GX battery reads and writes."""

from __future__ import annotations

import pytest

from tests.modbus.harness import s32, signed, u32

GX = 225


def gx_read(client, address: int, count: int) -> list[int]:
    reply = client.read_holding_registers(address, count=count, device_id=GX)
    assert not reply.isError(), reply
    return reply.registers


def test_gx_blocks_read_whole_with_victrons_types_and_scales(server, client):
    server.on_loop(server.rig.core.set_soc, 80.0)
    server.on_loop(server.rig.set_current, -12.0)
    server.tick(60.0)  # a minute of discharge: Ah consumed
    d = server.rig.last
    low = gx_read(client, 256, 76)
    at = lambda a: low[a - 256]  # noqa: E731
    assert s32(low, 0) == round(d.bank.aggregates.power) and signed(at(258)) == round(d.bank.aggregates.power)
    assert at(259) == round(d.bank.aggregates.voltage * 100)  # x100
    assert signed(at(261)) == -120  # x10, signed, negative = discharging
    assert at(262) == 210
    assert d.consumed_ah > 0.1
    assert at(265) == round(d.consumed_ah * 10)  # the sheet's -10 on a negative D-Bus value: a positive word
    assert u32(low, 330 - 256) == round(d.consumed_ah)
    assert at(266) == round(d.soc * 10)
    assert at(307) == 2000 and at(308) == 2000  # 200 A (1C) x10 while allowed
    assert at(309) == 2000  # 200 Ah x10
    assert [at(a) for a in range(268, 280)] == [0] * 12  # no alarms
    high = gx_read(client, 1282, 62)
    hat = lambda a: high[a - 1282]  # noqa: E731
    assert hat(1282) == 9  # running
    assert (hat(1286), hat(1287), hat(1288), hat(1289)) == (4, 2, 2, 4)
    assert hat(1290) == 330 and hat(1291) == 330  # x100
    assert (hat(1297), hat(1298)) == (1, 1)
    assert hat(1322) == 3  # on
    assert high[1336 - 1282:] == [0] * 8  # /CustomName: none yet


def test_gx_alarm_enums_and_allow_flags_follow_the_bms(server, client):
    server.tick(10.0)  # CHG-7: the limits rise from 0 to 1C over 10 s after the start
    server.on_loop(server.rig.battery(3).flags.__setitem__, "cell_high_voltage", True)
    server.tick(0.5)
    assert gx_read(client, 269, 1) == [2]  # high voltage alarm
    assert gx_read(client, 1297, 2) == [0, 1]  # not allowed to charge, allowed to discharge
    assert gx_read(client, 307, 2) == [0, 2000]
    assert gx_read(client, 1283, 1) == [13]  # over voltage
    assert gx_read(client, 1282, 1) == [10]  # error


def test_gx_mode_is_writable_and_the_measurements_are_not(server, client):
    assert not client.write_register(1322, 252, device_id=GX).isError()
    assert not server.rig.core.mode_on and gx_read(client, 1322, 1) == [252]
    assert client.read_holding_registers(105, count=1, device_id=1).registers == [0]  # the same mode
    assert client.write_register(1322, 4, device_id=GX).exception_code == 3
    assert not client.write_register(1322, 3, device_id=GX).isError()
    assert server.rig.core.mode_on
    assert client.write_register(280, 1, device_id=GX).exception_code == 2  # the BMV relay: read-only here
    assert client.write_register(259, 1, device_id=GX).exception_code == 2


@pytest.mark.parametrize(("address", "count"), [(255, 1), (332, 1), (330, 3), (1281, 2), (1343, 2), (0, 1)])
def test_gx_addresses_outside_victrons_blocks_are_exception_02(client, address, count):
    assert client.read_holding_registers(address, count=count, device_id=GX).exception_code == 2


def test_the_native_blocks_are_not_on_the_gx_unit_and_vice_versa(client):
    assert client.read_holding_registers(320, count=1, device_id=1).exception_code == 2
    assert client.read_holding_registers(100, count=1, device_id=GX).exception_code == 2


def text_words(text: str, words: int = 8) -> list[int]:
    data = text.encode("ascii").ljust(2 * words, b"\0")
    return [data[i] << 8 | data[i + 1] for i in range(0, 2 * words, 2)]


def test_custom_name_1336_is_readable_writable_validated_and_persisted(server, client):
    assert gx_read(client, 1336, 8) == [0] * 8  # no name yet: an empty string, as on a GX
    assert not client.write_registers(1336, text_words("Boathouse bank"), device_id=GX).isError()
    assert gx_read(client, 1336, 8) == text_words("Boathouse bank")
    assert server.rig.core.settings.custom_name == "Boathouse bank"
    assert server.store.load_state()["settings"]["custom_name"] == "Boathouse bank"  # committed before the answer
    # a write of part of the string keeps the rest (Victron's dbus_modbustcp does the same)
    assert not client.write_register(1337, int.from_bytes(b"AT", "big"), device_id=GX).isError()
    assert server.rig.core.settings.custom_name == "BoAThouse bank"
    assert not client.write_registers(1336, text_words("0123456789abcdef"), device_id=GX).isError()  # 16: full
    assert server.rig.core.settings.custom_name == "0123456789abcdef"
    assert not client.write_registers(1336, text_words("Shed\0junk"), device_id=GX).isError()
    assert server.rig.core.settings.custom_name == "Shed"  # the name ends at the first NUL
    for bad in ([0x4101] + [0] * 7, [0x41C3] + [0] * 7, [0x0A41] + [0] * 7):  # control characters, not ASCII
        assert client.write_registers(1336, bad, device_id=GX).exception_code == 3
    assert client.write_registers(1342, [0x4142, 0x4344, 0x4546], device_id=GX).exception_code == 2  # runs past 1343
    assert server.rig.core.settings.custom_name == "Shed"
    assert gx_read(client, 1336, 8) == text_words("Shed")
    assert not client.write_register(120, 3, device_id=1).isError()  # reset settings: a name is not a setting
    assert server.rig.core.settings.custom_name == "Shed"


def test_custom_name_survives_a_restart_from_the_store(server, client):
    from smallbms_bus.bms.core import BmsCore
    from tests.bms.rig import WALL0

    assert not client.write_registers(1336, text_words("Main bank"), device_id=GX).isError()
    restored = BmsCore.from_snapshot(server.store.load_state(), 0.0, WALL0)
    assert restored.settings.custom_name == "Main bank"


def test_temperature_cell_ids_name_the_battery_with_the_extreme(server, client):
    server.on_loop(server.rig.battery(2).__setattr__, "temps", (12.0, 22.0))
    server.on_loop(server.rig.battery(4).__setattr__, "temps", (15.0, 35.0))
    server.tick(1.5)
    assert gx_read(client, 318, 2) == [120, 350]
    ids = gx_read(client, 1314, 8)
    assert ids[:4] == text_words("B2", 4) and ids[4:] == text_words("B4", 4)


def test_last_and_average_discharge_come_from_the_history(server, client):
    server.on_loop(server.rig.core.set_soc, 100.0)
    server.on_loop(server.rig.set_current, -60.0)
    server.tick(600.0)  # 10 Ah drawn from a 200 Ah bank
    h = server.rig.last.history
    assert h.last_discharge_ah == pytest.approx(server.rig.last.consumed_ah) and h.last_discharge_ah > 9.0
    words = gx_read(client, 281, 3)
    assert words[1] == round(h.last_discharge_ah * 10)  # 282, the sheet's -10 on a negative D-Bus value
    assert words[2] == 0  # 283: no charge cycle yet, so no average
    server.on_loop(server.rig.core.history.__setattr__, "charge_cycles", 4)
    server.tick(0.1)
    h = server.rig.last.history
    assert gx_read(client, 283, 1) == [round(h.cumulative_ah_drawn / 4 * 10)]


def test_last_errors_and_shutdowns_come_from_the_alarms_newest_first_and_survive_a_restart(server, client):
    from smallbms_bus.bms.core import BmsCore
    from tests.bms.rig import WALL0

    assert gx_read(client, 1292, 5) == [0] * 5 and gx_read(client, 310, 8) == [0] * 8
    server.on_loop(server.rig.battery(3).flags.__setitem__, "cell_high_voltage", True)
    server.tick(0.5)
    first = server.rig.last.wall
    server.on_loop(server.rig.battery(3).flags.__setitem__, "cell_high_voltage", False)
    server.tick(5.0)
    assert not server.rig.last.alarms
    server.on_loop(server.rig.battery(2).__setattr__, "silent", True)  # comms lost: 23
    server.tick(6.0)
    assert server.rig.last.alarms
    second = next(e.wall for e in server.rig.events if e.name == "BATTERY_COMMS_LOST" and e.value == "raised")
    assert gx_read(client, 1292, 5) == [2, 23, 13, 0, 0]  # two errors, each took a direction away
    times = gx_read(client, 310, 8)
    assert [u32(times, 0), u32(times, 2), u32(times, 4)] == [int(second), int(first), 0]
    server.on_loop(server.rig.core.set_soc, 5.0)  # LOW_SOC: the discharge floor, not an error
    server.tick(0.5)
    assert gx_read(client, 1292, 5) == [2, 23, 13, 0, 0]
    restored = BmsCore.from_snapshot(server.on_loop(server.rig.core.snapshot, server.rig.t), 0.0, WALL0)
    assert restored.diagnostics == server.rig.core.diagnostics and restored.diagnostics.shutdowns == 2
