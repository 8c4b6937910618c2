"""Linux GPIO lines through the character device (/dev/gpiochipN) and libgpiod v2's Python bindings.

Theory of operation
-------------------
Channel n drives line `lines[n-1]` of `chip` (an offset like 17 or a line name like "GPIO17"); input n
reads `inputs[n-1]`. All lines are requested at open() in one request, outputs with their value
INACTIVE (relay released: the safe state until the controller says otherwise). Polarity is the
kernel's: a line with `active_low` set is driven low for "on", so channel states stay logical
("on" = relay energised / input active) whatever the wiring. Closing releases the request, and the
kernel leaves the lines as they were (GPIO v2 has no "release to input").

`read(channel)` returns the line value as the GPIO driver reports it. That is the pin, not the relay
contact: it catches a driver that did not take the value, not a welded relay.

The `gpiod` module (PyPI `gpiod` 2.x, the optional extra `gpio`) is imported only at open(), so the
rest of the package works without it; a missing module is an `OutputError` that says how to install it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from smallbms_bus.outputs.base import OptionError, OutputError, RelayBoard

BIASES = ("as_is", "pull_up", "pull_down", "disabled")
INSTALL_HINT = "pip install 'smallbms-bus[gpio]' (PyPI gpiod 2.x, the libgpiod v2 bindings)"


@dataclass(frozen=True)
class LineSpec:
    """One requested line: what the kernel is asked for (`active_low` is the kernel's inversion)."""

    channel: int
    line: int | str
    output: bool
    active_low: bool
    bias: str = "as_is"


def _lines(option: str, value: object) -> tuple[int | str, ...]:
    if not isinstance(value, list | tuple) or not all(
            (isinstance(x, int) and not isinstance(x, bool) and x >= 0) or (isinstance(x, str) and x)
            for x in value):
        raise OptionError("gpiod", option, value, 'allowed a list of line offsets (17) or line names ("GPIO17"), '
                          "channel 1 first")
    return tuple(value)


def per_line(option: str, value: bool | Sequence[bool], count: int) -> tuple[bool, ...]:
    """One flag for every line: a single bool applies to all, a list gives one per line, channel 1 first."""
    if isinstance(value, bool):
        return (value,) * count
    if isinstance(value, list | tuple) and len(value) == count and all(isinstance(x, bool) for x in value):
        return tuple(value)
    raise OptionError("gpiod", option, value, f"allowed true/false or a list of {count} of them (one per line)")


def line_plan(lines: Sequence[int | str], active_low: bool | Sequence[bool], inputs: Sequence[int | str] = (),
              input_active_low: bool | Sequence[bool] = False, input_bias: str = "as_is") -> tuple[LineSpec, ...]:
    """Validate the options and say exactly which lines are requested how (pure: no kernel, no gpiod)."""
    outputs = _lines("lines", lines)
    ins = _lines("inputs", inputs)
    if not outputs and not ins:  # inputs only: a GPIO remote input beside another relay board
        raise OptionError("gpiod", "lines", [], "at least one output line (or input line)")
    if input_bias not in BIASES:
        raise OptionError("gpiod", "input_bias", input_bias, f"allowed {', '.join(BIASES)}")
    seen: set[int | str] = set()
    for line in outputs + ins:
        if line in seen:
            raise OptionError("gpiod", "inputs" if line in ins else "lines", line,
                              f"line {line!r} is used twice: each line once, in lines or inputs")
        seen.add(line)
    out_low = per_line("active_low", active_low, len(outputs))
    in_low = per_line("input_active_low", input_active_low, len(ins))
    return (tuple(LineSpec(n, line, True, low) for n, (line, low) in enumerate(zip(outputs, out_low, strict=True), 1))
            + tuple(LineSpec(n, line, False, low, input_bias)
                    for n, (line, low) in enumerate(zip(ins, in_low, strict=True), 1)))


def line_settings(gpiod: Any, spec: LineSpec) -> Any:
    """The gpiod.LineSettings for one planned line (`gpiod` is the imported module)."""
    line = gpiod.line
    if spec.output:
        return gpiod.LineSettings(direction=line.Direction.OUTPUT, active_low=spec.active_low,
                                  output_value=line.Value.INACTIVE)
    return gpiod.LineSettings(direction=line.Direction.INPUT, active_low=spec.active_low,
                              bias=line.Bias[spec.bias.upper()])


class GpiodBoard(RelayBoard):
    backend = "gpiod"
    can_read_back = True

    def __init__(self, chip: str = "/dev/gpiochip0", *, lines: Sequence[int | str] = (),
                 active_low: bool | Sequence[bool] = False, inputs: Sequence[int | str] = (),
                 input_active_low: bool | Sequence[bool] = False, input_bias: str = "as_is",
                 consumer: str = "smallbms-bus") -> None:
        if not isinstance(chip, str) or not chip:
            raise OptionError("gpiod", "chip", chip, 'the chip\'s device path, e.g. "/dev/gpiochip0"')
        self.chip = chip
        self.consumer = consumer
        self.plan = line_plan(lines, active_low, inputs, input_active_low, input_bias)
        self._outputs = {s.channel: s.line for s in self.plan if s.output}
        self._inputs = {s.channel: s.line for s in self.plan if not s.output}
        self.channels = len(self._outputs)
        self.input_channels = len(self._inputs)
        self.has_inputs = bool(self._inputs)
        self._request: Any = None
        self._value: Any = None  # gpiod.line.Value, bound at open()

    def describe(self) -> str:
        return f"gpiod {self.chip}"

    def _open_device(self) -> None:
        try:
            import gpiod
        except ImportError as exc:
            raise OutputError(self.describe(), f"the gpiod module is missing: {INSTALL_HINT}") from exc
        config = {spec.line: line_settings(gpiod, spec) for spec in self.plan}
        try:
            self._request = gpiod.request_lines(self.chip, consumer=self.consumer, config=config)
        except (OSError, ValueError) as exc:  # no such chip or line, line busy, permission denied
            raise OutputError(self.describe(), f"cannot request lines {list(config)}: {exc}") from exc
        self._value = gpiod.line.Value

    def _close_device(self) -> None:
        request, self._request = self._request, None
        if request is not None:
            request.release()

    def _io(self, channel: int, what: str, call: Any) -> Any:
        if self._request is None:
            raise OutputError(self.describe(), f"{what}: board is not open", channel)
        try:
            return call(self._request)
        except Exception as exc:  # OSError from the ioctl, gpiod's RequestReleasedError: all mean "line lost"
            raise OutputError(self.describe(), f"{what}: {exc}", channel) from exc

    def _write(self, channel: int, on: bool) -> None:
        line, value = self._outputs[channel], self._value.ACTIVE if on else self._value.INACTIVE
        self._io(channel, f"set line {line!r} {'on' if on else 'off'}", lambda r: r.set_value(line, value))

    def _read(self, channel: int) -> bool:
        line = self._outputs[channel]
        return bool(self._io(channel, f"get line {line!r}", lambda r: r.get_value(line)))

    def _read_input(self, channel: int) -> bool:
        line = self._inputs[channel]
        return bool(self._io(channel, f"get input line {line!r}", lambda r: r.get_value(line)))
