"""Connection policy of the /metrics endpoint under floods (issue 12, item 8), the real service, real sockets.

The attacker binds 127.0.0.2 (or the scraper's own 127.0.0.1) and holds 1,000 connections that never send
a request; a scraper must get its answer within 1 s. Times are what the scraper sees (connect to body).
"""

from __future__ import annotations

import http.client
import socket
import time

import pytest

from tests.metrics_rig import RunningBms, Scrape
from tests.ports import hung_up

FLOOD = 1000
CONTRACT_S = 1.0  # the contract


def flood(port: int, n: int, source: str) -> list[socket.socket]:
    held = []
    for _ in range(n):
        sock = socket.socket()
        sock.settimeout(10)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        held.append(sock)
    return held


def taken(run: RunningBms, n: int, timeout: float = 20.0) -> None:
    """Until the service has taken n connections off its accept queue (its own counts; a connection that sends
    nothing reaches it only after the kernel's TCP_DEFER_ACCEPT second)."""
    endpoint = run.service.metrics
    run.wait_for(lambda: endpoint.connections_total + endpoint.closed["refused"] >= n, timeout,
                 f"{n} connections taken")


def timed_scrape(port: int, source: str = "127.0.0.1",
                 connection: http.client.HTTPConnection | None = None) -> tuple[float, Scrape]:
    """One GET /metrics on a new connection from `source` (or on `connection`): seconds from connect to body."""
    started = time.monotonic()
    conn = connection or http.client.HTTPConnection("127.0.0.1", port, timeout=5, source_address=(source, 0))
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        body = response.read()
        assert response.status == 200
    finally:
        if connection is None:
            conn.close()
    return time.monotonic() - started, Scrape(body.decode())


@pytest.fixture(scope="module")
def bms(tmp_path_factory):
    with RunningBms(tmp_path_factory.mktemp("metrics-flood"), "1s1p-12v100") as run:
        yield run.started()


def test_a_scraper_is_answered_within_1_s_while_another_address_holds_1000_idle_connections(bms):
    before = bms.service.metrics.connections_total + bms.service.metrics.closed["refused"]
    held = flood(bms.port, FLOOD, "127.0.0.2")
    try:
        early = timed_scrape(bms.port)[0]  # the flood still waits in the kernel (TCP_DEFER_ACCEPT)
        taken(bms, before + FLOOD)
        elapsed, scrape = timed_scrape(bms.port)
        assert max(early, elapsed) < CONTRACT_S, (early, elapsed)
        # The flood keeps at most its per-address share (4); the rest were evicted or refused on accept, counted.
        assert scrape.value("smallbms_metrics_connections_closed_total", reason="evicted") + \
            scrape.value("smallbms_metrics_connections_closed_total", reason="refused") >= FLOOD - 4
        assert scrape.value("smallbms_metrics_connections") <= 4 + 1
        assert max(timed_scrape(bms.port)[0] for _ in range(3)) < CONTRACT_S
    finally:
        for sock in held:
            sock.close()


def test_a_flood_from_the_scrapers_own_address_never_evicts_its_keep_alive_connection(bms):
    """Prometheus keeps one connection open between scrapes: it has sent a request, the flood has not, so the
    flood's own connections are the longest-idle; a new scraper from the same address gets in as well."""
    keep_alive = http.client.HTTPConnection("127.0.0.1", bms.port, timeout=5)
    try:
        timed_scrape(bms.port, connection=keep_alive)
        before = bms.service.metrics.connections_total + bms.service.metrics.closed["refused"]
        held = flood(bms.port, FLOOD, "127.0.0.1")
        try:
            taken(bms, before + FLOOD)
            elapsed, _ = timed_scrape(bms.port, connection=keep_alive)  # same connection: not evicted
            assert elapsed < CONTRACT_S, elapsed
            assert keep_alive.sock is not None
            assert max(timed_scrape(bms.port)[0] for _ in range(3)) < CONTRACT_S
        finally:
            for sock in held:
                sock.close()
    finally:
        keep_alive.close()


def test_a_connection_without_a_request_is_closed_after_first_request_timeout_a_scraper_after_idle_timeout(
        tmp_path):
    extra = "first_request_timeout = 1.0\nidle_timeout = 3.0\n"
    with RunningBms(tmp_path, "1s1p-12v100", metrics_extra=extra) as run:
        run.started()
        keep_alive = http.client.HTTPConnection("127.0.0.1", run.port, timeout=10)
        timed_scrape(run.port, connection=keep_alive)
        with socket.create_connection(("127.0.0.1", run.port), timeout=10) as silent:
            silent.sendall(b"GET /metrics HTTP/1.1\r\n")  # a head that never ends is not a request
            started = time.monotonic()
            assert hung_up(silent)
            assert 0.9 <= time.monotonic() - started < 5.0
        timed_scrape(run.port, connection=keep_alive)  # 1 s+ since its last request: still open
        started = time.monotonic()
        assert keep_alive.sock is not None and hung_up(keep_alive.sock)  # then idle_timeout
        assert 2.5 <= time.monotonic() - started < 8.0
        _, scrape = timed_scrape(run.port)
        assert scrape.value("smallbms_metrics_connections_closed_total", reason="no_request") == 1
        assert scrape.value("smallbms_metrics_connections_closed_total", reason="idle_timeout") == 1
        assert scrape.value("smallbms_metrics_connections_closed_total", reason="evicted") == 0
