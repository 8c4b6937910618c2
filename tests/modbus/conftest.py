from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import pytest

from tests.bms.rig import Rig
from tests.modbus.harness import RunningServer
from tests.ports import recv_exact


@pytest.fixture
def server() -> Iterator[RunningServer]:
    """A learned 2S2P bank of 12.8 V 100 Ah batteries behind a real Modbus TCP server."""
    running = RunningServer(Rig(series=2, parallel=2))
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

