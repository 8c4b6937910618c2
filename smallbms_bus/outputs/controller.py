"""Drive a relay board from the BMS core's wanted outputs, and prove it did (OUT-4, OUT-5, REM-1, LED-1/2).

Theory of operation
-------------------
`RelayController` maps roles (load_disconnect, charge_disconnect, pre_alarm, error_led, status_led) to board
channels. It is synchronous and meant for one worker thread; time comes from the caller (`now`) or
the injected clock, so tests drive re-assert and back-off without sleeping.

apply(wanted, now)
  1. Every mapped role gets a target level; a role missing from `wanted` is off (fail safe). LEDs:
     "solid" = on, "off" = off, "blinking" = on (a mechanical relay toggled at 1 Hz wears out in days),
     or a 1 Hz toggle with `blink_leds=True` (solid-state relays, GPIO).
  2. If the board is down, it is re-opened when its back-off allows; otherwise nothing is written.
  3. Roles whose target changed are written at once, all of them, before any read-back. Every
     `reassert_every` seconds, and right after a re-open, *every* role is written (a relay flipped by
     hand, or a board that rebooted with its relays released, comes back).
  4. Where the board can read back, each written role is read back: a mismatch is a fault naming role,
     channel and both states. The role is written again when the back-off allows (or at once when its
     target changes); the fault clears when its read-back agrees. Between writes one role is read back
     every `probe_every` s (1 s, round robin), so a board that went away or a relay flipped by hand is a
     fault within about a second rather than at the next re-assert.
  5. Any OutputError is a fault naming role and channel: the board is closed and re-opened with
     back-off (`smallbms_bus.backoff.Backoff`: 0.1 s doubling to 5 s), then everything is re-asserted. The
     back-off resets only after a clean full re-assert, so a board that opens but fails at once does
     not hammer the bus.
  The returned `OutputsStatus.fault` is what the core shows as RELAY_FAULT.

safe()      every mapped output off, best effort, never raises (start-up, crash, shutdown: OUT-4).
remote(now) the remote on/off input (REM-1): None when not configured (the wire loop: always on); an I/O
            error is a fault and counts as OFF.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from smallbms_bus.backoff import Backoff
from smallbms_bus.outputs.base import OutputError, RelayBoard
from smallbms_bus.outputs.remote import RemoteInput
from smallbms_bus.vocabulary import LED_ROLES, OUTPUT_ROLES

log = logging.getLogger(__name__)

ROLES = OUTPUT_ROLES  # the roles a channel map may name
LED_STATES = ("off", "blinking", "solid")
BLINK_PERIOD = 1.0  # s: 1 Hz, on for the first half of each second
PROBE_EVERY = 1.0  # s between read-back probes while nothing is written (one Modbus request: ~20 ms at 9600 baud)


def _onoff(value: bool | None) -> str:
    return "unknown" if value is None else "on" if value else "off"


@dataclass(frozen=True)
class OutputsStatus:
    """What the board did. `fault` is None when every output is proven (or, without read-back, written)."""

    fault: str | None
    board_up: bool
    commanded: dict[str, bool]  # role -> level the controller wants (LEDs after blink mapping)
    read_back: dict[str, bool | None]  # role -> last level read from the board, None = cannot / not yet
    remote: bool | None  # last remote input (after inversion), None = not configured / not read yet
    commands: int  # channel writes
    faults: int  # fault events: I/O errors, failed opens, new read-back mismatches
    reconnects: int  # successful re-opens after the board was lost


class RelayController:
    def __init__(self, board: RelayBoard, channel_map: Mapping[str, int | None], *, reassert_every: float = 5.0,
                 backoff: Backoff | None = None, clock: Callable[[], float] = time.monotonic,
                 blink_leds: bool = False, remote_channel: int | None = None, remote_inverted: bool = False,
                 remote_input: RemoteInput | None = None, probe_every: float = PROBE_EVERY) -> None:
        self.board = board
        self.channel_map = self._check_map(board, channel_map)
        if remote_channel is not None:
            if not board.has_inputs:
                raise ValueError(f"remote_channel={remote_channel}: {board.describe()} has no inputs")
            if not isinstance(remote_channel, int) or not 1 <= remote_channel <= board.input_channels:
                raise ValueError(f"remote_channel={remote_channel!r}: {board.describe()} has inputs "
                                 f"1..{board.input_channels}")
        if remote_channel is not None and remote_input is not None:
            raise ValueError("the remote input is either a board input (remote_channel) or its own device "
                             "(remote_input), not both")
        self.remote_input = remote_input
        if not reassert_every > 0:
            raise ValueError(f"reassert_every={reassert_every!r}: allowed seconds > 0")
        self.remote_channel = remote_channel
        self.remote_inverted = remote_inverted
        self.reassert_every = reassert_every
        self.probe_every = probe_every
        self.backoff = backoff or Backoff()
        self.clock = clock
        self.blink_leds = blink_leds
        self.commands = 0
        self.faults = 0
        self.reconnects = 0
        self._commanded: dict[str, bool] = {}
        self._written: dict[str, bool] = {}  # what the board was last told, per role; cleared when it is lost
        self._read_back: dict[str, bool | None] = dict.fromkeys(self.channel_map)
        self._remote: bool | None = None
        self._io_fault: str | None = None
        self._mismatch: dict[str, str] = {}
        self._lost = False
        self._next_open_at = -math.inf
        self._next_reassert = -math.inf
        self._next_retry_at = -math.inf
        self._next_probe = -math.inf
        self._probe_index = 0

    @staticmethod
    def _check_map(board: RelayBoard, channel_map: Mapping[str, int | None]) -> dict[str, int]:
        mapped: dict[str, int] = {}
        by_channel: dict[int, str] = {}
        for role, channel in channel_map.items():
            if role not in ROLES:
                raise ValueError(f"unknown output role {role!r}: allowed {', '.join(ROLES)}")
            if channel is None:
                continue
            if not isinstance(channel, int) or isinstance(channel, bool) or not 1 <= channel <= board.channels:
                raise ValueError(f"{role}: channel {channel!r} is not on {board.describe()} "
                                 f"(channels 1..{board.channels})")
            if channel in by_channel:
                raise ValueError(f"{role}: channel {channel} is already used by {by_channel[channel]}")
            by_channel[channel] = role
            mapped[role] = channel
        return mapped

    # -- targets ---------------------------------------------------------------------------------
    def _level(self, role: str, value: Any, now: float) -> bool:
        value = getattr(value, "value", value)  # accept the core's Led enum as well as its string
        if isinstance(value, bool):
            return value
        if role in LED_ROLES and value in LED_STATES:
            if value == "blinking":
                return not self.blink_leds or (now % BLINK_PERIOD) < BLINK_PERIOD / 2
            return value == "solid"
        allowed = "true/false or " + ", ".join(map(repr, LED_STATES)) if role in LED_ROLES else "true/false"
        raise ValueError(f"{role}: wanted {value!r}, allowed {allowed}")

    def _targets(self, wanted: Mapping[str, Any], now: float) -> dict[str, bool]:
        for role in wanted:
            if role not in ROLES:
                raise ValueError(f"unknown output role {role!r}: allowed {', '.join(ROLES)}")
        return {role: self._level(role, wanted.get(role, False), now) for role in self.channel_map}

    # -- board up / down -------------------------------------------------------------------------
    def _ensure_open(self, now: float) -> bool:
        """True when the board is open, re-opening it if its back-off allows."""
        if self.board.is_open:
            return True
        return now >= self._next_open_at and self._open_now(now)

    def _open_now(self, now: float) -> bool:
        try:
            self.board.open()
        except OutputError as exc:
            delay = self.backoff.next_delay()
            self._next_open_at = now + delay
            if self._io_fault is None:
                self._io_fault = str(exc)
                self.faults += 1
            log.debug("%s; retry in %.1f s", exc, delay)
            return False
        if self._lost:
            self.reconnects += 1
            self._lost = False
            log.info("relay board %s is back: re-asserting every output", self.board.describe())
        self._written.clear()
        self._next_reassert = -math.inf  # everything is re-asserted at once
        return True

    def _take_down(self, reason: str, now: float) -> None:
        self._io_fault = reason
        self.faults += 1
        self._lost = True
        self.board.close()
        self._written.clear()
        self._read_back = dict.fromkeys(self.channel_map)
        delay = self.backoff.next_delay()
        self._next_open_at = now + delay
        log.warning("relay fault: %s; board closed, re-open in %.1f s", reason, delay)

    # -- the three operations ----------------------------------------------------------------------
    def apply(self, wanted: Mapping[str, Any], now: float | None = None) -> OutputsStatus:
        """Write what changed (everything when due), verify by read-back, and report."""
        now = self.clock() if now is None else now
        target = self._targets(wanted, now)
        self._commanded = target
        if not self._ensure_open(now):
            return self.status()
        full = now >= self._next_reassert
        retry = bool(self._mismatch) and now >= self._next_retry_at
        roles = [role for role in self.channel_map
                 if full or self._written.get(role) != target[role] or (retry and role in self._mismatch)]
        if not roles:
            self._probe(now)
            return self.status()
        self._next_probe = now + self.probe_every  # the writes below are read back: that is this period's proof
        role = roles[0]
        try:
            for role in roles:  # every write first: a slow read-back must not delay another output
                self.board.write(self.channel_map[role], target[role])
                self.commands += 1
                self._written[role] = target[role]
            if self.board.can_read_back:
                for role in roles:
                    self._verify(role, target[role])
        except OutputError as exc:
            self._take_down(f"{role} (channel {self.channel_map[role]}): {exc}", now)
            return self.status()
        if self._mismatch and now >= self._next_retry_at:
            self._next_retry_at = now + self.backoff.next_delay()
        if full:
            self._next_reassert = now + self.reassert_every
            if self._io_fault is not None:
                log.info("relay board %s: every output re-asserted", self.board.describe())
                self._io_fault = None
        if self._io_fault is None and not self._mismatch:
            self.backoff.reset()
        return self.status()

    def _probe(self, now: float) -> None:
        """Read one written role back (round robin) every `probe_every` s while nothing is written."""
        if not self.board.can_read_back or now < self._next_probe or not self._written:
            return
        self._next_probe = now + self.probe_every
        roles = [r for r in self.channel_map if r in self._written]
        role = roles[self._probe_index % len(roles)]
        self._probe_index += 1
        try:
            self._verify(role, self._written[role])
        except OutputError as exc:
            self._take_down(f"{role} (channel {self.channel_map[role]}): {exc}", now)

    def _verify(self, role: str, wanted: bool) -> None:
        channel = self.channel_map[role]
        seen = self.board.read(channel)
        self._read_back[role] = seen
        if seen == wanted:
            if self._mismatch.pop(role, None) is not None:
                log.info("relay fault cleared: %s (channel %d) reads back %s", role, channel, _onoff(seen))
            return
        reason = f"{role} (channel {channel}): commanded {_onoff(wanted)}, read back {_onoff(seen)}"
        if self._mismatch.get(role) != reason:
            self.faults += 1
            log.warning("relay fault: %s", reason)
        self._mismatch[role] = reason

    def safe(self) -> None:
        """Switch every mapped output off. Best effort: every channel is tried, nothing is raised."""
        now = self.clock()
        self._commanded = dict.fromkeys(self.channel_map, False)
        for role, channel in self.channel_map.items():
            try:
                if not self.board.is_open and not self._open_now(now):
                    continue
                self.board.write(channel, False)
                self.commands += 1
                self._written[role] = False
            except Exception as exc:  # never raise: this runs at start-up, after a crash and at shutdown
                self._take_down(f"{role} (channel {channel}): switching off failed: {exc}", now)

    def remote(self, now: float | None = None) -> bool | None:
        """The remote on/off input: None = not configured (always on); False on any I/O trouble."""
        now = self.clock() if now is None else now
        if self.remote_input is not None:
            self._remote = self.remote_input.read(now)
            return self._remote
        if self.remote_channel is None:
            return None
        self._remote = False
        if not self._ensure_open(now):
            return False
        try:
            raw = self.board.read_input(self.remote_channel)
        except OutputError as exc:
            self._take_down(f"remote input (input {self.remote_channel}): {exc}", now)
            return False
        self._remote = raw != self.remote_inverted
        return self._remote

    # -- reporting ---------------------------------------------------------------------------------
    @property
    def fault(self) -> str | None:
        parts = ([self._io_fault] if self._io_fault else []) + list(self._mismatch.values())
        if self.remote_input is not None and self.remote_input.fault:
            parts.append(self.remote_input.fault)
        return "; ".join(parts) or None

    def status(self) -> OutputsStatus:
        return OutputsStatus(fault=self.fault, board_up=self.board.is_open, commanded=dict(self._commanded),
                             read_back=dict(self._read_back), remote=self._remote, commands=self.commands,
                             faults=self.faults, reconnects=self.reconnects)
