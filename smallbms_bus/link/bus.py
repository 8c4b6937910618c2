"""The battery link: a python-can bus opened from config, kept open (COM-4), never able to stall the BMS (COM-5).

Theory of operation
-------------------
The link is a device with ONE owner thread (the service's "bus" thread runs `Link.serve`): only that
thread opens, reads, writes and closes the python-can bus (python-can buses are not guaranteed to be
thread-safe for a send beside a receive). Other threads use three thread-safe calls only:

- `offer(frame)`: the event loop hands over BMS_STATE through a latest-wins slot of one frame and never
  waits; the owner thread writes it at once (it is woken through a pipe while it waits for frames). A
  frame replaced before it went out, or offered while the link is down, is counted as unsent.
- `status(now)`: the link's state and why. It also checks the age of the oldest unsent BMS_STATE: when
  that reaches SEND_DEADLINE_S (1 s) the link is *stalled* (COM-5), which is a link fault like COM-4.
  The event loop calls it every tick, so a stall is seen even while the owner thread is stuck inside a
  system call (a USB driver that never returns); the owner, once it runs again, closes the bus and
  re-opens it with back-off.
- `counters()`: plain integers for metrics.

The owner hands decoded reports to the event loop (`serve`'s `deliver`): at once when one of them may
cross a protective threshold (the core's own `protective_signature` changed: a flag, a cell or
temperature limit, an identity), otherwise at most HOLD_S (20 ms) later, so the loop is woken a few
dozen times a second instead of once per read (at 750 frames/s, about 400 reads a second).

`poll(timeout)` is the owner's work: (re-)open with back-off, write the waiting BMS_STATE, receive and
decode what arrived within `timeout`. It never raises on bus trouble:

- a frame the DBC rejects is dropped and counted by the `FrameDecoder` (COM-3);
- an SLCAN line that is not exactly one frame is counted by kind in `link.slcan.LineParser` (COM-3);
  other python-can interfaces that raise ValueError on a garbled frame are counted as ``garbled``;
- a port error (adapter unplugged, serial port gone, SocketCAN interface down or missing: CanError,
  OSError) takes the link down, as does a stall. The bus is shut down and re-opened with exponential
  back-off (0.1 s doubling to 5 s; the back-off restarts only after the link stayed up for 10 s, so a
  flapping adapter is retried ever more slowly). The BMS core treats any down state as comms loss.

Logging: a WARNING with the reason when an outage starts (the first failed open, the link lost, the stall),
DEBUG for every retry, INFO when the link is up again. The state (`BusState`) and the reason are shown in
Modbus block A (`bus_state`), in metrics (`smallbms_bus_state`, `smallbms_bus_down_reason_info`) and by
`smallbms-bus status`.

Timing decisions read only the injected `clock` (monotonic by default), so tests drive back-off.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import can

from smallbms_bus.backoff import Backoff
from smallbms_bus.bms.alarms import BusState
from smallbms_bus.bms.settings import DEFAULT_SETTINGS
from smallbms_bus.bms.signature import protective_signature
from smallbms_bus.link.codec import FrameDecoder
from smallbms_bus.link.slcan import LINE_KINDS, SlcanBus
from smallbms_bus.reports import Report

log = logging.getLogger(__name__)

DEFAULT_BITRATE = 500_000
# Interfaces whose bitrate is set outside the process (ip link) or that have none.
_NO_BITRATE = {"socketcan", "virtual"}
MAX_FRAMES_PER_POLL = 256  # bounds one poll's work (and one batch handed to the event loop)
POLL_S = 0.05  # the owner thread's longest wait for frames before it looks at its state again
IDLE_RECV_S = 0.01  # a bus without a file descriptor (virtual) cannot be woken: it waits this long at most
HOLD_S = 0.02  # reports that cross no threshold wait at most this long to be handed to the event loop
SEND_DEADLINE_S = 1.0  # COM-5: BMS_STATE not written within this is a link fault
STUCK_CALL_S = 0.5  # a bus call that has not returned after this is stuck (the longest wait is POLL_S)
STABLE_S = 10.0  # the re-open back-off restarts from 0.1 s once the link stayed up this long
GARBLED = "garbled"  # a frame another python-can interface could not parse (it raised ValueError)
WOULD_BLOCK = {errno.ENOBUFS, errno.EAGAIN}


@dataclass(frozen=True)
class BusConfig:
    """Where the batteries are. `options` go to `can.Bus` unchanged (e.g. sleep_after_open for slcan)."""

    interface: str
    channel: str
    bitrate: int = DEFAULT_BITRATE
    options: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        return f"{self.interface}:{self.channel}"

    @classmethod
    def of(cls, interface: str, channel: str, bitrate: int = DEFAULT_BITRATE, *, slcan_wait: bool = False) -> BusConfig:
        """USB SLCAN adapters answer at once, so python-can's 2 s pause after opening is skipped unless
        `slcan_wait` (boards that reset when the port opens)."""
        options = {"sleep_after_open": 0} if interface == "slcan" and not slcan_wait else {}
        return cls(interface, channel, bitrate, options)


IFF_UP = 0x1
INTERFACE_CHECK_PERIOD = 1.0  # s between SocketCAN administrative-state checks


def socketcan_is_up(channel: str, sys_class_net: Path = Path("/sys/class/net")) -> bool:
    """True when the interface exists and is administratively up (`ip link set X up`).

    A socket bound to an interface that goes down may simply stop receiving without an error, so
    the link asks the kernel directly instead of waiting for a failure.
    """
    try:
        flags = int((sys_class_net / channel / "flags").read_text().strip(), 16)
    except (OSError, ValueError):
        return False
    return bool(flags & IFF_UP)


def open_bus(config: BusConfig) -> can.BusABC:
    if config.interface == "socketcan" and not socketcan_is_up(config.channel):
        raise can.CanOperationError(f"SocketCAN interface {config.channel} is missing or down")
    kwargs: dict[str, Any] = {"interface": config.interface, "channel": config.channel}
    if config.interface not in _NO_BITRATE:
        kwargs["bitrate"] = config.bitrate
    kwargs.update(config.options)
    if config.interface == "slcan":
        del kwargs["interface"]
        return SlcanBus(**kwargs)
    return can.Bus(**kwargs)


StateCallback = Callable[[bool, str], None]


def _would_block(error: can.CanError) -> bool:
    """A transmit queue that is full right now (python-can's socketcan says so in words): retried, not fatal."""
    return getattr(error, "error_code", None) in WOULD_BLOCK or "Transmit buffer full" in str(error)


class Link:
    def __init__(
        self,
        config: BusConfig,
        decoder: FrameDecoder | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        backoff: Backoff | None = None,
        bus_factory: Callable[[BusConfig], can.BusABC] = open_bus,
        on_state: StateCallback | None = None,
    ) -> None:
        self.config = config
        self.decoder = decoder or FrameDecoder()
        self.clock = clock
        self.backoff = backoff or Backoff()
        self.bus_factory = bus_factory
        self.on_state = on_state  # called (from any thread) after every state change
        self.bus: can.BusABC | None = None  # the owner thread's alone
        self.state = BusState.NOT_OPEN
        self.reason = "not opened yet"
        self.opens = 0
        self.downs = 0  # the link lost after it was up (I/O error, interface down, stall)
        self.stalls = 0  # COM-5: BMS_STATE unsent for SEND_DEADLINE_S
        self.sent = 0
        self.send_errors = 0  # a send that failed with a port error (the link went down)
        self.unsent = 0  # BMS_STATE frames replaced by a newer one, or dropped because the link was down
        self.adapter_errors = 0  # SLCAN: BELL answers (the adapter refused a frame or command)
        self.line_counts: dict[str, int] = dict.fromkeys((GARBLED, *LINE_KINDS), 0)  # COM-3, per kind
        self._lock = threading.Lock()  # guards the state, the transmit slot and the wake pipe
        self._tx: can.Message | None = None  # the latest BMS_STATE not yet written (latest wins)
        self._tx_since: float | None = None  # when the oldest unsent BMS_STATE was offered
        self._tx_at = 0.0  # when the frame in the slot was offered
        self._wake: tuple[int, int] | None = None  # a pipe: offer() wakes the owner waiting for frames
        self._fileno: int | None = None
        self._call_since: float | None = None  # when the owner thread entered the bus call it is in, if any
        self._down_since = clock()
        self._up_since = 0.0
        self._next_open_at = 0.0
        self._next_interface_check = 0.0

    @property
    def up(self) -> bool:
        return self.state is BusState.UP

    @property
    def garbled(self) -> int:
        """Lines or frames the interface could not parse, all kinds together."""
        return sum(self.line_counts.values())

    # -- state -----------------------------------------------------------------------------------------
    def _set_state(self, state: BusState, reason: str) -> None:
        """Record a state change, log it (WARNING when an outage starts, INFO when it ends) and report it."""
        with self._lock:
            changed = self._transition(state, reason)
        if changed and self.on_state is not None:
            self.on_state(state is BusState.UP, reason)

    def _transition(self, state: BusState, reason: str) -> bool:
        """Under the lock. True when the state or its reason changed."""
        before, was = self.state, self.reason
        if (state, reason) == (before, was):
            return False
        self.state, self.reason = state, reason
        name = self.config.describe()
        now = self.clock()
        if state is BusState.UP:
            if before is BusState.NOT_OPEN:
                log.info("bus %s up: opened", name)
            else:
                log.info("bus %s up again after %.1f s down (was: %s)", name, now - self._down_since, was)
        elif state is BusState.NOT_OPEN:
            log.info("bus %s closed", name)
        elif before in (BusState.UP, BusState.NOT_OPEN):  # an outage starts: once, with the reason
            self._down_since = now
            if state is BusState.OPEN_FAILED:
                log.warning("bus %s %s; retrying with back-off up to %g s", name, reason, self.backoff.maximum)
            else:
                log.warning("bus %s down: %s: comms loss until it is re-opened", name, reason)
        else:
            log.debug("bus %s still down: %s", name, reason)
        return True

    def status(self, now: float | None = None) -> tuple[BusState, str]:
        """The state and why (any thread); finds a stall (COM-5) even while the owner thread is stuck."""
        now = self.clock() if now is None else now
        with self._lock:
            since = self._tx_since
            if self.state is not BusState.UP or since is None or now - since < SEND_DEADLINE_S:
                return self.state, self.reason
            reason = f"BMS_STATE not sent for {now - since:.1f} s: the adapter is not taking frames"
            entered = self._call_since
            if entered is not None and now - entered >= STUCK_CALL_S:
                reason += f" (the link's thread has been inside one call for {now - entered:.1f} s)"
            self.stalls += 1
            self.downs += 1
            self._drop_tx()
            self._transition(BusState.STALLED, reason)
            state = self.state
        if self.on_state is not None:
            self.on_state(False, reason)
        return state, reason

    def open(self) -> bool:
        """Try to open the bus now (owner thread). True when it is up."""
        if self.bus is not None:
            return True
        try:
            bus = self.bus_factory(self.config)
        except Exception as exc:  # any failure to open is "still down"; the reason is kept
            delay = self.backoff.next_delay()
            self._next_open_at = self.clock() + delay
            log.debug("bus %s cannot be opened (retry in %.1f s): %s", self.config.describe(), delay, exc)
            self._set_state(BusState.OPEN_FAILED, f"cannot be opened: {exc}")
            return False
        self.bus = bus
        if isinstance(bus, SlcanBus):
            bus.parser.counts = self.line_counts  # the counts outlive a re-open
        try:
            self._fileno = None if isinstance(bus, SlcanBus) else int(bus.fileno())
        except Exception:  # virtual and many others have none: they are polled with a short timeout
            self._fileno = None
        self.opens += 1
        self._up_since = self.clock()
        with self._lock:
            self._drop_tx()  # a frame offered before the link was up is stale
            changed = self._transition(BusState.UP, "")
        if changed and self.on_state is not None:
            self.on_state(True, "")
        return True

    def _drop_tx(self) -> None:
        """Under the lock."""
        if self._tx is not None:
            self.unsent += 1
        self._tx, self._tx_since = None, None

    def _release_bus(self) -> None:
        bus, self.bus = self.bus, None
        if bus is not None:
            try:
                bus.shutdown()
            except Exception:  # a vanished device also fails to close; nothing more to do
                log.debug("bus shutdown raised", exc_info=True)

    def _take_down(self, state: BusState, reason: str) -> None:
        """The owner closes the bus and schedules a re-open; the back-off keeps growing for a flapping link."""
        self._release_bus()
        now = self.clock()
        if now - self._up_since >= STABLE_S:
            self.backoff.reset()
        self._next_open_at = now + self.backoff.next_delay()
        with self._lock:
            self._drop_tx()
            if self.state is BusState.UP:
                self.downs += 1
            changed = self._transition(state, reason) if self.state is not BusState.STALLED else False
        if changed and self.on_state is not None:
            self.on_state(False, reason)

    def close(self) -> None:
        """Owner thread (or nobody else running): close the bus and the wake pipe."""
        if isinstance(self.bus, SlcanBus):
            self.bus.discard_on_close = True  # the final close must not wait for a stalled adapter
        self._release_bus()
        with self._lock:
            self._drop_tx()
            if self._wake is not None:
                for fd in self._wake:
                    os.close(fd)
                self._wake = None
        self._set_state(BusState.NOT_OPEN, "closed")

    # -- hand-off from other threads ----------------------------------------------------------------------
    def offer(self, frame: can.Message) -> bool:
        """Hand a frame (BMS_STATE) to the owner thread; never waits. False when the link is down."""
        now = self.clock()
        with self._lock:
            if self.state is not BusState.UP:
                self.unsent += 1
                return False
            if self._tx is None:
                self._tx_since = now
            else:
                self.unsent += 1  # replaced before it went out: the newer state is what matters
            self._tx, self._tx_at = frame, now
            if self._wake is not None:
                with contextlib.suppress(BlockingIOError):  # already woken
                    os.write(self._wake[1], b"\0")
        return True

    def wake(self) -> None:
        """Make a waiting owner thread return from its wait now (at shutdown)."""
        with self._lock:
            if self._wake is not None:
                with contextlib.suppress(BlockingIOError):
                    os.write(self._wake[1], b"\0")

    def _wake_fd(self) -> int:
        with self._lock:
            if self._wake is None:
                read, write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
                self._wake = (read, write)
            return self._wake[0]

    def _drain_wake(self, fd: int) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(fd, 512)

    # -- the owner thread's work -----------------------------------------------------------------------------
    def serve(self, stop: threading.Event, deliver: Callable[[list[Report]], None], hold: float = HOLD_S,
              pre_alarm_level: Callable[[], float] = lambda: DEFAULT_SETTINGS.pre_alarm_level_per_cell) -> None:
        """The owner thread's loop: poll until `stop` is set, hand reports to `deliver`, then close the bus.

        A report that may cross a protective threshold (the core's own `protective_signature` changed: a flag,
        a cell or temperature limit, an identity) is handed over at once, with any held before it; the others
        (nearly all: "still fine") are held at most `hold` seconds and handed over together, so the event loop
        is woken a few dozen times a second instead of once per read. The tick evaluates every 100 ms anyway.
        `pre_alarm_level` reads the setting the core uses now (a float read, safe from this thread)."""
        held: list[Report] = []
        held_since = 0.0
        signatures: dict[tuple, tuple] = {}
        try:
            while not stop.is_set():
                wait = POLL_S if not held else max(0.0, held_since + hold - self.clock())
                try:
                    reports = self.poll(wait)
                except Exception:  # the link never raises on bus trouble; anything else is a bug: keep going
                    log.exception("bus %s: unexpected error in the link's thread; continuing", self.config.describe())
                    stop.wait(1.0)
                    continue
                urgent = False
                level = pre_alarm_level()
                for report in reports:
                    key, signature = protective_signature(report, level)
                    if key is not None and signatures.get(key) != signature:
                        signatures[key] = signature
                        urgent = True
                if reports and not held:
                    held_since = self.clock()
                held += reports
                if held and (urgent or self.clock() - held_since >= hold or self.state is not BusState.UP):
                    deliver(held)
                    held = []
        finally:
            self.close()

    def poll(self, timeout: float) -> list[Report]:
        """Owner thread: (re-)open when the back-off allows, write the waiting BMS_STATE, receive and decode
        for up to `timeout` seconds."""
        now = self.clock()
        wake = self._wake_fd()
        self.status(now)
        if self.bus is not None and self.state is not BusState.UP:  # stalled (found here or by another thread)
            self._take_down(self.state, self.reason)
        if self.bus is None:
            wait = self._next_open_at - now
            if wait > 0:
                self._sleep(min(wait, timeout), wake)
                return []
            if not self.open():
                return []
        if self.backoff.current and now - self._up_since >= STABLE_S:
            self.backoff.reset()
        if self.config.interface == "socketcan" and now >= self._next_interface_check:
            self._next_interface_check = now + INTERFACE_CHECK_PERIOD
            if not socketcan_is_up(self.config.channel):
                self._take_down(BusState.INTERFACE_DOWN, f"interface {self.config.channel} is down")
                return []
        self._transmit()
        frames = self._receive(timeout, wake)
        if self.bus is None:
            return []
        self._transmit()  # a BMS_STATE offered while we waited goes out now, not after decoding
        decode = self.decoder.decode
        reports = []
        for frame in frames:
            report = decode(frame)
            if report is not None:
                reports.append(report)
        return reports

    def _sleep(self, seconds: float, wake: int) -> None:
        if seconds > 0:
            poller = select.poll()
            poller.register(wake, select.POLLIN)
            if poller.poll(seconds * 1000):
                self._drain_wake(wake)

    def _receive(self, timeout: float, wake: int) -> list[can.Message]:
        """Frames that arrived within `timeout` (at most MAX_FRAMES_PER_POLL); a port error takes the link down."""
        bus = self.bus
        assert bus is not None
        frames: list[can.Message] = []
        self._call_since = self.clock()
        try:
            if isinstance(bus, SlcanBus):
                frames = bus.recv_batch(timeout, wake, MAX_FRAMES_PER_POLL)  # drains `wake` when woken
                if bus.parser.errors:
                    self.adapter_errors += bus.parser.errors
                    bus.parser.errors = 0
                return frames
            if self._fileno is not None:  # wait on the bus and the wake pipe together, then read what is there
                poller = select.poll()
                poller.register(self._fileno, select.POLLIN)
                poller.register(wake, select.POLLIN)
                ready = dict(poller.poll(timeout * 1000))
                if wake in ready:
                    self._drain_wake(wake)
                frame = self._recv_one(bus, 0.0) if self._fileno in ready else None
            else:
                self._drain_wake(wake)  # not waited on: kept empty
                frame = self._recv_one(bus, min(timeout, IDLE_RECV_S))
            while frame is not None:
                frames.append(frame)
                if len(frames) >= MAX_FRAMES_PER_POLL:
                    break
                frame = self._recv_one(bus, 0.0)
        except (can.CanError, OSError) as exc:
            self._take_down(BusState.LOST, f"receive failed: {exc}")
        finally:
            self._call_since = None
        return frames

    def _recv_one(self, bus: can.BusABC, timeout: float) -> can.Message | None:
        """A frame, or None; a frame the interface cannot parse is counted and skipped."""
        try:
            return bus.recv(timeout)
        except (ValueError, IndexError):  # another python-can interface's parser on a garbled frame
            self.line_counts[GARBLED] += 1
            return None

    def _transmit(self) -> None:
        """Write the waiting BMS_STATE; a full transmit queue is retried (until SEND_DEADLINE_S makes it COM-5)."""
        with self._lock:
            frame = self._tx
        bus = self.bus
        if frame is None or bus is None:
            return
        self._call_since = self.clock()
        try:
            bus.send(frame, timeout=0)
        except can.CanError as exc:
            if _would_block(exc):
                return
            self.send_errors += 1
            self._take_down(BusState.LOST, f"send failed: {exc}")
            return
        except OSError as exc:
            self.send_errors += 1
            self._take_down(BusState.LOST, f"send failed: {exc}")
            return
        finally:
            self._call_since = None
        self.sent += 1
        with self._lock:
            if self._tx is frame:
                self._tx, self._tx_since = None, None
            elif self._tx is not None:  # a newer frame came meanwhile: it is the oldest unsent now
                self._tx_since = self._tx_at

    def counters(self) -> dict[str, int]:
        return {
            "frames_received": self.decoder.received,
            "frames_decoded": self.decoder.decoded,
            **{f"malformed_{k}": v for k, v in self.decoder.malformed.items()},
            **{f"malformed_{k}": v for k, v in self.line_counts.items()},
            "opens": self.opens,
            "downs": self.downs,
            "stalls": self.stalls,
            "sent": self.sent,
            "send_errors": self.send_errors,
            "unsent": self.unsent,
            "adapter_errors": self.adapter_errors,
        }
