"""A bus that cannot be opened is visible (issue 12, item 9): a WARNING with the reason once per outage, INFO when
it ends, and the state in metrics and in `smallbms-bus status`."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import urllib.request

import can
import pytest

from smallbms_bus.bms.alarms import BusState
from smallbms_bus.cli import main
from smallbms_bus.config import parse_config
from smallbms_bus.link.bus import BusConfig, Link
from smallbms_bus.outputs.memory import MemoryBoard
from smallbms_bus.service import Service
from tests.ports import free_port


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def link_records(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "smallbms_bus.link.bus"]


def test_a_channel_that_cannot_be_opened_is_one_warning_with_the_reason_then_info_when_it_opens(caplog):
    caplog.set_level(logging.DEBUG, logger="smallbms_bus.link.bus")
    clock = FakeClock()
    plugged = {"yes": False}

    def factory(config: BusConfig) -> can.BusABC:
        if not plugged["yes"]:
            raise can.CanInitializationError("could not open port /dev/ttyNONE: [Errno 2] No such file or directory")
        return can.Bus(interface="virtual", channel="visibility")

    states: list[tuple[bool, str]] = []
    link = Link(BusConfig("slcan", "/dev/ttyNONE"), clock=clock, bus_factory=factory,
                on_state=lambda up, why: states.append((up, why)))
    for _ in range(60):  # 30 s of back-off retries
        link.poll(0)
        clock.t += 0.5
    warnings = [m for level, m in link_records(caplog) if level == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "slcan:/dev/ttyNONE" in warnings[0] and "cannot be opened" in warnings[0] and "ttyNONE" in warnings[0]
    assert link.state is BusState.OPEN_FAILED and "No such file" in link.reason
    assert link.reason == "cannot be opened: could not open port /dev/ttyNONE: [Errno 2] No such file or directory"
    assert states and states[0][0] is False
    retries = [m for level, m in link_records(caplog) if level == logging.DEBUG and "retry" in m]
    assert len(retries) >= 5  # each retry is still in the log, at DEBUG

    plugged["yes"] = True
    caplog.clear()
    for _ in range(20):
        link.poll(0)
        clock.t += 0.5
    assert link.up
    infos = [m for level, m in link_records(caplog) if level == logging.INFO]
    assert len(infos) == 1 and "up again" in infos[0], infos
    link.close()


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        return answer.read().decode()


def test_status_and_metrics_say_the_bus_is_down_and_why(tmp_path, caplog, capsys):
    caplog.set_level(logging.INFO, logger="smallbms_bus")
    modbus_port, metrics_port = free_port(), free_port()
    text = (f'[bus]\ninterface = "slcan"\nchannel = "{tmp_path}/ttyNONE"\n[store]\npath = "{tmp_path}/state.db"\n'
            f'[outputs]\nbackend = "memory"\n[modbus]\nhost = "127.0.0.1"\nport = {modbus_port}\n'
            f'[metrics]\nhost = "127.0.0.1"\nport = {metrics_port}\n[web]\nport = 0\n')
    service = Service(parse_config(text), board=MemoryBoard())
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(loop.run_until_complete(service.run(stop))), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                metrics = scrape(metrics_port)
            except OSError:
                metrics = ""
            if "smallbms_bus_up 0" in metrics and 'state="open_failed"} 1' in metrics:
                break
            time.sleep(0.1)
        assert "smallbms_bus_up 0.0" in metrics or "smallbms_bus_up 0" in metrics
        assert 'smallbms_bus_state{state="open_failed"} 1' in metrics
        reason = [line for line in metrics.splitlines() if line.startswith("smallbms_bus_down_reason_info{")]
        assert len(reason) == 1 and "ttyNONE" in reason[0] and "No such file" in reason[0], reason
        time.sleep(1.0)  # several back-off retries
        capsys.readouterr()
        assert main(["status", "--port", str(modbus_port)]) == 0
        out = capsys.readouterr().out
        state = next(line for line in out.splitlines() if line.startswith("state"))
        assert state.split(None, 1)[1] == "waiting for batteries (bus down: cannot be opened)", out
        assert "bus                down: cannot be opened" in out
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=15)
    assert result == [0]
    warnings = [m for level, m in link_records(caplog) if level == logging.WARNING]
    assert len(warnings) == 1 and "ttyNONE" in warnings[0] and "No such file" in warnings[0], warnings
