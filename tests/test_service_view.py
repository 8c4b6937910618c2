"""Issue 14 (item 4): a scrape reads the immutable view the service published with its last decision and copies
of the Modbus counters, never the live objects that go on changing under it."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from smallbms_bus.config import parse_config
from smallbms_bus.demo import demo_config
from smallbms_bus.metrics import BmsCollector, Snapshot, TextEncoder
from smallbms_bus.modbus.stats import ModbusStats
from smallbms_bus.outputs.memory import MemoryBoard
from smallbms_bus.service import Service
from smallbms_bus.view import ServiceView


@pytest.fixture
def service(tmp_path) -> Iterator[Service]:
    text = demo_config(f"view-{os.getpid()}", str(tmp_path / "state.db"))  # ports 0: nothing served
    service = Service(parse_config(text, "<test>"), board=MemoryBoard())
    try:
        yield service
    finally:
        service.store.close()
        service.lock.release()


def _scrape(service: Service) -> str:
    return TextEncoder().encode(BmsCollector(service).families(Snapshot.of(service))).decode()


def test_the_view_is_an_immutable_copy_and_the_scrape_reads_only_it(service):
    assert isinstance(service.view(), ServiceView) and service.view().decision is None
    decision = service.core.evaluate(service.clock(), service.wall())
    service.publish(decision, service.clock())
    view = service.view()
    assert view.decision is decision
    # the link goes on counting: a view taken (and a scrape's snapshot) keeps its instant
    received = view.link["frames_received"]
    snapshot = Snapshot.of(service)
    service.link.decoder.received += 1000
    assert view.link["frames_received"] == received and snapshot.link["frames_received"] == received
    text = TextEncoder().encode(BmsCollector(service).families(snapshot)).decode()
    assert f"smallbms_bus_frames_received_total {float(received)}" in text
    assert f"smallbms_bus_frames_received_total {float(received + 1000)}" in _scrape(service)  # a new scrape
    with pytest.raises(AttributeError):
        view.evaluations = 99  # type: ignore[misc]


def test_a_snapshot_copies_the_modbus_counters(service):
    class Server:
        stats = ModbusStats(connections_open=2)

    service.modbus = Server()  # type: ignore[assignment]
    Server.stats.count(3, None)
    snapshot = Snapshot.of(service)
    Server.stats.count(3, None)  # the live counters move on while the scrape is encoded
    Server.stats.connections_open = 7
    assert snapshot.modbus is not None
    requests, stats = snapshot.modbus
    assert stats is not Server.stats and stats.connections_open == 2
    assert requests == {("read_holding_registers", "ok"): 1}

