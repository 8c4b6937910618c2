"""The installer's Modbus client: one connection to a running service, reads and writes by register name.

Shared by `status` and the commands that change something (`set`, `mode`, `command`, `set-soc`). The
addresses and scales come from register_maps/native.toml; the words go over the same hand-checked MBAP
code as `status` (smallbms_bus/modbus/status.py), so whatever the other end does the command prints one
line and exits 1. A write the service refuses raises `Refused` with the reason its exception code means
on this server (docs/modbus.md "Exceptions"): the caller adds what it can read back to explain it.
"""

from __future__ import annotations

import argparse
import socket
import struct
import time
from types import TracebackType
from typing import Any

from smallbms_bus.bank import UNIT_VOLTAGE
from smallbms_bus.modbus.codes import exception_text
from smallbms_bus.modbus.regmap import Register, RegisterMap, decode, decode_block, load_map
from smallbms_bus.modbus.status import (
    RESET,
    StatusError,
    _arguments,
    _connect,
    _receive,
    _target,
    read_registers,
)

WRITE_SINGLE = 6
MAX_READ = 125  # words per read request (Modbus)
# What each exception code means for a write to this service (docs/modbus.md): the reason printed.
WRITE_REASONS = {
    1: "this computer may not write: the service takes writes only from modbus.allow_write_from (default: its "
       "own machine) and, with TLS, only from clients with a certificate from modbus.tls_client_ca",
    2: "the service has no writable register there (a service with another register map?)",
    3: "the service refused the value",
    4: "the service could not save the change (its store: disk full, read-only or failing; see its log); "
       "nothing changed",
    6: "the service cannot take it yet",
    11: "the service has no such unit id (see --unit / modbus.unit)",
}


class Refused(Exception):
    """A write answered with a Modbus exception: `code`, and the reason this server means by it."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    """--config / --host / --port / --unit / --timeout, as `status` has them."""
    parser.add_argument("--config", help="take host, port and unit from this configuration file's [modbus]")
    parser.add_argument("--host", default=None, help="service address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="Modbus TCP port (default 502; the demo uses 5020)")
    parser.add_argument("--unit", type=int, default=None, help="unit id of the native map (default 1)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the service (default 3)")


def target(args: argparse.Namespace) -> tuple[str, int, int] | str:
    """(host, port, unit), or the bad argument or config key named (the command exits 2)."""
    if (bad := _arguments(args)) is not None:
        return bad
    return _target(args)


class Client:
    """One Modbus TCP connection to the native map of a running service."""

    def __init__(self, host: str, port: int, unit: int, timeout: float) -> None:
        self.host, self.port, self.unit, self.timeout = host, port, unit, timeout
        self.where = f"{host}:{port}"
        self.map: RegisterMap = load_map("native")
        self.blocks = {b.name: b for b in self.map.blocks}
        self.registers: dict[str, Register] = {r.name: r for b in self.map.blocks if b.repeat == 1
                                               for r in b.registers}
        self._sock: socket.socket | None = None
        self._tid = 0

    def __enter__(self) -> Client:
        self._sock = _connect(self.host, self.port, self.timeout)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _next(self) -> int:
        self._tid = self._tid % 0xFFFF + 1
        return self._tid

    def read(self, start: int, count: int, what: str) -> list[int]:
        assert self._sock is not None, "use Client as a context manager"
        words: list[int] = []
        while count > 0:
            n = min(count, MAX_READ)
            words += read_registers(self._sock, self._next(), self.unit, start, n, self.timeout, self.where, what)
            start, count = start + n, count - n
        return words

    def block(self, name: str) -> dict[str, Any]:
        """A non-repeated block of the native map, register name -> engineering value (None = unknown)."""
        block = self.blocks[name]
        return decode_block(self.map, name, self.read(block.start or 0, block.length, f"block {name}"))

    def batteries(self) -> list[dict[str, Any]]:
        """Block E for every slot that holds a battery (presence not 0), with `node` and a `cells` list."""
        block = self.blocks["E"]
        per = max(1, MAX_READ // block.length)
        out: list[dict[str, Any]] = []
        for first in range(0, int(block.repeat), per):
            n = min(per, int(block.repeat) - first)
            words = self.read((block.start or 0) + first * block.length, n * block.length,
                              f"block E (batteries {first + 1}-{first + n})")
            for k in range(n):
                chunk = words[k * block.length:(k + 1) * block.length]
                values = {r.name: decode(r, chunk[r.address:r.address + r.words], self.map.missing)
                          for r in block.registers if r.type != "reserved"}
                if values.get("presence"):
                    count = values.get("cell_count") or 0
                    values["cells"] = [values.pop(f"cell_{i}") for i in range(1, 17)][:count]
                    out.append({"node": first + k + 1, **values})
        return out

    def write(self, name: str, raw: int) -> None:
        """FC6: one register by name, the raw word. Raises Refused (exception) or StatusError (transport)."""
        assert self._sock is not None, "use Client as a context manager"
        reg = self.registers[name]
        tid = self._next()
        pdu = struct.pack(">BHH", WRITE_SINGLE, reg.address, raw & 0xFFFF)
        what = f"the write of {name}"
        try:
            self._sock.sendall(struct.pack(">HHHB", tid, 0, len(pdu) + 1, self.unit) + pdu)
            deadline = time.monotonic() + self.timeout
            header = _receive(self._sock, 7, deadline, self.where, self.timeout)
            rtid, protocol, length, runit = struct.unpack(">HHHB", header)
            if protocol != 0 or rtid != tid or runit != self.unit or not 3 <= length <= 254:
                raise StatusError(f"{self.where}: not a Modbus answer to {what} (header {header.hex(' ')})")
            body = _receive(self._sock, length - 1, deadline, self.where, self.timeout)
        except ConnectionResetError:
            raise StatusError(f"{self.where}: {RESET} ({what})") from None
        except OSError as error:
            raise StatusError(f"{self.where}: {what}: {error.strerror or error}") from None
        if body[0] == WRITE_SINGLE | 0x80 and len(body) == 2:
            code = body[1]
            reason = WRITE_REASONS.get(code, exception_text(code))
            raise Refused(code, f"{reason} (Modbus exception {code:02d})")
        if body != pdu:
            raise StatusError(f"{self.where}: not a Modbus answer to {what} (function {body[0]})")



def series_units(status: dict[str, Any]) -> int | None:
    """12.8 V units in series in the bank, from block A's nominal voltage (None until learned)."""
    nominal = status.get("nominal_voltage")
    return round(nominal / UNIT_VOLTAGE) if nominal else None
