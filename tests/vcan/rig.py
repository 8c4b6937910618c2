"""The rig of the vcan suite: `smallbms-bus run` (interface socketcan, channel vcan0) and `smallbms-bus simulate`
as two processes on vcan0, the real deployment shape; the relays on a virtual Modbus TCP I/O module; and the
test as a third node on the bus that records every frame (decoded through the DBC, and in a candump-style log
written by can.Logger) and every relay change, each with the time it saw it.

Runs where vcan0 is up: natively (`sudo deploy/can/vcan-up.sh vcan0 && .venv/bin/python -m pytest -m vcan`)
or inside a CAN-capable kernel under QEMU (`bash tests/vcan/run-in-vm`), where Python runs about 18x
slower (software emulation). So the rules' own bounds (discovery window, comm_timeout, the 30 s pre-alarm
lead, the 2 s recovery) are asserted tightly and reaction times loosely (REACT_S).
"""

from __future__ import annotations

import functools
import os
import signal
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
START_S = 120.0  # one process's start (imports, DBC): under emulation 10-20 s, natively under 1 s
REACT_S = 3.0  # a frame or a timer to a relay: natively ~10 ms, under emulation well under 1 s
TOL_S = 0.25  # slack on bounds between a frame and a relay: relays are sampled every 20 ms by a thread
LEARN_S = 10.0  # first frame to outputs on: discovery window (1 s) + both BAT_SERIAL halves (1 s apart) + start-up skew

R = TypeVar("R")
Process = subprocess.Popen | Forked


@functools.cache
def dbc() -> Database:
    """Parsed once per session: a parse costs about 5 s under emulation."""
    return load_dbc()


@dataclass(frozen=True)
class Seen:
    at: float  # when the frame arrived, on this process's time.monotonic() clock
    report: Any


class Recorder:
    """A third node on the bus and a probe on the relay module: what happened, and when."""

    def __init__(self, module: VirtualModbusTcpModule, log_path: Path) -> None:
        self.module, self.log_path = module, log_path
        self.decoder = FrameDecoder(dbc())
        self.frames: list[Seen] = []
        self.relays: list[tuple[float, dict[int, bool]]] = [(time.monotonic(), module.relays)]
        self._stop = threading.Event()
        self._bus = can.Bus(interface="socketcan", channel=CHANNEL)
        self._logger = can.Logger(str(log_path))  # .log: candump -L lines, "(time) vcan0 101#..."
        self._threads = [threading.Thread(target=self._listen, daemon=True),
                         threading.Thread(target=self._probe, daemon=True)]
        for thread in self._threads:
            thread.start()

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self._bus.recv(0.1)
            except (can.CanError, OSError):  # vcan0 taken down by a test: keep listening
                time.sleep(0.05)
                continue
            if msg is None:
                continue
            # The kernel's receive time (SO_TIMESTAMP, wall clock) on the monotonic clock: this thread may run
            # late under emulation, the kernel stamps the frame when it arrives.
            at = time.monotonic() - max(0.0, time.time() - msg.timestamp)
            self._logger(msg)
            report = self.decoder.decode(msg)
            if report is not None:
                self.frames.append(Seen(at, report))

    def _probe(self) -> None:
        last = self.relays[-1][1]
        while not self._stop.wait(0.02):
            state = self.module.relays
            if state != last:
                self.relays.append((time.monotonic(), state))
                last = state

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
    def of(self, kind: type[R], after: float = 0.0, node: int | None = None) -> list[tuple[float, R]]:
        return [(s.at, s.report) for s in list(self.frames) if isinstance(s.report, kind) and s.at >= after
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
[modbus]
host = "127.0.0.1"
port = {modbus_port}
""")
    return path


class Rig:
    """Relay module, recorder, `smallbms-bus run`, then (or with it) `smallbms-bus simulate`, on vcan0."""

    def __init__(self, directory: Path, scenario: str, bank: str, speed: float, *, comm_timeout: float = 5.0,
                 discovery_window: float = 1.0, modbus_port: int = 0, forks: ForkServer | None = None,
                 together: bool = False) -> None:
        """`together`: start the simulator with the service rather than once it runs (saves a start-up), for
        scenarios whose clock only matters under a BMS (a charger or load that needs BMS_STATE to run)."""
        if not socketcan_is_up(CHANNEL):
            pytest.skip(NO_VCAN)
        self.directory = directory
        self.modbus_port = modbus_port
        self.started = time.monotonic()
        self.forks = forks  # None: fresh interpreters (`python -m smallbms_bus.cli`), else forks of a warm one
        self.service_log, self.sim_log = directory / "service.log", directory / "simulate.log"
        self.service: Process | None = None
        self.simulator: Process | None = None
        self.recorder: Recorder | None = None
        self.module = VirtualModbusTcpModule(unit=1)
        try:
            self.recorder = Recorder(self.module, directory / "bus.log")
            config = write_config(directory / "smallbms-bus.toml", directory / "state.db", self.module.port,
                                  comm_timeout=comm_timeout, discovery_window=discovery_window,
                                  modbus_port=modbus_port)
            self.service = self._start(["run", "--config", str(config)], self.service_log)
            simulate = ["simulate", "--interface", "socketcan", "--channel", CHANNEL, "--bank", bank,
                        "--scenario", scenario, "--speed", str(speed)]
            if together:
                self.simulator = self._start(simulate, self.sim_log)
            self.wait(lambda: "running: bus" in self.service_log.read_text(), START_S, "the service running")
            self.service_running = time.monotonic()
            if not together:
                self.simulator = self._start(simulate, self.sim_log)
            self.first_frame = self.wait(lambda: self.first(BatteryStatus), START_S, "the simulator's first frame")
            print(f"rig: service running after {self.service_running - self.started:.1f} s, first battery frame"
                  f" {self.first_frame - self.started:.1f} s after the start", file=sys.stderr)
        except BaseException:
            self.close()
            raise

    def _start(self, argv: list[str], log: Path) -> Process:
        log.touch()
        if self.forks is not None:
            return self.forks.spawn(argv, str(log))
        with log.open("w") as err:
            return subprocess.Popen([*CMD, *argv], stdout=subprocess.DEVNULL, stderr=err,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def first(self, kind: type, after: float = 0.0, where: Callable[[Any], bool] = lambda r: True) -> float | None:
        return next((at for at, r in self.recorder.of(kind, after) if where(r)), None)

    def state_from(self, at: float) -> BmsState:
        """The first BMS_STATE seen at or after `at`."""
        return next(s for _, s in self.recorder.of(BmsState, at))

    def bms_state(self) -> BmsState | None:
        states = self.recorder.of(BmsState, time.monotonic() - 1.0)
        return states[-1][1] if states else None

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
            time.sleep(0.02)

    def wait_relays(self, wanted: dict[int, bool], timeout: float, after: float = 0.0) -> float:
        """The first time after `after` that every channel of `wanted` is as wanted."""
        def reached() -> float | None:
            return next((at for at, state in list(self.recorder.relays)
                         if at >= after and all(state[c] == v for c, v in wanted.items())), None)
        return self.wait(reached, timeout, f"relays {wanted}")

    def describe(self) -> str:
        def tail(path: Path) -> str:
            return "\n".join(path.read_text().splitlines()[-12:]) if path.exists() else "(no log)"
        return (f"last BMS_STATE {self.bms_state()}\nrelays {self.recorder.relays[-1][1]}\n"
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


def current_settles(r: Rig, after: float, node: int = 1, limit: float = 0.3) -> float:
    """When the simulated devices stopped: the first BAT_STATUS after `after` with |current| <= `limit` A."""
    return r.wait(lambda: r.first(BatteryStatus, after, lambda s: s.node == node and abs(s.current) <= limit),
                  REACT_S, f"battery {node}'s current back to 0 A (charger and load stopped)")

