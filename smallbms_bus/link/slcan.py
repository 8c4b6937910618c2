"""SLCAN (a USB-serial CAN adapter speaking the Lawicel ASCII protocol): strict framing, bounded writes.

Theory of operation
-------------------
Opening the port and the set-up commands (C, S<n>, O) are python-can's `slcanBus.__init__`; reading,
parsing and writing are this module's, because python-can's are neither strict nor bounded: it reads
one byte per system call, parses any line that starts like a frame (trailing characters ignored, a
short line yields a short frame, a non-ASCII byte raises out of `recv`) and writes with no timeout
and a `tcdrain`, which never returns from an adapter that stopped reading (COM-5).

- Read: everything the port holds is read in one system call and cut into lines at CR (the adapter's
  OK) or BELL (its error answer) by `LineParser`, in one pass. Each line is exactly one of:
  a frame (`t`/`T`/`x`, `r`/`R`, FD `d`/`D`/`b`/`B`, with exactly the length its DLC gives, hex digits
  only, an identifier in range, optionally 4 more hex digits: the timestamp of Lawicel's `Z1`);
  an adapter answer (an empty line = OK, `z`/`Z` = transmit OK, BELL = error); or one malformed line
  counted under one of `LINE_KINDS`. A line longer than `MAX_LINE` is counted once as `slcan_too_long`
  and discarded up to its terminator, so the buffer never holds more than `MAX_LINE` bytes.
- Write: non-blocking. A line the port does not take at once waits in the bus (one line at most) and
  goes out when the port is writable again; while it waits, a further frame is refused with EAGAIN.
  The caller (the link) decides when refusals are a fault: BMS_STATE unsent for 1 s is COM-5.
  Set-up commands wait at most `WRITE_TIMEOUT_S`; nothing here waits for the output to drain.
- Only the port failing raises (`CanOperationError`): the link takes that as COM-4.

The bus is used by one thread at a time (the link's owner thread, see bus.py).
"""

from __future__ import annotations

import binascii
import contextlib
import errno
import os
import re
import select
import time
from collections import deque
from typing import Any

import can
import serial
from can.interfaces.slcan import slcanBus
from can.util import CAN_FD_DLC, len2dlc

MAX_LINE = 160  # bytes before the terminator; the longest valid line (an FD frame of 64 bytes) is 142
TIMESTAMP_DIGITS = 4  # Lawicel's optional time stamp (`Z1`): milliseconds, 4 hex digits after the data
WRITE_TIMEOUT_S = 1.0  # a set-up command the adapter does not take within this fails the open
CLOSE_TIMEOUT_S = 0.2  # the "C" at shutdown is a courtesy; a stalled adapter gets no more time
READ_SIZE = 16384  # one read: ~700 frame lines

# Malformed line kinds (COM-3), counted by the link and exported as `bus_frames_malformed_total{kind}`.
NON_ASCII, TOO_LONG, BAD_LENGTH, BAD_FIELD, UNKNOWN = (
    "slcan_non_ascii", "slcan_too_long", "slcan_bad_length", "slcan_bad_field", "slcan_unknown")
LINE_KINDS = (NON_ASCII, TOO_LONG, BAD_LENGTH, BAD_FIELD, UNKNOWN)

_CR, _BELL = 0x0D, 0x07
_SPLIT = re.compile(rb"([\r\x07])")
_NOT_PRINTABLE = re.compile(rb"[^\x20-\x7e]")
_HEX = re.compile(rb"[0-9A-Fa-f]*")
# first character -> (identifier digits, extended, remote, FD, bit rate switch)
_LAYOUT: dict[int, tuple[int, bool, bool, bool, bool]] = {
    ord("t"): (3, False, False, False, False), ord("T"): (8, True, False, False, False),
    ord("x"): (8, True, False, False, False),  # CANdapter's extended frame, as python-can accepts it
    ord("r"): (3, False, True, False, False), ord("R"): (8, True, True, False, False),
    ord("d"): (3, False, False, True, False), ord("D"): (8, True, False, True, False),
    ord("b"): (3, False, False, True, True), ord("B"): (8, True, False, True, True),
}
_TRANSMIT_OK = (b"z", b"Z")
_HEX_DIGIT = {c: int(chr(c), 16) for c in b"0123456789ABCDEFabcdef"}


class LineParser:
    """SLCAN bytes in, frames out; every line accounted for (pure: no I/O, the time stamp is passed in)."""

    def __init__(self) -> None:
        self._buffer = b""
        self.discarding = False  # inside an over-long line (already counted), up to its terminator
        self.counts: dict[str, int] = dict.fromkeys(LINE_KINDS, 0)  # the link points this at its own totals
        self.frames = 0
        self.answers = 0  # OK, transmit OK and BELL answers
        self.errors = 0  # BELL answers: the adapter refused a command or a frame
        self.ignore_answers = 0  # answers still due to the set-up commands (a BELL to "C" is normal there)

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, chunk: bytes, timestamp: float) -> list[can.Message]:
        """The frames completed by `chunk`, in order; everything else is counted."""
        data = self._buffer + chunk if self._buffer else chunk
        parts = _SPLIT.split(data)  # [line, terminator, line, terminator, ..., unterminated rest]
        rest = parts.pop()
        out: list[can.Message] = []
        for i in range(0, len(parts), 2):
            line, bell = parts[i], parts[i + 1] == b"\x07"
            if self.discarding:  # the end of an over-long line, counted when it began
                self.discarding = False
                continue
            if bell:
                if line:  # an adapter sends BELL alone; text before it is corruption
                    self._count(NON_ASCII if _NOT_PRINTABLE.search(line) else UNKNOWN)
                else:
                    self._answer(error=True)
                continue
            if not line:
                self._answer(error=False)
                continue
            parsed = parse_line(line, timestamp)
            if isinstance(parsed, str):
                if parsed:
                    self._count(parsed)
                else:
                    self._answer(error=False)
            else:
                self.frames += 1
                out.append(parsed)
        if len(rest) > MAX_LINE:
            if not self.discarding:
                self._count(TOO_LONG)
                self.discarding = True
            rest = b""
        self._buffer = rest
        return out

    def _count(self, kind: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1

    def _answer(self, *, error: bool) -> None:
        self.answers += 1
        if self.ignore_answers > 0:
            self.ignore_answers -= 1
        elif error:
            self.errors += 1


def parse_line(line: bytes, timestamp: float = 0.0) -> can.Message | str:
    """One line without its terminator: a frame, "" for an adapter answer, or the malformed kind."""
    if len(line) > MAX_LINE:
        return TOO_LONG
    if _NOT_PRINTABLE.search(line):
        return NON_ASCII
    layout = _LAYOUT.get(line[0])
    if layout is None:
        return "" if line in _TRANSMIT_OK else UNKNOWN
    digits, extended, remote, fd, brs = layout
    head = 1 + digits
    if len(line) <= head:
        return BAD_LENGTH
    code = _HEX_DIGIT.get(line[head], 99)  # the DLC: a decimal digit 0-8, or a hex digit for FD
    if code > (15 if fd else 8):
        return BAD_FIELD
    size = CAN_FD_DLC[code]
    end = head + 1 + (0 if remote else 2 * size)
    if len(line) != end and len(line) != end + TIMESTAMP_DIGITS:
        return BAD_LENGTH
    if not _HEX.fullmatch(line, 1):  # strictly: int(x, 16) allows "_" and bytes.fromhex allows spaces
        return BAD_FIELD
    ident = int(line[1:head], 16)
    if ident > (0x1FFFFFFF if extended else 0x7FF):
        return BAD_FIELD
    return can.Message(timestamp=timestamp, arbitration_id=ident, is_extended_id=extended, is_remote_frame=remote,
                       is_fd=fd, bitrate_switch=brs, dlc=size,
                       data=None if remote else binascii.unhexlify(line[head + 1:end]))


def encode_line(msg: can.Message) -> bytes:
    """A frame as the SLCAN line an adapter transmits (upper-case hex, CR)."""
    ident = f"{msg.arbitration_id:08X}" if msg.is_extended_id else f"{msg.arbitration_id:03X}"
    if msg.is_remote_frame:
        return f"{'R' if msg.is_extended_id else 'r'}{ident}{msg.dlc:d}\r".encode()
    if msg.is_fd:
        kind = ("B" if msg.is_extended_id else "b") if msg.bitrate_switch else ("D" if msg.is_extended_id else "d")
        return f"{kind}{ident}{len2dlc(msg.dlc):X}{msg.data.hex().upper()}\r".encode()
    return f"{'T' if msg.is_extended_id else 't'}{ident}{msg.dlc:d}{msg.data.hex().upper()}\r".encode()


class SlcanBus(slcanBus):
    """python-can's SLCAN bus with this module's reader, parser and writer (see the module docstring)."""

    def __init__(self, channel: Any, **kwargs: Any) -> None:
        self.parser = LineParser()
        self._tx = b""  # the unwritten rest of one line
        self._pending: deque[can.Message] = deque()  # parsed, not yet returned (a read holds many frames)
        self._fd: int | None = None
        self._poller: select.poll | None = None
        self._poller_wake: int | None = None
        self._poller_out = False  # the port is registered for POLLOUT too
        self._initialising = True
        # Discard unwritten output when closing: only at the final close. A USB serial driver's close() waits
        # (closing_wait, up to 30 s) for the output to drain, but discarding it would also hide that the adapter
        # still takes nothing: after a stall the link re-opens only once the port takes data again.
        self.discard_on_close = False
        try:
            super().__init__(channel, **kwargs)
        except BaseException:
            self._close_port()  # python-can leaves the port open when a set-up command fails
            raise
        self._initialising = False

    # -- I/O primitives ----------------------------------------------------------------------------------
    def _port_fd(self) -> int | None:
        if self._fd is None:
            self._fd = getattr(getattr(self, "serialPortOrig", None), "fd", None)  # socket:// and loop:// have none
        return self._fd

    @staticmethod
    def _poll(fd: int, events: int, timeout: float | None) -> int:
        """Wait for `events` on `fd`; the events that happened."""
        poller = select.poll()  # not select(): the fd may be above 1023 in a service with many connections
        poller.register(fd, events)
        ready = poller.poll(None if timeout is None else max(0.0, timeout) * 1000)
        return ready[0][1] if ready else 0

    def _flush_tx(self) -> bool:
        """Write what the port takes now; True when nothing is left."""
        if not self._tx:
            return True
        fd = self._port_fd()
        try:
            if fd is not None:
                written = os.write(fd, self._tx)
            else:
                port = self.serialPortOrig
                port.write_timeout = 0
                count = port.write(self._tx)
                written = len(self._tx) if count is None else count
        except (BlockingIOError, serial.SerialTimeoutException):
            written = 0
        except (OSError, serial.SerialException) as error:
            raise can.CanOperationError(f"Could not write to serial device: {error}",
                                        getattr(error, "errno", None)) from error
        self._tx = self._tx[written:]
        return not self._tx

    def _drain(self, timeout: float) -> bool:
        """Wait at most `timeout` for the port to take the waiting line; True when it did."""
        deadline = time.monotonic() + timeout
        while not self._flush_tx():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            fd = self._port_fd()
            if fd is None:
                time.sleep(min(left, 0.001))
            else:
                self._poll(fd, select.POLLOUT, left)
        return True

    def _transmit(self, line: bytes, timeout: float) -> None:
        """Take one line and write what the port takes now; EAGAIN when an earlier line still waits after `timeout`."""
        if not self._drain(timeout):
            raise can.CanOperationError("the adapter is not taking data: an earlier line is still unwritten",
                                        errno.EAGAIN)
        self._tx = line
        self._flush_tx()

    # -- python-can's hooks --------------------------------------------------------------------------------
    def _write(self, string: str) -> None:
        """Set-up and close commands (python-can's open, close, set_bitrate): written within WRITE_TIMEOUT_S."""
        self._transmit(string.encode() + self.LINE_TERMINATOR, WRITE_TIMEOUT_S)
        if not self._drain(WRITE_TIMEOUT_S):
            raise can.CanOperationError(f"Could not write to serial device: the adapter took nothing for "
                                        f"{WRITE_TIMEOUT_S:g} s", errno.EAGAIN)
        if self._initialising:
            self.parser.ignore_answers += 1

    def send(self, msg: can.Message, timeout: float | None = None) -> None:
        """Write one frame. `timeout` (default WRITE_TIMEOUT_S) bounds the wait for an earlier line only: the
        frame itself is taken at once (what the port does not take waits here and goes out later)."""
        self._transmit(encode_line(msg), WRITE_TIMEOUT_S if timeout is None else timeout)

    def recv_batch(self, timeout: float | None, wake: int | None = None, limit: int = 256) -> list[can.Message]:
        """The frames of one read (at most `limit`), or [] after `timeout`; returns [] at once when the pipe `wake`
        becomes readable (and drains it). A waiting transmit line is completed as the port takes it."""
        if self._pending:
            return self._take(limit)
        fd = self._port_fd()
        if fd is None:
            return self._recv_without_fd(timeout, limit)
        deadline = None if timeout is None else time.monotonic() + timeout
        poller = self._reader(fd, wake)
        while True:
            if bool(self._tx) != self._poller_out:  # ask for POLLOUT only while a line waits: else it spins
                self._poller_out = bool(self._tx)
                poller.modify(fd, select.POLLIN | (select.POLLOUT if self._poller_out else 0))
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = poller.poll(None if left is None else left * 1000)
            events = 0
            for ready_fd, ready_events in ready:
                if ready_fd == fd:
                    events = ready_events
                else:  # woken: a frame to transmit, or the link stopping
                    with contextlib.suppress(BlockingIOError):
                        os.read(ready_fd, 512)
                    return []
            if events & select.POLLOUT:
                self._flush_tx()
            if events & (select.POLLIN | select.POLLHUP | select.POLLERR | select.POLLNVAL) and self._read(fd):
                return self._take(limit)
            if not ready or left == 0.0:
                return []

    def _reader(self, fd: int, wake: int | None) -> select.poll:
        """One poll object for the port (and the caller's wake pipe), kept between reads: a read is hot."""
        if self._poller is None or self._poller_wake != wake:
            self._poller = select.poll()  # not select(): the fd may be above 1023 in a busy service
            self._poller.register(fd, select.POLLIN)
            self._poller_out = False
            if wake is not None:
                self._poller.register(wake, select.POLLIN)
            self._poller_wake = wake
        return self._poller

    def _read(self, fd: int) -> bool:
        """Read what the port holds; True when it completed at least one frame."""
        try:
            chunk = os.read(fd, READ_SIZE)
        except BlockingIOError:
            return False
        except OSError as error:
            raise can.CanOperationError(f"Could not read from serial device: {error}", error.errno) from error
        if not chunk:  # readable yet empty: the device went away (pyserial's reading of it too)
            raise can.CanOperationError("Could not read from serial device: it reports data but returns none "
                                        "(disconnected?)")
        frames = self.parser.feed(chunk, time.time())
        self._pending.extend(frames)
        return bool(frames)

    def _recv_without_fd(self, timeout: float | None, limit: int) -> list[can.Message]:
        """socket:// and loop:// ports: pyserial's own reads (each waits at most the port's 1 ms timeout)."""
        port = self.serialPortOrig
        deadline = serial.Timeout(timeout)
        try:
            while True:
                self._flush_tx()
                chunk = port.read(port.in_waiting or 1)
                if chunk:
                    self._pending.extend(self.parser.feed(chunk, time.time()))
                    if self._pending:
                        return self._take(limit)
                elif deadline.expired():
                    return []
        except serial.SerialException as error:
            raise can.CanOperationError(f"Could not read from serial device: {error}") from error

    def _take(self, limit: int) -> list[can.Message]:
        pending = self._pending
        if len(pending) <= limit:
            out = list(pending)
            pending.clear()
            return out
        return [pending.popleft() for _ in range(limit)]

    def _recv_internal(self, timeout: float | None) -> tuple[can.Message | None, bool]:
        """python-can's `recv()` (the simulator and tests use it): one frame at a time from the same reader."""
        frames = self.recv_batch(timeout, limit=1)
        return (frames[0] if frames else None), False

    def shutdown(self) -> None:
        can.BusABC.shutdown(self)
        with contextlib.suppress(can.CanError, OSError, serial.SerialException):
            self._transmit(b"C\r", 0)  # close the CAN channel if the adapter takes it at once ...
            deadline = time.monotonic() + CLOSE_TIMEOUT_S
            while not self._flush_tx() and time.monotonic() < deadline:
                time.sleep(0.01)  # ... or shortly after; never more than CLOSE_TIMEOUT_S
        self._close_port()

    def _close_port(self) -> None:
        port = getattr(self, "serialPortOrig", None)
        if port is None:
            return
        with contextlib.suppress(Exception):  # a vanished device fails to flush and to close: nothing more to do
            if self.discard_on_close and (self._tx or port.out_waiting):
                port.reset_output_buffer()
        with contextlib.suppress(Exception):
            port.close()
