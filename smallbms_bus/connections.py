"""Who keeps a connection slot when a server is full: the policy of the Modbus server and of /metrics.

A refused newcomer is the operator locked out: before this policy 32 idle connections made every new
Modbus poller get "connection reset" for as long as the attacker kept them. Now a newcomer is taken,
and someone else's slot is given up instead:

- per address: an address already holding `max_connections_per_address` loses its own longest-idle
  connection to its newcomer (a flood from one host only ever displaces that host's connections; a PLC
  that rebooted and left half-open connections behind gets straight back in);
- in total: at `max_connections`, the longest-idle connection of all goes.

"Longest idle" ranks, oldest first within each rank: connections that never sent a complete request and
have nothing waiting to be read; then those that never sent one but have bytes waiting (a poller that
connected a moment ago and whose first request is in the socket, not yet read: without this rank a
flood from the poller's own address would evict it before its request is read); then the others by
the time of their last complete request. A connect-and-hold attacker therefore only ever displaces
connections that never asked anything, and a poller that polls keeps its connection through any
flood. Bytes that do not complete a request do not count (a slowloris stays idle).

The one newcomer not taken: one that has sent nothing, from an address whose share is full and holds a
connection that never asked anything either. Taking it would only evict its equal, for ten times the
work of hanging it up in `GuardedSocket.accept` before asyncio builds anything (counted as refused).
The listening sockets also set TCP_DEFER_ACCEPT (Modbus, HTTP and TLS clients speak first): a poller
is handed over with its request already readable, a connect-and-hold flood waits in the kernel for a
second without costing a descriptor, and a flood that re-opens what we drop is slowed tenfold.
Dropped connections are reset, not closed with a FIN, so no TIME_WAIT piles up on our side.

Timeouts: a connection with no complete request `first_request_timeout` after connecting is closed (a
connect-and-hold attacker costs little); one that has polled is closed `idle_timeout` after its last
complete request.

What it cannot do: an attacker on more addresses than max_connections / max_connections_per_address that
keeps sending valid requests more often than the operator's poller competes with it for slots. A
firewall, or binding the server to the interface the poller is on, is the answer to that.

File descriptors: every connection is one, and asyncio holds up to about IN_FLIGHT_FDS more while it
accepts and closes a flood. `fd_budget` raises the process's soft RLIMIT_NOFILE toward its hard limit
when the configured caps need it, and otherwise lowers the cap (WARNING naming the key), so that a flood
can never take the descriptors the bus, the relay board and the store need. A failed accept (EMFILE: the
process is out of descriptors anyway) is logged once per RATE_S by `quiet_accept_errors`; asyncio then
pauses that listener for 1 s, the BMS keeps running.

Owner: the event loop's thread; nothing here is touched from another thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import resource
import socket
import struct
import termios
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger(__name__)

RATE_S = 10.0  # at most one log line per kind of event per this many seconds during a flood
RESERVE_FDS = 128  # descriptors kept for the service itself (bus, relay board, store, log, listeners, re-opens)
# asyncio accepts up to its `backlog` connections per turn of the loop, and each holds a descriptor for a few turns
# (accept, transport, connection_made, eviction, close) before a flood's newcomer-evicts-oldest settles: measured
# 888 descriptors in flight with backlog 1024 under a re-connecting flood. So asyncio gets a small batch, and the
# kernel's queue (where a waiting connection costs no descriptor) is deep: a burst waits there instead of having
# its SYNs dropped, which would cost a poller a 1 s retransmission.
ACCEPT_BATCH = 64
RETRY_BIND_S = 10.0  # a listener whose port is taken tries again this often; the BMS runs on meanwhile
ACCEPT_QUEUE = 1024
# Reserved once for the process (the flood test: at most 150 descriptors in all, 17 before it, caps 32 + 16).
IN_FLIGHT_FDS = 4 * ACCEPT_BATCH
MIN_GRANT = 16  # connections a server keeps even when the limit is too low for its cap (then EMFILE can happen)
REFUSALS_PER_ACCEPT = 16  # newcomers GuardedSocket.accept may hang up before it lets the loop run again
# Modbus, HTTP and TLS clients speak first. With TCP_DEFER_ACCEPT the kernel hands a connection over when its first
# bytes arrive, or after this long without them: a poller is accepted with its request already readable (so it is
# never mistaken for a silent newcomer), while a connect-and-hold flood waits in the kernel, costing no descriptor.
DEFER_ACCEPT_S = 1
_LINGER_RESET = struct.pack("ii", 1, 0)
SELECT_LIMIT = 1024  # select()-based libraries (pyserial) cannot use a descriptor at or above FD_SETSIZE


class Slot(Protocol):
    """One connection as the policy sees it."""

    address: str  # the peer's IP address (no port): the unit of the per-address cap

    def waiting(self) -> bool:
        """Bytes have arrived that the server has not read yet (see `bytes_waiting`)."""
        ...


@dataclass(frozen=True)
class Limits:
    max_connections: int
    max_connections_per_address: int
    first_request_timeout: float
    idle_timeout: float


class ConnectionPolicy:
    """The slots of one server (all its listeners). `admit` takes a newcomer and says who must go."""

    def __init__(self, limits: Limits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.clock = clock
        self._fresh: OrderedDict[Slot, float] = OrderedDict()  # no complete request yet: connect time, oldest first
        self._polled: OrderedDict[Slot, float] = OrderedDict()  # last complete request, longest-idle first
        self._by_address: dict[str, dict[Slot, None]] = {}

    def __len__(self) -> int:
        return len(self._fresh) + len(self._polled)

    def __contains__(self, slot: object) -> bool:
        return slot in self._fresh or slot in self._polled

    def __iter__(self) -> Iterator[Slot]:
        return iter([*self._fresh, *self._polled])

    def admit(self, slot: Slot) -> list[Slot]:
        """Register a newcomer; return the connections it displaces (forgotten here; the caller hangs them up)."""
        victims: list[Slot] = []
        per_address = min(self.limits.max_connections_per_address, self.limits.max_connections)
        same = self._by_address.get(slot.address)
        while same and len(same) >= per_address:
            victims.append(self._forget(self._longest_idle(same)))
        while len(self) >= self.limits.max_connections:
            victims.append(self._forget(self._longest_idle(None)))
        self._fresh[slot] = self.clock()
        self._by_address.setdefault(slot.address, {})[slot] = None
        return victims

    def request(self, slot: Slot) -> None:
        """A complete request arrived on `slot`: it is now the most recently active."""
        if slot in self._fresh:
            del self._fresh[slot]
        elif slot not in self._polled:
            return  # already forgotten (evicted or closed)
        self._polled[slot] = self.clock()
        self._polled.move_to_end(slot)

    def crowded(self, address: str) -> bool:
        """A newcomer from `address` that has sent nothing would only displace its equal: the address holds its
        full share and one of its connections never asked anything and has nothing waiting either. Such a
        newcomer is refused on accept (GuardedSocket), for a tenth of what taking and evicting costs."""
        same = self._by_address.get(address)
        per_address = min(self.limits.max_connections_per_address, self.limits.max_connections)
        return same is not None and len(same) >= per_address and \
            any(slot in self._fresh and not slot.waiting() for slot in same)

    def forget(self, slot: Slot) -> None:
        if slot in self:
            self._forget(slot)

    def expired(self) -> list[tuple[Slot, str]]:
        """Connections past their timeout, forgotten here, with why: "no_request" or "idle"."""
        now, out = self.clock(), []
        for table, timeout, why in ((self._fresh, self.limits.first_request_timeout, "no_request"),
                                    (self._polled, self.limits.idle_timeout, "idle")):
            for slot, since in list(table.items()):  # oldest first: stop at the first one still in time
                if now - since <= timeout:
                    break
                out.append((self._forget(slot), why))
        return out

    def idle_for(self, slot: Slot) -> float:
        since = self._fresh.get(slot, self._polled.get(slot))
        return 0.0 if since is None else self.clock() - since

    def _longest_idle(self, among: dict[Slot, None] | None) -> Slot:
        if among is None:
            fresh: list[Slot] = list(self._fresh)  # oldest first
        else:
            fresh = sorted((s for s in among if s in self._fresh), key=self._fresh.__getitem__)
        for slot in fresh:
            if not slot.waiting():
                return slot
        if fresh:
            return fresh[0]
        if among is None:
            return next(iter(self._polled))
        return min(among, key=self._polled.__getitem__)

    def _forget(self, slot: Slot) -> Slot:
        self._fresh.pop(slot, None)
        self._polled.pop(slot, None)
        same = self._by_address.get(slot.address)
        if same is not None:
            same.pop(slot, None)
            if not same:
                del self._by_address[slot.address]
        return slot


def bytes_waiting(transport: Any) -> int:
    """Bytes in the kernel's receive buffer of a transport's socket, not yet read."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    return 0 if sock is None else fd_bytes_waiting(sock.fileno())


def abort_with_reset(transport: Any) -> None:
    """Hang up now, with a reset rather than a FIN: the service keeps no TIME_WAIT entry for a connection it
    dropped (a re-connecting flood leaves tens of thousands, and a poller's new port from the same address could
    meet one and wait for a SYN retransmission), and answers a client never read cannot hold the descriptor."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()


def fd_bytes_waiting(fd: int) -> int:
    """FIONREAD: one syscall."""
    try:
        return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
    except (OSError, ValueError):
        return 0


class GuardedSocket(socket.socket):
    """A listening socket whose accept() hangs up, before asyncio builds a transport and a protocol for it, a
    newcomer that `refuse(address)` says is crowded out and that has sent nothing yet. Under a re-connecting
    flood that is what most newcomers are; taking each and evicting its equal cost ~10x more, and a poller
    waits in the kernel's accept queue behind all of them. asyncio calls accept() on this object (it is the
    `sock` given to create_server), and its listen(ACCEPT_BATCH) keeps the queue ACCEPT_QUEUE deep."""

    def __init__(self, family: int, refuse: Callable[[str], bool]) -> None:
        # IPPROTO_TCP, not 0: accepted sockets inherit it, and asyncio sets TCP_NODELAY only on proto 6 (without
        # it Nagle and delayed ACKs stall pipelined answers for 40 ms at a time)
        super().__init__(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.refuse = refuse

    def listen(self, backlog: int = ACCEPT_QUEUE) -> None:
        super().listen(max(backlog, ACCEPT_QUEUE))

    def accept(self) -> tuple[socket.socket, Any]:
        for _ in range(REFUSALS_PER_ACCEPT):
            fd, peer = self._accept()  # type: ignore[attr-defined]  # BlockingIOError when the queue is empty
            sock = socket.socket(self.family, self.type, self.proto, fileno=fd)
            if fd_bytes_waiting(fd) == 0 and self.refuse(address_of(peer)):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)  # see abort_with_reset
                sock.close()
                continue
            return sock, peer
        raise BlockingIOError(errno.EAGAIN, "more to refuse: next turn of the loop")


async def guarded_sockets(host: str, port: int, refuse: Callable[[str], bool]) -> list[GuardedSocket]:
    """Bound GuardedSockets for every address `host` resolves to, as asyncio's create_server binds them
    (SO_REUSEADDR; IPv6 sockets IPv6-only)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)
    sockets: list[GuardedSocket] = []
    try:
        for family, address in dict.fromkeys((info[0], info[4]) for info in infos):
            sock = GuardedSocket(family, refuse)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if hasattr(socket, "TCP_DEFER_ACCEPT"):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, DEFER_ACCEPT_S)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def address_of(peername: Any) -> str:
    """The per-address key of a peer: its IP address, an IPv4-mapped IPv6 address as IPv4."""
    if not peername:
        return "?"
    host = str(peername[0]).split("%", 1)[0]
    return host.removeprefix("::ffff:") if host.startswith("::ffff:") and "." in host else host


class RateLimitedLog:
    """The first event of a kind is logged at once; later ones within RATE_S are counted, and the latest of them
    is logged with the count once RATE_S has passed (at the next event or `flush`), so a flood of 100,000
    connections writes a line per RATE_S, not 100,000."""

    def __init__(self, logger: logging.Logger, clock: Callable[[], float] = time.monotonic) -> None:
        self.logger, self.clock = logger, clock
        self._last: dict[str, float] = {}
        self._held: dict[str, tuple[int, int, str, tuple[Any, ...]]] = {}  # kind -> (count, level, message, args)

    def __call__(self, kind: str, level: int, message: str, *args: Any) -> None:
        if self.clock() - self._last.get(kind, -RATE_S) < RATE_S:
            self._held[kind] = (self._held.get(kind, (0,))[0] + 1, level, message, args)
            return
        count = self._held.pop(kind, (0,))[0]
        self._emit(kind, level, message, args, f" (and {count} more like it in the last {RATE_S:g} s)" if count else "")

    def flush(self) -> None:
        """Log what was held back for longer than RATE_S (the reapers call this: a flood's last line comes too)."""
        for kind, (count, level, message, args) in list(self._held.items()):
            if self.clock() - self._last[kind] >= RATE_S:
                del self._held[kind]
                suffix = f" ({count} like it in the last {RATE_S:g} s)" if count > 1 else ""
                self._emit(kind, level, message, args, suffix)

    def _emit(self, kind: str, level: int, message: str, args: tuple[Any, ...], suffix: str) -> None:
        self._last[kind] = self.clock()
        self.logger.log(level, message + suffix, *args)


# -- file descriptors ---------------------------------------------------------------------------------------
_granted: dict[int, int] = {}  # id(server) -> descriptors promised to its connections (event-loop thread)


def _open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 64  # no /proc: a typical count for the service


def fd_budget(owner: object, key: str, wanted: int) -> int:
    """How many connections `owner`, a server configured by `key` (e.g. "modbus.max_connections"), may hold:
    `wanted` if the descriptor limit allows it, after raising the soft limit toward the hard one if needed;
    else what fits but at least MIN_GRANT, with a WARNING naming the key. `release_fds(owner)` gives them back."""
    release_fds(owner)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    others = _open_fds() + RESERVE_FDS + sum(_granted.values()) + IN_FLIGHT_FDS
    need = others + wanted
    if soft != resource.RLIM_INFINITY and need > soft:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        if target > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                log.info("raised the open-file limit from %d to %d for %s = %d (the hard limit is %s)", soft, target,
                         key, wanted, "unlimited" if hard == resource.RLIM_INFINITY else hard)
                if target > SELECT_LIMIT:
                    log.warning("%s = %d lets descriptors pass %d: a serial device re-opened during a connection "
                                "flood could get one that select()-based serial libraries cannot use; keep the "
                                "connection caps below about 800 in total on serial set-ups", key, wanted,
                                SELECT_LIMIT - 1)
                soft = target
            except (ValueError, OSError) as error:
                log.debug("cannot raise the open-file limit: %s", error)
    granted = wanted if soft == resource.RLIM_INFINITY else max(min(wanted, MIN_GRANT), min(wanted, soft - others))
    if granted < wanted:
        log.warning("%s = %d does not fit the open-file limit (%d, hard %s): serving at most %d connections; "
                    "raise LimitNOFILE= in the systemd unit or lower %s", key, wanted, soft,
                    "unlimited" if hard == resource.RLIM_INFINITY else hard, granted, key)
    _granted[id(owner)] = granted
    return granted


def release_fds(owner: object) -> None:
    _granted.pop(id(owner), None)


_ACCEPT_FAILED = "socket.accept() out of system resource"


def quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """asyncio logs a failed accept (EMFILE, ENFILE, ENOBUFS, ENOMEM) with a traceback and retries that listener
    1 s later: correct, but a traceback a second fills the journal. Installed once per loop: one WARNING per
    RATE_S instead; every other loop error goes to the handler that was there before."""
    if getattr(loop, "_smallbms_accept_guard", False):
        return
    previous = loop.get_exception_handler()
    limited = RateLimitedLog(log)

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") == _ACCEPT_FAILED:
            error = context.get("exception")
            limited("accept", logging.WARNING, "cannot accept a connection: %s (open-file limit %d); asyncio "
                    "retries in 1 s, the BMS keeps running", error,
                    resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        elif previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
    loop._smallbms_accept_guard = True  # type: ignore[attr-defined]


async def keep_binding(bind: Callable[[], Awaitable[None]], what: str) -> None:
    """Retry `bind` every RETRY_BIND_S until it succeeds (a task of the listener that could not bind at start)."""
    while True:
        await asyncio.sleep(RETRY_BIND_S)
        try:
            await bind()
            return
        except OSError as error:
            log.debug("%s: bind retry failed: %s", what, error)
