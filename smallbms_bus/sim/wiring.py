"""`simulate --relay-board`: the simulated charger and load follow the relays of a Modbus TCP I/O module.

Theory of operation
-------------------
In a real installation the charge relay switches the charger's remote input and the load relay the load.
`smallbms-bus run` writes its relays to a board it owns; `simulate` is another process, so it reads the
same relays back from the board, as a second Modbus TCP client (a TCP module serves several clients; a
serial RS-485 line has one master, hence TCP only): the coils of `--load-relay` and `--charge-relay`
(channel n = coil n-1, the service's default numbering), every `POLL_S`. The simulated devices then see
what the relays really do: mode off, remote off, an alarm, and a relay that did not switch (a write the
board refused, a welded contact) all show on the bank current.

A read that fails (the module unreachable, an exception response) is counted and logged, rate-limited;
the devices keep the contacts as last read, because a real relay holds its state while nobody can read
it. Before the first successful read the contacts count as open.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass

from smallbms_bus.outputs.base import OutputError
from smallbms_bus.outputs.modbus import ModbusBoard

log = logging.getLogger(__name__)

POLL_S = 0.1  # real seconds between reads of the relays
TIMEOUT_S = 0.3
ERROR_LOG_INTERVAL_S = 5.0
_SPEC = re.compile(r"^modbus-tcp:(?P<host>\[[^\]]+\]|[^:]+):(?P<port>\d+)(?::(?P<unit>\d+))?$")


@dataclass(frozen=True)
class RelayBoardSpec:
    host: str
    port: int
    unit: int = 1

    @classmethod
    def parse(cls, text: str) -> RelayBoardSpec:
        """`modbus-tcp:HOST:PORT[:UNIT]`; ValueError says what is expected."""
        match = _SPEC.match(text.strip())
        if match is None:
            raise ValueError(f"{text!r}: expected modbus-tcp:HOST:PORT[:UNIT], e.g. modbus-tcp:127.0.0.1:5021")
        port, unit = int(match["port"]), int(match["unit"] or 1)
        if not 1 <= port <= 65535:
            raise ValueError(f"{text!r}: port {port} is outside 1..65535")
        if not 0 <= unit <= 247:
            raise ValueError(f"{text!r}: unit {unit} is outside 0..247")
        return cls(match["host"].strip("[]"), port, unit)

    def describe(self) -> str:
        return f"modbus-tcp {self.host}:{self.port} unit {self.unit}"


class RelayReader:
    """A thread that keeps the latest state of some relays of a Modbus TCP board."""

    def __init__(self, spec: RelayBoardSpec, channels: dict[str, int], poll_s: float = POLL_S) -> None:
        self.spec = spec
        self.channels = dict(channels)  # name -> channel (1-based)
        self.poll_s = poll_s
        self.board = ModbusBoard("tcp", host=spec.host, port=spec.port, unit=spec.unit,
                                 channels=max(8, *self.channels.values()), timeout=TIMEOUT_S, retries=0)
        self._states: dict[str, bool] = {}
        self.reads = 0
        self.errors = 0
        self.last_error: str | None = None
        self.last_read_at: float | None = None  # time.monotonic() of the last good read
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="relay-reader", daemon=True)
        self._logged_at: float | None = None

    def start(self) -> RelayReader:
        self._thread.start()
        return self

    def contact(self, name: str) -> bool | None:
        """The relay's state as last read (None before the first read)."""
        return self._states.get(name)

    def read_once(self) -> None:
        """One read of every channel (the thread's work; tests call it directly)."""
        try:
            self.board.open()
            states = {name: bool(self.board.read(channel)) for name, channel in self.channels.items()}
        except OutputError as error:
            self.board.close()
            self.errors += 1
            self.last_error = str(error)
            now = time.monotonic()
            if self._logged_at is None or now - self._logged_at >= ERROR_LOG_INTERVAL_S:
                log.warning("relay board %s: %s (the simulated devices keep the relays as last read)",
                            self.spec.describe(), error)
                self._logged_at = now
            return
        self._states = states  # one assignment: the simulator's thread sees a whole read
        self.reads += 1
        self.last_error = None
        self.last_read_at = time.monotonic()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.read_once()
            self._stop.wait(self.poll_s)

    def describe(self) -> str:
        """For the status line: the relays as last read, or why they could not be read."""
        states = ", ".join(f"{name} {'on' if self._states[name] else 'off'}" for name in self.channels
                           if name in self._states) or "not read yet"
        if self.last_error is not None:
            return f"relays {states} (read FAILED: {self.last_error}; the last state read is kept)"
        return f"relays {states} ({self.spec.describe()})"

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        self.board.close()
