"""`GET /metrics` over HTTP/1.1 on the service's event loop; the encoding on a paced worker thread (see
`MetricsServer`)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import gc
import gzip
import itertools
import logging
import time
from typing import Any

from smallbms_bus.config import defaults
from smallbms_bus.connections import (
    ACCEPT_BATCH,
    RETRY_BIND_S,
    ConnectionPolicy,
    Limits,
    RateLimitedLog,
    abort_with_reset,
    address_of,
    bytes_waiting,
    fd_budget,
    guarded_sockets,
    keep_binding,
    quiet_accept_errors,
    release_fds,
)
from smallbms_bus.metrics.catalog import CLOSE_REASONS
from smallbms_bus.metrics.collection import BmsCollector, Snapshot, Watched, process_metrics
from smallbms_bus.metrics.exposition import CONTENT_TYPE, TextEncoder

log = logging.getLogger(__package__)  # "smallbms_bus.metrics", the name operators' log filters know

# -- serving ------------------------------------------------------------------------------------------------
SLICE_S = 0.0005  # encode this long, then pause: the GIL goes to whoever waits for it (the event loop, the bus)
PAUSE_S = 0.0001
MAX_HEAD_BYTES = 16_384



class _HttpConnection:
    """One HTTP connection as the connection policy sees it."""

    __slots__ = ("address", "reader", "writer")

    def __init__(self, address: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.address, self.reader, self.writer = address, reader, writer

    def waiting(self) -> bool:
        # StreamReader has no public length: its buffer holds what arrived and was not yet parsed.
        return bool(getattr(self.reader, "_buffer", b"")) or bytes_waiting(self.writer.transport) > 0


def limits_of(section: dict[str, Any]) -> Limits:
    """The [metrics] keys of the connection policy (config.py holds their defaults)."""
    return Limits(section["max_connections"], section["max_connections_per_address"],
                  section["first_request_timeout"], section["idle_timeout"])


class MetricsServer:
    """`GET /metrics` for Prometheus, served next to the BMS with as little event-loop stall as possible.

    Every way of serving in the service's process costs the event loop something, because building and
    encoding 1,700 series is pure Python (about 4.5 ms of CPU for 800 cells) and holds the GIL. The
    candidates, measured with benchmarks/metrics.py (a thread posting a callback to the loop every 2 ms, as
    the bus receiver does; delay until it runs, p99, while scraping every 50 ms; 2-core VM):

    - encoding on the loop: the loop is blocked for the whole encoding and gzip (p99 ~7 ms);
    - prometheus-client's `start_http_server` (a thread, its generate_latest): p99 ~12 ms; its encoder
      takes ~14 ms of GIL per scrape, and a waiting thread only gets the GIL every switch interval (5 ms);
    - this server's encoding on a worker thread without pauses: p99 ~5.5 ms (the switch interval again);
    - this server as configured: p99 ~0.8 ms, against ~0.5 ms with no scrapes at all. Chosen.

    How it is split, and why:
    - The HTTP side is an asyncio server on the service's own loop: accepting and parsing a request
      costs microseconds and needs no thread of its own.
    - The snapshot is taken on the loop (the core's thread): a handful of references and small dict
      copies, cheap, and it can never see the core half-way through an evaluation.
    - The families are built and encoded on one worker thread that sleeps `PAUSE_S` after every `SLICE_S`
      of work. A real sleep makes the GIL change hands: a thread that only released and re-took it
      (time.sleep(0)) would take it straight back, and the loop or the bus receiver would wait the whole
      switch interval. The pauses add ~1.5 ms to a scrape (p50 ~8.5 ms over HTTP with gzip, 800 cells).
    - gzip (Prometheus asks for it) runs on the same thread; zlib releases the GIL while compressing.
    - The text format 0.0.4 is always served: prometheus-client 0.26's OpenMetrics encoder is 1.6x slower
      than its text encoder and Prometheus reads both; `TextEncoder` writes exactly what generate_latest
      would, from cached label strings, 3x faster.
    - `start` freezes the objects alive after start-up out of the garbage collector's reach (see there).

    A port that cannot be bound is logged and retried every RETRY_BIND_S; the BMS keeps running
    (Prometheus then reports the target down, which is what the exporter-down alert is for).

    Connections follow smallbms_bus/connections.py, as Modbus does: a newcomer is taken and, over
    `[metrics] max_connections_per_address` or `max_connections`, the longest-idle connection (one that never
    sent a complete request head first) is hung up. A connection gets `first_request_timeout` for its first
    request head and `idle_timeout` after each; a client that does not read its answer is hung up by the same
    clock. `limits` are the `[metrics]` keys (`limits_of`), their defaults when not given.
    """

    def __init__(self, service: Watched, host: str, port: int, *, slice_s: float = SLICE_S,
                 pause_s: float = PAUSE_S, limits: Limits | None = None) -> None:
        self.service = service
        self.host, self.port = host, port
        self.slice_s, self.pause_s = slice_s, pause_s
        self.collector = BmsCollector(service)
        self.encoder = TextEncoder()
        self.extra = process_metrics()  # a registry of its own, not prometheus-client's global one
        self.scrapes = 0
        self.encode_seconds = 0.0
        self._servers: list[asyncio.base_events.Server] = []  # one per address the host resolves to
        self._retry: asyncio.Task[None] | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="metrics")
        self.policy = ConnectionPolicy(limits or limits_of(defaults()["metrics"]))  # the [metrics] keys
        self.connections_total = 0
        self.closed: dict[str, int] = dict.fromkeys(CLOSE_REASONS, 0)
        self._quiet = RateLimitedLog(log)
        self._reaper: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def bound(self) -> tuple[str, int] | None:
        """(host, port) actually listened on, or None while not bound."""
        if not self._servers or not self._servers[0].sockets:
            return None
        host, port = self._servers[0].sockets[0].getsockname()[:2]
        return host, port

    @property
    def url(self) -> str:
        host, port = self.bound or (self.host, self.port)
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"

    async def start(self) -> None:
        """Listen now; if the port cannot be bound, log why and keep retrying in the background."""
        # The objects alive after start-up (modules, the DBC: ~65k) never die; a full collection walking them
        # took 11 ms with the GIL held, and a scrape's thousands of short-lived objects trigger collections.
        # Frozen, they are skipped: a full collection drops to microseconds (measured; benchmarks/metrics.py).
        gc.freeze()
        quiet_accept_errors(asyncio.get_running_loop())
        limits = self.policy.limits
        granted = fd_budget(self, "metrics.max_connections", limits.max_connections)
        self.policy.limits = Limits(granted, *dataclasses.astuple(limits)[1:])
        self._reaper = asyncio.get_running_loop().create_task(self._reap())
        try:
            await self._bind()
        except OSError as error:
            log.error("metrics: cannot listen on %s:%s (%s); retrying every %g s, the BMS runs on",
                      self.host, self.port, error.strerror or error, RETRY_BIND_S)
            self._retry = asyncio.get_running_loop().create_task(keep_binding(self._bind, "metrics"))

    async def _bind(self) -> None:
        sockets = await guarded_sockets(self.host, self.port, self._refuse)
        try:
            while sockets:
                self._servers.append(await asyncio.start_server(self._connection, sock=sockets[0], limit=MAX_HEAD_BYTES,
                                                                backlog=ACCEPT_BATCH))
                sockets.pop(0)
        except OSError:
            for sock in sockets:
                sock.close()
            await self._close_servers()
            raise
        log.info("metrics: serving %s", self.url)

    async def close(self) -> None:
        self._closing = True
        for task in (self._retry, self._reaper):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await self._close_servers()
        for conn in list(self.policy):  # idle keep-alive connections: their handlers end on the close
            conn.writer.close()  # type: ignore[attr-defined]
        release_fds(self)
        await asyncio.get_running_loop().run_in_executor(None, self._pool.shutdown, True)

    async def _close_servers(self) -> None:
        for server in self._servers:
            server.close()
            await server.wait_closed()
        self._servers.clear()

    def _refuse(self, address: str) -> bool:
        """GuardedSocket's question for a newcomer that has sent nothing: hang it up on accept?"""
        if not self.policy.crowded(address):
            return False
        self.closed["refused"] += 1
        self._quiet("refused", logging.WARNING, "metrics: refused a connection from %s that sent nothing: it already "
                    "holds its share and one of them never sent a request either (metrics.max_connections_per_address)",
                    address)
        return True

    # -- HTTP ------------------------------------------------------------------------------------------------
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closing:
            writer.close()
            return
        conn = _HttpConnection(address_of(writer.get_extra_info("peername")), reader, writer)
        for victim in self.policy.admit(conn):
            self._drop(victim, "evicted", f"for a newcomer from {conn.address}")  # type: ignore[arg-type]
        self.connections_total += 1
        try:
            while not self._closing and await self._request(conn, reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the client went away, sent garbage, or was hung up (idle, evicted): nothing to answer
        except RuntimeError:  # the encoding thread was shut down under a request: the service is stopping
            if not self._closing:
                raise
        finally:
            self.policy.forget(conn)
            writer.close()

    def _drop(self, conn: _HttpConnection, reason: str, detail: str) -> None:
        """Hang up at once (the policy already forgot it)."""
        self.closed[reason] += 1
        key = {"evicted": "max_connections / max_connections_per_address", "no_request": "first_request_timeout",
               "idle_timeout": "idle_timeout"}[reason]
        self._quiet(reason, logging.WARNING if reason == "evicted" else logging.INFO,
                    "metrics: closing a connection from %s: %s %s (metrics.%s)", conn.address,
                    reason.replace("_", " "), detail, key)
        if conn.writer.transport is not None:
            abort_with_reset(conn.writer.transport)

    async def _reap(self) -> None:
        limits = self.policy.limits
        while True:
            await asyncio.sleep(min(limits.first_request_timeout / 4, limits.idle_timeout / 4, 1.0))
            for conn, why in self.policy.expired():
                reason = "no_request" if why == "no_request" else "idle_timeout"
                timeout = limits.first_request_timeout if why == "no_request" else limits.idle_timeout
                self._drop(conn, reason, f"for {timeout:g} s")  # type: ignore[arg-type]
            self._quiet.flush()

    async def _request(self, conn: _HttpConnection, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> bool:
        """Answer one request; True to keep the connection open for the next. How long the client may take
        to send it is the connection policy's timeouts (the reaper hangs up)."""
        head = await reader.readuntil(b"\r\n\r\n")
        self.policy.request(conn)
        request, *lines = head.decode("latin-1").split("\r\n")
        parts = request.split()
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines if line)}
        if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or "content-length" in headers \
                or "transfer-encoding" in headers:  # Prometheus sends a plain GET: anything else is refused
            await self._send(writer, 400, b"bad request\n", "text/plain; charset=utf-8", close=True)
            return False
        method, target, version = parts
        keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        path = target.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            await self._send(writer, 405, b"only GET\n", "text/plain; charset=utf-8", close=not keep,
                             extra="Allow: GET, HEAD\r\n")
        elif path == "/metrics":
            gzipped = "gzip" in headers.get("accept-encoding", "")
            body = await self.render(gzipped)
            await self._send(writer, 200, body, CONTENT_TYPE, close=not keep, head=method == "HEAD",
                             extra="Content-Encoding: gzip\r\n" if gzipped else "")
        elif path == "/":
            await self._send(writer, 200, b'<html><body><a href="/metrics">/metrics</a></body></html>\n',
                             "text/html; charset=utf-8", close=not keep, head=method == "HEAD")
        else:
            await self._send(writer, 404, b"not found: try /metrics\n", "text/plain; charset=utf-8",
                             close=not keep, head=method == "HEAD")
        return keep

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, status: int, body: bytes, content_type: str, *, close: bool,
                    head: bool = False, extra: str = "") -> None:
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}[status]
        writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
                     f"Content-Length: {len(body)}\r\n{extra}{'Connection: close' + chr(13) + chr(10) if close else ''}"
                     "\r\n".encode("latin-1") + (b"" if head else body))
        await writer.drain()

    # -- encoding --------------------------------------------------------------------------------------------
    async def render(self, gzipped: bool = False) -> bytes:
        """One scrape: the snapshot here on the loop, the encoding on the metrics thread."""
        snapshot = Snapshot.of(self.service)
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._encode, snapshot, gzipped)

    def _encode(self, snapshot: Snapshot, gzipped: bool) -> bytes:
        started = time.perf_counter()
        pace = _Pacer(self.slice_s, self.pause_s)
        families = itertools.chain(self.collector.families(snapshot, pace), self.extra.collect())
        parts = []
        for piece in self.encoder.pieces(families):
            parts.append(piece)
            pace()
        body = "".join(parts).encode()
        if gzipped:
            body = gzip.compress(body, compresslevel=1, mtime=0)  # zlib releases the GIL while it compresses
        self.scrapes += 1
        self.encode_seconds = time.perf_counter() - started
        return body


class _Pacer:
    """Called often while encoding: after every `slice_s` of work, sleep `pause_s` (a real sleep hands the GIL
    over; see MetricsServer)."""

    __slots__ = ("next", "pause_s", "slice_s")

    def __init__(self, slice_s: float, pause_s: float) -> None:
        self.slice_s, self.pause_s = slice_s, pause_s
        self.next = time.perf_counter() + slice_s

    def __call__(self) -> None:
        if self.pause_s and time.perf_counter() >= self.next:
            time.sleep(self.pause_s)
            self.next = time.perf_counter() + self.slice_s


