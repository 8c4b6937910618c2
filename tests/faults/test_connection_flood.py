"""Connection floods against `smallbms-bus run` (a process, real sockets, default connection caps): an attacker in
its own process holds 1,000 connections that never send anything, from another loopback address (127.0.0.2) or
from the poller's own (127.0.0.1), to Modbus and to /metrics; with --churn it re-opens at once every connection
the service hangs up, so it holds 1,000 for as long as it runs and keeps the service evicting.

Must hold (issue 12, item 8): a poller or scraper that connects meanwhile is answered within 1 s, every time;
a client that keeps polling on its connection (the observer, in its own process) is never cut off and keeps
its latency bound; the BMS keeps running (relays on, no task restart); the service's descriptors stay bounded
by the caps.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import resource
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from smallbms_bus.connections import IN_FLIGHT_FDS
from tests.faults.campaign import CAMPAIGN
from tests.faults.rigs import CHARGE, LOAD, ProcessRig, metric, wait_until
from tests.ports import recv_exact

pytestmark = [pytest.mark.faults, pytest.mark.timeout(CAMPAIGN.timeout_s)]

FLOOD = 1000
CONTRACT_S = 1.0  # the contract, for every fresh poll and scrape
SCENARIO_S = 3.0  # fresh polls every 50 ms for this long: past the kernel's 1 s TCP_DEFER_ACCEPT hold, into the churn
OBSERVER_PERIOD_S = 0.02
# The observer on its own connection. Not test_modbus_abuse.py's 250 ms: here the attacker's own process takes a
# good part of one of the two cores, and the observer waits for the CPU as much as for the service (its worst
# came in the held-flood phase, where the service does least). Its contract is the pollers' 1 s; p99 says it
# stays the exception (measured with a CPU hog beside: p99 <= 104 ms, max <= 486 ms).
BOUND_MAX_S = CONTRACT_S
BOUND_P99_S = 0.25
SCENARIOS = [  # (target, attacker's address, --churn)
    ("modbus", "127.0.0.2", False),
    ("modbus", "127.0.0.2", True),
    ("modbus", "127.0.0.1", True),
    ("metrics", "127.0.0.2", True),
    ("metrics", "127.0.0.1", True),
]


class Attacker:
    def __init__(self, tmp: Path, port: int, source: str, churn: bool) -> None:
        self.stop_file = tmp / f"flood-{port}-{source}-{churn}.stop"
        self.process = subprocess.Popen([sys.executable, "-m", "tests.faults.flood", str(port), source, str(FLOOD),
                                         str(self.stop_file), *(["--churn"] if churn else [])],
                                        stdout=subprocess.PIPE, text=True)

    def __enter__(self) -> Attacker:
        assert self.process.stdout is not None
        assert self.process.stdout.readline().strip() == "held", "the attacker could not open its connections"
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_file.touch()
        out, _ = self.process.communicate(timeout=30)
        self.counts = json.loads(out.strip().splitlines()[-1])


def poll_modbus(port: int) -> float:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.0.0.1", 0)) as sock:
        sock.sendall(struct.pack(">HHHBBHH", 1, 0, 6, 1, 3, 0, 2))
        head = recv_exact(sock, 9)
        assert head[7] == 3, head.hex()
        recv_exact(sock, 4)
    return time.monotonic() - started


def scrape(port: int) -> float:
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5, source_address=("127.0.0.1", 0))
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        assert response.status == 200 and b"smallbms_build_info" in response.read()
    finally:
        conn.close()
    return time.monotonic() - started


def dropped(values: dict[str, float], target: str) -> float:
    """Connections the service hung up under its connection policy: evicted, refused on accept (a series the
    service does not export counts 0, so that this test runs, and fails on its polls, before issue 12 too)."""
    def value(name: str, **labels: str) -> float:
        try:
            return metric(values, name, **labels)
        except (AssertionError, KeyError):
            return 0.0

    if target == "modbus":
        return value("smallbms_modbus_connections_closed_total", reason="evicted") + \
            value("smallbms_modbus_connections_refused_total")
    return sum(value("smallbms_metrics_connections_closed_total", reason=reason) for reason in ("evicted", "refused"))


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_connection_floods_never_lock_out_a_poller_or_a_scraper_and_the_bms_runs_on(tmp_path: Path, figures):
    with ProcessRig(tmp_path, metrics=True) as rig:
        rig.start()
        rig.wait_ready()
        wait_until(lambda: rig.module.relays[LOAD] and rig.module.relays[CHARGE], 20, "load and charge on")
        pid = rig.service.pid
        fds_before = fds(pid)
        stop_file = tmp_path / "observer.stop"
        observer = subprocess.Popen([sys.executable, "-m", "tests.faults.modbus_observer", str(rig.modbus_port),
                                     str(OBSERVER_PERIOD_S), str(stop_file)], stdout=subprocess.PIPE, text=True)
        results: dict[str, dict[str, float]] = {}
        phases: list[tuple[str, float]] = [("quiet", time.monotonic())]
        try:
            time.sleep(0.5)
            for target, source, churn in SCENARIOS:
                port = rig.modbus_port if target == "modbus" else rig.metrics_port
                ask = poll_modbus if target == "modbus" else scrape
                name = f"{target} from {'another address' if source != '127.0.0.1' else 'the same address'}" + \
                    (", re-opening" if churn else "")
                phases.append((name, time.monotonic()))
                dropped_before = dropped(rig.metrics(), target)
                with Attacker(tmp_path, port, source, churn) as attacker:
                    most_fds, latencies = 0, []
                    end = time.monotonic() + SCENARIO_S
                    while time.monotonic() < end:
                        latencies.append(ask(port))
                        most_fds = max(most_fds, fds(pid))
                        time.sleep(0.05)
                    # The service had the flood in hand (all but its per-address share hung up) while polls went on.
                    share = 8 if target == "modbus" else 4
                    wait_until(lambda: dropped(rig.metrics(), target) - dropped_before >= FLOOD - share, 10,  # noqa: B023
                               f"{name}: the flood taken")
                    latencies.append(ask(port))
                assert max(latencies) < CONTRACT_S, f"{name}: {[round(x, 3) for x in latencies]}"
                assert rig.module.relays[LOAD] and rig.module.relays[CHARGE], f"{name}: the outputs changed"
                results[name] = {"polls": len(latencies), "worst_ms": round(max(latencies) * 1000, 1),
                                 "median_ms": round(sorted(latencies)[len(latencies) // 2] * 1000, 1),
                                 "attacker_opened": attacker.counts["opened"],
                                 "attacker_reopens_per_s": attacker.counts["reopens_per_s"],
                                 "service_fds_max": most_fds}
                # Descriptors: the caps (32 Modbus + 16 metrics), connections being accepted or closed (asyncio takes
                # ACCEPT_BATCH per turn of its loop: fd_budget reserves IN_FLIGHT_FDS), the poller; never the 1,000.
                bound = fds_before + 32 + 16 + IN_FLIGHT_FDS + 8
                assert most_fds <= bound, f"{name}: the service held {most_fds} descriptors (bound {bound})"
            values = rig.metrics()
            assert metric(values, "smallbms_task_restarts_total") == 0
            assert metric(values, "smallbms_decision_age_seconds") < 1.0
            evicted = metric(values, "smallbms_modbus_connections_closed_total", reason="evicted")
            refused = metric(values, "smallbms_modbus_connections_refused_total")
            scrapes_evicted = metric(values, "smallbms_metrics_connections_closed_total", reason="evicted")
            scrapes_refused = metric(values, "smallbms_metrics_connections_closed_total", reason="refused")
            assert evicted + refused >= 3 * (FLOOD - 8) and scrapes_evicted + scrapes_refused >= 2 * (FLOOD - 4)
        finally:
            stop_file.touch()
            out, _ = observer.communicate(timeout=30)
        seen = json.loads(out)
        assert not seen["errors"], f"the polling client was cut off: {seen['errors'][:5]}"
        latencies = sorted(latency for _, latency in seen["latencies"])
        p99, worst = latencies[int(len(latencies) * 0.99)], latencies[-1]
        by_phase = {}
        for (phase, begin), (_, end) in zip(phases, [*phases[1:], ("end", float("inf"))], strict=True):
            during = sorted(latency for at, latency in seen["latencies"] if begin <= at < end)
            if during:
                by_phase[phase] = {"reads": len(during), "p99_ms": round(during[int(len(during) * 0.99)] * 1000, 1),
                                   "max_ms": round(during[-1] * 1000, 1)}
        assert worst <= BOUND_MAX_S and p99 <= BOUND_P99_S, \
            f"observer p99 {p99 * 1000:.1f} ms, max {worst * 1000:.1f} ms; by phase {by_phase}"
        assert rig.stop() == 0, rig.stderr()
        log = rig.stderr()
        assert "Traceback" not in log
        evictions_logged = sum(log.count(what) for what in ("evicted the longest-idle", "closing a connection from",
                                                            "refused a connection from"))
    figures(flood=FLOOD, scenarios=results, observer_by_phase=by_phase, observer_reads=len(latencies),
            observer_p99_ms=round(p99 * 1000, 1),
            observer_max_ms=round(worst * 1000, 1), modbus_evicted=int(evicted), modbus_refused=int(refused),
            metrics_evicted=int(scrapes_evicted), metrics_refused=int(scrapes_refused),
            log_lines_about_evictions=evictions_logged, service_fds_before=fds_before)


class LimitedRig(ProcessRig):
    """`smallbms-bus run` started under a given RLIMIT_NOFILE (soft, hard), with systemd's watchdog on, so
    WATCHDOG=1 on the notify socket shows the BMS ticking."""

    def __init__(self, tmp_path: Path, limits: tuple[int, int], **kwargs: object) -> None:
        super().__init__(tmp_path, **kwargs)  # type: ignore[arg-type]
        self.limits = limits

    def start(self) -> subprocess.Popen:
        self.starts += 1
        self.stderr_path = self.tmp / f"service-{self.starts}.err"
        limits = self.limits
        with self.stderr_path.open("w") as err:
            self.service = subprocess.Popen(
                [sys.executable, "-m", "smallbms_bus.cli", "run", "--config", str(self.config)],
                stdout=subprocess.DEVNULL, stderr=err,
                env={**os.environ, "NOTIFY_SOCKET": self.notify_path, "PYTHONUNBUFFERED": "1",
                     "WATCHDOG_USEC": "2000000"},
                preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, limits))
        return self.service

    def watchdogs(self, seconds: float) -> int:
        """WATCHDOG=1 messages over the next `seconds`."""
        count, end = 0, time.monotonic() + seconds
        while time.monotonic() < end:
            self.notify.settimeout(max(0.01, end - time.monotonic()))
            with contextlib.suppress(TimeoutError):
                count += self.notify.recv(256) == b"WATCHDOG=1"
        return count


def open_polled(port: int, n: int, source: str, *, all_at_once: bool) -> list[socket.socket]:
    """n connections from `source`, each answered once, then held: real clients, never the longest-idle of a
    connect-and-hold flood. all_at_once: every request is sent before any answer is read (all n open)."""
    held = []
    for i in range(n):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
        sock.sendall(struct.pack(">HHHBBHH", i, 0, 6, 1, 3, 0, 2))
        if not all_at_once:
            assert recv_exact(sock, 13)[7] == 3
        held.append(sock)
    if all_at_once:
        for sock in held:
            assert recv_exact(sock, 13)[7] == 3
    return held


def soft_limit(pid: int) -> int:
    line = next(x for x in Path(f"/proc/{pid}/limits").read_text().splitlines() if x.startswith("Max open files"))
    return int(line.split()[3])


@pytest.mark.skipif(resource.getrlimit(resource.RLIMIT_NOFILE)[1] not in (resource.RLIM_INFINITY,)
                    and resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 4096, reason="needs a hard limit of 4096")
def test_the_open_file_limit_is_raised_for_the_caps_or_the_caps_lowered_and_the_bms_keeps_ticking(
        tmp_path: Path, figures):
    """max_connections = 1000 of real clients (each polled once, then held). Under a soft limit of 256 and a
    hard one of 4096 the service raises its soft limit and serves all 1,000 at once (before: accept failed
    with EMFILE at ~240 and the rest waited for ever). Under soft = hard = 512 it serves what fits, says so
    naming the key, and a new poller is still answered within 1 s while 1,000 are held; the BMS ticks."""
    modbus = "max_connections = 1000\nmax_connections_per_address = 1000\nidle_timeout = 600.0"
    found: dict[str, object] = {}
    (tmp_path / "raised").mkdir()
    (tmp_path / "lowered").mkdir()
    with LimitedRig(tmp_path / "raised", (256, 4096), modbus=modbus) as rig:
        rig.start()
        rig.wait_ready()
        assert soft_limit(rig.service.pid) > 1000
        assert "raised the open-file limit from 256 to" in rig.stderr()
        started = time.monotonic()
        held = open_polled(rig.modbus_port, FLOOD, "127.0.0.2", all_at_once=True)
        found["raised_all_answered_s"] = round(time.monotonic() - started, 2)
        try:
            assert poll_modbus(rig.modbus_port) < CONTRACT_S
            assert rig.watchdogs(2.0) >= 2
        finally:
            for sock in held:
                sock.close()
        assert rig.stop() == 0
        found["raised_soft_limit"] = soft_limit_of_log(rig.stderr())
    with LimitedRig(tmp_path / "lowered", (512, 512), modbus=modbus, metrics=True) as rig:
        rig.start()
        rig.wait_ready()
        log = rig.stderr()
        assert "modbus.max_connections = 1000 does not fit the open-file limit (512, hard 512)" in log, log
        granted = int(log.split("does not fit")[1].split("serving at most ")[1].split()[0])
        held = []
        try:
            held = open_polled(rig.modbus_port, FLOOD, "127.0.0.2", all_at_once=False)  # later ones evict earlier
            latencies = [poll_modbus(rig.modbus_port) for _ in range(10)]
            assert max(latencies) < CONTRACT_S, latencies
            assert rig.watchdogs(2.0) >= 2
            assert fds(rig.service.pid) < 512
            values = rig.metrics()
            assert metric(values, "smallbms_modbus_connections") <= granted
            assert metric(values, "smallbms_task_restarts_total") == 0
        finally:
            for sock in held:
                sock.close()
        assert rig.stop() == 0
        assert "cannot accept a connection" not in rig.stderr()  # no EMFILE: the cap fitted the limit
        found.update(lowered_granted=granted, lowered_worst_ms=round(max(latencies) * 1000, 1))
    figures(**found)


def soft_limit_of_log(log: str) -> int:
    return int(log.split("raised the open-file limit from 256 to ")[1].split()[0])
