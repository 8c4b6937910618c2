"""The controller (OUT-4, OUT-5, REM-1, LED mapping) against real clients and virtual boards.

Time is the test's FakeClock / explicit `now`: re-assert and back-off are driven, never slept.
"""

from __future__ import annotations

import pytest

from smallbms_bus.backoff import Backoff
from smallbms_bus.outputs import open_board
from smallbms_bus.outputs.controller import ROLES, RelayController
from smallbms_bus.outputs.memory import MemoryBoard
from tests.outputs.conftest import FAST

MAP = {"load_disconnect": 1, "charge_disconnect": 2, "pre_alarm": 3, "error_led": 4, "status_led": 5}
ALL_OFF = {"load_disconnect": False, "charge_disconnect": False, "pre_alarm": False, "error_led": "off",
           "status_led": "off"}
RUNNING = {"load_disconnect": True, "charge_disconnect": True, "pre_alarm": False, "error_led": "off",
           "status_led": "solid"}


def memory_outputs(clock, **kwargs):
    board = MemoryBoard(channels=8)
    board.open()
    return board, RelayController(board, MAP, clock=clock, **kwargs)


def relays(board, count=5):
    return [board.relays[n] for n in range(1, count + 1)]


# -- writing and re-asserting ----------------------------------------------------------------------
def test_apply_writes_every_change_at_once_and_only_the_changes(clock):
    board, out = memory_outputs(clock)
    status = out.apply(RUNNING, clock.now)
    assert relays(board) == [True, True, False, False, True]
    assert status.fault is None and status.board_up
    assert status.read_back == {"load_disconnect": True, "charge_disconnect": True, "pre_alarm": False,
                                "error_led": False, "status_led": True}
    first = status.commands
    status = out.apply({**RUNNING, "load_disconnect": False, "pre_alarm": True}, clock.now + 0.1)
    assert relays(board) == [False, True, True, False, True]
    assert status.commands == first + 2  # the two changed roles, nothing else


def test_roles_missing_from_wanted_are_switched_off(clock):
    board, out = memory_outputs(clock)
    out.apply(RUNNING, clock.now)
    out.apply({"charge_disconnect": True}, clock.now + 0.1)
    assert relays(board) == [False, True, False, False, False]


def test_a_relay_flipped_behind_its_back_is_reasserted(rtu_board, rtu_client, clock):
    out = RelayController(rtu_client, MAP, reassert_every=5.0, clock=clock)
    out.apply(RUNNING, 100.0)
    rtu_board.set_relay(1, False)  # someone flips load_disconnect by hand
    out.apply(RUNNING, 104.9)
    assert rtu_board.relays[1] is False  # not yet due
    status = out.apply(RUNNING, 105.0)
    assert rtu_board.relays[1] is True
    assert status.fault is None


def test_a_board_that_rebooted_gets_everything_back(rtu_board, rtu_client, clock):
    out = RelayController(rtu_client, MAP, clock=clock)
    out.apply(RUNNING, 100.0)
    rtu_board.reboot()
    assert not any(rtu_board.relays.values())
    out.apply(RUNNING, 105.0)
    assert [rtu_board.relays[n] for n in range(1, 6)] == [True, True, False, False, True]


# -- read-back faults ----------------------------------------------------------------------------------
def test_stuck_relay_is_a_fault_naming_role_and_channel_within_one_apply(rtu_board, rtu_client, clock):
    out = RelayController(rtu_client, MAP, clock=clock)
    out.apply(ALL_OFF, 100.0)
    rtu_board.stuck.add(2)  # charge relay welded open
    status = out.apply(RUNNING, 100.1)
    assert status.fault == "charge_disconnect (channel 2): commanded on, read back off"
    assert status.read_back["charge_disconnect"] is False
    assert rtu_board.relays[1] is True  # the other outputs were still written
    assert status.faults == 1


def test_mismatch_is_retried_with_backoff_and_clears(clock):
    board, out = memory_outputs(clock, backoff=Backoff(initial=1.0, maximum=8.0))
    board.stuck.add(1)
    status = out.apply(RUNNING, 100.0)
    assert status.fault == "load_disconnect (channel 1): commanded on, read back off"
    writes = board.writes
    out.apply(RUNNING, 100.5)  # before the back-off: the welded relay is not hammered
    assert board.writes == writes
    out.apply(RUNNING, 101.0)  # retry 1 s later, still stuck: next retry 2 s later
    assert board.writes == writes + 1
    out.apply(RUNNING, 102.5)
    assert board.writes == writes + 1
    board.stuck.clear()
    status = out.apply(RUNNING, 103.0)
    assert status.fault is None and board.relays[1] is True
    assert status.faults == 1  # one mismatch, however often it was retried


def test_a_changed_target_is_written_at_once_even_while_backing_off(clock):
    board, out = memory_outputs(clock)
    board.stuck.add(2)
    out.apply(RUNNING, 100.0)
    status = out.apply({**RUNNING, "load_disconnect": False, "charge_disconnect": False}, 100.01)
    assert board.relays[1] is False
    assert status.fault is None  # the stuck relay happens to be where we now want it


# -- I/O errors, back-off, recovery ------------------------------------------------------------------
def test_unplugged_board_faults_and_recovers_with_backoff_reasserting_everything(rtu_board, rtu_client, clock):
    out = RelayController(rtu_client, MAP, clock=clock, backoff=Backoff(initial=1.0, maximum=4.0))
    out.apply(RUNNING, 100.0)
    rtu_board.unplug()
    status = out.apply({**RUNNING, "load_disconnect": False}, 101.0)
    assert status.fault.startswith("load_disconnect (channel 1): modbus rtu ")
    assert "write coil 0 off" in status.fault
    assert not status.board_up and status.faults == 1
    # Still gone: re-open attempts follow the back-off (1 s, then 2 s, then 4 s).
    assert not out.apply(RUNNING, 101.5).board_up  # too early: no attempt
    assert not out.apply(RUNNING, 102.0).board_up  # attempt fails: next in 2 s
    assert not out.apply(RUNNING, 103.9).board_up
    rtu_board.replug()
    assert not out.apply(RUNNING, 103.9).board_up  # back, but the back-off is not over yet
    rtu_board.set_relay(3, True)  # meanwhile someone switched the pre-alarm relay by hand
    status = out.apply(RUNNING, 104.0)
    assert status.board_up and status.reconnects == 1
    assert status.fault is None
    assert [rtu_board.relays[n] for n in range(1, 6)] == [True, True, False, False, True]


def test_a_board_unplugged_while_nothing_changes_is_a_fault_at_the_next_probe(rtu_board, rtu_client, clock):
    """Between writes one output is read back every second: a board that went away is RELAY_FAULT within
    about a second, not only at the next 5 s re-assert (issue 7: RELAY_FAULT within 2 s)."""
    out = RelayController(rtu_client, MAP, reassert_every=5.0, clock=clock)
    out.apply(RUNNING, 100.0)
    requests = rtu_board.requests
    assert out.apply(RUNNING, 100.5).fault is None and rtu_board.requests == requests  # nothing due: no traffic
    assert out.apply(RUNNING, 101.0).fault is None and rtu_board.requests == requests + 1  # one probe
    rtu_board.unplug()
    assert out.apply(RUNNING, 101.5).fault is None  # the next probe is at 102.0
    status = out.apply(RUNNING, 102.0)
    assert status.fault.startswith("charge_disconnect (channel 2): modbus rtu ")  # round robin: the 2nd role
    assert not status.board_up


def test_a_relay_flipped_by_hand_is_found_by_a_probe_and_written_again(clock):
    board, out = memory_outputs(clock)
    out.apply(RUNNING, 100.0)
    board.relays[1] = False  # someone flips load_disconnect by hand
    status = out.apply(RUNNING, 101.0)
    assert status.fault == "load_disconnect (channel 1): commanded on, read back off"
    status = out.apply(RUNNING, 101.1)  # the mismatch is retried at once: written and read back
    assert board.relays[1] is True and status.fault is None


def test_backoff_doubles_and_resets_after_a_clean_reassert(clock):
    board, out = memory_outputs(clock, backoff=Backoff(initial=0.5, maximum=2.0))
    out.apply(RUNNING, 100.0)
    board.fail_writes = True
    board.fail_open = True
    out.apply(ALL_OFF, 100.0)  # write fails: board closed, re-open at 100.5
    opened = board.opens
    for now in (100.4, 100.5, 101.4, 101.5, 103.4, 103.5, 105.4, 105.5):
        out.apply(ALL_OFF, now)
    assert board.opens == opened  # every attempt failed
    board.fail_open = board.fail_writes = False
    assert not out.apply(ALL_OFF, 107.4).board_up  # delays were 0.5, 1, 2, 2 (capped): next at 107.5
    status = out.apply(ALL_OFF, 107.5)
    assert status.board_up and status.fault is None and status.reconnects == 1
    assert out.backoff.current == 0.0


def test_board_missing_at_startup_is_a_fault_until_it_opens(clock):
    board = MemoryBoard(fail_open=True)
    out = RelayController(board, MAP, clock=clock)
    status = out.apply(RUNNING, 100.0)
    assert status.fault == "memory: open failed (fail_open is set)" and not status.board_up
    board.fail_open = False
    status = out.apply(RUNNING, 100.1)
    assert status.fault is None and relays(board) == [True, True, False, False, True]


def test_lcus_without_read_back_is_reasserted_after_replug(lcus_board, clock):
    board = open_board("lcus", port=lcus_board.path, channels=4)
    lcus_map = {"load_disconnect": 1, "charge_disconnect": 2, "pre_alarm": 3}
    out = RelayController(board, lcus_map, clock=clock, backoff=Backoff(initial=1.0))
    try:
        status = out.apply(RUNNING, 100.0)
        assert lcus_board.wait_frames(3)
        assert status.read_back == dict.fromkeys(lcus_map)  # cannot read back: None, not a fault
        assert status.fault is None
        lcus_board.unplug()  # USB-powered: its relays drop out
        status = out.apply({**RUNNING, "pre_alarm": True}, 101.0)
        assert status.fault.startswith("pre_alarm (channel 3): lcus-4 ")
        lcus_board.replug()
        status = out.apply(RUNNING, 102.0)
        assert status.fault is None and status.reconnects == 1
        assert lcus_board.wait_frames(6)
        assert lcus_board.relays == {1: True, 2: True, 3: False, 4: False}
    finally:
        board.close()


# -- safe() ---------------------------------------------------------------------------------------------
def test_safe_switches_everything_off(rtu_board, rtu_client, clock):
    out = RelayController(rtu_client, MAP, clock=clock)
    out.apply(RUNNING, 100.0)
    out.safe()
    assert not any(rtu_board.relays.values())
    assert out.status().commanded == dict.fromkeys(MAP, False)


def test_safe_never_raises_and_still_switches_the_channels_that_work(clock):
    board, out = memory_outputs(clock)
    out.apply(RUNNING, 100.0)
    board.broken = {1}  # load_disconnect's coil refuses writes
    out.safe()
    assert relays(board)[1:] == [False, False, False, False]
    assert out.status().fault.startswith("load_disconnect (channel 1): switching off failed")
    board.fail_writes = True
    out.safe()  # a board that fails everything: still no exception


def test_safe_on_an_unplugged_board_does_not_raise(rtu_board, rtu_client, clock):
    out = RelayController(rtu_client, MAP, clock=clock)
    out.apply(RUNNING, 100.0)
    rtu_board.unplug()
    out.safe()
    assert out.status().fault is not None and not out.status().board_up


def test_safe_at_startup_opens_the_board(clock):
    board = MemoryBoard()
    board.relays[1] = True  # whatever state the relays were left in
    out = RelayController(board, MAP, clock=clock)
    out.safe()
    assert board.is_open and not any(board.relays.values())


# -- remote input ----------------------------------------------------------------------------------------
def test_remote_follows_the_boards_discrete_input(rtu_board, rtu_client, clock):
    out = RelayController(rtu_client, MAP, clock=clock, remote_channel=2)
    assert out.remote(100.0) is False
    rtu_board.set_input(2, True)
    assert out.remote(100.1) is True
    assert out.status().remote is True


def test_remote_inverted(rtu_board, rtu_client, clock):
    out = RelayController(rtu_client, MAP, clock=clock, remote_channel=1, remote_inverted=True)
    assert out.remote(100.0) is True
    rtu_board.set_input(1, True)
    assert out.remote(100.1) is False


def test_remote_not_configured_is_none(clock):
    _, out = memory_outputs(clock)
    assert out.remote(100.0) is None


def test_remote_io_error_is_a_fault_and_counts_as_off(rtu_board, rtu_client, clock):
    out = RelayController(rtu_client, MAP, clock=clock, remote_channel=1, backoff=Backoff(initial=1.0))
    rtu_board.set_input(1, True)
    assert out.remote(100.0) is True
    rtu_board.unplug()
    assert out.remote(100.1) is False
    assert out.status().fault.startswith("remote input (input 1): modbus rtu ")
    assert out.remote(100.2) is False  # still backing off
    rtu_board.replug()
    assert out.remote(101.1) is True
    status = out.apply(RUNNING, 101.2)  # reopened: everything re-asserted, fault cleared
    assert status.fault is None and status.reconnects == 1


def test_remote_needs_a_board_with_inputs(lcus_board):
    board = open_board("lcus", port=lcus_board.path, channels=4)
    try:
        with pytest.raises(ValueError, match=r"remote_channel=1: lcus-4 .* has no inputs"):
            RelayController(board, {"load_disconnect": 1}, remote_channel=1)
    finally:
        board.close()


# -- LEDs ---------------------------------------------------------------------------------------------------
def test_led_mapping_on_a_relay_board(clock):
    board, out = memory_outputs(clock)
    out.apply({**ALL_OFF, "error_led": "solid", "status_led": "blinking"}, 100.0)
    assert relays(board)[3:] == [True, True]  # blinking holds a mechanical relay on
    out.apply({**ALL_OFF, "error_led": "off", "status_led": "blinking"}, 100.6)
    assert relays(board)[3:] == [False, True]


def test_led_blinks_at_1_hz_when_asked(clock):
    board, out = memory_outputs(clock, blink_leds=True)
    seen = []
    for now in (100.0, 100.25, 100.5, 100.75, 101.0):
        out.apply({**ALL_OFF, "status_led": "blinking"}, now)
        seen.append(board.relays[5])
    assert seen == [True, True, False, False, True]
    out.apply({**ALL_OFF, "status_led": "solid"}, 101.5)
    assert board.relays[5] is True


def test_led_accepts_the_cores_enum_and_rejects_nonsense(clock):
    from smallbms_bus.bms.alarms import Led

    board, out = memory_outputs(clock)
    out.apply({**ALL_OFF, "error_led": Led.SOLID}, 100.0)
    assert board.relays[4] is True
    with pytest.raises(ValueError, match=r"error_led: wanted 'flashing', allowed true/false or 'off', 'blinking'"):
        out.apply({**ALL_OFF, "error_led": "flashing"}, 100.1)
    with pytest.raises(ValueError, match=r"load_disconnect: wanted 'solid', allowed true/false"):
        out.apply({**ALL_OFF, "load_disconnect": "solid"}, 100.1)


# -- construction ---------------------------------------------------------------------------------------------
def test_two_roles_on_one_channel_is_refused():
    with pytest.raises(ValueError, match="charge_disconnect: channel 1 is already used by load_disconnect"):
        RelayController(MemoryBoard(), {"load_disconnect": 1, "charge_disconnect": 1})


def test_unknown_role_and_foreign_channel_are_refused():
    with pytest.raises(ValueError, match=r"unknown output role 'buzzer': allowed " + ", ".join(ROLES)):
        RelayController(MemoryBoard(), {"buzzer": 1})
    with pytest.raises(ValueError, match=r"pre_alarm: channel 9 is not on memory \(channels 1..8\)"):
        RelayController(MemoryBoard(), {"pre_alarm": 9})


def test_unmapped_roles_are_ignored(clock):
    board = MemoryBoard()
    out = RelayController(board, {"load_disconnect": 1, "charge_disconnect": 2, "error_led": None}, clock=clock)
    status = out.apply(RUNNING, 100.0)
    assert set(status.commanded) == {"load_disconnect", "charge_disconnect"}


def test_tcp_module_end_to_end(tcp_module, clock):
    board = open_board("modbus", transport="tcp", host="127.0.0.1", port=tcp_module.port, **FAST)
    out = RelayController(board, MAP, clock=clock, remote_channel=8)
    try:
        tcp_module.set_input(8, True)
        status = out.apply(RUNNING, 100.0)
        assert status.fault is None and out.remote(100.0) is True
        assert [tcp_module.relays[n] for n in range(1, 6)] == [True, True, False, False, True]
        tcp_module.stuck.add(3)
        status = out.apply({**RUNNING, "pre_alarm": True}, 100.1)
        assert status.fault == "pre_alarm (channel 3): commanded on, read back off"
    finally:
        board.close()
