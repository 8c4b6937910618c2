"""LCUS-1/2/4/8: the common CH340 USB serial relay boards.

Theory of operation
-------------------
The board listens at 9600 baud 8N1 for 4-byte frames `A0 <channel> <state> <sum>`, state 0 = off,
1 = on, sum = (0xA0 + channel + state) & 0xFF. It never answers, so nothing is read back
(`can_read_back` is False: a relay that did not switch goes unnoticed; the controller compensates
only by re-asserting every output periodically) and there are no inputs. A frame with a bad sum
is silently ignored by the board.

What can be detected is the serial side: a USB adapter pulled out, a port that vanished or a write
that does not drain within `timeout` all raise `OutputError`.
"""

from __future__ import annotations

import serial

from smallbms_bus.outputs.base import OptionError, OutputError, RelayBoard

LCUS_BAUDRATE = 9600
LCUS_START = 0xA0
LCUS_SIZES = (1, 2, 4, 8)


def lcus_frame(channel: int, on: bool) -> bytes:
    """The 4-byte command that switches `channel` (1-based) on or off."""
    state = 1 if on else 0
    return bytes((LCUS_START, channel, state, (LCUS_START + channel + state) & 0xFF))


class LcusBoard(RelayBoard):
    backend = "lcus"
    can_read_back = False
    has_inputs = False

    def __init__(self, port: str | None = None, *, channels: int = 1, timeout: float = 1.0) -> None:
        if not isinstance(port, str) or not port:
            raise OptionError("lcus", "port", port, 'the serial port path, e.g. port = "/dev/ttyUSB0" (required)')
        if channels not in LCUS_SIZES or isinstance(channels, bool):
            raise OptionError("lcus", "channels", channels, "allowed 1, 2, 4 or 8 (LCUS-1/2/4/8)")
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 30:
            raise OptionError("lcus", "timeout", timeout, "allowed seconds, more than 0 up to 30")
        self.port = port
        self.channels = channels
        self.timeout = float(timeout)
        self._serial: serial.Serial | None = None

    def describe(self) -> str:
        return f"lcus-{self.channels} {self.port}"

    def _open_device(self) -> None:
        try:
            self._serial = serial.Serial(self.port, LCUS_BAUDRATE, timeout=self.timeout,
                                         write_timeout=self.timeout, exclusive=True)
        except (serial.SerialException, OSError) as exc:
            raise OutputError(self.describe(), f"cannot open: {exc}") from exc

    def _close_device(self) -> None:
        port, self._serial = self._serial, None
        if port is not None:
            port.close()

    def _write(self, channel: int, on: bool) -> None:
        port = self._serial
        if port is None:
            raise OutputError(self.describe(), "board is not open", channel)
        try:
            port.write(lcus_frame(channel, on))
            port.flush()  # the frame is on the wire before we report success
        except (serial.SerialException, OSError) as exc:
            raise OutputError(self.describe(), f"write {'on' if on else 'off'} failed: {exc}", channel) from exc
