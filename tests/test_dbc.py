"""dbc/lithium_ng.dbc: generated, complete, and exactly PROTOCOL.md."""

from __future__ import annotations

import subprocess
import sys

import can
from hypothesis import given
from hypothesis import strategies as st
from smallbms_bus.dbc import generate

from smallbms_bus.link.codec import default_dbc_path

# PROTOCOL.md "Messages" table: base id, name, period (ms).
PROTOCOL_MESSAGES = {
    "BAT_STATUS": (0x100, 100), "BAT_CELLS_1_4": (0x140, 500), "BAT_CELLS_5_8": (0x180, 500),
    "BAT_CELLS_9_12": (0x1C0, 500), "BAT_CELLS_13_16": (0x200, 500), "BAT_TEMPS": (0x240, 1000),
    "BAT_INFO": (0x280, 1000), "BAT_SERIAL": (0x2C0, 1000),
}


def test_committed_dbc_equals_generator_output():
    committed = default_dbc_path().read_bytes().decode()
    same = committed == generate.render()  # a bool, so a failure does not make pytest diff 360 kB
    assert same, "dbc/lithium_ng.dbc is stale: run python -m smallbms_bus.dbc.generate"
    assert generate.main(["--check"]) == 0


def test_every_message_for_every_node(dbc):
    assert dbc.get_message_by_name("BMS_STATE").frame_id == 0x0F0
    for kind, (base, period) in PROTOCOL_MESSAGES.items():
        for n in range(1, 51):
            message = dbc.get_message_by_frame_id(base + n)
            assert message.name == f"{kind}_{n:02d}"
            assert message.length == 8
            assert message.cycle_time == period
            assert message.senders == [f"BATTERY_{n:02d}"]
            assert not message.is_extended_frame
    assert len(dbc.messages) == 1 + 8 * 50
    ids = [m.frame_id for m in dbc.messages]
    assert len(ids) == len(set(ids))


def test_bat_status_layout_matches_protocol(dbc):
    m = dbc.get_message_by_name("BAT_STATUS_01")
    layout = {s.name: (s.start, s.length, s.is_signed, s.scale, s.byte_order) for s in m.signals}
    assert layout["Voltage"] == (0, 16, False, 0.001, "little_endian")
    assert layout["Current"] == (16, 16, True, 0.1, "little_endian")
    assert layout["Temperature"] == (32, 16, True, 0.1, "little_endian")
    flags = ["CellHighVoltage", "CellLowVoltage", "CellLowPreAlarm", "Balancing", "CellImbalance",
             "HardwareFault", "FirmwareUpdating"]
    for bit, name in enumerate(flags):
        assert layout[name][:2] == (48 + bit, 1)
    assert layout["AliveCounter"][:3] == (56, 8, False)


def test_bms_state_and_info_layout(dbc):
    state = {s.name: (s.start, s.length) for s in dbc.get_message_by_name("BMS_STATE").signals}
    assert [state[n] for n in ("AllowedToCharge", "AllowedToDischarge", "PreAlarm", "ModeOn", "RemoteOn",
                               "FirmwareUpdate")] == [(b, 1) for b in range(6)]
    assert state["StateOfCharge"] == (8, 8) and state["Alarms"] == (16, 16) and state["Warnings"] == (32, 16)
    assert state["BatteryCount"] == (48, 8) and state["AliveCounter"] == (56, 8)
    info = {s.name: (s.start, s.length) for s in dbc.get_message_by_name("BAT_INFO_09").signals}
    assert info == {"NominalVoltage": (0, 8), "NominalCapacity": (8, 16), "FirmwareMajor": (24, 8),
                    "FirmwareMinor": (32, 8), "FirmwarePatch": (40, 8), "StringIndex": (48, 8),
                    "SeriesIndex": (56, 8)}
    serial = dbc.get_message_by_name("BAT_SERIAL_50")
    assert serial.is_multiplexed()
    assert serial.get_signal_by_name("SerialPart").is_multiplexer


CANDUMP_LINES = {
    # candump format: interface, id, [dlc], bytes. One line per message kind.
    "  can0  0F0   [8]  0B C8 01 02 08 00 04 07": ("BMS_STATE", {"StateOfCharge": 100.0, "Alarms": 513}),
    "  can0  107   [8]  D4 30 F6 FF 09 01 01 2A": ("BAT_STATUS_07", {"Voltage": 12.5, "Current": -1.0,
                                                                      "Temperature": 26.5, "AliveCounter": 42}),
    "  can0  141   [8]  E4 0C E4 0C FF FF 00 00": ("BAT_CELLS_1_4_01", {"Cell1": 3.3}),
    "  can0  1B2   [8]  E4 0C E4 0C E4 0C E4 0C": ("BAT_CELLS_5_8_50", {"Cell8": 3.3}),
    "  can0  1C3   [8]  E4 0C E4 0C E4 0C E4 0C": ("BAT_CELLS_9_12_03", {"Cell12": 3.3}),
    "  can0  204   [8]  E4 0C E4 0C E4 0C E4 0C": ("BAT_CELLS_13_16_04", {"Cell16": 3.3}),
    "  can0  245   [8]  83 FF 2D 01 00 00 00 00": ("BAT_TEMPS_05", {"CellTempMin": -12.5, "CellTempMax": 30.1}),
    "  can0  286   [8]  04 64 00 01 02 03 02 01": ("BAT_INFO_06", {"NominalCapacity": 100, "StringIndex": 2}),
    "  can0  2C7   [8]  01 48 51 32 32 33 33 41": ("BAT_SERIAL_07", {"SerialChars8to14": 18352168464699720}),
}


def test_cantools_cli_decodes_candump_lines_of_every_message():
    """`candump can0 | python -m cantools decode dbc/lithium_ng.dbc` works on a live bus."""
    text = "\n".join(CANDUMP_LINES) + "\n"
    out = subprocess.run([sys.executable, "-m", "cantools", "decode", str(default_dbc_path())],
                         input=text, capture_output=True, text=True, check=True, timeout=60).stdout
    for name, values in CANDUMP_LINES.values():
        block = out.split(f"{name}(", 1)
        assert len(block) == 2, f"{name} not decoded:\n{out}"
        body = block[1].split(")", 1)[0]
        for signal, value in values.items():
            assert f"{signal}: {value}" in body, f"{signal}={value} missing from {name}: {body}"
    assert "Unknown" not in out and "::\n" not in out.replace(" ::\n", "")


@given(volts=st.integers(0, 0xFFFF), amps=st.integers(-32768, 32767), temp=st.integers(-400, 1250),
       alive=st.integers(0, 255))
def test_signed_fields_round_trip(dbc, volts, amps, temp, alive):
    m = dbc.get_message_by_name("BAT_STATUS_12")
    raw = {"Voltage": volts, "Current": amps, "Temperature": temp, "AliveCounter": alive,
           **{s.name: 0 for s in m.signals if s.length == 1}}
    data = m.encode(raw, scaling=False)
    assert m.decode(data, scaling=False) == raw
    frame = can.Message(arbitration_id=m.frame_id, data=data, is_extended_id=False)
    assert int.from_bytes(frame.data[2:4], "little", signed=True) == amps


@given(part=st.sampled_from([0, 1]),
       text=st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=7))
def test_multiplexed_serial_round_trips(dbc, part, text):
    m = dbc.get_message_by_name("BAT_SERIAL_33")
    chars = ("SerialChars1to7", "SerialChars8to14")[part]
    value = int.from_bytes(text.encode().ljust(7, b"\0"), "little")
    data = m.encode({"SerialPart": part, chars: value}, scaling=False)
    assert data[0] == part and data[1:] == text.encode().ljust(7, b"\0")
    assert m.decode(data, scaling=False, decode_choices=False) == {"SerialPart": part, chars: value}
