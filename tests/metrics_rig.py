"""A running service with its Prometheus endpoint on a free port, and helpers to scrape and read it."""

from __future__ import annotations

import asyncio
import gzip
import threading
import time
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import can
from prometheus_client.parser import text_string_to_metric_families

from smallbms_bus.config import parse_config
from smallbms_bus.outputs.memory import MemoryBoard
from smallbms_bus.service import Service
from smallbms_bus.sim.runner import Simulator
from tests.ports import free_port


class Scrape:
    """One parsed exposition: samples by name, and the TYPE of each family."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.types = {line.split()[2]: line.split()[3] for line in text.splitlines() if line.startswith("# TYPE ")}
        self.samples: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                self.samples[s.name].append((s.labels, s.value))

    def series(self, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
        return [(lab, v) for lab, v in self.samples.get(name, []) if all(lab.get(k) == x for k, x in labels.items())]

    def value(self, name: str, **labels: str) -> float:
        found = self.series(name, **labels)
        assert len(found) == 1, f"{name}{labels}: {len(found)} series"
        return found[0][1]


def scrape(url: str, *, gzipped: bool = False) -> Scrape:
    request = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"} if gzipped else {})
    with urllib.request.urlopen(request, timeout=10) as response:
        body = response.read()
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        if gzipped:
            assert response.headers["Content-Encoding"] == "gzip"
            body = gzip.decompress(body)
    return Scrape(body.decode())


class RunningBms:
    """The real Service on its own event-loop thread (virtual bus, memory board, SQLite store in tmp_path),
    virtual batteries on the same bus, metrics on 127.0.0.1:<free port>."""

    def __init__(self, tmp_path: Path, bank: str = "2s2p-12v100", *, scenario: str = "steady",
                 comm_timeout: float = 5.0, metrics_port: int | None = None, modbus_port: int = 0,
                 metrics_extra: str = "") -> None:
        channel = f"metrics-{uuid.uuid4().hex[:8]}"
        self.port = free_port() if metrics_port is None else metrics_port
        self.url = f"http://127.0.0.1:{self.port}/metrics"
        self.config = parse_config(
            f'[bus]\ninterface = "virtual"\nchannel = "{channel}"\n'
            f"[bms]\ndiscovery_window = 1.0\ncomm_timeout = {comm_timeout}\n"
            f'[store]\npath = "{tmp_path / "state.db"}"\n[outputs]\nbackend = "memory"\n'
            f'[modbus]\nhost = "127.0.0.1"\nport = {modbus_port}\n'
            f'[web]\nport = 0\n[metrics]\nhost = "127.0.0.1"\nport = {self.port}\n{metrics_extra}')
        self.service = Service(self.config, board=MemoryBoard())
        self.sim = Simulator.from_scenario(scenario, bank)
        self.sim_bus = can.Bus(interface="virtual", channel=channel)
        self.sim_stop = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.stop = asyncio.Event()
        self.result: list[int] = []

    def __enter__(self) -> RunningBms:
        threading.Thread(target=self.sim.run, args=(self.sim_bus,), kwargs={"stop_event": self.sim_stop},
                         daemon=True).start()

        def serve() -> None:
            asyncio.set_event_loop(self.loop)
            self.result.append(self.loop.run_until_complete(self.service.run(self.stop)))

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()
        return self

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.05)
        raise AssertionError(f"{what} not reached in {timeout} s")

    def started(self, timeout: float = 15.0) -> RunningBms:
        self.wait_for(lambda: self.service.decision is not None and self.service.decision.started
                      and self.service.metrics is not None and self.service.metrics.bound is not None,
                      timeout, "core started and metrics served")
        return self

    def scrape(self, *, gzipped: bool = False) -> Scrape:
        return scrape(self.url, gzipped=gzipped)

    def shutdown(self) -> int:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(timeout=15)
        return self.result[0]

    def __exit__(self, *exc: object) -> None:
        if self.thread.is_alive():
            self.shutdown()
        self.sim_stop.set()
        self.sim_bus.shutdown()
