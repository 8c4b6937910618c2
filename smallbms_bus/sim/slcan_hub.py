"""A virtual CAN wire with SLCAN adapters on pseudo-terminals.

Each port is a pseudo-terminal whose far end behaves like a USB SLCAN (Lawicel) adapter plugged
into one shared CAN bus: frames a program transmits on one port (`t...` / `T...` lines) are received
on every other open port; adapter commands (`C`, `S6`, `O`, ...) are acknowledged with `\\r`.
This is the real serial path of a deployment (pyserial, python-can's slcan parser, line framing)
without hardware, for tests and for commissioning a service against `smallbms-bus simulate`.

Ports are reached through stable symlinks in `directory` (like a udev rule's /dev/slcan0), so
`unplug(name)` (the pseudo-terminal is closed: the program sees I/O errors) and `replug(name)` (a
new pseudo-terminal behind the same path) model an adapter pulled out and put back.
"""

from __future__ import annotations

import os
import selectors
import tempfile
import threading
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
