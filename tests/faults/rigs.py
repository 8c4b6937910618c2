"""Rigs of the fault campaign: the real service in-process or as a process, and ways to watch it.

- `RecordingBoard`: a memory relay board that stamps every write with time.monotonic(), so a test knows
  when each relay command reached the board (the service's clock is time.monotonic too).
- `DecisionLog`: records every decision of a running core (time and the three outputs) by wrapping its
  `evaluate`; the real evaluate runs, nothing is changed.
- `ServiceRig`: `Service` on its own event-loop thread with virtual batteries on a python-can `virtual` bus
  (as tests/test_service.py's `Running`, but any relay backend from the config).
- `ProcessRig`: `smallbms-bus run` and `smallbms-bus simulate` as processes on an SLCAN pseudo-terminal wire
  (`SlcanHub`), relays on a `VirtualModbusTcpModule`, READY=1 read from a notify socket.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import can
from pymodbus.client import ModbusTcpClient

from smallbms_bus.bms.core import Decision
from smallbms_bus.config import parse_config
from smallbms_bus.outputs.base import RelayBoard
from smallbms_bus.outputs.memory import MemoryBoard
from smallbms_bus.service import Service
from smallbms_bus.sim.relay_boards import VirtualModbusTcpModule
from smallbms_bus.sim.runner import Simulator
from smallbms_bus.sim.slcan_hub import SlcanHub
from tests.ports import free_port

LOAD, CHARGE, PRE = 1, 2, 3
CMD = [sys.executable, "-m", "smallbms_bus.cli"]


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, poll: float = 0.01) -> float:
    """Wait for `predicate`; return the time.monotonic() at which it was seen true."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return time.monotonic()
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(poll)


def rss_kib(pid: int | str = "self") -> int:
    """Resident set size from /proc/<pid>/status (VmRSS, KiB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


class RecordingBoard(MemoryBoard):
    """A memory relay board whose writes are logged as (time.monotonic(), channel, on)."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.log: list[tuple[float, int, bool]] = []

    def _write(self, channel: int, on: bool) -> None:
        super()._write(channel, on)
        self.log.append((time.monotonic(), channel, on))

    def first_write(self, channel: int, on: bool, after: float) -> float | None:
        return next((t for t, c, v in list(self.log) if c == channel and v == on and t >= after), None)


@dataclass(frozen=True, slots=True)
class Decided:
    at: float  # the decision's `now` (time.monotonic in the service)
    load: bool
    charge: bool
    pre: bool


class DecisionLog:
    """Every decision of `core` from now on; the core's own evaluate does the work."""

    def __init__(self, core: Any) -> None:
        self.entries: list[Decided] = []
        real = core.evaluate

        def evaluate(now: float, wall: float) -> Decision:
            decision = real(now, wall)
            o = decision.outputs
            self.entries.append(Decided(now, o.load_disconnect, o.charge_disconnect, o.pre_alarm))
            return decision

        core.evaluate = evaluate


def check_outputs_follow_decisions(decisions: list[Decided], writes: list[tuple[float, int, bool]],
                                   since: float, until: float, lag: float) -> dict[str, float]:
    """The invariants between what the core decided and what reached the relays (load, charge, pre-alarm):

    1. every relay write carries a value some decision wanted within `lag` before the write (no output
       changes without a decision that wants it);
    2. a relay is never left in a state the latest decision disagrees with for longer than `lag`;
    3. at `until` every relay holds what the last decision wants.
    Returns the longest disagreement seen per role (seconds)."""
    roles = {LOAD: "load", CHARGE: "charge", PRE: "pre"}
    decided = [d for d in decisions if since <= d.at <= until]
    assert decided, "no decision in the window"
    worst: dict[str, float] = {}
    for channel, role in roles.items():
        wanted = [(d.at, getattr(d, role)) for d in decided]
        ws = [(t, v) for t, c, v in writes if c == channel and since <= t <= until]
        for t, v in ws:
            assert any(t - lag <= at <= t and want == v for at, want in wanted), \
                f"{role} relay written {v} at {t:.3f} with no decision wanting it in the {lag} s before"
        # Relay state over time: the last write before `since` (or the first decision's) and then each write.
        before = [(t, v) for t, c, v in writes if c == channel and t < since]
        state = before[-1][1] if before else wanted[0][1]
        events = sorted([(t, 0, v) for t, v in ws] + [(at, 1, want) for at, want in wanted])
        relay, want, disagree_since, longest = state, wanted[0][1], None, 0.0
        for t, kind, value in events:
            if kind == 0:
                relay = value
            else:
                want = value
            if relay != want and disagree_since is None:
                disagree_since = t
            elif relay == want and disagree_since is not None:
                longest = max(longest, t - disagree_since)
                disagree_since = None
        if disagree_since is not None:
            longest = max(longest, until - disagree_since)
        assert longest <= lag, f"{role} relay disagreed with the decisions for {longest:.3f} s (> {lag} s)"
        assert relay == wanted[-1][1] or (disagree_since is not None and until - disagree_since <= lag), \
            f"{role} relay ends {relay}, the last decision wants {wanted[-1][1]}"
        worst[role] = round(longest, 4)
    return worst


def service_config(store: Path, *, bus: str = 'interface = "virtual"\nchannel = "x"', bms: str = "",
                   outputs: str = '[outputs]\nbackend = "memory"\n', modbus_port: int = 0, metrics_port: int = 0,
                   extra: str = "") -> str:
    return (f"[bus]\n{bus}\n[bms]\ndiscovery_window = 1.0\n{bms}\n[store]\npath = \"{store}\"\n{outputs}\n"
            f"[modbus]\nhost = \"127.0.0.1\"\nport = {modbus_port}\n[metrics]\nhost = \"127.0.0.1\"\n"
            f"port = {metrics_port}\n[web]\nport = 0\n{extra}")


class ServiceRig:
    """`Service` on an event-loop thread and a simulator on the same python-can virtual bus."""

    def __init__(self, tmp_path: Path, *, scenario: str = "steady", bank: str = "2s1p-12v100", speed: float = 1.0,
                 board: RelayBoard | None = None, bms: str = "", outputs: str = '[outputs]\nbackend = "memory"\n',
                 extra: str = "") -> None:
        self.channel = f"faults-{uuid.uuid4().hex[:8]}"
        text = service_config(tmp_path / "state.db", bus=f'interface = "virtual"\nchannel = "{self.channel}"',
                              bms=bms, outputs=outputs, extra=extra)
        self.config = parse_config(text)
        self.service = Service(self.config, board=board)
        self.board = self.service.board
        self.decisions = DecisionLog(self.service.core)
        self.sim = Simulator.from_scenario(scenario, bank, speed=speed)
        self.sim_bus = can.Bus(interface="virtual", channel=self.channel)
        self.sim_stop = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.stop = asyncio.Event()
        self.result: list[int] = []
        self.errors: list[BaseException] = []

    def __enter__(self) -> ServiceRig:
        threading.Thread(target=self.sim.run, args=(self.sim_bus,), kwargs={"stop_event": self.sim_stop},
                         name="sim", daemon=True).start()

        def serve() -> None:
            asyncio.set_event_loop(self.loop)
            try:
                self.result.append(self.loop.run_until_complete(self.service.run(self.stop)))
            except BaseException as error:  # reported by shutdown(): a service that dies is a failed test
                self.errors.append(error)

        self.thread = threading.Thread(target=serve, name="service", daemon=True)
        self.thread.start()
        return self

    @property
    def decision(self) -> Decision | None:
        return self.service.decision

    def on(self, *channels: int) -> bool:
        relays = self.board.relays  # type: ignore[attr-defined]
        return all(relays[c] for c in channels)

    def on_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        async def call() -> Any:
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(10)

    def shutdown(self) -> int:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(timeout=20)
        assert not self.errors, f"the service died: {self.errors!r}"
        assert self.result, "the service did not stop within 20 s"
        return self.result[0]

    def __exit__(self, *exc: object) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.stop.set)
            self.thread.join(timeout=20)
        self.sim_stop.set()
        self.sim_bus.shutdown()


# -- processes ---------------------------------------------------------------------------------------------
class ProcessRig:
    """`smallbms-bus run` against `smallbms-bus simulate`, both on one SLCAN pseudo-terminal wire, relays on a
    Modbus TCP I/O module. The simulator and the relay module outlive restarts of the service."""

    def __init__(self, tmp_path: Path, *, scenario: str = "steady", bank: str = "2s1p-12v100",
                 modbus: str = "", metrics: bool = False, bms: str = "", store: str = "",
                 store_path: Path | None = None) -> None:
        self.tmp = tmp_path
        self.scenario, self.bank = scenario, bank
        self.modbus_port = free_port()
        self.metrics_port = free_port() if metrics else 0
        self.store = store_path or tmp_path / "state.db"
        self.hub = SlcanHub()
        self.module = VirtualModbusTcpModule(unit=1)
        outputs = (f'[outputs]\nbackend = "modbus"\n[outputs.options]\ntransport = "tcp"\nhost = "127.0.0.1"\n'
                   f"port = {self.module.port}\nunit = 1\n")
        text = service_config(self.store, bus=f'interface = "slcan"\nchannel = "{self.hub.path("slcan1")}"',
                              bms=bms, outputs=outputs, modbus_port=self.modbus_port, metrics_port=self.metrics_port)
        text = text.replace("[modbus]\n", f"[modbus]\n{modbus}\n").replace("[store]\n", f"[store]\n{store}\n")
        self.config = tmp_path / "smallbms-bus.toml"
        self.config.write_text(text)
        parse_config(text)  # a typo in a test's config fails here, not as a service that exits 2
        self.simulator: subprocess.Popen | None = None
        self.service: subprocess.Popen | None = None
        self.notify_path = str(tmp_path / "notify.sock")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(self.notify_path)
        self.starts = 0

    def __enter__(self) -> ProcessRig:
        self.simulator = subprocess.Popen([*CMD, "simulate", "--interface", "slcan", "--channel",
                                           self.hub.path("slcan0"), "--bank", self.bank, "--scenario", self.scenario],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self

    def start(self) -> subprocess.Popen:
        """Start the service; stderr goes to a file per start (a pipe nobody reads could fill and block it)."""
        assert self.service is None or self.service.poll() is not None, "the service is already running"
        self.starts += 1
        self.stderr_path = self.tmp / f"service-{self.starts}.err"
        with self.stderr_path.open("w") as err:
            self.service = subprocess.Popen([*CMD, "run", "--config", str(self.config)], stdout=subprocess.DEVNULL,
                                            stderr=err, env={**os.environ, "NOTIFY_SOCKET": self.notify_path,
                                                             "PYTHONUNBUFFERED": "1"})
        return self.service

    def wait_ready(self, timeout: float = 15.0) -> float:
        """Block until this start's READY=1; return time.monotonic() then."""
        assert self.service is not None
        deadline = time.monotonic() + timeout
        while True:
            self.notify.settimeout(max(0.01, min(0.2, deadline - time.monotonic())))
            try:
                if self.notify.recv(256) == b"READY=1":
                    return time.monotonic()
            except TimeoutError:
                pass
            if self.service.poll() is not None:
                raise AssertionError(f"the service exited with {self.service.returncode}: {self.stderr()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no READY=1 within {timeout} s")

    def drain_notify(self) -> None:
        self.notify.setblocking(False)
        try:
            while True:
                self.notify.recv(256)
        except BlockingIOError:
            pass
        finally:
            self.notify.setblocking(True)

    def stderr(self) -> str:
        return self.stderr_path.read_text() if hasattr(self, "stderr_path") else ""

    def kill(self) -> None:
        if self.service is not None and self.service.poll() is None:
            self.service.send_signal(signal.SIGKILL)
            self.service.wait(timeout=10)

    def stop(self) -> int:
        assert self.service is not None
        self.service.send_signal(signal.SIGTERM)
        return self.service.wait(timeout=30)

    def client(self, *, source: str | None = None, timeout: float = 3.0) -> ModbusTcpClient:
        client = ModbusTcpClient("127.0.0.1", port=self.modbus_port, timeout=timeout, retries=0,
                                 source_address=(source, 0) if source else None)
        assert client.connect(), "the service's Modbus port does not accept connections"
        return client

    def metrics(self) -> dict[str, float]:
        """One scrape of /metrics as {series: value} (labels kept in the key)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                values[key] = float(value)
        return values

    def __exit__(self, *exc: object) -> None:
        try:
            if self.service is not None and self.service.poll() is None:
                self.service.send_signal(signal.SIGTERM)
                try:
                    self.service.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    self.service.kill()
                    self.service.wait()
            if self.simulator is not None:
                self.simulator.terminate()
                self.simulator.wait(timeout=10)
        finally:
            self.notify.close()
            self.module.close()
            self.hub.close()


def metric(values: dict[str, float], name: str, **labels: str) -> float:
    """The value of one series of a scrape; labels must match exactly."""
    if labels:
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for key, value in values.items():
            m = re.fullmatch(rf"{re.escape(name)}\{{(.*)\}}", key)
            if m and ",".join(sorted(m.group(1).split(","))) == want:
                return value
        raise AssertionError(f"no series {name}{{{want}}}")
    return values[name]
