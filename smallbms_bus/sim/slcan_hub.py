"""A virtual CAN wire with SLCAN adapters on pseudo-terminals.

Each port is a pseudo-terminal whose far end behaves like a USB SLCAN (Lawicel) adapter plugged
into one shared CAN bus: frames a program transmits on one port (`t...` / `T...` lines) are received
on every other open port; adapter commands (`C`, `S6`, `O`, ...) are acknowledged with `\\r`.
This is the real serial path of a deployment (pyserial, python-can's slcan parser, line framing)
without hardware, for tests and for commissioning a service against `smallbms-bus simulate`.

Ports are reached through stable symlinks in `directory` (like a udev rule's /dev/slcan0), so
`unplug(name)` (the pseudo-terminal is closed: the program sees I/O errors) and `replug(name)` (a
new pseudo-terminal behind the same path) model an adapter pulled out and put back. `stall(name)` models
an adapter that stops taking data from the host (its USB endpoint stalls, its firmware hangs): the hub
stops reading that port and fills the port's buffer, so the program's next write cannot complete; frames
from the wire are still delivered to it. `resume(name)` discards what was written meanwhile (the
adapter lost it) and reads the port again.
"""

from __future__ import annotations

import os
import selectors
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

FRAME_COMMANDS = (b"t", b"T", b"r", b"R")


@dataclass
class _Port:
    name: str
    link: Path
    master: int
    slave: int
    buffer: bytearray = field(default_factory=bytearray)
    frames_in: int = 0
    frames_out: int = 0


class SlcanHub:
    def __init__(self, names: tuple[str, ...] = ("slcan0", "slcan1"), directory: str | None = None) -> None:
        self.directory = Path(directory or tempfile.mkdtemp(prefix="slcan-hub-"))
        self._lock = threading.Lock()
        self._selector = selectors.DefaultSelector()
        self._ports: dict[str, _Port] = {}
        self._wake_r, self._wake_w = os.pipe()
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._stop = False
        for name in names:
            self._plug(name)
        self._thread = threading.Thread(target=self._run, name="slcan-hub", daemon=True)
        self._thread.start()

    def path(self, name: str) -> str:
        return str(self.directory / name)

    def _plug(self, name: str) -> None:
        master, slave = os.openpty()
        os.set_blocking(master, False)  # a port nobody reads loses frames; it must not stall the wire
        link = self.directory / name
        tmp = link.with_suffix(".new")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(os.ttyname(slave))
        tmp.replace(link)  # atomic: the path never points nowhere while replugging
        port = _Port(name, link, master, slave)
        with self._lock:
            self._ports[name] = port
            self._selector.register(master, selectors.EVENT_READ, port)
        self._wake()

    def unplug(self, name: str) -> None:
        """Pull the adapter: the pseudo-terminal disappears and the program's I/O fails."""
        with self._lock:
            port = self._ports.pop(name)
            self._selector.unregister(port.master)
        port.link.unlink(missing_ok=True)
        os.close(port.master)
        os.close(port.slave)

    def replug(self, name: str) -> None:
        self._plug(name)

    def stall(self, name: str) -> int:
        """The adapter stops reading what the program writes; returns the bytes it took to fill the buffer."""
        with self._lock:
            port = self._ports[name]
            self._selector.unregister(port.master)
        filler = os.open(os.ttyname(port.slave), os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY)
        filled, quiet = 0, 0
        try:
            # The kernel moves a pty's data between its buffers in the background, so room can reappear after
            # a refused write: fill until three rounds 20 ms apart take nothing at all.
            while quiet < 3:
                took = 0
                for chunk in (b"\0" * 4096, b"\0"):  # no line terminator: nothing the hub would answer or forward
                    try:
                        while True:
                            took += os.write(filler, chunk)
                    except BlockingIOError:
                        continue
                filled += took
                quiet = quiet + 1 if took == 0 else 0
                time.sleep(0.02)
        finally:
            os.close(filler)
        return filled

    def resume(self, name: str) -> None:
        """The adapter takes data again, having lost whatever was written while it stalled."""
        with self._lock:
            port = self._ports[name]
            try:
                while os.read(port.master, 65536):
                    pass
            except OSError:  # BlockingIOError: drained; EIO: the program has its side closed right now
                pass
            port.buffer.clear()
            self._selector.register(port.master, selectors.EVENT_READ, port)
        self._wake()

    def frames_from(self, name: str) -> int:
        return self._ports[name].frames_in

    def _wake(self) -> None:
        os.write(self._wake_w, b"x")

    def _run(self) -> None:
        while not self._stop:
            for key, _ in self._selector.select(timeout=0.5):
                if key.data is None:
                    os.read(self._wake_r, 4096)
                    continue
                self._service(key.data)

    def _service(self, port: _Port) -> None:
        try:
            chunk = os.read(port.master, 65536)
        except OSError:  # nothing to read, or the program closed its side: wait for it to reopen
            chunk = b""
        if not chunk:
            return
        port.buffer.extend(chunk)
        while True:
            end = port.buffer.find(b"\r")
            if end < 0:
                break
            line = bytes(port.buffer[: end + 1])
            del port.buffer[: end + 1]
            if line[:1] in FRAME_COMMANDS:
                port.frames_in += 1
                self._broadcast(port, line)
            # Adapters acknowledge commands (and transmitted frames) with CR.
            self._write(port, b"\r")

    def _broadcast(self, sender: _Port, line: bytes) -> None:
        with self._lock:
            targets = [p for p in self._ports.values() if p is not sender]
        for port in targets:
            if self._write(port, line):
                port.frames_out += 1

    @staticmethod
    def _write(port: _Port, data: bytes) -> bool:
        try:
            os.write(port.master, data)
        except OSError:  # nobody has the port open, or its buffer is full: the frame is lost, as on CAN
            return False
        return True

    def close(self) -> None:
        self._stop = True
        self._wake()
        self._thread.join(timeout=2)
        for name in list(self._ports):
            self.unplug(name)
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._selector.close()

    def __enter__(self) -> SlcanHub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
