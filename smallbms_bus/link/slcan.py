"""SLCAN (a USB-serial CAN adapter speaking the Lawicel ASCII protocol) without a system call per byte.

python-can's `slcanBus._read` reads the serial port one byte at a time: a `select` and a `read` for
each of the ~22 bytes of a frame line. With 50 batteries (~750 frames/s) that is ~33,000 system calls
a second, about half of the service's CPU. `BufferedSlcanBus` reads whatever the port holds in one
call and cuts lines from its buffer; the protocol, the parser and the error handling stay python-can's.
"""

from __future__ import annotations

import select

import serial
from can.exceptions import error_check
from can.interfaces.slcan import slcanBus

TERMINATORS = (b"\r", b"\x07")  # OK, and BELL (the adapter's error answer), as in python-can


class BufferedSlcanBus(slcanBus):
    def _read(self, timeout: float | None) -> str | None:
        deadline = serial.Timeout(timeout)
        port = self.serialPortOrig
        fd = getattr(port, "fd", None)  # a local serial port; socket:// and loop:// URLs have none
        with error_check("Could not read from serial device"):
            while True:
                line = self._take_line()
                if line is not None:
                    return line
                waiting = port.in_waiting
                if not waiting and fd is not None:
                    # Sleep in one select until data or the deadline, not in 1 ms reads (python-can's port timeout).
                    if not select.select([fd], [], [], None if timeout is None else deadline.time_left())[0]:
                        return None
                    waiting = port.in_waiting
                chunk = port.read(waiting or 1)  # without an fd: waits at most the port's own timeout (1 ms)
                if chunk:
                    self._buffer.extend(chunk)
                elif deadline.expired():
                    return None

    def _take_line(self) -> str | None:
        ends = [i for i in (self._buffer.find(t) for t in TERMINATORS) if i >= 0]
        if not ends:
            return None
        end = min(ends) + 1
        line = bytes(self._buffer[:end])
        del self._buffer[:end]
        return line.decode()  # a garbled line raises UnicodeDecodeError, a ValueError: the link counts it
