"""The rig of the vcan suite: `smallbms-bus run` (interface socketcan, channel vcan0) and `smallbms-bus simulate`
as two processes on vcan0, the real deployment shape; the relays on a virtual Modbus TCP I/O module; and the
test as a third node on the bus that records every frame (decoded through the DBC, and in a candump-style log
written by can.Logger) and every relay change.

Runs where vcan0 is up: natively (`sudo deploy/can/vcan-up.sh vcan0 && .venv/bin/python -m pytest -m vcan`)
or inside a CAN-capable kernel under QEMU (`bash tests/vcan/run-in-vm`), where Python runs about 18x
slower (software emulation), and more with a loaded host. So nothing is timed by when this process got round
to seeing something. Every time is on one clock, CLOCK_REALTIME (`time.time()`):
- a frame: the kernel's timestamp (SO_TIMESTAMPNS), taken when the sender sent it on vcan0;
- a decision of the service's core: the `wall` of its event in the service's own event log (the store), taken
  by the core when it decided;
- a relay change: stamped by the relay module as it applies the write (the earliest a receiver can know).
The rules' own bounds (discovery window, comm_timeout, the 30 s pre-alarm lead, the 2 s recovery) are asserted
between frames and decisions, exactly (CLOCK_TOL_S); what depends on the machine's scheduling (a frame to the
decision it causes, a decision to its relay) loosely (REACT_S). Waits have generous deadlines (WAIT_S): they
only bound a hang and are never the assertion.
"""

from __future__ import annotations

import functools
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import can
import pytest
from cantools.database import Database

from smallbms_bus.link.bus import socketcan_is_up
from smallbms_bus.link.codec import FrameDecoder, load_dbc
from smallbms_bus.reports import BatteryStatus, BmsState
from smallbms_bus.sim.relay_boards import VirtualModbusTcpModule
from tests.transports import NO_VCAN
from tests.vcan.forkserver import Forked, ForkServer

CMD = [sys.executable, "-m", "smallbms_bus.cli"]
CHANNEL = "vcan0"
LOAD, CHARGE, PRE_ALARM = 1, 2, 3  # the config's default board channels
START_S = 300.0  # deadline of one process's start (imports, DBC): natively under 1 s, 10-70 s under emulation
WAIT_S = 120.0  # deadline of a wait for something that must happen (a hang, not a bound of a rule)
REACT_S = 3.0  # the machine's scheduling: a frame to the decision it causes, a decision to its relay
CLOCK_TOL_S = 0.01  # frames, decisions and relays are all on CLOCK_REALTIME: only NTP slewing differs

R = TypeVar("R")
Process = subprocess.Popen | Forked


@functools.cache
def dbc() -> Database:
    """Parsed once per session: a parse costs about 5 s under emulation."""
    return load_dbc()


@dataclass(frozen=True)
class Seen:
    at: float  # when the frame was sent: the kernel's timestamp (CLOCK_REALTIME)
    report: Any


class StampingModule(VirtualModbusTcpModule):
    """The relay module, recording each change of its relays with the time it applied the write."""

    def __init__(self, unit: int) -> None:
        self.changes: list[tuple[float, dict[int, bool]]] = []
        super().__init__(unit=unit)
        self.changes.append((time.time(), self.relays))

    async def _action(self, *args: Any) -> Any:
        result = await super()._action(*args)
        state = self.relays
        if self.changes and state != self.changes[-1][1]:
            self.changes.append((time.time(), state))
        return result


class Recorder:
    """A third node on the bus, and the relay module's changes: what happened, and when."""

    def __init__(self, module: StampingModule, log_path: Path) -> None:
        self.module, self.log_path = module, log_path
        self.decoder = FrameDecoder(dbc())
        self.frames: list[Seen] = []
        self._stop = threading.Event()
        self._bus = can.Bus(interface="socketcan", channel=CHANNEL)
        self._logger = can.Logger(str(log_path))  # .log: candump -L lines, "(time) vcan0 101#..."
        self._threads = [threading.Thread(target=self._listen, daemon=True)]
        for thread in self._threads:
            thread.start()

    @property
    def relays(self) -> list[tuple[float, dict[int, bool]]]:
        return list(self.module.changes)

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self._bus.recv(0.1)
            except (can.CanError, OSError):  # vcan0 taken down by a test: keep listening
                time.sleep(0.05)
                continue
            if msg is None:
                continue
            self._logger(msg)
            report = self.decoder.decode(msg)
            if report is not None:  # this thread may run seconds late under emulation: the kernel's stamp counts
                self.frames.append(Seen(msg.timestamp, report))

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        self._bus.shutdown()
        self._logger.stop()

    def log_text(self) -> str:
        self._logger.file.flush()
        return self.log_path.read_text()

    # -- what was seen
    def of(self, kind: type[R], after: float = 0.0, node: int | None = None,
           before: float = float("inf")) -> list[tuple[float, R]]:
        return [(s.at, s.report) for s in list(self.frames) if isinstance(s.report, kind) and after <= s.at < before
                and (node is None or s.report.node == node)]

    def relay(self, channel: int) -> bool:
        return self.relays[-1][1][channel]

    def switched(self, channel: int, on: bool, after: float = 0.0) -> list[float]:
        """Times at which `channel` went to `on` (after `after`)."""
        out, previous = [], None
        for at, state in list(self.relays):
            if previous is not None and state[channel] == on and previous[channel] != on and at >= after:
                out.append(at)
            previous = state
        return out


def write_config(path: Path, store: Path, module_port: int, *, comm_timeout: float, discovery_window: float,
                 modbus_port: int) -> Path:
    path.write_text(f"""
[bus]
interface = "socketcan"
channel = "{CHANNEL}"
[bms]
comm_timeout = {comm_timeout}
discovery_window = {discovery_window}
[store]
path = "{store}"
[outputs]
backend = "modbus"
reassert_every = 5.0
[outputs.options]
transport = "tcp"
host = "127.0.0.1"
port = {module_port}
unit = 1
[metrics]
port = 0
[web]
port = 0
[modbus]
host = "127.0.0.1"
port = {modbus_port}
""")
    return path


@dataclass(frozen=True)
class Decided:
    """One event of the service's event log: what its core decided, and when (its own clocks)."""

    wall: float  # CLOCK_REALTIME when the core decided: comparable with the frames' kernel timestamps
    now: float  # the core's monotonic clock: exact durations between two decisions (the service's timers)
    name: str
    value: str
    reason: str


class Rig:
    """Relay module, recorder, `smallbms-bus run`, then (or with it) `smallbms-bus simulate`, on vcan0."""

    def __init__(self, directory: Path, scenario: str, bank: str, speed: float, *, comm_timeout: float = 5.0,
                 discovery_window: float = 1.0, modbus_port: int = 0, forks: ForkServer | None = None,
                 together: bool = False, fresh_service: bool = False) -> None:
        """`together`: start the simulator with the service rather than once it runs (saves a start-up), for
        scenarios whose clock only matters under a BMS (a charger or load that needs BMS_STATE to run).
        `fresh_service`: the service in a fresh interpreter (the console entry as deployed), the simulator still
        forked (a test partner: its start-up would only cost a minute under emulation)."""
        if not socketcan_is_up(CHANNEL):
            pytest.skip(NO_VCAN)
        self.directory = directory
        self.modbus_port = modbus_port
        self.started = time.time()
        self.forks = forks  # None: fresh interpreters (`python -m smallbms_bus.cli`), else forks of a warm one
        self.service_log, self.sim_log = directory / "service.log", directory / "simulate.log"
        self.store = directory / "state.db"
        self.service: Process | None = None
        self.simulator: Process | None = None
        self.recorder: Recorder | None = None
        self.module = StampingModule(unit=1)
        try:
            self.recorder = Recorder(self.module, directory / "bus.log")
            config = write_config(directory / "smallbms-bus.toml", self.store, self.module.port,
                                  comm_timeout=comm_timeout, discovery_window=discovery_window,
                                  modbus_port=modbus_port)
            self.service = self._start(["run", "--config", str(config)], self.service_log, fresh=fresh_service)
            simulate = ["simulate", "--interface", "socketcan", "--channel", CHANNEL, "--bank", bank,
                        "--scenario", scenario, "--speed", str(speed)]
            if together:
                self.simulator = self._start(simulate, self.sim_log)
            self.wait(lambda: "running: bus" in self.service_log.read_text(), START_S, "the service running")
            self.service_running = time.time()
            if not together:
                self.simulator = self._start(simulate, self.sim_log)
            self.first_frame = self.wait(lambda: self.first(BatteryStatus), START_S, "the simulator's first frame")
            print(f"rig: service running after {self.service_running - self.started:.1f} s, first battery frame"
                  f" {self.first_frame - self.started:.1f} s after the start", file=sys.stderr)
        except BaseException:
            self.close()
            raise

    def _start(self, argv: list[str], log: Path, fresh: bool = False) -> Process:
        log.touch()
        if self.forks is not None and not fresh:
            return self.forks.spawn(argv, str(log))
        with log.open("w") as err:
            return subprocess.Popen([*CMD, *argv], stdout=subprocess.DEVNULL, stderr=err,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def first(self, kind: type, after: float = 0.0, where: Callable[[Any], bool] = lambda r: True) -> float | None:
        return next((at for at, r in self.recorder.of(kind, after) if where(r)), None)

    def state_from(self, at: float) -> BmsState:
        """The first BMS_STATE sent at or after `at` (waits for it)."""
        return self.wait(lambda: next((s for _, s in self.recorder.of(BmsState, at)), None), WAIT_S,
                         "a BMS_STATE")

    def bms_state(self) -> BmsState | None:
        """The last BMS_STATE seen."""
        states = self.recorder.of(BmsState)
        return states[-1][1] if states else None

    # -- the service's own event log (its store), read-only beside the running service
    def events(self) -> list[Decided]:
        """Every event the service has committed to its store, oldest first."""
        if not self.store.exists():
            return []
        try:
            with sqlite3.connect(f"file:{self.store}?mode=ro", uri=True, timeout=5) as db:
                rows = db.execute("SELECT wall, now, name, value, reason FROM events ORDER BY id").fetchall()
        except sqlite3.OperationalError:  # not created yet, or busy: the caller waits and asks again
            return []
        return [Decided(*row) for row in rows]

    def event(self, name: str, value: str, after: float = 0.0) -> Decided:
        """The first decision `name` -> `value` taken at or after `after` (CLOCK_REALTIME); waits for the service
        to commit it (events are written with the state, within a few seconds)."""
        return self.wait(lambda: next((e for e in self.events() if e.name == name and e.value == value
                                       and e.wall >= after), None), WAIT_S, f"event {name} -> {value}")

    def wait(self, until: Callable[[], R], timeout: float, what: str) -> R:
        """Poll `until` until it returns something true; fail with what the bus and the processes said."""
        deadline = time.monotonic() + timeout
        while True:
            result = until()
            if result:
                return result
            for name, process in (("service", self.service), ("simulator", self.simulator)):
                if process is not None and process.poll() is not None:
                    raise AssertionError(f"{what}: the {name} exited with {process.returncode}\n{self.describe()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {timeout:g} s\n{self.describe()}")
            time.sleep(0.05)

    def wait_relays(self, wanted: dict[int, bool], after: float = 0.0) -> float:
        """The first time at or after `after` that every channel of `wanted` is as wanted (waits for it)."""
        def reached() -> float | None:
            return next((at for at, state in self.recorder.relays
                         if at >= after and all(state[c] == v for c, v in wanted.items())), None)
        return self.wait(reached, WAIT_S, f"relays {wanted}")

    def describe(self) -> str:
        def tail(path: Path) -> str:
            return "\n".join(path.read_text().splitlines()[-12:]) if path.exists() else "(no log)"
        events = "\n".join(f"  {e.wall:.3f} {e.name} -> {e.value}: {e.reason}" for e in self.events()[-12:])
        return (f"last BMS_STATE {self.bms_state()}\nrelays {self.recorder.relays[-1][1]}\n"
                f"--- events\n{events}\n"
                f"--- service log\n{tail(self.service_log)}\n--- simulator log\n{tail(self.sim_log)}")

    def close(self) -> None:
        for process in (self.simulator, self.service):  # batteries first, then the BMS (SIGTERM: outputs off)
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)
        if self.recorder is not None:
            self.recorder.close()
        self.module.close()


def earliest(*times: float | None) -> float | None:
    return min((t for t in times if t is not None), default=None)


def follows(relay: float, decided: Decided, what: str) -> None:
    """A relay change caused by `decided`: not before it, and within the machine's scheduling after it."""
    assert decided.wall - CLOCK_TOL_S <= relay <= decided.wall + REACT_S, \
        f"{what}: relay changed {relay - decided.wall:+.3f} s from the decision {decided}"


def figures(test: str, **values: float) -> None:
    """The measured margins, on stderr (pytest -rP shows them for passing tests: `run-in-vm -rP`)."""
    print(f"figures {test}: " + ", ".join(f"{k}={v:.3f}" for k, v in values.items()), file=sys.stderr)


def current_settles(r: Rig, after: float, node: int = 1, limit: float = 0.3) -> float:
    """When the simulated devices stopped: the first BAT_STATUS after `after` with |current| <= `limit` A."""
    return r.wait(lambda: r.first(BatteryStatus, after, lambda s: s.node == node and abs(s.current) <= limit),
                  WAIT_S, f"battery {node}'s current back to 0 A (charger and load stopped)")
