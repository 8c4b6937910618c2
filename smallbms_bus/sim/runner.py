"""Frames on time: the frame scheduler, the simulator that ties the parts, the real-time loop.

Theory of operation
-------------------
`FrameScheduler` knows each battery's streams and their periods from PROTOCOL.md: BAT_STATUS
every 100 ms, every BAT_CELLS_x the battery has every 500 ms, BAT_TEMPS, BAT_INFO and BAT_SERIAL
every 1 s (BAT_SERIAL alternates multiplexer 0 and 1). Given a time, `due(now)` returns the frames
due since the last call, encoded through the DBC by `FrameEncoder`. Due times are computed as
``start + phase + k * period`` (no drift from summing floats). Battery phases are spread over
90 ms so 50 batteries do not all transmit in the same millisecond. A caller that falls behind
gets one frame per stream, not a burst of the missed ones (a late frame is worth more than many
stale frames). A silent battery keeps its schedule but sends nothing.

`Simulator` holds bank + charger + load + scenario + scheduler. `step(now)` advances the physics
by ``speed * elapsed`` simulated seconds (in sub-steps of at least 50 ms and at most 2 s, split at
scenario actions; beyond 20 sub-steps per call the sub-steps grow instead), then returns the frames
due at `now`. Frame periods and the 1 s BMS_STATE watchdog of the devices run on `now`, the clock
the simulator is given: `speed` accelerates only the batteries' physics and the scenario's timeline
(`simulate`, next to a service that counts real time), while the demo gives it a `SimClock`
(sim/clock.py) shared with the service and keeps `speed` at 1, so the protocol's periods and the
BMS's timers are all simulated time (docs/simulator.md "Time"). `on_frame(msg)` decodes received
frames; a BMS_STATE goes to the charger and the load. `fast_forward(seconds)` runs the scenario's
start off-line (`simulate --start-at`).

Only `Simulator.run` touches the world: its `clock` (time.monotonic by default), `bus.send` and
`bus.recv`. It sends what is due, then listens for BMS_STATE until the next frame is due; `rate`
(clock seconds per real second) turns those waits into real ones. Bus errors are counted and logged
(rate-limited) and never end the loop: a simulator that dies on a glitch is a poor test partner.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import can

from smallbms_bus.link.codec import FrameDecoder, FrameEncoder
from smallbms_bus.protocol import frame_period
from smallbms_bus.reports import BmsState, Report
from smallbms_bus.sim.bank import DEFAULT_BANK, BankShape, VirtualBank
from smallbms_bus.sim.battery import VirtualBattery
from smallbms_bus.sim.devices import Devices
from smallbms_bus.sim.scenarios import DEFAULT_SCENARIO, Scenario, ScenarioPlayer, get_scenario

log = logging.getLogger(__name__)

STATUS_PERIOD_S = frame_period("BAT_STATUS")  # the DBC's GenMsgCycleTime
CELLS_PERIOD_S = frame_period("BAT_CELLS_1_4")
SLOW_PERIOD_S = frame_period("BAT_TEMPS")  # BAT_TEMPS, BAT_INFO, BAT_SERIAL (one stream: the DBC gives them one period)
STAGGER_S = 0.09  # battery phases spread over this window (< the 100 ms status period)
PHYSICS_STEP_S = 2.0
MIN_PHYSICS_STEP_S = 0.05  # simulated seconds: half the BAT_STATUS period
MAX_SUBSTEPS = 20
MAX_IDLE_S = 0.05  # the loop wakes at least this often (physics, stop request, duration)
ERROR_LOG_INTERVAL_S = 5.0


@dataclass
class _Stream:
    battery: VirtualBattery
    kind: str  # "status", "cells" or "slow"
    period: float
    phase: float
    index: int = 0  # next due time = start + phase + index * period

    def due_time(self, start: float) -> float:
        return start + self.phase + self.index * self.period


class FrameScheduler:
    """Which frames are due at a time, for every battery of a bank."""

    def __init__(self, bank: VirtualBank, encoder: FrameEncoder, stagger_s: float = STAGGER_S) -> None:
        self.bank = bank
        self.encoder = encoder
        self.start: float | None = None
        self.skipped = 0  # periods a late caller missed, over all streams (one frame per stream is sent, not a burst)
        self._serial_part = {b.node: 0 for b in bank.batteries}
        count = len(bank.batteries)
        self._streams: list[_Stream] = []
        for i, battery in enumerate(bank.batteries):
            phase = stagger_s * i / count
            self._streams += [
                _Stream(battery, "status", STATUS_PERIOD_S, phase),
                _Stream(battery, "cells", CELLS_PERIOD_S, phase),
                _Stream(battery, "slow", SLOW_PERIOD_S, phase),
            ]

    def next_due(self) -> float | None:
        """When the next frame is due (None before the first call to `due`)."""
        if self.start is None:
            return None
        start = self.start
        return min(s.due_time(start) for s in self._streams)

    def due(self, now: float) -> list[can.Message]:
        """Frames due at `now`, in due-time order. The first call sets the schedule's origin."""
        if self.start is None:
            self.start = now
        start = self.start
        ready: list[tuple[float, int, _Stream]] = []
        for order, stream in enumerate(self._streams):
            due_at = stream.due_time(start)
            if due_at > now:
                continue
            missed = math.floor((now - due_at) / stream.period)  # skip, do not burst
            stream.index += missed
            if not stream.battery.silent:
                self.skipped += missed
            ready.append((stream.due_time(start), order, stream))
            stream.index += 1
        ready.sort(key=lambda item: (item[0], item[1]))
        frames: list[can.Message] = []
        for _, _, stream in ready:
            if not stream.battery.silent:
                frames += self._frames(stream)
        return frames

    def _frames(self, stream: _Stream) -> list[can.Message]:
        battery, encode = stream.battery, self.encoder
        if stream.kind == "status":
            return [encode.status(battery.status())]
        if stream.kind == "cells":
            return [encode.cells(r) for r in battery.cell_reports()]
        part = self._serial_part[battery.node]
        self._serial_part[battery.node] = 1 - part
        return [encode.temps(battery.temps()), encode.info(battery.info()),
                encode.serial(battery.serial_fragment(part))]


@dataclass
class RunStats:
    frames_sent: int = 0
    send_errors: int = 0
    frames_received: int = 0
    receive_errors: int = 0
    bms_states: int = 0


class _Bus(Protocol):
    def send(self, msg: can.Message, timeout: float | None = None) -> None: ...
    def recv(self, timeout: float | None = None) -> can.Message | None: ...


class _ErrorLog:
    """Logs the first error of a kind at once, then at most one summary per interval."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.suppressed = 0
        self.last_logged: float | None = None

    def __call__(self, error: Exception, now: float) -> None:
        if self.last_logged is None or now - self.last_logged >= ERROR_LOG_INTERVAL_S:
            extra = f" (+{self.suppressed} more)" if self.suppressed else ""
            log.warning("%s failed: %s%s", self.what, error, extra)
            self.last_logged, self.suppressed = now, 0
        else:
            self.suppressed += 1


def _device(name: str, stopped_by: str | None) -> str:
    return f"{name} on" if stopped_by is None else f"{name} off ({stopped_by})"


class Simulator:
    def __init__(
        self,
        bank: VirtualBank,
        devices: Devices,
        scenario: Scenario | None = None,
        encoder: FrameEncoder | None = None,
        decoder: FrameDecoder | None = None,
        speed: float = 1.0,
    ) -> None:
        self.bank = bank
        self.devices = devices
        self.scenario = scenario or get_scenario(DEFAULT_SCENARIO)
        self.encoder = encoder or FrameEncoder()
        self.decoder = decoder or FrameDecoder(self.encoder.db)
        self.scheduler = FrameScheduler(bank, self.encoder)
        self.player = ScenarioPlayer(self.scenario)
        self.sim_time = 0.0
        self.last_now: float | None = None
        # Simulated time is anchor_sim + speed * (now - anchor_now), recomputed from the anchor
        # rather than summed step by step, so it does not drift and hits action times exactly.
        self._anchor: tuple[float, float] | None = None  # (now, sim_time) at the last change of speed
        self._speed = 1.0
        self.speed = speed
        self.last_bms_state: BmsState | None = None
        self.last_bms_state_at: float | None = None  # the clock's time of the last BMS_STATE received
        self.stats = RunStats()
        self.net_ah = 0.0  # Ah into the bank since the start (negative: drawn), the physics' own count
        self.player.apply_due(0.0, bank, devices)

    @classmethod
    def from_scenario(
        cls,
        scenario: Scenario | str = DEFAULT_SCENARIO,
        bank: BankShape | str = DEFAULT_BANK,
        soc: float | None = None,
        ambient: float | None = None,
        seed: int = 0,
        ignore_bms: bool = False,
        speed: float = 1.0,
        encoder: FrameEncoder | None = None,
    ) -> Simulator:
        scenario = get_scenario(scenario) if isinstance(scenario, str) else scenario
        virtual_bank, devices = scenario.build(bank, soc=soc, ambient=ambient, seed=seed, ignore_bms=ignore_bms)
        return cls(virtual_bank, devices, scenario, encoder=encoder, speed=speed)

    # --- pure part: driven by any clock ---------------------------------------------------

    @property
    def speed(self) -> float:
        return self._speed

    @speed.setter
    def speed(self, value: float) -> None:
        if not value > 0:
            raise ValueError(f"speed must be > 0, not {value}")
        if self.last_now is not None:
            self._anchor = (self.last_now, self.sim_time)
        self._speed = value

    def step(self, now: float) -> list[can.Message]:
        """Advance physics by `speed` x the time since the last call; return the frames due at `now`."""
        if self._anchor is None:
            self._anchor = (now, self.sim_time)
        if self.last_now is None or now > self.last_now:
            anchor_now, anchor_sim = self._anchor
            end = anchor_sim + (now - anchor_now) * self._speed
            # Physics in steps of at least MIN_PHYSICS_STEP_S: a bank's state moves little in 50 ms, and stepping
            # 50 batteries at every frame's due time (hundreds a second) cost most of a core.
            next_action = self.player.next_at()
            if end - self.sim_time >= MIN_PHYSICS_STEP_S or (next_action is not None and end >= next_action):
                self.advance_to(end, now)
            self.last_now = now
        return self.scheduler.due(now)

    def advance_to(self, end: float, now: float) -> None:
        """Physics only, up to simulated time `end`, with the devices judging BMS_STATE at `now`."""
        max_step = max(PHYSICS_STEP_S, (end - self.sim_time) / MAX_SUBSTEPS)
        while self.sim_time < end:
            target = min(end, self.sim_time + max_step)
            next_action = self.player.next_at()
            if next_action is not None and self.sim_time < next_action < target:
                target = next_action
            current = self.bank.operating_current(self.devices.characteristic(now, self.sim_time))
            self.bank.step(current, target - self.sim_time)
            self.net_ah += current * (target - self.sim_time) / 3600.0
            self.sim_time = target
            self.player.apply_due(self.sim_time, self.bank, self.devices)

    def fast_forward(self, seconds: float) -> None:
        """Run the scenario's first `seconds` off-line, before any frame: physics in steps of at most
        PHYSICS_STEP_S with the charger and load running as the scenario sets them (as if a BMS allowed
        everything), scenario actions at their times. The bank then goes on the bus in that state."""
        if self.last_now is not None:
            raise RuntimeError("fast_forward is for before the first step")
        devices = (self.devices.charger, self.devices.load)
        saved = [d.ignore_bms for d in devices]
        for device in devices:
            device.ignore_bms = True
        try:
            end = self.sim_time + seconds
            while self.sim_time < end:
                self.advance_to(min(end, self.sim_time + PHYSICS_STEP_S * MAX_SUBSTEPS), 0.0)
        finally:
            for device, ignore in zip(devices, saved, strict=True):
                device.ignore_bms = ignore
        self._anchor = None  # the next step(now) continues from here
        self.net_ah = 0.0  # what the bus can see starts now

    def on_frame(self, msg: can.Message, now: float | None = None) -> Report | None:
        """Feed a received frame; a BMS_STATE reaches the charger and the load."""
        self.stats.frames_received += 1
        report = self.decoder.decode(msg)
        if isinstance(report, BmsState):
            when = now if now is not None else (self.last_now or 0.0)
            self.devices.on_bms_state(report, when)
            self.last_bms_state, self.last_bms_state_at = report, when
            self.stats.bms_states += 1
        return report

    def status_line(self) -> str:
        bank, now = self.bank, self.last_now or 0.0
        soc_low, soc_high = bank.soc_range()
        cell_low, cell_high = bank.cell_voltage_range()
        temps = [t for b in bank.batteries for t in b.cell_temperatures()]
        flags = bank.active_flags()
        flag_text = ", ".join(f"{name}@{','.join(map(str, nodes))}" for name, nodes in flags.items()) or "none"
        charger, load = self.devices.charger, self.devices.load
        bms = f"{_device('charger', charger.stopped_by(now))}, {_device('load', load.stopped_by(now))}"
        if charger.ignore_bms or load.ignore_bms:
            bms += " (BMS ignored)"
        return (f"sim {self.sim_time:8.1f} s | {bank.voltage:6.2f} V {bank.current:+7.1f} A {self.net_ah:+.3f} Ah"
                f" | SoC {soc_low:5.1f}-{soc_high:5.1f} % | cells {cell_low:.3f}-{cell_high:.3f} V"
                f" | {min(temps):.1f}-{max(temps):.1f} degC | {bms} | flags: {flag_text}")

    # --- real time ------------------------------------------------------------------------

    def run(
        self,
        bus: _Bus,
        duration: float | None = None,
        speed: float | None = None,
        stop_event: threading.Event | None = None,
        status_every: float = 5.0,
        on_status: Callable[[Simulator], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        rate: float = 1.0,
    ) -> RunStats:
        """Send frames on time and obey BMS_STATE until `duration` (s of `clock`) passes or `stop_event` is set.

        `speed` (None = keep the simulator's) multiplies the physics only; frame periods follow `clock`.
        `rate` is how many `clock` seconds pass per real second (a `SimClock`'s speed; then `speed` is
        1 and the clock carries the acceleration): the loop's waits are divided by it.
        """
        if speed is not None:
            self.speed = speed
        if not rate > 0:
            raise ValueError(f"rate must be > 0, not {rate}")
        send_log, recv_log = _ErrorLog("send"), _ErrorLog("receive")
        start = clock()
        end = None if duration is None else start + duration
        next_status = start + status_every
        while not (stop_event is not None and stop_event.is_set()):
            now = clock()
            if end is not None and now >= end:
                break
            for msg in self.step(now):
                try:
                    bus.send(msg)
                    self.stats.frames_sent += 1
                except (can.CanError, OSError) as error:
                    self.stats.send_errors += 1
                    send_log(error, now)
            if on_status is not None and now >= next_status:
                on_status(self)
                next_status = now + status_every
            next_due = self.scheduler.next_due()
            idle = now + MAX_IDLE_S * rate  # MAX_IDLE_S is real seconds
            wake = idle if next_due is None else min(next_due, idle)
            if end is not None:
                wake = min(wake, end)
            self._receive_until(bus, wake, clock, recv_log, rate)
        return self.stats

    def _receive_until(self, bus: _Bus, wake: float, clock: Callable[[], float], errors: _ErrorLog,
                       rate: float = 1.0) -> None:
        while (timeout := wake - clock()) > 0:
            try:
                msg = bus.recv(timeout=timeout / rate)
            except (can.CanError, OSError, ValueError) as error:  # slcan raises ValueError on a garbled line
                self.stats.receive_errors += 1
                errors(error, clock())
                time.sleep(max(0.0, min(timeout / rate, MAX_IDLE_S)))  # a dead port fails at once: do not spin
                return
            if msg is not None:
                self.on_frame(msg, clock())
