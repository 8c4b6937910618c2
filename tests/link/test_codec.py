"""Frame decoding (COM-3): every frame is a report or counted under exactly one malformed kind."""

from __future__ import annotations

import can
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smallbms_bus.link.codec import MALFORMED_KINDS, FrameDecoder
from smallbms_bus.reports import (
    BatteryInfo,
    BatteryStatus,
    BatteryTemps,
    BmsState,
    CellVoltages,
    SerialFragment,
)


def frame(can_id: int, data: bytes | str, **kw) -> can.Message:
    payload = bytes.fromhex(data) if isinstance(data, str) else data
    return can.Message(arbitration_id=can_id, data=payload, is_extended_id=False, **kw)


def test_bat_status_decodes_to_scaled_signed_values(decoder):
    r = decoder.decode(frame(0x107, "D430F6FF0901012A"))
    assert r == BatteryStatus(node=7, voltage=12.5, current=-1.0, temperature=26.5, cell_high_voltage=True,
                              cell_low_voltage=False, cell_low_pre_alarm=False, balancing=False,
                              cell_imbalance=False, hardware_fault=False, firmware_updating=False,
                              alive_counter=42)


def test_every_flag_bit_maps_to_its_field(decoder):
    fields = ["cell_high_voltage", "cell_low_voltage", "cell_low_pre_alarm", "balancing", "cell_imbalance",
              "hardware_fault", "firmware_updating"]
    for bit, name in enumerate(fields):
        r = decoder.decode(frame(0x101, bytes([0xE8, 0x33, 0, 0, 0, 0, 1 << bit, 0])))
        assert [f for f in fields if getattr(r, f)] == [name]


def test_reserved_flag_bit_is_ignored(decoder):
    r = decoder.decode(frame(0x101, bytes([0xE8, 0x33, 0, 0, 0, 0, 0x80, 0])))
    assert isinstance(r, BatteryStatus) and not any(
        getattr(r, f) for f in ("cell_high_voltage", "hardware_fault", "firmware_updating"))


def test_cells_with_not_present_marker(decoder):
    r = decoder.decode(frame(0x1C3, "E40CFFFF00008813"))
    assert r == CellVoltages(node=3, first_cell=9, voltages=(3.3, None, 0.0, 5.0))


def test_temps_info_serial_and_bms_state(decoder):
    assert decoder.decode(frame(0x245, "83FF2D0100000000")) == BatteryTemps(5, -12.5, 30.1)
    assert decoder.decode(frame(0x286, "0464000102030201")) == BatteryInfo(6, 4, 100, (1, 2, 3), 2, 1)
    assert decoder.decode(frame(0x2C7, "0048513232333341")) == SerialFragment(7, 0, "HQ2233A")
    assert decoder.decode(frame(0x2C7, "0141424300000000")) == SerialFragment(7, 1, "ABC")
    assert decoder.decode(frame(0x0F0, "0BFF010208000407")) == BmsState(
        True, True, False, True, False, False, None, 513, 8, 4, 7)
    assert decoder.decode(frame(0x0F0, "0B64010208000407")).state_of_charge == 50.0
    assert decoder.malformed_total == 0


@pytest.mark.parametrize(("message", "kind"), [
    (frame(0x7FF, bytes(8)), "unknown_id"),
    (frame(0x100, bytes(8)), "unknown_id"),  # node 0 does not exist
    (frame(0x133, bytes(8)), "unknown_id"),  # node 51 does not exist
    (can.Message(arbitration_id=0x107, data=bytes(8), is_extended_id=True), "unknown_id"),
    (frame(0x107, bytes(7)), "wrong_dlc"),
    (frame(0x107, bytes(0)), "wrong_dlc"),
    (can.Message(arbitration_id=0x107, data=bytes(8), dlc=8, is_extended_id=False, is_fd=True), "not_data_frame"),
    (can.Message(arbitration_id=0x107, is_remote_frame=True, dlc=8, is_extended_id=False), "not_data_frame"),
    (can.Message(is_error_frame=True), "not_data_frame"),
    (frame(0x286, "0364000102030201"), "out_of_range"),  # NominalVoltage 3 is invalid
    (frame(0x286, "0064000102030201"), "out_of_range"),  # NominalVoltage 0
    (frame(0x286, "0400000102030201"), "out_of_range"),  # capacity 0 Ah
    (frame(0x286, "0464000102030001"), "out_of_range"),  # StringIndex 0
    (frame(0x286, "0464000102033301"), "out_of_range"),  # StringIndex 51
    (frame(0x286, "0464000102030205"), "out_of_range"),  # SeriesIndex 5
    (frame(0x141, "891300000000E40C"), "out_of_range"),  # a cell at 5.001 V
    (frame(0x107, "D430F6FF7F06002A"), "out_of_range"),  # battery at 163.1 degC
    (frame(0x245, "6CFE2D0100000000"), "out_of_range"),  # cell at -40.4 degC
    (frame(0x2C7, "0248513232333341"), "out_of_range"),  # multiplexer 2
    (frame(0x2C7, "0048005132333341"), "out_of_range"),  # NUL inside the serial
    (frame(0x2C7, "00C8513232333341"), "out_of_range"),  # non-ASCII byte
])
def test_malformed_frames_are_counted_by_kind(decoder, message, kind):
    assert decoder.decode(message) is None
    assert decoder.malformed == {k: int(k == kind) for k in MALFORMED_KINDS}
    assert decoder.received == 1 and decoder.decoded == 0


@settings(max_examples=3000, deadline=None)
@given(can_id=st.one_of(st.integers(0, 0x7FF), st.sampled_from([0xF0, 0x101, 0x132, 0x141, 0x1B2, 0x1C1, 0x232,
                                                                  0x241, 0x281, 0x2C1, 0x2F2])),
       data=st.binary(max_size=8), extended=st.booleans(), remote=st.booleans())
def test_random_bytes_on_any_id_never_raise(can_id, data, extended, remote):
    decoder = FrameDecoder.__new__(FrameDecoder)  # share the parsed DBC: building it per example is slow
    decoder.__dict__.update(_SHARED.__dict__)
    decoder.malformed = dict.fromkeys(MALFORMED_KINDS, 0)
    decoder.received = decoder.decoded = 0
    message = can.Message(arbitration_id=can_id, data=None if remote else data, dlc=len(data),
                          is_extended_id=extended, is_remote_frame=remote)
    report = decoder.decode(message)
    assert decoder.received == 1
    assert (report is not None) + decoder.malformed_total == 1
    if report is not None:
        assert decoder.decoded == 1 and len(data) == 8 and not extended and not remote


_SHARED = FrameDecoder()


@pytest.mark.parametrize(("soc", "raw"), [(80.3, 161), (80.2, 160), (80.25, 160), (80.75, 162), (0.0, 0),
                                          (100.0, 200), (None, 0xFF)])
def test_bms_state_soc_goes_on_the_wire_in_the_dbcs_half_percent_steps(soc, raw, decoder, encoder):
    """The core hands BMS_STATE its SoC unrounded; the encoder rounds it to the DBC's 0.5 % step (ties to even,
    as every scaled signal) and 0xFF is "unknown"."""
    message = encoder.bms_state(BmsState(True, True, False, True, False, False, soc, 0, 0, 2, 1))
    assert message.data[1] == raw
    assert decoder.decode(message).state_of_charge == (None if soc is None else raw / 2)
