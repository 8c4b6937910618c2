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
- Connections (smallbms_bus/connections.py): a newcomer is taken; over `max_connections_per_address`
  its own address's longest-idle connection goes, over `max_connections` the longest-idle of all (one
  that never sent a request first); only a silent newcomer that would displace its silent equal is hung
  up on accept. A connection with no request `first_request_timeout` after connecting is closed, one
  that has polled `idle_timeout` after its last request. A client that stops reading its answers is
  paused (asyncio flow control), so it never grows our buffers or blocks the loop, and is closed by the
  idle timeout.

Why not pymodbus's datastore: its request path answers a read-only live value with 02 or needs the
application to push every value into its tables; here reads are pulled from the latest decision,
which is also what makes one image per decision possible. pymodbus internals used here
(ServerRequestHandler, TransactionManager.callback_data, the framer) are pinned by pyproject's
pymodbus~=3.16.1 and exercised by tests/modbus.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import ssl
import struct
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
from smallbms_bus.config import defaults
from smallbms_bus.connections import (
    ACCEPT_BATCH,
    ConnectionPolicy,
    Limits,
    RateLimitedLog,
    abort_with_reset,
    address_of,
    bytes_waiting,
    fd_budget,
    guarded_sockets,
    quiet_accept_errors,
    release_fds,
)
from smallbms_bus.modbus.image import UnitImage, layout_of
from smallbms_bus.modbus.regmap import RegisterMap, decode_word, load_maps
from smallbms_bus.modbus.sources import ModbusView
from smallbms_bus.modbus.stats import ModbusStats
from smallbms_bus.modbus.tls import tls_context
from smallbms_bus.modbus.writes import Refused, StringPatch, WriteRefused, WriteValue

log = logging.getLogger(__name__)
# pymodbus logs a WARNING per undecodable frame: a misbehaving client would fill the journal. Ours are counted.
logging.getLogger("pymodbus.logging").setLevel(logging.ERROR)

READ, WRITE_SINGLE, WRITE_MULTIPLE = (3, 4), 6, 16
MAX_READ, MAX_WRITE = 125, 123
BATCH = 32  # pipelined requests answered per turn of the event loop, per connection
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_DEFAULT = defaults()["modbus"]  # the config schema is the one place a default is written


@dataclass(frozen=True)
class ModbusOptions:
    host: str = _DEFAULT["host"]
    port: int | None = _DEFAULT["port"]  # None = no plain Modbus TCP listener (config: 0); 0 here = any free port
    unit: int = _DEFAULT["unit"]
    gx_unit: int = _DEFAULT["gx_unit"]  # 0 = off
    allow_write_from: tuple[Network, ...] = tuple(ipaddress.ip_network(n) for n in _DEFAULT["allow_write_from"])
    tls_cert: str | None = _DEFAULT["tls_cert"]
    tls_key: str | None = _DEFAULT["tls_key"]
    tls_client_ca: str | None = _DEFAULT["tls_client_ca"]
    tls_port: int = _DEFAULT["tls_port"]  # Modbus/TCP Security's registered port
    max_connections: int = _DEFAULT["max_connections"]
    max_connections_per_address: int = _DEFAULT["max_connections_per_address"]
    first_request_timeout: float = _DEFAULT["first_request_timeout"]
    idle_timeout: float = _DEFAULT["idle_timeout"]

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
    # a write this server refused itself (not allowed, not writable, bad value): the event log's (source, what, why)
    refused: Callable[[str, str, Refused], None] = lambda source, what, refused: None


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
        self.address = "?"  # the per-address cap's key
        self.may_write = False
        self.counted = False
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
        self.address = address_of(peer)
        for victim in app.policy.admit(self):
            victim.drop("evicted", f"for a newcomer from {self.address}")
        self.counted = True
        app.stats.connections_open += 1
        app.stats.connections_total += 1
        self.may_write = app.may_write(self.peer, transport.get_extra_info("peercert"))
        log.debug("Modbus: client %s connected (%s)", self.peer, "may write" if self.may_write else "read-only")

    def _forget(self) -> None:
        if self.counted:
            self.counted = False
            self.app.stats.connections_open -= 1
            self.app.policy.forget(self)

    def waiting(self) -> bool:
        return bool(self.unanswered) or bytes_waiting(self.transport) > 0

    def drop(self, why: str, detail: str) -> None:
        """Hang up at once (the policy already forgot it)."""
        stats, app = self.app.stats, self.app
        if why == "evicted":
            stats.connections_evicted += 1
            app.quiet("evicted", logging.WARNING, "Modbus: evicted the longest-idle connection of %s %s "
                      "(modbus.max_connections %d, max_connections_per_address %d)", self.peer, detail,
                      app.policy.limits.max_connections, app.options.max_connections_per_address)
        elif why == "no_request":
            stats.connections_no_request_closed += 1
            app.quiet("no_request", logging.INFO, "Modbus: closing %s: no request %s (modbus.first_request_timeout)",
                      self.peer, detail)
        elif self.paused:
            stats.connections_slow_closed += 1
            app.quiet("slow", logging.INFO, "Modbus: closing %s: not reading its answers %s (modbus.idle_timeout)",
                      self.peer, detail)
        else:
            stats.connections_idle_closed += 1
            app.quiet("idle", logging.INFO, "Modbus: closing %s: idle %s (modbus.idle_timeout)", self.peer, detail)
        if self.transport:
            abort_with_reset(self.transport)
        self.close()

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
        if answered:  # only a complete request makes a connection active: a slowloris stays idle
            self.app.policy.request(self)
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
        known = function in (*READ, WRITE_SINGLE, WRITE_MULTIPLE)
        code = ExcCodes.ILLEGAL_VALUE if known else ExcCodes.ILLEGAL_FUNCTION
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
        self.policy = ConnectionPolicy(self._limits(options.max_connections))
        self.quiet = RateLimitedLog(log)
        self.units: dict[int, list[RegisterMap]] = {options.unit: [self.maps["native"], self.maps["sunspec"]]}
        if options.gx_unit:
            self.units[options.gx_unit] = [self.maps["gx"]]
        self._images: dict[int, UnitImage] = {}
        self._decision: Decision | None = None
        self._snapshot: ModbusView | None = None
        self._listeners: list[Any] = []
        self._reaper: asyncio.Task | None = None
        self.bound: list[tuple[str, int]] = []  # (host, port) actually listening, for logs and tests
        self._ssl = self._ssl_context() if options.tls else None

    def _limits(self, max_connections: int) -> Limits:
        o = self.options
        return Limits(max_connections, o.max_connections_per_address, o.first_request_timeout, o.idle_timeout)

    @property
    def connections(self) -> list[_Connection]:
        return list(self.policy)  # type: ignore[arg-type]

    # -- lifecycle -------------------------------------------------------------------------------------------
    async def start(self) -> None:
        o = self.options
        quiet_accept_errors(asyncio.get_running_loop())
        self.policy.limits = self._limits(fd_budget(self, "modbus.max_connections", o.max_connections))
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
        """Checked at start-up (and by check-config, through the same function): a file that cannot be used is
        a ConfigError naming its key (exit 2)."""
        o = self.options
        assert o.tls_cert is not None  # self.options.tls
        ctx = tls_context(o.tls_cert, o.tls_key, o.tls_client_ca)
        if not o.tls_client_ca:
            log.warning("Modbus: TLS without modbus.tls_client_ca: no client can authenticate, so nobody may write")
        return ctx

    async def _listen(self, kind: type, port: int, **extra: Any) -> None:
        server = self

        class Listener(kind):  # type: ignore[misc, valid-type]
            def callback_new_connection(self) -> _Connection:
                return _Connection(self, server)

        sockets = await guarded_sockets(self.options.host, port, self._refuse)
        try:
            while sockets:
                listener = Listener(_NoDatastore(), address=(self.options.host, port), **extra)
                # pymodbus's create_server call (a partial, pinned by pymodbus~=3.16.1) on our socket, with our
                # accept batch and a TLS handshake bounded like a first request (a connection is only ours once
                # the handshake is done).
                create = listener.call_create
                options: dict[str, Any] = {"sock": sockets[0], "backlog": ACCEPT_BATCH, "ssl": create.keywords["ssl"],
                                           "start_serving": True}
                if options["ssl"] is not None:
                    options["ssl_handshake_timeout"] = self.options.first_request_timeout
                listener.call_create = functools.partial(create.func, create.args[0], **options)
                await listener.serve_forever(background=True)
                host, bound_port = sockets.pop(0).getsockname()[:2]
                self._listeners.append(listener)
                self.bound.append((host, bound_port))
        finally:
            for sock in sockets:
                sock.close()

    def _refuse(self, address: str) -> bool:
        """GuardedSocket's question for a newcomer that has sent nothing: hang it up on accept?"""
        if not self.policy.crowded(address):
            return False
        self.stats.connections_refused += 1
        self.quiet("refused", logging.WARNING, "Modbus: refused a connection from %s that sent nothing: it already "
                   "holds %d connections and one of them never sent a request either "
                   "(modbus.max_connections_per_address)", address, self.options.max_connections_per_address)
        return True

    async def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        for listener in self._listeners:
            await listener.shutdown()
        self._listeners.clear()
        self.bound.clear()
        release_fds(self)

    async def _reap_idle(self) -> None:
        limits = self.policy.limits
        while True:
            await asyncio.sleep(min(limits.first_request_timeout / 4, limits.idle_timeout / 4, 1.0))
            for conn, why in self.policy.expired():
                timeout = limits.first_request_timeout if why == "no_request" else limits.idle_timeout
                conn.drop(why, f"for {timeout:g} s")  # type: ignore[attr-defined]
            self.quiet.flush()

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

    def snapshot(self) -> ModbusView | None:
        decision = self.access.decision()
        if decision is None:
            return None
        if decision is not self._decision:
            self._decision = decision
            self._snapshot = ModbusView.of(decision, self.access.core, self.access.clock() - self.access.started,
                                         self.options.unit)
        return self._snapshot

    def image(self, unit: int, snapshot: ModbusView) -> UnitImage:
        layout = layout_of(snapshot)
        image = self._images.get(unit)
        if image is None or (image.layout != layout and any(m.dynamic for m in self.units[unit])):
            image = self._images[unit] = UnitImage(self.units[unit], layout)
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
        except Refused as refused:
            code = refused.code
            response = ExceptionResponse(fc, code, device_id=unit, transaction=tid)
            if fc in (WRITE_SINGLE, WRITE_MULTIPLE) and unit in self.units:
                self.access.refused(f"Modbus {conn.peer} unit {unit}", f"register {pdu.address}", refused)
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
            raise Refused(ExcCodes.GATEWAY_NO_RESPONSE, f"unit {unit}")
        if fc not in (*READ, WRITE_SINGLE, WRITE_MULTIPLE):
            raise Refused(ExcCodes.ILLEGAL_FUNCTION, f"function {fc}")
        snapshot = self.snapshot()
        if snapshot is None:
            raise Refused(ExcCodes.DEVICE_BUSY, "no decision yet")
        now = self.access.clock()
        self.access.core.modbus_client_seen(now)  # LED-2
        image = self.image(unit, snapshot)
        if fc in READ:
            if not 1 <= pdu.count <= MAX_READ:
                raise Refused(ExcCodes.ILLEGAL_VALUE, f"quantity {pdu.count}")
            words = image.read(snapshot, pdu.address, pdu.count)
            if words is None:
                raise Refused(ExcCodes.ILLEGAL_ADDRESS, f"{pdu.address}+{pdu.count}")
            cls = ReadHoldingRegistersResponse if fc == 3 else ReadInputRegistersResponse
            return cls(registers=words)
        values = list(pdu.registers)
        if fc == WRITE_MULTIPLE and not (1 <= pdu.count <= MAX_WRITE and pdu.byte_count == 2 * pdu.count
                                         == getattr(pdu, "_payload_byte_count", None) == 2 * len(values)):
            raise WriteRefused(ExcCodes.ILLEGAL_VALUE, f"quantity {pdu.count} / byte count {pdu.byte_count}")
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
        raise WriteRefused(ExcCodes.ILLEGAL_FUNCTION, "write not allowed")

    def _write(self, conn: _Connection, image: UnitImage, unit: int, address: int, values: Sequence[int]) -> Change:
        """Each word checked (address, range); the change as the service's write path takes it. The words of a
        string register (GX /CustomName) are one write: a StringPatch of the words written."""
        writes: list[tuple[str, str, WriteValue]] = []
        offset = 0
        while offset < len(values):
            found = image.register_at(address + offset)
            reg = None if found is None else found[0]
            if found is None or reg is None or not reg.writable or reg.target is None:
                raise WriteRefused(ExcCodes.ILLEGAL_ADDRESS, f"{address + offset} is not a writable register")
            if reg.type == "string":
                take = min(reg.words - found[1], len(values) - offset)
                writes.append((reg.name, reg.target, StringPatch(found[1], tuple(values[offset:offset + take]),
                                                                 reg.words)))
                offset += take
                continue
            value = decode_word(reg, values[offset])
            if reg.range is not None and not reg.range[0] <= value <= reg.range[1]:
                raise WriteRefused(ExcCodes.ILLEGAL_VALUE, f"{reg.name} = {value:g}")
            writes.append((reg.name, reg.target, value))
            offset += 1
        return Change(tuple(writes), source=f"Modbus {conn.peer} unit {unit}", reason="Modbus write")
