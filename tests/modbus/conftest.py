from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import pytest

from smallbms_bus.modbus.server import ModbusOptions
from tests.bms.rig import Rig
from tests.modbus.harness import RunningServer
from tests.ports import recv_exact


@pytest.fixture
def server() -> Iterator[RunningServer]:
    """A learned 2S2P bank of 12.8 V 100 Ah batteries behind a real Modbus TCP server."""
    # The `client` fixture connects before the test body, which may first run minutes of simulated time (several
    # real seconds on a loaded machine) before its first request: the real-time first-request/idle timeouts must
    # not close it meanwhile. Those timeouts are tested with servers of their own (test_connections.py).
    options = ModbusOptions(port=0, tls_port=0, first_request_timeout=3600.0, idle_timeout=3600.0)
    running = RunningServer(Rig(series=2, parallel=2), options)
    yield running
    running.close()


@pytest.fixture
def client(server: RunningServer):
    c = server.client()
    yield c
    c.close()


def raw_request(port: int, pdu: bytes, unit: int = 1, tid: int = 7, sock: socket.socket | None = None) -> bytes:
    """One MBAP frame sent over a plain socket, the answer's PDU returned (for requests pymodbus won't build)."""
    own = sock is None
    s = sock or socket.create_connection(("127.0.0.1", port), timeout=3)
    try:
        s.sendall(struct.pack(">HHHB", tid, 0, len(pdu) + 1, unit) + pdu)
        head = recv_exact(s, 7)
        rtid, _, length, runit = struct.unpack(">HHHB", head)
        assert (rtid, runit) == (tid, unit)
        return recv_exact(s, length - 1)
    finally:
        if own:
            s.close()

