"""A bus adapter that stops taking frames (COM-5) never freezes the BMS.

- SLCAN on a real pseudo-terminal (`SlcanHub.stall`): the adapter stops reading what the service writes and
  the port's buffer is full, so the service's next BMS_STATE cannot be written. Meanwhile battery 1 starts
  reporting CellHighVoltage. The service must keep deciding (the charge relay goes off on that frame),
  answer Modbus, send WATCHDOG=1, and after 1 s of unsent BMS_STATE take the link down (COM-4: comms loss,
  load off too) with a WARNING; once the adapter reads again the link re-opens, INFO, outputs back.
- python-can's virtual bus whose `send` stops returning (a driver stuck inside a system call): the link's own
  thread is blocked, so only the event loop's check of the oldest unsent BMS_STATE can see it. Same demands.

Times come from the service's clock (time.monotonic) and the relay board's write stamps.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import can
import pytest
from can.interfaces.virtual import VirtualBus
from pymodbus.client import ModbusTcpClient

from smallbms_bus.bms.alarms import BmsAlarm, BusState
from smallbms_bus.config import parse_config
from smallbms_bus.link.bus import BusConfig
from smallbms_bus.reports import BatteryStatus
from smallbms_bus.service import Service
from smallbms_bus.sim.runner import Simulator
from smallbms_bus.sim.slcan_hub import SlcanHub
from tests.faults.rigs import CHARGE, LOAD, RecordingBoard, service_config, wait_until
from tests.ports import free_port

pytestmark = [pytest.mark.faults, pytest.mark.timeout(120)]

SEND_DEADLINE_S = 1.0  # COM-5
MODBUS_BOUND_S = 1.0  # every block-A read during the stall is answered within this (typically a few ms)
WATCHDOG_GAP_S = 2.0  # WATCHDOG=1 is sent every second


class Watchers:
    """What an operator sees from outside: Modbus block A polled every 100 ms and systemd's notify socket."""

    def __init__(self, modbus_port: int, notify: socket.socket) -> None:
        self.modbus_port, self.notify = modbus_port, notify
        self.reads: list[tuple[float, float, list[int] | None]] = []  # (asked at, seconds, registers or None)
        self.watchdog: list[float] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._poll, daemon=True),
                        threading.Thread(target=self._listen, daemon=True)]

    def _poll(self) -> None:
        client = ModbusTcpClient("127.0.0.1", port=self.modbus_port, timeout=3, retries=0)
        while not self.stop.is_set():
            asked = time.monotonic()
            try:
                reply = client.read_holding_registers(0, count=40, device_id=1)
                registers = None if reply.isError() else list(reply.registers)
            except Exception:  # a timeout or a reset: recorded as no answer
                registers = None
                client.close()
            self.reads.append((asked, time.monotonic() - asked, registers))
            self.stop.wait(0.1)
        client.close()

    def _listen(self) -> None:
        self.notify.settimeout(0.2)
        while not self.stop.is_set():
            try:
                if self.notify.recv(256) == b"WATCHDOG=1":
                    self.watchdog.append(time.monotonic())
            except TimeoutError:
                pass

    def __enter__(self) -> Watchers:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=5)

    def check(self, since: float, until: float) -> dict[str, float]:
        """Every Modbus read asked in [since, until] answered within the bound; WATCHDOG=1 kept coming."""
        window = [r for r in self.reads if since <= r[0] <= until]
        assert len(window) >= (until - since) / 0.5, f"only {len(window)} Modbus reads in {until - since:.1f} s"
        late = [(round(a - since, 2), round(s, 3)) for a, s, regs in window if regs is None or s > MODBUS_BOUND_S]
        assert not late, f"Modbus unanswered or slower than {MODBUS_BOUND_S} s during the stall: {late}"
        beats = [since, *[t for t in self.watchdog if since <= t <= until], until]
        gap = max(b - a for a, b in itertools.pairwise(beats))
        assert gap <= WATCHDOG_GAP_S, f"no WATCHDOG=1 for {gap:.2f} s during the stall"
        return {"modbus_reads": len(window), "modbus_worst_s": round(max(s for _, s, _ in window), 3),
                "watchdog_worst_gap_s": round(gap, 3)}


@contextmanager
def running(tmp_path: Path, bus: str, monkeypatch: pytest.MonkeyPatch, *, sim_bus: can.BusABC,
            bus_factory: Any = None) -> Iterator[tuple[Service, RecordingBoard, Simulator, Watchers]]:
    """The real service in-process (its own event-loop thread) on `bus`, a simulator on `sim_bus`, watchers."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    monkeypatch.setenv("WATCHDOG_USEC", "5000000")
    modbus_port = free_port()
    board = RecordingBoard()
    service = Service(parse_config(service_config(tmp_path / "state.db", bus=bus, modbus_port=modbus_port)),
                      board=board)
    if bus_factory is not None:
        service.link.bus_factory = bus_factory
    sim = Simulator.from_scenario("steady", "2s1p-12v100")
    sim_stop = threading.Event()
    threading.Thread(target=sim.run, args=(sim_bus,), kwargs={"stop_event": sim_stop}, daemon=True).start()
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(loop.run_until_complete(service.run(stop))),
                              name="service", daemon=True)
    thread.start()
    try:
        with Watchers(modbus_port, notify) as watchers:
            yield service, board, sim, watchers
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=20)
        sim_stop.set()
        notify.close()
    assert result == [0], "the service did not stop cleanly"


def force_cell_high(sim: Simulator, node: int) -> dict[str, bool]:
    """Battery `node` reports CellHighVoltage while the returned dict holds the flag (the simulator's frames)."""
    forced: dict[str, bool] = {}
    battery = sim.bank.battery(node)
    real = battery.status

    def status() -> BatteryStatus:
        return dataclasses.replace(real(), **forced)

    battery.status = status  # type: ignore[method-assign]
    return forced


def bus_log(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("smallbms_bus.link") and r.levelno == level]


def test_a_stalled_slcan_adapter_is_a_link_fault_and_never_freezes_the_bms(tmp_path, monkeypatch, caplog, figures):
    caplog.set_level(logging.INFO, logger="smallbms_bus")
    with SlcanHub() as hub:
        sim_bus = can.Bus(interface="slcan", channel=hub.path("slcan0"), sleep_after_open=0)
        bus = f'interface = "slcan"\nchannel = "{hub.path("slcan1")}"'
        try:
            with running(tmp_path, bus, monkeypatch, sim_bus=sim_bus) as (service, board, sim, watchers):
                wait_until(lambda: board.relays[LOAD] and board.relays[CHARGE], 15, "load and charge on")
                forced = force_cell_high(sim, 1)
                time.sleep(1.5)  # Modbus polled and WATCHDOG=1 seen before the stall
                stalled = time.monotonic()
                filled = hub.stall("slcan1")
                forced["cell_high_voltage"] = True
                try:
                    # The frame is received and decided on while BMS_STATE cannot be written.
                    seen = wait_until(lambda: (d := service.decision) is not None
                                      and BmsAlarm.CELL_HIGH_VOLTAGE in d.alarms, 5, "CELL_HIGH_VOLTAGE decided")
                    charge_off = wait_until(lambda: board.first_write(CHARGE, False, stalled) is not None, 5,
                                            "charge relay off")
                    assert seen - stalled < SEND_DEADLINE_S, "CellHighVoltage waited for the stall to be detected"
                    # After 1 s of unsent BMS_STATE: link fault, comms loss, the load off as well.
                    wait_until(lambda: board.first_write(LOAD, False, stalled) is not None, 5, "load relay off")
                    load_off = board.first_write(LOAD, False, stalled)
                    assert load_off is not None
                    assert SEND_DEADLINE_S - 0.1 <= load_off - stalled <= SEND_DEADLINE_S + 1.0, \
                        f"load off {load_off - stalled:.2f} s after the stall"
                    assert BmsAlarm.BATTERY_COMMS_LOST in service.decision.alarms
                    assert "not taking frames" in service.decision.reasons["BATTERY_COMMS_LOST"]
                    time.sleep(2.0)  # the stall goes on; the link re-opens with back-off and cannot write
                    registers = watchers.reads[-1][2]
                    assert registers is not None and registers[20] & BmsAlarm.BATTERY_COMMS_LOST
                    assert registers[36] in (BusState.STALLED, BusState.OPEN_FAILED), registers[36]  # block A bus_state
                    found = watchers.check(stalled, time.monotonic())
                finally:
                    resumed = time.monotonic()
                    hub.resume("slcan1")
                forced.clear()
                back = wait_until(lambda: board.relays[LOAD] and board.relays[CHARGE], 15, "outputs back")
                counters = service.link.counters()
        finally:
            sim_bus.shutdown()
    warnings, infos = bus_log(caplog, logging.WARNING), bus_log(caplog, logging.INFO)
    assert any("not taking frames" in m for m in warnings), warnings
    assert sum("not taking frames" in m for m in warnings) == 1, f"the stall was logged more than once: {warnings}"
    assert any("up again" in m for m in infos), infos
    assert counters["stalls"] >= 1
    figures(buffer_filled_bytes=filled, cell_high_decided_s=round(seen - stalled, 3),
            charge_off_s=round(charge_off - stalled, 3), load_off_s=round(load_off - stalled, 3),
            outputs_back_s=round(back - resumed, 3), **found)


class StuckBus(VirtualBus):
    """python-can's virtual bus whose send() does not return while `gate` is closed: a driver stuck in a call."""

    def __init__(self, gate: threading.Event, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gate = gate

    def send(self, msg: can.Message, timeout: float | None = None) -> None:
        self.gate.wait()
        super().send(msg, timeout)


def test_a_link_thread_stuck_in_a_call_is_detected_by_the_event_loop(tmp_path, monkeypatch, caplog, figures):
    caplog.set_level(logging.INFO, logger="smallbms_bus")
    channel = f"stuck-{time.monotonic_ns()}"
    gate = threading.Event()
    gate.set()

    def factory(config: BusConfig) -> can.BusABC:
        return StuckBus(gate, channel=config.channel)

    sim_bus = can.Bus(interface="virtual", channel=channel)
    bus = f'interface = "virtual"\nchannel = "{channel}"'
    try:
        with running(tmp_path, bus, monkeypatch, sim_bus=sim_bus, bus_factory=factory) as (service, board, _, watchers):
            wait_until(lambda: board.relays[LOAD] and board.relays[CHARGE], 15, "load and charge on")
            time.sleep(1.5)
            stuck = time.monotonic()
            gate.clear()
            try:
                wait_until(lambda: board.first_write(LOAD, False, stuck) is not None, 5, "load relay off")
                load_off = board.first_write(LOAD, False, stuck)
                assert load_off is not None and load_off - stuck <= SEND_DEADLINE_S + 1.0
                wait_until(lambda: not board.relays[CHARGE], 1, "charge relay off")  # in the same apply, just after
                assert "not taking frames" in service.decision.reasons["BATTERY_COMMS_LOST"]
                time.sleep(1.5)
                found = watchers.check(stuck, time.monotonic())
            finally:
                released = time.monotonic()
                gate.set()
            back = wait_until(lambda: board.relays[LOAD] and board.relays[CHARGE], 15, "outputs back")
    finally:
        sim_bus.shutdown()
    warnings, infos = bus_log(caplog, logging.WARNING), bus_log(caplog, logging.INFO)
    assert any("not taking frames" in m and "inside one call" in m for m in warnings), warnings
    assert any("up again" in m for m in infos), infos
    figures(load_off_s=round(load_off - stuck, 3), outputs_back_s=round(back - released, 3), **found)
