"""The BMS-CAN link to an inverter/charger: a second python-can channel with its own owner thread (docs/inverter.md).

Theory of operation
-------------------
ONE owner thread (the service's "inverter" thread runs `InverterLink.serve`) opens, writes, reads and closes the
bus, like the battery link (smallbms_bus/link/bus.py), whose bus opener and back-off it shares. The event loop
never waits on this bus: every decision it hands over with `offer(values)`, a latest-wins slot (`InverterValues`,
smallbms_bus/inverter/frames.py). The thread sends from the slot on its own schedule:

- the whole frame set of the profile every `period`, 0x351 first;
- 0x351 alone whenever the last one is LIMITS_MAX_INTERVAL_S old (a period longer than that still has 0x351
  at least once a second: receivers stop after 3 s without it, the contract allows 1.5 s);
- values older than VALUES_STALE_S (the event loop stopped offering: a hung loop, a crashed tick) are not
  repeated: the thread sends NO_VALUES (every limit 0, CHG-6) until fresh values come. While the battery bus is
  down the loop keeps deciding and offering, and the core's limits are the zeros of CHG-6 then.
- at a clean stop, one last set with every limit 0, so the inverter stops at once instead of after its timeout.

Bus trouble never raises: a port error (CanError, OSError; a SocketCAN interface that is down) closes the bus
and re-opens it with exponential back-off (0.1 s doubling to 5 s). A full transmit queue (no receiver
acknowledging: the cable unplugged) is counted as a send error and retried at the next frame, not re-opened.

Received frames: 0x305 (keep-alive) and 0x307 (GX identification) are counted and time-stamped; anything else
is counted and ignored. With `keepalive_timeout` > 0, `silent_reason(now)` says why the inverter is silent
(no keep-alive within that time since the link started or since the last one); the service feeds it to the
core, which raises warning INVERTER_SILENT. It never changes ATC/ATD.

Every time is read from the injected `clock` (the simulation's in the demo); waits are `rate` times shorter
in real seconds (the simulation's speed).
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import can

from smallbms_bus.backoff import Backoff
from smallbms_bus.inverter.frames import NO_VALUES, FrameEncoder, InverterValues
from smallbms_bus.link.bus import BusConfig, open_bus, socketcan_is_up

log = logging.getLogger(__name__)

KEEPALIVE_ID = 0x305
IDENTIFICATION_ID = 0x307
LIMITS_ID = 0x351
LIMITS_MAX_INTERVAL_S = 1.0  # 0x351 at least this often whatever the period (the contract: never over 1.5 s)
VALUES_STALE_S = 2.0  # values not refreshed for this long are not repeated: every limit 0 instead
POLL_S = 0.05  # real seconds: the longest wait before the thread looks at its schedule and `stop` again
MAX_FRAMES_PER_POLL = 256
SEND_TIMEOUT_S = 0.05  # real seconds a send may wait for room in the transmit queue
INTERFACE_CHECK_PERIOD = 1.0
STABLE_S = 10.0  # the back-off restarts once the link stayed up this long
WOULD_BLOCK = {errno.ENOBUFS, errno.EAGAIN}


def _would_block(error: Exception) -> bool:
    return getattr(error, "error_code", None) in WOULD_BLOCK or "Transmit buffer full" in str(error)


class InverterLink:
    def __init__(self, config: BusConfig, encoder: FrameEncoder, *, period: float = 1.0,
                 keepalive_timeout: float = 0.0, clock: Callable[[], float] = time.monotonic, rate: float = 1.0,
                 backoff: Backoff | None = None,
                 bus_factory: Callable[[BusConfig], can.BusABC] = open_bus) -> None:
        self.config, self.encoder = config, encoder
        self.period, self.keepalive_timeout = period, keepalive_timeout
        self.limits_interval = min(period, LIMITS_MAX_INTERVAL_S)
        self.clock, self.rate = clock, rate
        self.backoff = backoff or Backoff()
        self.bus_factory = bus_factory
        self.bus: can.BusABC | None = None  # the owner thread's alone
        self.up = False
        self.reason = "not opened yet"
        now = clock()
        self._lock = threading.Lock()
        self._values: InverterValues = NO_VALUES
        self._values_at: float | None = None
        self._stale_logged = False
        self._next_set = self._next_limits = now
        self._next_open_at = now
        self._next_interface_check = now
        self._up_since = now
        self._started_at = now  # a keep-alive is first expected keepalive_timeout after this
        self.progress: float | None = None  # the clock time the thread last got to (the simulation watches it)
        # counters (plain ints/floats, read by metrics from any thread)
        self.sets_sent = self.frames_sent = self.send_errors = self.opens = self.downs = 0
        self.keepalives = self.identifications = self.other_received = 0
        self.last_keepalive_at: float | None = None
        self.last_limits_at: float | None = None
        self.max_limits_gap = 0.0

    # -- any thread ------------------------------------------------------------------------------------
    def offer(self, values: InverterValues) -> None:
        """The latest values (event loop); never waits."""
        now = self.clock()
        with self._lock:
            self._values, self._values_at = values, now

    def silent_reason(self, now: float | None = None) -> str | None:
        """Why the inverter counts as silent (no keep-alive within keepalive_timeout), or None."""
        if self.keepalive_timeout <= 0:
            return None
        now = self.clock() if now is None else now
        last = self.last_keepalive_at
        since = self._started_at if last is None else last
        if now - since < self.keepalive_timeout:
            return None
        if last is None:
            return f"no inverter keep-alive (0x305/0x307) on {self.config.describe()} since the start " \
                   f"{now - since:.0f} s ago"
        return f"no inverter keep-alive (0x305/0x307) on {self.config.describe()} for {now - since:.0f} s"

    def limits_age(self, now: float | None = None) -> float | None:
        """Seconds since the last 0x351 went out, None before the first."""
        last = self.last_limits_at
        return None if last is None else (self.clock() if now is None else now) - last

    def counters(self) -> dict[str, Any]:
        return {"sets_sent": self.sets_sent, "frames_sent": self.frames_sent, "send_errors": self.send_errors,
                "opens": self.opens, "downs": self.downs, "keepalives": self.keepalives,
                "identifications": self.identifications, "other_received": self.other_received,
                "max_limits_gap_s": self.max_limits_gap}

    def view(self, now: float) -> dict[str, Any]:
        """The counters with the link's state and ages, for watchers (metrics); plain values, a copy."""
        last = self.last_keepalive_at
        return {**self.counters(), "up": self.up, "limits_age": self.limits_age(now),
                "keepalive_age": None if last is None else now - last}

    # -- the owner thread ------------------------------------------------------------------------------
    def serve(self, stop: threading.Event) -> None:
        """The owner thread's loop until `stop`; then the last set with every limit 0, and close."""
        try:
            while not stop.is_set():
                try:
                    self.poll()
                except Exception:  # the link never raises on bus trouble; anything else is a bug: keep going
                    log.exception("inverter bus %s: unexpected error in the link's thread; continuing",
                                  self.config.describe())
                    self._take_down("unexpected error")
                    stop.wait(1.0)
        finally:
            if self.bus is not None:
                self._send_frames(self.encoder.frames(NO_VALUES), self.clock())
            self.close()

    def poll(self) -> None:
        """One round: (re-)open when the back-off allows, send what is due, receive until the next send."""
        now = self.clock()
        self.progress = now
        if self.bus is None:
            if now < self._next_open_at:
                time.sleep(min(POLL_S, (self._next_open_at - now) / self.rate))
                return
            if not self.open():
                return
        if self.up and self.backoff.current and now - self._up_since >= STABLE_S:
            self.backoff.reset()
        if self.config.interface == "socketcan" and now >= self._next_interface_check:
            self._next_interface_check = now + INTERFACE_CHECK_PERIOD
            if not socketcan_is_up(self.config.channel):
                self._take_down(f"interface {self.config.channel} is down")
                return
        if now >= self._next_set:
            self._send_frames(self.encoder.frames(self._current(now)), now)
            self.sets_sent += 1
            self._next_set = self._next_set + self.period if now - self._next_set < self.period else now + self.period
        elif now >= self._next_limits:
            self._send_frames([self.encoder.frame(self._current(now), LIMITS_ID)], now)
        if self.bus is not None:
            wait = min(self._next_set, self._next_limits) - self.clock()
            self._receive(max(0.0, min(wait / self.rate, POLL_S)))

    def _current(self, now: float) -> InverterValues:
        with self._lock:
            values, at = self._values, self._values_at
        if at is not None and now - at > VALUES_STALE_S:
            if not self._stale_logged:
                log.warning("inverter bus %s: no fresh decision for %.1f s: sending every limit 0",
                            self.config.describe(), now - at)
                self._stale_logged = True
            return NO_VALUES
        self._stale_logged = False
        return values

    def open(self) -> bool:
        try:
            bus = self.bus_factory(self.config)
        except Exception as exc:  # any failure to open is "still down"; the reason is kept
            self._next_open_at = self.clock() + self.backoff.next_delay()
            self._set_down(f"cannot be opened: {exc}")
            return False
        self.bus, self.up, self.reason = bus, True, ""
        self.opens += 1
        self._up_since = self.clock()
        log.info("inverter bus %s up", self.config.describe())
        return True

    def _set_down(self, reason: str) -> None:
        if self.up or self.reason != reason:
            outage_starts = self.up or self.reason == "not opened yet"  # once per outage, then DEBUG per retry
            level = logging.WARNING if outage_starts else logging.DEBUG
            log.log(level, "inverter bus %s down: %s; retrying with back-off up to %g s", self.config.describe(),
                    reason, self.backoff.maximum)
        if self.up:
            self.downs += 1
        self.up, self.reason = False, reason

    def _take_down(self, reason: str) -> None:
        self._release()
        now = self.clock()
        if now - self._up_since >= STABLE_S:
            self.backoff.reset()
        self._next_open_at = now + self.backoff.next_delay()
        self._set_down(reason)

    def _release(self) -> None:
        bus, self.bus = self.bus, None
        if bus is not None:
            try:
                bus.shutdown()
            except Exception:  # a vanished device also fails to close
                log.debug("inverter bus shutdown raised", exc_info=True)

    def close(self) -> None:
        self._release()
        self.up, self.reason = False, "closed"

    def _send_frames(self, frames: list[can.Message], now: float) -> None:
        bus = self.bus
        assert bus is not None
        for frame in frames:
            try:
                bus.send(frame, timeout=SEND_TIMEOUT_S)
            except (can.CanError, OSError) as exc:
                self.send_errors += 1
                if not _would_block(exc):
                    self._take_down(f"send failed: {exc}")
                return  # a full queue: the rest of this set waits for the next one
            self.frames_sent += 1
            if frame.arbitration_id == LIMITS_ID:
                if self.last_limits_at is not None:
                    self.max_limits_gap = max(self.max_limits_gap, now - self.last_limits_at)
                self.last_limits_at = now
                self._next_limits = now + self.limits_interval

    def _receive(self, timeout: float) -> None:
        bus = self.bus
        assert bus is not None
        try:
            frame = bus.recv(timeout)
            count = 0
            while frame is not None and count < MAX_FRAMES_PER_POLL:
                self._count(frame)
                count += 1
                frame = bus.recv(0.0)
        except (ValueError, IndexError):  # a frame the interface could not parse: counted as other
            self.other_received += 1
        except (can.CanError, OSError) as exc:
            self._take_down(f"receive failed: {exc}")

    def _count(self, frame: can.Message) -> None:
        if frame.is_error_frame or frame.is_extended_id:
            self.other_received += 1
        elif frame.arbitration_id == KEEPALIVE_ID:
            self.keepalives += 1
            self.last_keepalive_at = self.clock()
        elif frame.arbitration_id == IDENTIFICATION_ID:
            self.identifications += 1
            self.last_keepalive_at = self.clock()
        else:
            self.other_received += 1


def from_config(section: dict[str, Any], *, clock: Callable[[], float] = time.monotonic,
                rate: float = 1.0) -> InverterLink | None:
    """The link of an `[inverter]` section, or None while it is off (interface "")."""
    if not section["interface"]:
        return None
    config = BusConfig.of(section["interface"], section["channel"], section["bitrate"])
    return InverterLink(config, FrameEncoder(section["profile"]), period=section["period"],
                        keepalive_timeout=section["keepalive_timeout"], clock=clock, rate=rate)
