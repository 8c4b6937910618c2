"""Issue 14 (items 4 and 7): a scrape reads the immutable view the service published with its last decision and
copies of the Modbus counters, never the live objects that go on changing under it; the GIL hand-off interval."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

from smallbms_bus.config import parse_config
from smallbms_bus.demo import demo_config
from smallbms_bus.metrics import BmsCollector, Snapshot, TextEncoder
from smallbms_bus.modbus.stats import ModbusStats
from smallbms_bus.outputs.memory import MemoryBoard
from smallbms_bus.service import SWITCH_INTERVAL_S, Service
from smallbms_bus.view import ServiceView
from tests.metrics_rig import RunningBms


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


def test_the_view_is_built_per_decision_and_the_scrape_reads_only_it(service):
    assert isinstance(service.view, ServiceView) and service.view.decision is None
    decision = service.core.evaluate(service.clock(), service.wall())
    service.publish(decision, service.clock())
    view = service.view
    assert view.decision is decision
    # the link goes on counting after the decision: the view (and so the scrape) keeps the decision's instant
    received = view.link["frames_received"]
    service.link.decoder.received += 1000
    assert service.view is view and view.link["frames_received"] == received
    assert f"smallbms_bus_frames_received_total {float(received)}" in _scrape(service)
    service.publish(service.core.evaluate(service.clock(), service.wall()), service.clock())
    assert service.view is not view and service.view.link["frames_received"] == received + 1000
    assert f"smallbms_bus_frames_received_total {float(received + 1000)}" in _scrape(service)


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


def test_the_gil_is_handed_over_within_a_millisecond_while_the_service_runs(tmp_path):
    """The safety path crosses threads (bus -> loop -> outputs): while the service runs, a thread waiting for the
    GIL waits at most SWITCH_INTERVAL_S, not Python's 5 ms; the process's setting is restored afterwards."""
    before = sys.getswitchinterval()
    with RunningBms(tmp_path, "1s1p-12v100") as run:
        run.started()
        assert sys.getswitchinterval() == pytest.approx(SWITCH_INTERVAL_S) and SWITCH_INTERVAL_S <= 0.001
        assert run.shutdown() == 0
    assert sys.getswitchinterval() == pytest.approx(before)
