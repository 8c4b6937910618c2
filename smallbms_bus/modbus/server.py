"""Modbus TCP (and Modbus/TCP Security) server: REGISTERS.md on pymodbus, bound to the running BMS.

pymodbus provides the listener, the connections, MBAP framing and PDU encoding. The requests are
answered here, synchronously on the event loop, from the register maps:

- FC3 and FC4 read the same words (REGISTERS.md); FC6 and FC16 write; every other function is 01.
- A read or write touching an unmapped address is 02, a write to a read-only register is 02, a value
  out of range or a bad quantity is 03, a valid write the bank cannot take yet is 06; an unknown unit
  id is 0B (as a gateway answers for a device that is not there).
- A write is checked word by word here (addresses, ranges), then handed whole to the service's write
  path (smallbms_bus/commit.py, SET-3): planned, applied, decided at once ("mode off" reaches the relays
  right away), committed to the store on its thread, and only then answered; 04 when the store cannot
  commit it. Meanwhile the loop serves every other connection; the writer's own later requests wait
  for the write's answer, so a connection's answers stay in the order of its requests.
- Writes are accepted only from `allow_write_from` and, when TLS is configured, only from clients
  whose certificate `tls_client_ca` verified; anyone else gets 01, a log line and a metric.
- Connections over `max_connections` are closed on accept; idle ones after `idle_timeout`; a client
  that stops reading its answers is paused (asyncio flow control), so it never grows our buffers or
  blocks the loop, and is closed by the idle timeout.

Why not pymodbus's datastore: its request path answers a read-only live value with 02 or needs the
application to push every value into its tables; here reads are pulled from the latest decision,
which is also what makes one image per decision possible. pymodbus internals used here
(ServerRequestHandler, TransactionManager.callback_data, the framer) are pinned by pyproject's
pymodbus~=3.16.1 and exercised by tests/modbus.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import ssl
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pymodbus.constants import ExcCodes
from pymodbus.datastore import ModbusServerContext
from pymodbus.exceptions import ModbusIOException
from pymodbus.pdu import ExceptionResponse, ModbusPDU
from pymodbus.pdu.register_message import (
    ReadHoldingRegistersResponse,
    ReadInputRegistersResponse,
    WriteMultipleRegistersResponse,
    WriteSingleRegisterResponse,
)
from pymodbus.server import ModbusTcpServer, ModbusTlsServer
from pymodbus.server.requesthandler import ServerRequestHandler
from pymodbus.transaction import TransactionManager

from smallbms_bus.bms.core import BmsCore, Decision
from smallbms_bus.commit import Change, Committed
from smallbms_bus.modbus.image import UnitImage
from smallbms_bus.modbus.regmap import RegisterMap, decode_word, load_maps
from smallbms_bus.modbus.sources import Snapshot
from smallbms_bus.modbus.stats import ModbusStats
from smallbms_bus.modbus.writes import WriteRefused

log = logging.getLogger(__name__)
# pymodbus logs a WARNING per undecodable frame: a misbehaving client would fill the journal. Ours are counted.
logging.getLogger("pymodbus.logging").setLevel(logging.ERROR)

READ, WRITE_SINGLE, WRITE_MULTIPLE = (3, 4), 6, 16
MAX_READ, MAX_WRITE = 125, 123
BATCH = 32  # pipelined requests answered per turn of the event loop, per connection
ILLEGAL_FUNCTION, ILLEGAL_ADDRESS, ILLEGAL_VALUE = 1, 2, 3
GATEWAY_NO_RESPONSE = 0x0B
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class ModbusOptions:
    host: str = "127.0.0.1"
    port: int | None = 502  # None = no plain Modbus TCP listener (config: 0); 0 here = any free port (tests)
    unit: int = 1
    gx_unit: int = 225  # 0 = off
    allow_write_from: tuple[Network, ...] = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128"))
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    tls_port: int = 802  # Modbus/TCP Security's registered port
    max_connections: int = 32
    idle_timeout: float = 300.0

    @classmethod
    def from_config(cls, section: dict[str, Any]) -> ModbusOptions:
        values = {k: v for k, v in section.items() if k in cls.__dataclass_fields__}
        values["allow_write_from"] = tuple(ipaddress.ip_network(n) for n in section["allow_write_from"])
        values["port"] = section["port"] or None
        return cls(**values)

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


@dataclass
class BmsAccess:
    """What the server needs from the service: the core (settings, the status LED), its latest decision
    (reads), the service's write path (`Service.commit`), and the clock."""

    core: BmsCore
    decision: Callable[[], Decision | None]
    commit: Callable[[Change], Awaitable[Committed]]
    clock: Callable[[], float]
    started: float


class _NoDatastore(ModbusServerContext):
    """pymodbus wants a datastore; every request this server supports is answered before reaching it."""

    def __init__(self) -> None:  # deliberately not calling the parent: its datastore is not used
        self.old_simulator = True
        self.simdevices = []

    async def async_getValues(self, device_id: int, func_code: int, address: int, count: int = 1) -> ExcCodes:
        return ExcCodes.ILLEGAL_FUNCTION

    async def async_setValues(self, device_id: int, func_code: int, address: int, values: Any) -> ExcCodes:
        return ExcCodes.ILLEGAL_FUNCTION

    def device_ids(self) -> list[int]:
        return []


class _Connection(ServerRequestHandler):
    """One client connection: who it is, whether it may write, and its requests answered in order."""

    def __init__(self, listener: Any, server: ModbusServer) -> None:
        super().__init__(listener, listener.trace_packet, listener.trace_pdu, listener.trace_connect)
        self.app = server
        self.peer = "?"
        self.may_write = False
        self.counted = False
        self.last_activity = time.monotonic()  # I/O time, not the core's clock
        self.refusals_logged = 0
        self.paused = False  # the client stopped reading its answers (asyncio flow control)
        self.unanswered = b""  # received bytes not yet part of an answered frame
        self.reading_held = False  # reading paused by us while a batch of pipelined requests is answered
        self.writing: asyncio.Future[ModbusPDU] | None = None  # a write waiting for its commit (SET-3)

    # -- lifecycle -------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        app = self.app
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if peer else "?"
        if app.stats.connections_open >= app.options.max_connections:
            app.stats.connections_refused += 1
            log.warning("Modbus: refused a connection from %s: %d clients already (modbus.max_connections)",
                        self.peer, app.options.max_connections)
            self.close()
            return
        self.counted = True
        app.stats.connections_open += 1
        app.stats.connections_total += 1
        app.connections.add(self)
        self.may_write = app.may_write(self.peer, transport.get_extra_info("peercert"))
        log.debug("Modbus: client %s connected (%s)", self.peer, "may write" if self.may_write else "read-only")

    def _forget(self) -> None:
        if self.counted:
            self.counted = False
            self.app.stats.connections_open -= 1
            self.app.connections.discard(self)

    def callback_disconnected(self, exc: Exception | None) -> None:
        self._forget()
        super().callback_disconnected(exc)

    def close(self, reconnect: bool = False) -> None:
        self._forget()
        super().close(reconnect)

    # asyncio flow control: a client that does not read its answers stops being read from, and the requests
    # already received wait unanswered, so its answers never pile up beyond the transport's high-water mark.
    def pause_writing(self) -> None:
        self.paused = True
        if self.transport:
            self.transport.pause_reading()  # type: ignore[attr-defined]

    def resume_writing(self) -> None:
        self.paused = False
        if not self.transport:
            return
        if self.unanswered or self.reading_held:  # answer what was received first; _answer_some resumes reading
            self.reading_held = True
            asyncio.get_running_loop().call_soon(self._answer_some)
        else:
            self.transport.resume_reading()  # type: ignore[attr-defined]

    # -- requests --------------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        """Frames are cut by their MBAP length and answered in order, at most BATCH per turn of the event
        loop: a client that pipelines thousands of requests waits for its own answers, everyone else does
        not. (pymodbus's own path takes one frame per read, drops its buffer past 260 bytes and clears it
        on every send, which loses pipelined requests.)"""
        self.last_activity = time.monotonic()
        self.unanswered += data
        self._answer_some()

    def _answer_some(self) -> None:
        buffer, used, answered = self.unanswered, 0, 0
        while answered < BATCH and not self.paused and self.writing is None and len(buffer) - used >= 6 \
                and self.transport:
            _, protocol, length = struct.unpack_from(">HHH", buffer, used)
            if protocol != 0 or not 2 <= length <= 254:  # not Modbus/TCP, or framing lost: trust nothing after
                self.app.stats.connections_bad_frame_closed += 1
                log.debug("Modbus: closing %s: not a Modbus/TCP frame (%s)", self.peer, buffer[used:used + 8].hex())
                self.close()
                self.unanswered = b""
                return
            if len(buffer) - used < 6 + length:
                break  # a partial frame: wait for the rest
            self._answer_frame(buffer[used:used + 6 + length])
            used += 6 + length
            answered += 1
        self.unanswered = buffer[used:]
        if self.paused or not self.transport:  # the client is not reading its answers: resume_writing carries on
            return
        if self.writing is not None:  # the requests behind a write wait for its answer; _written carries on
            if not self.reading_held:
                self.reading_held = True
                self.transport.pause_reading()  # type: ignore[attr-defined]
            return
        if answered == BATCH:  # more may be waiting: let the loop breathe first
            if not self.reading_held:
                self.reading_held = True
                self.transport.pause_reading()  # type: ignore[attr-defined]
            asyncio.get_running_loop().call_soon(self._answer_some)
        elif self.reading_held:
            self.reading_held = False
            self.transport.resume_reading()  # type: ignore[attr-defined]

    def _answer_frame(self, frame: bytes) -> None:
        try:
            TransactionManager.callback_data(self, frame)
        except ModbusIOException:
            self._undecodable(frame)
            return
        pdu, self.last_pdu = self.last_pdu, None
        if pdu is None:
            return
        response = self.app.answer(self, pdu)
        if isinstance(response, ModbusPDU):
            self.pdu_send(response)
        else:  # a write: answered once committed
            self.writing = asyncio.ensure_future(response)
            self.writing.add_done_callback(self._written)

    def _written(self, write: asyncio.Future[ModbusPDU]) -> None:
        self.writing = None
        if write.cancelled() or not self.transport:  # the client or the server went away: the commit stands
            return
        self.pdu_send(write.result())
        self._answer_some()  # the requests that waited behind the write, then reading resumes

    def _undecodable(self, frame: bytes) -> None:
        """A frame pymodbus cannot decode (bad quantity, byte count, unknown function): its exception."""
        if len(frame) < 8:
            return  # a unit id and no function code: nothing to answer
        tid, _, _, unit, function = struct.unpack(">HHHBB", frame[:8])
        code = ILLEGAL_VALUE if function in (*READ, WRITE_SINGLE, WRITE_MULTIPLE) else ILLEGAL_FUNCTION
        self.app.stats.count(function, code)
        self.pdu_send(ExceptionResponse(function & 0x7F, code, device_id=unit, transaction=tid))

    async def handle_request(self) -> None:  # never used: data_received answers at once
        return None


class ModbusServer:
    def __init__(self, options: ModbusOptions, access: BmsAccess, maps: dict[str, RegisterMap] | None = None) -> None:
        self.options = options
        self.access = access
        self.maps = maps or load_maps()
        self.stats = ModbusStats()
        self.connections: set[_Connection] = set()
        self.units: dict[int, list[RegisterMap]] = {options.unit: [self.maps["native"], self.maps["sunspec"]]}
        if options.gx_unit:
            self.units[options.gx_unit] = [self.maps["gx"]]
        self._images: dict[int, UnitImage] = {}
        self._decision: Decision | None = None
        self._snapshot: Snapshot | None = None
        self._listeners: list[Any] = []
        self._reaper: asyncio.Task | None = None
        self.bound: list[tuple[str, int]] = []  # (host, port) actually listening, for logs and tests
        self._ssl = self._ssl_context() if options.tls else None

    # -- lifecycle -------------------------------------------------------------------------------------------
    async def start(self) -> None:
        o = self.options
        if o.port is not None:
            await self._listen(ModbusTcpServer, o.port)
        if o.tls:
            await self._listen(ModbusTlsServer, o.tls_port, sslctx=self._ssl)
        self._reaper = asyncio.create_task(self._reap_idle(), name="modbus-idle")
        log.info("Modbus: serving %s; unit %d native + SunSpec%s; writes from %s%s",
                 ", ".join(f"{h}:{p}" for h, p in self.bound), o.unit,
                 f", unit {o.gx_unit} Victron GX" if o.gx_unit else "",
                 ", ".join(map(str, o.allow_write_from)) or "nobody",
                 " with a client certificate" if o.tls else "")

    def _ssl_context(self) -> ssl.SSLContext:
        """Checked at start-up, so a wrong path is a configuration error naming the key (exit 2)."""
        o = self.options
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ctx.load_cert_chain(o.tls_cert, o.tls_key)  # type: ignore[arg-type]
        except (OSError, ssl.SSLError) as error:
            raise ValueError(f"modbus.tls_cert / modbus.tls_key: cannot load {o.tls_cert} with {o.tls_key}: "
                             f"{error}") from None
        if o.tls_client_ca:
            try:
                ctx.load_verify_locations(o.tls_client_ca)
            except (OSError, ssl.SSLError) as error:
                raise ValueError(f"modbus.tls_client_ca: cannot load {o.tls_client_ca}: {error}") from None
            ctx.verify_mode = ssl.CERT_OPTIONAL  # readers need no certificate; writers do
        else:
            log.warning("Modbus: TLS without modbus.tls_client_ca: no client can authenticate, so nobody may write")
        return ctx

    async def _listen(self, kind: type, port: int, **extra: Any) -> None:
        server = self

        class Listener(kind):  # type: ignore[misc, valid-type]
            def callback_new_connection(self) -> _Connection:
                return _Connection(self, server)

        listener = Listener(_NoDatastore(), address=(self.options.host, port), **extra)
        await listener.serve_forever(background=True)
        self._listeners.append(listener)
        for sock in listener.transport.sockets:
            host, bound_port = sock.getsockname()[:2]
            self.bound.append((host, bound_port))

    async def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        for listener in self._listeners:
            await listener.shutdown()
        self._listeners.clear()
        self.bound.clear()

    async def _reap_idle(self) -> None:
        timeout = self.options.idle_timeout
        while True:
            await asyncio.sleep(min(timeout / 4, 5.0))
            now = time.monotonic()
            for conn in [c for c in self.connections if now - c.last_activity > timeout]:
                if conn.paused:
                    self.stats.connections_slow_closed += 1
                else:
                    self.stats.connections_idle_closed += 1
                log.info("Modbus: closing %s, %s for %.0f s (modbus.idle_timeout)", conn.peer,
                         "not reading its answers" if conn.paused else "idle", now - conn.last_activity)
                conn.close()

    # -- access ------------------------------------------------------------------------------------------------
    def may_write(self, peer: str, peercert: Any) -> bool:
        try:
            address = ipaddress.ip_address(peer.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        allowed = any(address in net for net in self.options.allow_write_from)
        if self.options.tls:
            return allowed and bool(peercert)  # a certificate is only there when tls_client_ca verified it
        return allowed

    def snapshot(self) -> Snapshot | None:
        decision = self.access.decision()
        if decision is None:
            return None
        if decision is not self._decision:
            self._decision = decision
            self._snapshot = Snapshot(decision, self.access.core.settings, self.access.clock() - self.access.started,
                                      self.options.unit)
        return self._snapshot

    def image(self, unit: int, snapshot: Snapshot) -> UnitImage:
        nodes = tuple(sorted(snapshot.batteries))
        image = self._images.get(unit)
        if image is None or (image.nodes != nodes and any(m.dynamic for m in self.units[unit])):
            image = self._images[unit] = UnitImage(self.units[unit], nodes)
        return image

    # -- answering -----------------------------------------------------------------------------------------------
    def answer(self, conn: _Connection, pdu: ModbusPDU) -> ModbusPDU | Awaitable[ModbusPDU]:
        """The answer now, or (a write that passed its checks) a coroutine that answers once it is committed."""
        fc, unit, tid = pdu.function_code, pdu.dev_id, pdu.transaction_id
        code: int | None
        try:
            answer = self._answer(conn, pdu)
            if isinstance(answer, Change):
                return self._answer_write(pdu, answer)
            response, code = answer, None
        except WriteRefused as refused:
            code = refused.code
            response = ExceptionResponse(fc, code, device_id=unit, transaction=tid)
        except Exception:  # a bug must cost one request, never the connection or the service
            log.exception("Modbus: request fc %d unit %d failed", fc, unit)
            code = ExcCodes.DEVICE_FAILURE
            response = ExceptionResponse(fc, code, device_id=unit, transaction=tid)
        self.stats.count(fc, code)
        response.dev_id, response.transaction_id = unit, tid
        return response

    async def _answer_write(self, pdu: ModbusPDU, change: Change) -> ModbusPDU:
        fc, unit, tid = pdu.function_code, pdu.dev_id, pdu.transaction_id
        code: int | None = None
        response: ModbusPDU
        try:
            await self.access.commit(change)
            if fc == WRITE_SINGLE:
                response = WriteSingleRegisterResponse(address=pdu.address, registers=list(pdu.registers))
            else:
                response = WriteMultipleRegistersResponse(address=pdu.address, count=len(pdu.registers))
        except WriteRefused as refused:
            code = refused.code
            response = ExceptionResponse(fc, code, device_id=unit, transaction=tid)
        except Exception:  # a bug must cost one request, never the connection or the service
            log.exception("Modbus: write fc %d unit %d failed", fc, unit)
            code = ExcCodes.DEVICE_FAILURE
            response = ExceptionResponse(fc, code, device_id=unit, transaction=tid)
        self.stats.count(fc, code)
        response.dev_id, response.transaction_id = unit, tid
        return response

    def _answer(self, conn: _Connection, pdu: ModbusPDU) -> ModbusPDU | Change:
        fc, unit = pdu.function_code, pdu.dev_id
        if unit not in self.units:
            raise WriteRefused(GATEWAY_NO_RESPONSE, f"unit {unit}")
        if fc not in (*READ, WRITE_SINGLE, WRITE_MULTIPLE):
            raise WriteRefused(ILLEGAL_FUNCTION, f"function {fc}")
        snapshot = self.snapshot()
        if snapshot is None:
            raise WriteRefused(ExcCodes.DEVICE_BUSY, "no decision yet")
        now = self.access.clock()
        self.access.core.modbus_client_seen(now)  # LED-2
        image = self.image(unit, snapshot)
        if fc in READ:
            if not 1 <= pdu.count <= MAX_READ:
                raise WriteRefused(ILLEGAL_VALUE, f"quantity {pdu.count}")
            words = image.read(snapshot, pdu.address, pdu.count)
            if words is None:
                raise WriteRefused(ILLEGAL_ADDRESS, f"{pdu.address}+{pdu.count}")
            cls = ReadHoldingRegistersResponse if fc == 3 else ReadInputRegistersResponse
            return cls(registers=words)
        values = list(pdu.registers)
        if fc == WRITE_MULTIPLE and not (1 <= pdu.count <= MAX_WRITE and pdu.byte_count == 2 * pdu.count
                                         == getattr(pdu, "_payload_byte_count", None) == 2 * len(values)):
            raise WriteRefused(ILLEGAL_VALUE, f"quantity {pdu.count} / byte count {pdu.byte_count}")
        if not conn.may_write:
            self._refuse_write(conn, unit, pdu.address, len(values))
        return self._write(conn, image, unit, pdu.address, values)

    def _refuse_write(self, conn: _Connection, unit: int, address: int, count: int) -> None:
        self.stats.refused_writes += 1
        level = logging.WARNING if conn.refusals_logged < 3 else logging.DEBUG  # no log flood from one client
        conn.refusals_logged += 1
        log.log(level, "Modbus: refused a write from %s (unit %d, %d register(s) at %d): not in "
                "modbus.allow_write_from%s", conn.peer, unit, count, address,
                " or no verified client certificate" if self.options.tls else "")
        raise WriteRefused(ILLEGAL_FUNCTION, "write not allowed")

    def _write(self, conn: _Connection, image: UnitImage, unit: int, address: int, values: Sequence[int]) -> Change:
        """Each word checked (address, range); the change as the service's write path takes it."""
        writes: list[tuple[str, str, float]] = []
        for offset, word in enumerate(values):
            reg = image.register_at(address + offset)
            if reg is None or not reg.writable or reg.target is None:
                raise WriteRefused(ILLEGAL_ADDRESS, f"{address + offset} is not a writable register")
            value = decode_word(reg, word)
            if reg.range is not None and not reg.range[0] <= value <= reg.range[1]:
                raise WriteRefused(ILLEGAL_VALUE, f"{reg.name} = {value:g}")
            writes.append((reg.name, reg.target, value))
        return Change(tuple(writes), source=f"Modbus {conn.peer} unit {unit}", reason="Modbus write")
