"""A free TCP port on loopback for a test server (bound and released: fine for tests on one machine)."""

from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
