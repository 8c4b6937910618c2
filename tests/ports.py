"""Socket helpers for tests: a free TCP port on loopback (bound and released: fine on one machine), exact reads."""

from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly n bytes from a stream socket (a Modbus answer), or ConnectionError when the peer hangs up."""
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed by the server")
        data += chunk
    return data


def hung_up(sock: socket.socket) -> bool:
    """True when the peer has closed the connection: an orderly close, or a reset (the service resets the connections
    it drops for its connection policy: evicted, refused, timed out)."""
    try:
        return sock.recv(16) == b""
    except ConnectionResetError:
        return True
