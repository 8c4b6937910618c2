"""gpiod backend: what needs no kernel is tested here; real lines only where /dev/gpiochip* exists."""

from __future__ import annotations

import glob
import importlib.util

import pytest

from smallbms_bus.outputs import OutputError, make_board
from smallbms_bus.outputs.gpiod import LineSpec, line_plan, line_settings, per_line

HAVE_GPIOD = importlib.util.find_spec("gpiod") is not None
CHIPS = sorted(glob.glob("/dev/gpiochip*"))


def test_plan_maps_channels_to_lines_in_order_with_per_line_active_low():
    plan = line_plan([17, 27, "GPIO22"], [False, True, False], inputs=[5], input_active_low=True,
                     input_bias="pull_up")
    assert plan == (
        LineSpec(1, 17, True, False), LineSpec(2, 27, True, True), LineSpec(3, "GPIO22", True, False),
        LineSpec(1, 5, False, True, "pull_up"),
    )


def test_single_active_low_flag_applies_to_every_line():
    assert per_line("active_low", True, 3) == (True, True, True)
    assert per_line("active_low", [False, True], 2) == (False, True)


@pytest.mark.parametrize(("options", "message"), [
    ({"lines": [17, 17]}, r"line 17 is used twice"),
    ({"lines": [17], "inputs": [17]}, r"line 17 is used twice"),
    ({"lines": [17], "input_bias": "up"}, r"input_bias='up': allowed as_is, pull_up, pull_down, disabled"),
    ({"lines": [-1]}, r"lines=\[-1\]"),
    ({"lines": [True]}, r"lines=\[True\]"),
    ({"lines": [17], "active_low": "yes"}, r"active_low='yes'"),
    ({"lines": [17], "chip": ""}, r"chip=''"),
])
def test_bad_options_name_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        make_board("gpiod", **options)


def test_board_shape_follows_the_lines():
    board = make_board("gpiod", lines=[17, 27, 22], inputs=[5])
    assert (board.channels, board.input_channels, board.has_inputs, board.can_read_back) == (3, 1, True, True)
    assert not make_board("gpiod", lines=[17]).has_inputs


@pytest.mark.skipif(HAVE_GPIOD, reason="the gpiod module is installed here")
def test_missing_gpiod_module_is_a_clear_output_error():
    board = make_board("gpiod", lines=[17])
    with pytest.raises(OutputError, match=r"gpiod /dev/gpiochip0: the gpiod module is missing: pip install "
                                          r"'smallbms-bus\[gpio\]'"):
        board.open()


@pytest.mark.skipif(not HAVE_GPIOD, reason="the optional gpiod module (libgpiod v2 bindings) is not installed")
def test_line_settings_carry_direction_polarity_and_a_released_start_value():
    import gpiod
    from gpiod.line import Bias, Direction, Value

    out = line_settings(gpiod, LineSpec(1, 17, True, True))
    assert (out.direction, out.active_low, out.output_value) == (Direction.OUTPUT, True, Value.INACTIVE)
    inp = line_settings(gpiod, LineSpec(1, 5, False, False, "pull_down"))
    assert (inp.direction, inp.active_low, inp.bias) == (Direction.INPUT, False, Bias.PULL_DOWN)


@pytest.mark.skipif(not HAVE_GPIOD, reason="the optional gpiod module (libgpiod v2 bindings) is not installed")
@pytest.mark.skipif(not CHIPS, reason="no /dev/gpiochip* on this machine (no GPIO chip, no gpio-sim module)")
def test_real_chip_switches_a_line_and_reads_it_back():  # pragma: no cover - needs a chip with a free line 0
    board = make_board("gpiod", chip=CHIPS[0], lines=[0])
    board.open()
    try:
        board.write(1, True)
        assert board.read(1) is True
        board.write(1, False)
        assert board.read(1) is False
    finally:
        board.close()
