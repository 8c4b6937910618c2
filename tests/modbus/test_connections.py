"""Connection policy of the Modbus server under floods (issue 12, item 8), over real sockets.

An attacker on loopback binds 127.0.0.2 as its source address; the operator's poller uses 127.0.0.1. The
contract: a poller that connects is answered within 1 s while 1,000 idle connections are held, whether they
come from another address or from the poller's own. Timings are what the poller sees (connect to answer).
"""

from __future__ import annotations

import socket
import struct
import subprocess
import time
from collections.abc import Callable

import pytest

from smallbms_bus.modbus.server import ModbusOptions
from tests.bms.rig import Rig
from tests.modbus.conftest import raw_request
from tests.modbus.harness import RunningServer
from tests.ports import free_port, hung_up

FLOOD = 1000
CONTRACT_S = 1.0  # the contract; measured times are in the milliseconds
READ_BLOCK_A = struct.pack(">BHH", 3, 0, 2)


def flood(port: int, n: int, source: str) -> list[socket.socket]:
    """n connections from `source` that never send anything (connect-and-hold)."""
    held = []
    for _ in range(n):
        sock = socket.socket()
        sock.settimeout(10)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        held.append(sock)
    return held


def wait_accepted(running: RunningServer, total: int, timeout: float = 20.0) -> None:
    """Until the server has taken every connection of the flood off its accept queue (its own count)."""
    stats, deadline = running.server.stats, time.monotonic() + timeout
    while stats.connections_total + stats.connections_refused < total:
        assert time.monotonic() < deadline, f"{stats.connections_total + stats.connections_refused} of {total} taken"
        time.sleep(0.02)


def settle(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "not reached"
        time.sleep(0.02)


def poll_once(port: int, source: str = "127.0.0.1", sock: socket.socket | None = None) -> float:
    """Connect (unless `sock`), read two registers; the seconds from connect to answer."""
    started = time.monotonic()
    own = sock is None
    s = sock or socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    try:
        answer = raw_request(port, READ_BLOCK_A, sock=s)
        assert answer[:2] == bytes([3, 4]) and answer[2:4] == b"\x00\x01", answer.hex()  # map version 1
    finally:
        if own:
            s.close()
    return time.monotonic() - started


def close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()


@pytest.fixture
def running():
    server = RunningServer(Rig())  # the defaults: max_connections 32, max_connections_per_address 8
    yield server
    server.close()


def test_a_poller_is_answered_within_1_s_while_another_address_holds_1000_idle_connections(running):
    held = flood(running.port, FLOOD, "127.0.0.2")
    try:
        early = poll_once(running.port)  # the flood still waits in the kernel (TCP_DEFER_ACCEPT)
        wait_accepted(running, FLOOD)
        elapsed = [early, *(poll_once(running.port) for _ in range(5))]
        assert max(elapsed) < CONTRACT_S, elapsed
        stats = running.server.stats
        # The flood keeps at most its per-address share; everything above it was evicted or, once its share was
        # full of connections that never asked anything, refused on accept: counted either way.
        options = running.server.options
        settle(lambda: stats.connections_open <= options.max_connections_per_address)  # the pollers' closes
        assert stats.connections_evicted + stats.connections_refused == FLOOD - options.max_connections_per_address
        assert stats.connections_refused > 0
    finally:
        close_all(held)


def test_a_flood_from_the_pollers_own_address_evicts_its_own_idle_connections_not_the_poller(running):
    """Same address: a polling connection is not the longest-idle (the flood never sent a request), so it
    keeps being served on the same connection; a fresh poller gets in by evicting the flood's oldest."""
    port = running.port
    steady = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        poll_once(port, sock=steady)
        held = flood(port, FLOOD, "127.0.0.1")
        try:
            wait_accepted(running, FLOOD + 1)
            assert poll_once(port, sock=steady) < CONTRACT_S  # not evicted
            elapsed = [poll_once(port) for _ in range(5)]
            assert max(elapsed) < CONTRACT_S, elapsed
            settle(lambda: running.server.stats.connections_open <= running.server.options.max_connections_per_address)
        finally:
            close_all(held)
    finally:
        steady.close()


def test_when_the_total_is_full_the_longest_idle_connection_goes_and_never_a_recent_poller():
    running = RunningServer(Rig(), ModbusOptions(port=0, max_connections=4, max_connections_per_address=4))
    try:
        port = running.port
        pollers = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
        for sock in pollers:
            poll_once(port, sock=sock)
        silent = flood(port, 1, "127.0.0.2")  # never sends: the first to go when the total is full
        wait_accepted(running, 4)
        newcomer = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.0.0.3", 0))
        poll_once(port, sock=newcomer)
        assert hung_up(silent[0])  # evicted, though pollers[0] has been idle for longer: it never asked
        for sock in (*pollers[1:], newcomer):
            poll_once(port, sock=sock)  # pollers[0] is now the longest-idle
        second = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.0.0.4", 0))
        poll_once(port, sock=second)  # everyone has polled: the longest-idle goes
        assert hung_up(pollers[0]), "the longest-idle poller was not the one evicted"
        for sock in (*pollers[1:], newcomer, second):
            poll_once(port, sock=sock)
        assert running.server.stats.connections_evicted == 2
        close_all([*pollers, newcomer, second, *silent])
    finally:
        running.close()


def test_a_connection_that_never_sends_a_request_is_closed_after_the_first_request_timeout():
    running = RunningServer(Rig(), ModbusOptions(port=0, first_request_timeout=1.0, idle_timeout=30.0))
    try:
        port = running.port
        polling = socket.create_connection(("127.0.0.1", port), timeout=5)
        poll_once(port, sock=polling)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as silent:
            silent.sendall(READ_BLOCK_A[:3])  # a partial frame is not a request
            started = time.monotonic()
            assert hung_up(silent)
            assert 0.9 <= time.monotonic() - started < 5.0
        poll_once(port, sock=polling)  # idle for longer than 1 s, but it has polled: idle_timeout applies
        assert running.server.stats.connections_no_request_closed == 1
        assert running.server.stats.connections_idle_closed == 0
        polling.close()
    finally:
        running.close()


def test_a_tls_connection_that_never_completes_its_handshake_is_closed_after_the_first_request_timeout(tmp_path):
    """Over TLS a connection is only the server's once the handshake is done; the handshake gets the same
    first_request_timeout (asyncio's default is 60 s), so connect-and-hold costs no more on the TLS port."""
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out",
                    "server.pem", "-days", "2", "-subj", "/CN=127.0.0.1"], cwd=tmp_path, check=True,
                   capture_output=True)
    options = ModbusOptions(port=None, tls_port=free_port(), tls_cert=str(tmp_path / "server.pem"),
                            tls_key=str(tmp_path / "server.key"), first_request_timeout=1.0)
    running = RunningServer(Rig(), options)
    try:
        with socket.create_connection(("127.0.0.1", options.tls_port), timeout=10) as silent:
            started = time.monotonic()
            assert hung_up(silent)
            assert 0.9 <= time.monotonic() - started < 5.0
    finally:
        running.close()


def test_accepted_connections_have_tcp_nodelay_as_asyncio_sets_it(running):
    """Our listening sockets must be IPPROTO_TCP ones: asyncio only sets TCP_NODELAY on those, and without it
    pipelined answers wait for delayed ACKs (a slow-reader campaign took 4x longer to settle)."""
    with socket.create_connection(("127.0.0.1", running.port), timeout=5) as sock:
        poll_once(running.port, sock=sock)
        (conn,) = running.server.connections
        assert conn.transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
