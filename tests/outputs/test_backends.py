"""Each backend switches each channel and reads it back, against real virtual hardware."""

from __future__ import annotations

import pytest
import serial

from smallbms_bus.outputs import OutputError, open_board
from smallbms_bus.outputs.lcus import lcus_frame
from smallbms_bus.outputs.memory import MemoryBoard
from smallbms_bus.sim.relay_boards import VirtualModbusRelayBoard
from tests.outputs.conftest import FAST


def switch_every_channel(board, observed):
    """Each channel on then off, alone: the board (and `observed`, the hardware's own view) must follow."""
    for channel in range(1, board.channels + 1):
        board.write(channel, True)
        assert observed() == {n: n == channel for n in range(1, board.channels + 1)}, channel
        if board.can_read_back:
            assert board.read(channel) is True
        board.write(channel, False)
        if board.can_read_back:
            assert board.read(channel) is False
    assert not any(observed().values())


def test_memory_switches_and_reads_back():
    board = open_board("memory", channels=4)
    switch_every_channel(board, lambda: board.relays)


def test_modbus_rtu_switches_every_channel_and_reads_it_back(rtu_board, rtu_client):
    switch_every_channel(rtu_client, lambda: rtu_board.relays)


def test_modbus_tcp_switches_every_channel_and_reads_it_back(tcp_module):
    board = open_board("modbus", transport="tcp", host="127.0.0.1", port=tcp_module.port, **FAST)
    try:
        switch_every_channel(board, lambda: tcp_module.relays)
    finally:
        board.close()


def test_modbus_coil_offset_moves_channel_one(tcp_module):
    # A board that numbers its coils from 1: channel 1 is coil 1, i.e. the module's relay 2.
    board = open_board("modbus", transport="tcp", host="127.0.0.1", port=tcp_module.port, coil_offset=1,
                       channels=7, **FAST)
    try:
        board.write(1, True)
        assert tcp_module.relays[2] is True and tcp_module.relays[1] is False
    finally:
        board.close()


def test_lcus_switches_every_channel(lcus_board):
    board = open_board("lcus", port=lcus_board.path, channels=4)
    frames = 0

    def observed():
        nonlocal frames
        frames += 1
        assert lcus_board.wait_frames(frames)
        return lcus_board.relays

    try:
        assert board.read(1) is None  # no read-back on LCUS
        for channel in range(1, 5):
            board.write(channel, True)
            assert observed() == {n: n == channel for n in range(1, 5)}
            board.write(channel, False)
            assert observed() == dict.fromkeys(range(1, 5), False)
    finally:
        board.close()


def test_modbus_discrete_inputs_follow_the_board(rtu_board, rtu_client):
    rtu_board.set_input(3, True)
    assert rtu_client.read_input(3) is True
    assert rtu_client.read_input(2) is False
    rtu_board.set_input(3, False)
    assert rtu_client.read_input(3) is False


def test_modbus_stuck_coil_reads_back_its_old_state(rtu_board, rtu_client):
    rtu_client.write(5, True)
    rtu_board.stuck.add(5)
    rtu_client.write(5, False)
    assert rtu_client.read(5) is True


def test_modbus_exception_response_is_an_output_error(rtu_board):
    # The client believes in 9 channels; the board has 8: coil 8 answers exception 02.
    board = open_board("modbus", transport="rtu", port=rtu_board.path, unit=7, channels=9, **FAST)
    try:
        with pytest.raises(OutputError, match=r"channel 9: read coil 8: Modbus exception 02 \(illegal data address\)"):
            board.read(9)
        with pytest.raises(OutputError, match=r"channel 9: write coil 8 on: Modbus exception 02"):
            board.write(9, True)
    finally:
        board.close()


def test_modbus_rtu_unplugged_adapter_is_an_output_error(rtu_board, rtu_client):
    rtu_board.unplug()
    with pytest.raises(OutputError, match=r"modbus rtu .* unit 7 channel 1: write coil 0 on"):
        rtu_client.write(1, True)
    rtu_client.close()
    with pytest.raises(OutputError, match="the serial port does not exist"):
        rtu_client.open()
    rtu_board.replug()
    rtu_client.open()
    rtu_client.write(1, True)
    assert rtu_board.relays[1] is True


def test_modbus_wrong_unit_is_an_output_error(tmp_path):
    # A real RS-485 board stays silent for another unit id (a timeout); pymodbus's server answers 04.
    with VirtualModbusRelayBoard(unit=2, directory=str(tmp_path)) as virtual:
        board = open_board("modbus", transport="rtu", port=virtual.path, unit=3, timeout=0.2, retries=0)
        try:
            with pytest.raises(OutputError, match="unit 3 channel 1: read coil 0: Modbus exception 04"):
                board.read(1)
        finally:
            board.close()


def test_modbus_tcp_nobody_listening_cannot_open(tcp_module):
    port = tcp_module.port
    tcp_module.close()
    with pytest.raises(OutputError, match=rf"modbus tcp 127.0.0.1:{port} unit 1: cannot connect"):
        open_board("modbus", transport="tcp", host="127.0.0.1", port=port, **FAST)


def test_lcus_frames_are_byte_exact():
    assert lcus_frame(1, True) == bytes.fromhex("A0 01 01 A2")
    assert lcus_frame(1, False) == bytes.fromhex("A0 01 00 A1")
    assert lcus_frame(2, True) == bytes.fromhex("A0 02 01 A3")
    assert lcus_frame(4, False) == bytes.fromhex("A0 04 00 A4")
    assert lcus_frame(8, True) == bytes.fromhex("A0 08 01 A9")


def test_virtual_lcus_ignores_bad_checksums_and_resynchronises(lcus_board):
    with serial.Serial(lcus_board.path, 9600) as port:
        port.write(bytes.fromhex("A0 01 01 A3"))  # wrong sum: ignored, like the real board
        port.write(bytes.fromhex("00 A0 02 01 A3"))  # a stray byte, then a good frame
        port.write(bytes.fromhex("A0 07 01 A8"))  # good sum, a channel an LCUS-4 does not have
        port.flush()
        assert lcus_board.wait_frames(3)
    assert lcus_board.bad_frames == 1
    assert lcus_board.frames == 1
    assert lcus_board.ignored == 1
    assert lcus_board.relays == {1: False, 2: True, 3: False, 4: False}


def test_lcus_unplugged_is_an_output_error_and_the_board_drops_out(lcus_board):
    board = open_board("lcus", port=lcus_board.path, channels=4)
    board.write(1, True)
    assert lcus_board.wait_frames(1) and lcus_board.relays[1]
    lcus_board.unplug()
    assert lcus_board.relays[1] is False  # USB-powered: unplugged means released
    with pytest.raises(OutputError, match=r"lcus-4 .* channel 2: write on failed"):
        board.write(2, True)
    board.close()
    with pytest.raises(OutputError, match="cannot open"):
        board.open()


def test_lcus_has_no_inputs(lcus_board):
    board = open_board("lcus", port=lcus_board.path, channels=4)
    try:
        with pytest.raises(OutputError, match="has no inputs"):
            board.read_input(1)
    finally:
        board.close()


def test_channel_outside_the_board_is_refused():
    board = open_board("memory", channels=2)
    with pytest.raises(OutputError, match=r"memory channel 3: no such relay: the board has relays 1\.\.2"):
        board.write(3, True)
    with pytest.raises(OutputError, match="channel 0"):
        board.read(0)


def test_closed_board_refuses_io():
    board = MemoryBoard()
    with pytest.raises(OutputError, match="memory channel 1: board is not open"):
        board.write(1, True)
