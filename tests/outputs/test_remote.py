"""The remote on/off input on its own device (REM-1 beside any relay board): reads, inversion, fail-safe."""

from __future__ import annotations

import pytest

from smallbms_bus.outputs.controller import RelayController
from smallbms_bus.outputs.gpiod import GpiodBoard, line_plan
from smallbms_bus.outputs.memory import MemoryBoard
from smallbms_bus.outputs.remote import RemoteInput

ROLES = {"load_disconnect": 1, "charge_disconnect": 2}


def test_reads_the_input_and_inverts_when_asked():
    device = MemoryBoard(channels=1, inputs=2, name="pi-gpio")
    remote = RemoteInput(device, 2)
    assert remote.read(0.0) is False
    device.set_input(2, True)
    assert remote.read(0.1) is True and remote.fault is None
    inverted = RemoteInput(MemoryBoard(channels=1, inputs=1), 1, inverted=True)
    assert inverted.read(0.0) is True


def test_a_device_that_cannot_be_opened_or_read_reads_off_reports_a_fault_and_recovers():
    device = MemoryBoard(channels=1, inputs=1, fail_open=True, name="pi-gpio")
    device.set_input(1, True)
    remote = RemoteInput(device, 1)
    assert remote.read(0.0) is False
    assert remote.fault is not None and "pi-gpio" in remote.fault and remote.faults == 1
    device.fail_open = False
    assert remote.read(0.05) is False  # still backing off (0.1 s): no hammering of a missing device
    assert remote.read(0.2) is True and remote.fault is None and device.opens == 1
    device.fail_reads = True
    assert remote.read(0.3) is False and "input read failed" in remote.fault
    assert not device.is_open  # closed, re-opened after the back-off
    device.fail_reads = False
    assert remote.read(0.5) is True and remote.fault is None


def test_outputs_take_the_remote_from_its_own_device_and_report_its_fault():
    relays = MemoryBoard(channels=4, inputs=0, name="relays")
    device = MemoryBoard(channels=1, inputs=1, name="pi-gpio")
    outputs = RelayController(relays, ROLES, remote_input=RemoteInput(device, 1))
    outputs.apply({"load_disconnect": True, "charge_disconnect": True}, 0.0)
    assert outputs.remote(0.0) is False
    device.set_input(1, True)
    assert outputs.remote(0.1) is True and outputs.fault is None
    device.fail_reads = True
    assert outputs.remote(0.2) is False
    assert outputs.fault is not None and "remote input pi-gpio" in outputs.fault
    assert outputs.status().remote is False
    assert relays.relays[1] and relays.relays[2]  # the relay board itself is fine; the core decides (REM-1)


def test_a_remote_is_a_board_input_or_its_own_device_not_both():
    with pytest.raises(ValueError, match="not both"):
        RelayController(MemoryBoard(), ROLES, remote_channel=1, remote_input=RemoteInput(MemoryBoard(), 1))
    with pytest.raises(ValueError, match="has no inputs"):
        RemoteInput(GpiodBoard("/dev/gpiochip0", lines=[5]), 1)
    with pytest.raises(ValueError, match=r"inputs 1\.\.1"):
        RemoteInput(MemoryBoard(inputs=1), 2)


def test_a_gpio_remote_is_an_input_only_gpiod_board():
    plan = line_plan([], False, ["GPIO17"], input_active_low=True, input_bias="pull_up")
    assert [(s.line, s.output, s.active_low, s.bias) for s in plan] == [("GPIO17", False, True, "pull_up")]
    board = GpiodBoard("/dev/gpiochip0", inputs=[17])
    assert (board.channels, board.input_channels, board.has_inputs) == (0, 1, True)
    with pytest.raises(ValueError, match="at least one output line"):
        GpiodBoard("/dev/gpiochip0")
