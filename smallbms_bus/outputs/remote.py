"""The remote on/off input (REM-1) when it is not on the relay board that drives the outputs.

Example: relays on a Modbus RTU board, the remote switch on a Raspberry Pi GPIO line. The input gets
its own device (any backend with inputs: `GpiodBoard(inputs=[17])`, a second Modbus module, ...),
opened lazily and re-opened with the link's back-off. It fails safe like the outputs: a device that
cannot be opened or read reads as "off" (loads and chargers off, REM-1) and is reported as a fault
(RELAY_FAULT with the reason), until a read succeeds again.
"""

from __future__ import annotations

import logging

from smallbms_bus.backoff import Backoff
from smallbms_bus.outputs.base import OutputError, RelayBoard

log = logging.getLogger(__name__)


class RemoteInput:
    def __init__(self, board: RelayBoard, channel: int = 1, *, inverted: bool = False,
                 backoff: Backoff | None = None) -> None:
        if not board.has_inputs:
            raise ValueError(f"remote input: {board.describe()} has no inputs")
        if not isinstance(channel, int) or isinstance(channel, bool) or not 1 <= channel <= board.input_channels:
            raise ValueError(f"remote input channel {channel!r}: {board.describe()} has inputs "
                             f"1..{board.input_channels}")
        self.board = board
        self.channel = channel
        self.inverted = inverted
        self.backoff = backoff or Backoff()
        self.fault: str | None = None
        self.faults = 0
        self._next_open_at = float("-inf")

    def _failed(self, reason: str, now: float) -> bool:
        if self.fault is None:
            self.faults += 1
            log.warning("remote input %s: %s; reads as off until it answers", self.board.describe(), reason)
        self.fault = f"remote input {self.board.describe()}: {reason}"
        self.board.close()
        self._next_open_at = now + self.backoff.next_delay()
        return False

    def read(self, now: float) -> bool:
        """The remote input after inversion; False (off) whenever it cannot be read."""
        if not self.board.is_open:
            if now < self._next_open_at:
                return False
            try:
                self.board.open()
            except OutputError as exc:
                return self._failed(str(exc), now)
        try:
            raw = self.board.read_input(self.channel)
        except OutputError as exc:
            return self._failed(str(exc), now)
        if self.fault is not None:
            log.info("remote input %s answers again", self.board.describe())
        self.fault = None
        self.backoff.reset()
        return raw != self.inverted

    def close(self) -> None:
        self.board.close()
