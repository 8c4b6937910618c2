"""Modbus/TCP Security (TLS with client certificates) and a fuzz run against the live server."""

from __future__ import annotations

import ipaddress
import random
import socket
import ssl
import struct
import subprocess
from pathlib import Path

import pytest
from pymodbus.client import ModbusTlsClient

from smallbms_bus.modbus.server import ModbusOptions, ModbusServer
from tests.bms.rig import Rig
from tests.modbus.harness import RunningServer
from tests.ports import free_port, recv_exact

EVERYONE = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate signed by the CA."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=test CA", cwd=d)
    for name, extra in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "extendedKeyUsage=clientAuth")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)
        (d / f"{name}.ext").write_text(extra + "\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)
    return d


def _tls_client(pki: Path, port: int, with_certificate: bool) -> ModbusTlsClient:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.pem"))
    ctx.check_hostname = False  # pymodbus passes no server name; the chain is still verified against the CA
    if with_certificate:
        ctx.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
    client = ModbusTlsClient("127.0.0.1", port=port, sslctx=ctx, timeout=3, retries=0)
    assert client.connect()
    return client


def test_over_tls_only_clients_with_a_verified_certificate_may_write(pki):
    options = ModbusOptions(port=0, tls_port=free_port(), allow_write_from=EVERYONE, tls_cert=str(pki / "server.pem"),
                            tls_key=str(pki / "server.key"), tls_client_ca=str(pki / "ca.pem"))
    running = RunningServer(Rig(series=2), options)
    try:
        tls_port = options.tls_port
        anonymous = _tls_client(pki, tls_port, with_certificate=False)
        assert anonymous.read_holding_registers(0, count=40, device_id=1).registers[0] == 1
        assert anonymous.write_register(105, 0, device_id=1).exception_code == 1
        assert running.rig.core.mode_on
        authenticated = _tls_client(pki, tls_port, with_certificate=True)
        assert not authenticated.write_register(105, 0, device_id=1).isError()
        assert not running.rig.core.mode_on
        plain = running.client()  # the plain port: nobody is authenticated there
        assert plain.write_register(105, 1, device_id=1).exception_code == 1
        assert running.server.stats.refused_writes == 2
        for c in (anonymous, authenticated, plain):
            c.close()
    finally:
        running.close()


def test_an_unreadable_tls_certificate_is_a_configuration_error_naming_the_key(tmp_path):
    options = ModbusOptions(tls_cert=str(tmp_path / "missing.pem"), tls_key=str(tmp_path / "missing.key"))
    with pytest.raises(ValueError, match=r"modbus\.tls_cert"):
        ModbusServer(options, access=None)  # type: ignore[arg-type]



def _state(core) -> tuple:
    h = core.history
    soc = core.monitor.soc(core.bank.topology().bank_capacity_ah)
    return (core.settings, core.mode_on, core.firmware_update_command, soc, core.bank.learned_revision,
            h.synchronisations, h.cumulative_ah_drawn)


def test_fuzz_random_and_truncated_requests_never_kill_the_server_and_refusals_change_nothing():
    """Random function codes, addresses, counts, values, units and truncated frames from a client that may
    write: every answer is well formed, every refused request left the state as it was, and afterwards the
    server still answers a normal read."""
    running = RunningServer(Rig(series=2), ModbusOptions(port=0, allow_write_from=EVERYONE))
    rng = random.Random(20261124)
    interesting = [0, 1, 36, 39, 40, 99, 100, 103, 105, 106, 120, 121, 122, 200, 221, 999, 1000, 2999, 3000, 39999,
                   40000, 40069, 40070, 65535]
    sock = socket.create_connection(("127.0.0.1", running.port), timeout=3)
    answered = refused = closed = 0
    try:
        for tid in range(1, 3001):
            fc = rng.choice([3, 4, 6, 16, 3, 16, 6, rng.randrange(0, 256)])
            address = rng.choice(interesting) if rng.random() < 0.7 else rng.randrange(0, 65536)
            count = rng.choice([0, 1, 2, 6, 40, 123, 124, 125, 126, rng.randrange(0, 65536)])
            unit = rng.choice([1, 1, 1, 225, 0, 7, 255])
            if fc == 6:
                body = struct.pack(">HH", address, rng.randrange(0, 65536))
            elif fc == 16:
                n = max(0, min(count, 130))
                data = bytes(rng.randrange(256) for _ in range(2 * n))
                body = struct.pack(">HHB", address, count, (2 * n) & 0xFF) + data
            else:
                body = struct.pack(">HH", address, count)
            pdu = bytes([fc]) + body
            if rng.random() < 0.1:  # truncated: the MBAP length says what was actually sent
                pdu = pdu[: rng.randrange(1, len(pdu))]
            before = running.on_loop(_state, running.rig.core)
            sock.sendall(struct.pack(">HHHB", tid, 0, len(pdu) + 1, unit) + pdu)
            if len(pdu) > 253:  # longer than any Modbus ADU: the stream is not Modbus/TCP, the server hangs up
                assert sock.recv(16) == b""
                assert running.on_loop(_state, running.rig.core) == before
                closed += 1
                sock.close()
                sock = socket.create_connection(("127.0.0.1", running.port), timeout=3)
                continue
            try:
                head = recv_exact(sock, 7)
            except TimeoutError:
                raise AssertionError(f"no answer to unit {unit} {pdu.hex()}") from None
            rtid, _, length, _ = struct.unpack(">HHHB", head)
            answer = recv_exact(sock, length - 1)
            assert rtid == tid
            if answer[0] & 0x80:
                refused += 1
                assert answer[1] in (1, 2, 3, 4, 6, 0x0B), answer.hex()
                assert running.on_loop(_state, running.rig.core) == before, f"refused request {pdu.hex()} changed state"
            else:
                answered += 1
        assert refused > 100 and answered > 50 and closed > 10  # every path was exercised
        assert running.server.stats.connections_bad_frame_closed == closed
    finally:
        sock.close()
    c = running.client()
    assert c.read_holding_registers(0, count=40, device_id=1).registers[0] == 1
    c.close()
    running.close()

