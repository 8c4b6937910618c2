"""Open a python-can bus from config and keep it open (COM-4).

Theory of operation
-------------------
`Link.poll(timeout)` is the only receive call. It returns the reports decoded from whatever
arrived within `timeout` and never raises on bus trouble:

- a frame the DBC rejects is dropped and counted by the `FrameDecoder` (COM-3);
- a line the SLCAN adapter garbles (python-can raises ValueError/IndexError) is counted as ``garbled`` and
  the link stays up: the next line is read normally;
- any other error (adapter unplugged, serial port gone, SocketCAN interface down: python-can's
  CanError, OSError) takes the link *down*. The bus is shut down, `on_state` is told why, and it is
  re-opened with exponential back-off (0.1 s doubling to 5 s) by later polls, without restarting
  anything. The BMS core treats link-down as comms loss (COM-2).

The link reads no wall clock of its own for decisions except through the injected `clock`
(monotonic by default), so tests can drive back-off deterministically.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import can

from smallbms_bus.link.codec import FrameDecoder
from smallbms_bus.link.slcan import BufferedSlcanBus
from smallbms_bus.reports import Report

log = logging.getLogger(__name__)

DEFAULT_BITRATE = 500_000
# Interfaces whose bitrate is set outside the process (ip link) or that have none.
_NO_BITRATE = {"socketcan", "virtual"}
MAX_FRAMES_PER_POLL = 256  # bounds one poll's work so a flood cannot starve the caller


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
        return BufferedSlcanBus(**kwargs)
    return can.Bus(**kwargs)


@dataclass
class Backoff:
    initial: float = 0.1
    maximum: float = 5.0
    current: float = 0.0

    def next_delay(self) -> float:
        self.current = self.initial if self.current == 0 else min(self.current * 2, self.maximum)
        return self.current

    def reset(self) -> None:
        self.current = 0.0


StateCallback = Callable[[bool, str], None]


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
        self.on_state = on_state
        self.bus: can.BusABC | None = None
        self.up = False
        self.reason = "not opened yet"
        self.opens = 0
        self.downs = 0
        self.garbled = 0
        self.sent = 0
        self.send_errors = 0
        self._next_open_at = 0.0
        self._next_interface_check = 0.0

    # -- state -----------------------------------------------------------------------------
    def _set_state(self, up: bool, reason: str, *, deliberate: bool = False) -> None:
        changed = up != self.up
        self.up, self.reason = up, reason
        if changed:
            (log.info if up or deliberate else log.warning)("bus %s %s: %s", self.config.describe(),
                                                            "up" if up else "down", reason)
            if self.on_state is not None:
                self.on_state(up, reason)

    def open(self) -> bool:
        """Try to open the bus now. True when it is up."""
        if self.bus is not None:
            return True
        try:
            self.bus = self.bus_factory(self.config)
        except Exception as exc:  # any failure to open is "still down"; the reason is kept
            delay = self.backoff.next_delay()
            self._next_open_at = self.clock() + delay
            self.reason = f"open failed: {exc}; retry in {delay:.1f} s"
            log.debug("bus %s %s", self.config.describe(), self.reason)
            return False
        self.opens += 1
        self.backoff.reset()
        self._set_state(True, "opened")
        return True

    def _release_bus(self) -> None:
        bus, self.bus = self.bus, None
        if bus is not None:
            try:
                bus.shutdown()
            except Exception:  # a vanished device also fails to close; nothing more to do
                log.debug("bus shutdown raised", exc_info=True)

    def _take_down(self, reason: str) -> None:
        self._release_bus()
        self.downs += 1
        self._next_open_at = self.clock() + self.backoff.next_delay()
        self._set_state(False, reason)

    def close(self) -> None:
        self._release_bus()
        self._set_state(False, "closed", deliberate=True)

    # -- traffic -----------------------------------------------------------------------------
    def _recv(self, timeout: float) -> can.Message | None:
        """One frame or None; garbled lines are counted and skipped; bus errors take the link down."""
        bus = self.bus
        if bus is None:
            return None
        try:
            return bus.recv(timeout)
        except (ValueError, IndexError):  # python-can's slcan parser on a garbled or truncated line
            self.garbled += 1
            return None
        except (can.CanError, OSError) as exc:
            self._take_down(f"receive failed: {exc}")
            return None

    def poll(self, timeout: float) -> list[Report]:
        """Receive and decode for up to `timeout` seconds; re-open a down link when its back-off allows."""
        if self.bus is None:
            wait = self._next_open_at - self.clock()
            if wait > 0:
                time.sleep(min(wait, timeout))
                return []
            if not self.open():
                return []
        if self.config.interface == "socketcan":
            now = self.clock()
            if now >= self._next_interface_check:
                self._next_interface_check = now + INTERFACE_CHECK_PERIOD
                if not socketcan_is_up(self.config.channel):
                    self._take_down(f"interface {self.config.channel} is down")
                    return []
        reports: list[Report] = []
        frame = self._recv(timeout)
        decode = self.decoder.decode
        count = 0
        while frame is not None:
            report = decode(frame)
            if report is not None:
                reports.append(report)
            count += 1
            if count >= MAX_FRAMES_PER_POLL:
                break
            frame = self._recv(0.0)
        return reports

    def send(self, frame: can.Message) -> bool:
        """Send one frame; False (and link down on a bus error) when it could not be sent."""
        bus = self.bus
        if bus is None:
            return False
        try:
            bus.send(frame)
        except can.CanOperationError as exc:
            # A full transmit queue (no one acknowledging on a real bus) is not a dead adapter.
            self.send_errors += 1
            if exc.error_code == errno.ENOBUFS:
                return False
            self._take_down(f"send failed: {exc}")
            return False
        except (can.CanError, OSError) as exc:
            self.send_errors += 1
            self._take_down(f"send failed: {exc}")
            return False
        self.sent += 1
        return True

    def counters(self) -> dict[str, int]:
        return {
            "frames_received": self.decoder.received,
            "frames_decoded": self.decoder.decoded,
            **{f"malformed_{k}": v for k, v in self.decoder.malformed.items()},
            "malformed_garbled": self.garbled,
            "opens": self.opens,
            "downs": self.downs,
            "sent": self.sent,
            "send_errors": self.send_errors,
        }
