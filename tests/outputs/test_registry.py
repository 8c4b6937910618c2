"""The backend registry: names, options, and errors that say what is allowed."""

from __future__ import annotations

import pytest

from smallbms_bus.outputs import BACKENDS, OptionError, OutputError, RelayBoard, board_class, make_board, open_board


def test_every_backend_is_a_relay_board():
    assert set(BACKENDS) == {"memory", "modbus", "lcus", "gpiod"}
    for name in BACKENDS:
        cls = board_class(name)
        assert issubclass(cls, RelayBoard) and cls.backend == name


def test_unknown_backend_names_it_and_the_allowed_ones():
    with pytest.raises(ValueError,
                       match=r"unknown relay board backend 'usbrelay': allowed memory, modbus, lcus, gpiod"):
        open_board("usbrelay")


def test_unknown_option_names_it_and_the_allowed_ones():
    with pytest.raises(ValueError, match=r"lcus board option baud=9600: not an option of the lcus backend: "
                                         r"allowed port, channels, timeout"):
        make_board("lcus", port="/dev/ttyUSB0", baud=9600)


@pytest.mark.parametrize(("backend", "options", "message"), [
    ("lcus", {"port": "/dev/ttyUSB0", "channels": 3}, r"channels=3: allowed 1, 2, 4 or 8"),
    ("lcus", {}, r"port=None"),
    ("modbus", {"transport": "udp"}, r"transport='udp': allowed 'rtu' \(serial\) or 'tcp'"),
    ("modbus", {"transport": "rtu"}, r"port=None: transport 'rtu' needs the serial port path"),
    ("modbus", {"transport": "tcp"}, r"host=None: transport 'tcp' needs"),
    ("modbus", {"transport": "rtu", "port": "/dev/ttyUSB0", "parity": "X"}, r"parity='X'"),
    ("modbus", {"transport": "rtu", "port": "/dev/ttyUSB0", "unit": 0}, r"unit=0: allowed an integer 1..247"),
    ("modbus", {"transport": "tcp", "host": "10.0.0.5", "port": 70000}, r"port=70000"),
    ("modbus", {"transport": "tcp", "host": "10.0.0.5", "timeout": 0}, r"timeout=0"),
    ("memory", {"channels": 0}, r"channels=0: allowed 1..64"),
    ("gpiod", {"lines": []}, r"lines=\[\]"),
    ("gpiod", {"lines": [17, 27], "active_low": [True]}, r"active_low=\[True\]: allowed true/false or a list of 2"),
])
def test_bad_option_values_name_the_option(backend, options, message):
    with pytest.raises(ValueError, match=message):
        make_board(backend, **options)


def test_make_board_does_no_io():
    board = make_board("lcus", port="/nonexistent/ttyUSB9", channels=8)
    assert not board.is_open and board.channels == 8


def test_open_board_raises_output_error_when_the_device_is_missing():
    with pytest.raises(OutputError, match=r"lcus-1 /nonexistent/ttyUSB9: cannot open"):
        open_board("lcus", port="/nonexistent/ttyUSB9")
    with pytest.raises(OutputError, match=r"modbus rtu /nonexistent/ttyUSB9 unit 1: cannot open: the serial port "
                                          r"does not exist"):
        open_board("modbus", port="/nonexistent/ttyUSB9")


def test_capabilities_are_declared():
    assert make_board("memory").can_read_back and make_board("memory").has_inputs
    lcus = make_board("lcus", port="/dev/null", channels=2)
    assert (lcus.can_read_back, lcus.has_inputs, lcus.channels) == (False, False, 2)
    modbus = make_board("modbus", transport="tcp", host="127.0.0.1", inputs=0)
    assert (modbus.can_read_back, modbus.has_inputs, modbus.channels) == (True, False, 8)


@pytest.mark.parametrize(("backend", "options", "option", "allowed"), [
    ("memory", {"stuck": 3}, "stuck", "a list of integers"),  # was set(3): a TypeError
    ("memory", {"channels": "8"}, "channels", "an integer"),
    ("memory", {"fail_open": 1}, "fail_open", "true/false"),
    ("lcus", {"port": "/dev/ttyUSB0", "timeout": "1"}, "timeout", "a number"),
    ("modbus", {"transport": "tcp", "host": "h", "port": 1.5}, "port", "a string or an integer"),
    ("gpiod", {"lines": [17], "active_low": "yes"}, "active_low", "true/false or a list of true/false values"),
    ("gpiod", {"lines": [{"a": 1}]}, "lines", "a list of integers or strings"),
    ("lcus", {}, "port", "required"),
    ("memory", {"backend": "memory"}, "backend", "not an option of the memory backend"),
])
def test_options_are_type_checked_against_the_constructor_naming_the_option(backend, options, option, allowed):
    with pytest.raises(OptionError) as info:
        make_board(backend, **options)
    assert info.value.option == option and allowed in info.value.allowed
    assert isinstance(info.value, ValueError)
