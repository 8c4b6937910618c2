"""`smallbms-bus status` against servers that misbehave: exit 1 with one line, never a traceback (issue 12, item 9).

Each server is a real TCP listener on loopback that does one bad thing; the command runs as a real subprocess.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest

CMD = [sys.executable, "-m", "smallbms_bus.cli", "status"]
Behaviour = Callable[[socket.socket], None]


def _reset(conn: socket.socket) -> None:
    """Close with RST instead of FIN: what a server that refuses a client (or a full listener) does."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def _read_request(conn: socket.socket) -> bytes:
    conn.settimeout(5)
    return conn.recv(260)


def reset_on_accept(conn: socket.socket) -> None:
    _reset(conn)


def reset_after_request(conn: socket.socket) -> None:
    _read_request(conn)
    _reset(conn)


def close_on_accept(conn: socket.socket) -> None:
    conn.close()  # the request then meets a closed socket: the client sees the FIN or, as often, an RST


def close_after_request(conn: socket.socket) -> None:
    _read_request(conn)
    conn.close()


def never_answers(conn: socket.socket) -> None:
    _read_request(conn)
    time.sleep(8)
    conn.close()


def speaks_http(conn: socket.socket) -> None:
    _read_request(conn)
    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    time.sleep(3)
    conn.close()


def binary_garbage(conn: socket.socket) -> None:
    _read_request(conn)
    conn.sendall(bytes(range(256)) * 4)
    time.sleep(3)
    conn.close()


def short_modbus_answer(conn: socket.socket) -> None:
    """Modbus-shaped: the right transaction id and function, but one register where dozens were asked for."""
    while request := _read_request(conn):
        tid, _, _, unit, fc = struct.unpack(">HHHBB", request[:8])
        pdu = struct.pack(">BBH", fc, 2, 0x1234)
        conn.sendall(struct.pack(">HHHB", tid, 0, len(pdu) + 1, unit) + pdu)


def trickles(conn: socket.socket) -> None:
    """Slow: a valid-looking header, one byte every half second, never a whole answer within the timeout."""
    request = _read_request(conn)
    header = request[:2] + b"\x00\x00\x00\xff" + request[6:8]
    for byte in header:
        conn.sendall(bytes([byte]))
        time.sleep(0.5)
    conn.close()


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[Callable[[Behaviour], int]]:
    listeners: list[socket.socket] = []

    def start(behaviour: Behaviour) -> int:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listeners.append(listener)

        def serve() -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                threading.Thread(target=_guard, args=(behaviour, conn), daemon=True).start()

        threading.Thread(target=serve, daemon=True).start()
        return listener.getsockname()[1]

    yield start
    for listener in listeners:
        listener.close()


def _guard(behaviour: Behaviour, conn: socket.socket) -> None:
    with contextlib.suppress(OSError):  # the client gave up first: nothing to do
        behaviour(conn)


def _one_line_failure(result: subprocess.CompletedProcess[str], code: int) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("status: "), result.stderr
    assert result.stdout == ""
    return lines[0]


@pytest.mark.parametrize(("behaviour", "says"), [
    (reset_on_accept, "connection reset"),
    (reset_after_request, "connection reset"),
    (close_on_accept, ("closed the connection", "connection reset")),
    (close_after_request, "closed the connection"),
    (never_answers, "no answer within 1 s"),
    (speaks_http, "not a Modbus answer"),
    (binary_garbage, "not a Modbus answer"),
    (short_modbus_answer, "not a Modbus answer"),
    (trickles, "no answer within 1 s"),
])
def test_status_against_a_misbehaving_server_is_one_line_and_exit_1(server, behaviour, says):
    port = server(behaviour)
    started = time.monotonic()
    result = subprocess.run([*CMD, "--port", str(port), "--timeout", "1"], capture_output=True, text=True,
                            timeout=60)
    elapsed = time.monotonic() - started
    line = _one_line_failure(result, 1)
    assert f"127.0.0.1:{port}" in line, line
    assert any(s in line for s in ((says,) if isinstance(says, str) else says)), line
    assert elapsed < 30, elapsed  # bounded by --timeout and one retry, plus interpreter start on a loaded machine


def test_status_when_nothing_listens_is_one_line_and_exit_1():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connect is refused
        result = subprocess.run([*CMD, "--port", str(port), "--timeout", "1"], capture_output=True, text=True,
                                timeout=60)
    line = _one_line_failure(result, 1)
    assert f"no Modbus server at 127.0.0.1:{port}" in line


@pytest.mark.parametrize(("args", "option"), [
    (["--port", "70000"], "--port"),
    (["--port", "-1"], "--port"),
    (["--unit", "300"], "--unit"),
    (["--unit", "-1"], "--unit"),
    (["--timeout", "0"], "--timeout"),
    (["--timeout", "-1"], "--timeout"),
    (["--timeout", "nan"], "--timeout"),
    (["--timeout", "inf"], "--timeout"),
])
def test_status_bad_arguments_exit_2_naming_the_option(args, option):
    result = subprocess.run([*CMD, *args], capture_output=True, text=True, timeout=60)
    line = _one_line_failure(result, 2)
    assert option in line, line


def test_status_with_an_unresolvable_host_is_one_line_and_exit_1():
    result = subprocess.run([*CMD, "--host", "bogus..host", "--timeout", "1"], capture_output=True, text=True,
                            timeout=60)
    line = _one_line_failure(result, 1)
    assert "bogus..host" in line
