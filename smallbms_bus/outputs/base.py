"""The one small interface every relay board obeys (the shape of python-can's BusABC).

Theory of operation
-------------------
A board is synchronous and blocking: every call either finishes within the board's own timeout or
raises `OutputError`. The service drives it from one worker thread, so a board needs no locking and no
event loop. Channels are 1-based, as printed on the boards; backends translate them to their own
addressing (Modbus coil 0, GPIO line offset 17, ...).

Public methods check the channel and the open state here, once, and call the backend's `_write`,
`_read` and `_read_input`. A backend sets what it can in class attributes, so callers ask instead of
guessing: `can_read_back` (does `read` report the relay, or return None), `has_inputs` (is there a
discrete input for the remote on/off), `channels` / `input_channels` (how many). They are class
attributes; a backend whose size is an option overrides them per instance.

Every failure is an `OutputError` whose message says which board, which channel and what failed;
`close()` never raises, because it is called on boards that have just failed.
"""

from __future__ import annotations

import abc
import logging
from typing import ClassVar

log = logging.getLogger(__name__)


class OutputError(Exception):
    """A relay board operation failed: the message names the board, the channel and what failed."""

    def __init__(self, board: str, what: str, channel: int | None = None) -> None:
        self.board = board
        self.channel = channel
        self.what = what
        where = board if channel is None else f"{board} channel {channel}"
        super().__init__(f"{where}: {what}")


class OptionError(ValueError):
    """A backend option (`[outputs.options]`) is unknown, missing, of the wrong type or out of range.

    Raised by `make_board` and the backends' constructors, before any I/O; the configuration check turns
    it into the ConfigError naming `outputs.options.<option>`.
    """

    def __init__(self, backend: str, option: str, value: object, allowed: str) -> None:
        self.backend, self.option, self.value, self.allowed = backend, option, value, allowed
        super().__init__(f"{backend} board option {option}={value!r}: {allowed}")


class RelayBoard(abc.ABC):
    """A relay board (or GPIO bank): switch channels, read them back, read discrete inputs."""

    #: registry name of the backend ("memory", "modbus", ...)
    backend: ClassVar[str] = "abstract"
    #: True when `read(channel)` reports the relay's state; False when it always returns None
    can_read_back: bool = False
    #: True when the board has discrete inputs (`read_input`), e.g. for the remote on/off
    has_inputs: bool = False
    #: number of relay channels (1..channels); backends whose size is an option set it per instance
    channels: int = 0
    #: number of discrete inputs (1..input_channels)
    input_channels: int = 0

    _open: bool = False

    # -- what a backend implements -------------------------------------------------------------
    @abc.abstractmethod
    def describe(self) -> str:
        """Which board, for messages and logs: 'lcus /dev/ttyUSB0', 'modbus tcp 10.0.0.5:502 unit 1'."""

    @abc.abstractmethod
    def _open_device(self) -> None:
        """Open the device; raise OutputError when it cannot be opened."""

    @abc.abstractmethod
    def _close_device(self) -> None:
        """Release the device; may raise (close() swallows it)."""

    @abc.abstractmethod
    def _write(self, channel: int, on: bool) -> None: ...

    def _read(self, channel: int) -> bool | None:
        return None

    def _read_input(self, channel: int) -> bool:
        raise NotImplementedError

    # -- the interface callers use -------------------------------------------------------------
    @property
    def is_open(self) -> bool:
        return self._open

    def open(self) -> None:
        """Open the device (no-op when open). Raises OutputError."""
        if self._open:
            return
        self._open_device()
        self._open = True

    def close(self) -> None:
        """Release the device. Never raises: it is how a failed board is put aside."""
        self._open = False
        try:
            self._close_device()
        except Exception:  # a vanished device often fails to close as well; nothing more to do
            log.debug("closing %s raised", self.describe(), exc_info=True)

    def write(self, channel: int, on: bool) -> None:
        """Energise (on=True) or release one relay."""
        self._check(channel, self.channels, "relay")
        self._write(channel, bool(on))

    def read(self, channel: int) -> bool | None:
        """The relay's state as the board reports it, or None where the board cannot report it."""
        self._check(channel, self.channels, "relay")
        return self._read(channel) if self.can_read_back else None

    def read_input(self, channel: int) -> bool:
        """A discrete input (True = active)."""
        if not self.has_inputs:
            raise OutputError(self.describe(), f"has no inputs ({self.backend} boards cannot read a remote input)",
                              channel)
        self._check(channel, self.input_channels, "input")
        return self._read_input(channel)

    def _check(self, channel: int, count: int, kind: str) -> None:
        if not isinstance(channel, int) or isinstance(channel, bool) or not 1 <= channel <= count:
            raise OutputError(self.describe(), f"no such {kind}: the board has {kind}s 1..{count}", channel)
        if not self._open:
            raise OutputError(self.describe(), "board is not open", channel)

    def __enter__(self) -> RelayBoard:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()} {'open' if self._open else 'closed'}>"
