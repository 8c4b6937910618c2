"""SET-3: the one write path of the service, for every front end (Modbus now; an HTTP API and MQTT later).

    committed = await service.commit(Change(writes=(("discharge_floor", "discharge_floor", 15.0),),
                                            source="Modbus 10.0.0.5 unit 1", reason="Modbus write"))

A front end turns its request into a `Change`: (name as the client wrote it, target, engineering value)
triples, the targets of smallbms_bus/modbus/writes.py (the settings, "mode", "gx_mode", "set_soc",
"command"). `commit` answers with `Committed` once the change is on disk, or raises `WriteRefused` with a
code (Modbus exception numbers: 03 value out of range, 06 not possible yet or stopping, 04 the store
could not commit it); a front end maps the code to its own answer (Modbus: the exception; HTTP: e.g.
400 / 409 / 503).

Threads: the event loop owns the core, the store thread (one worker) owns the SQLite connection.

1. plan (loop): `plan_writes` checks the whole change; a refusal changes nothing.
2. apply (loop): the steps run on the core, and the core decides at once, so "mode off" reaches the
   relays now, whatever the store does next.
3. snapshot (loop): `Persister.collect(force=True)` takes the core's snapshot with its pending events.
4. commit (store thread): awaited without blocking the loop; every other client is served meanwhile.
5. answer: committed -> `Committed`. The store failed -> the parts the steps changed are put back
   (`BmsCore.restore_parts`), except "mode off", which stays in effect (the safe direction); logged at
   ERROR; `WriteRefused(STORE_FAILED)`, whose message says what was undone and what stays in effect
   without surviving a restart.

What another client reads while a write is in flight (between 2 and 5): the new value. Reads show what
the BMS is doing now, and from step 2 its decisions and relays follow the change. If the store then
refuses it, the change is undone at once and reads show the old value again (a refusal is rare and
logged at ERROR). Only the writer waits for the durable answer.

Changes are committed one at a time (an asyncio lock): a second write waits for the first one's
answer, so an undo never puts back a part that a later write changed.

Events (the log in the store, docs/store.md "The event log"): a committed change is recorded in the same
save as the change itself: one `setting` event per setting whose value changed ("discharge floor 10 % ->
15 % by Modbus 10.0.0.5 unit 1"), one `command` event per command, and the core's MODE event names the
writer. A change the store could not commit leaves no such event. Every refused write or command (here,
or already by the front end: `note_refusal`) is a `refused` event with who and why, at most
REFUSED_EVENTS_PER_WINDOW per REFUSED_EVENT_WINDOW_S one by one; the rest of a window are counted and
written as one summary event when the window ends (`flush_refusals`, from the service's tick) or at the
stop, so a client hammering the server cannot push the BMS's own events out of the bounded log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pymodbus.constants import ExcCodes

from smallbms_bus.bms.core import BmsCore, Event
from smallbms_bus.bms.settings import SPEC_BY_NAME, Settings
from smallbms_bus.modbus.writes import (
    ALARM_RESET,
    BUSY,
    COMMANDS,
    ILLEGAL_VALUE,
    STORE_FAILED,
    Refused,
    Step,
    WriteRefused,
    WriteValue,
    plan_writes,
)
from smallbms_bus.protocol import PER_UNIT
from smallbms_bus.store import PendingSave, Persister

log = logging.getLogger(__name__)

REFUSALS_LOGGED = 10  # refused writes logged at ERROR per run of store failures (then counted only)
REFUSED_EVENT_WINDOW_S = 3600.0  # refused writes and commands: at most REFUSED_EVENTS_PER_WINDOW events one by one
REFUSED_EVENTS_PER_WINDOW = 10  # per window, then one summary event for the rest (a flood cannot flush the log)
SUMMARY_SOURCES = 3  # writers a summary names (with their counts), the others only counted
# refusal code -> the event's value: why it was refused
REFUSAL_KINDS = {ExcCodes.ILLEGAL_FUNCTION: "not_allowed", ExcCodes.ILLEGAL_ADDRESS: "not_writable",
                 ILLEGAL_VALUE: "out_of_range", STORE_FAILED: "store_failed", BUSY: "not_now"}
# command register value -> event name
COMMAND_EVENTS = {1: "SYNCHRONISE_SOC", 2: "RESET_HISTORY", 3: "RESET_SETTINGS", 4: "RELEARN_BANK",
                  5: "FIRMWARE_UPDATE_BEGIN", 6: "FIRMWARE_UPDATE_DONE", 7: "FIRMWARE_UPDATE_ABORT"}


@dataclass(frozen=True)
class Change:
    """One request of a front end, applied whole or not at all."""

    writes: tuple[tuple[str, str, WriteValue], ...]  # (name as the client wrote it, target, engineering value)
    source: str  # who, for the log: "Modbus 10.0.0.5 unit 1"
    reason: str = "write"  # what the core's MODE event says: "Modbus write"


@dataclass
class _Refusals:
    """The refused writes of the current window that were not logged one by one."""

    logged: int = 0
    first_wall: float | None = None
    last_wall: float = 0.0
    kinds: Counter[str] = field(default_factory=Counter)
    sources: Counter[str] = field(default_factory=Counter)

    @property
    def suppressed(self) -> int:
        return sum(self.kinds.values())


@dataclass(frozen=True)
class Committed:
    steps: tuple[str, ...]  # what was applied and is now on disk, e.g. "settings discharge_floor_pct=15"


class WritePath:
    """`commit` is the service's write path; `save` hands a collected save to the store thread and says
    whether it committed (the service's bounded hand-off); `decide` makes the core decide now (never raises)."""

    def __init__(self, core: BmsCore, persister: Persister, save: Callable[[PendingSave], Awaitable[bool]],
                 decide: Callable[[], object], clock: Callable[[], float], wall: Callable[[], float],
                 record: Callable[[Sequence[Event]], None] | None = None) -> None:
        self.core, self.persister, self.save, self.decide = core, persister, save, decide
        self.clock, self.wall = clock, wall
        self.record = record or persister.queue  # the service logs and counts them too
        self._window_ends: float | None = None  # monotonic end of the current refusal window
        self._refusals = _Refusals()
        self.committed = 0
        self.refused = 0  # refused because the store could not commit them (04)
        self._lock = asyncio.Lock()
        self._closed = False
        self._logged = 0  # refusals logged at ERROR in the current run of store failures

    async def commit(self, change: Change) -> Committed:
        async with self._lock:
            if self._closed:
                refused = WriteRefused(BUSY, "the service is stopping")
                self.note_refusal(change.source, _names(change), refused)
                raise refused
            now = self.clock()
            try:
                steps = plan_writes(self.core, change.writes, now, f"{change.reason} by {change.source}")
            except WriteRefused as refused:
                log.info("refused a write by %s: %s", change.source, refused)
                self.note_refusal(change.source, _names(change), refused)
                raise
            before = self.core.snapshot(now)
            was = _Before(self.core)
            applied: list[Step] = []
            results: dict[str, object] = {}
            try:
                for step in steps:
                    results[step.describe] = step.apply()
                    applied.append(step)
            except Exception:  # planned, so a bug: nothing half-done stays
                self._undo(applied, before, "a write that failed half-way")
                raise
            self.decide()
            described = "; ".join(step.describe for step in steps)
            if not any(step.durable for step in steps):  # nothing the store keeps (the SunSpec controller heartbeat)
                log.debug("%s (written by %s)", described, change.source)
                return Committed(tuple(step.describe for step in steps))
            events = self._events(change, was, results)
            self.record(events)  # saved with the change, in the same transaction
            save = self.persister.collect(self.core, self.clock(), self.wall(), force=True)
            assert save is not None  # force=True always collects
            if await self.save(save):
                self.committed += 1
                self._logged = 0
                log.info("%s (written by %s, committed)", described, change.source)
                return Committed(tuple(step.describe for step in steps))
            self.persister.discard(events)  # not done, so not logged as done (it will be saved with the next save)
            undone = self._undo([s for s in steps if not s.kept], before,
                                "undone: the store could not commit the write")
            self.decide()
            kept = [step.describe for step in steps if step.kept]
            why = f"the store cannot commit it ({self.persister.last_error})"
            if undone:
                why += "; undone"
            if kept:
                why += f"; {', '.join(kept)} is in effect but will not survive a restart"
            message = f"{described} by {change.source} refused: {why}"
            self.refused += 1
            self._logged += 1
            if kept or self._logged <= REFUSALS_LOGGED:
                log.error("%s", message)
                if self._logged == REFUSALS_LOGGED:
                    log.error("further writes refused while the store fails are not logged, only counted "
                              "(smallbms_store_writes_refused_total)")
            self.note_refusal(change.source, _names(change), WriteRefused(STORE_FAILED, f"{described}: {why}"))
            raise WriteRefused(STORE_FAILED, message)

    # -- events ---------------------------------------------------------------------------------------
    def _events(self, change: Change, was: _Before, results: dict[str, object]) -> list[Event]:
        wall, now, core = self.wall(), self.clock(), self.core
        by = f"by {change.source}"
        events: list[Event] = []
        commands = [int(v) for _, target, v in change.writes if target == "command" and isinstance(v, int | float)]
        reset = " (reset settings)" if 3 in commands else ""
        for _, target, value in change.writes:
            if target == "set_soc" and isinstance(value, int | float):
                events.append(Event(wall, now, "SET_SOC", "command", f"{value:g} %",
                                    f"set SoC: {_soc(was.soc)} -> {value:g} % {by}"))
            elif target == "alarm_reset" and value == ALARM_RESET:
                cleared = ", ".join(results.get("alarm reset") or ()) or "nothing"  # type: ignore[arg-type]
                events.append(Event(wall, now, "ALARM_RESET", "command", cleared,
                                    f"alarm reset: cleared {cleared} {by}"))
            elif target == "command" and isinstance(value, int | float):
                code = int(value)
                label = COMMANDS[code]
                result = "done"
                detail = ""
                if code == 1:
                    result, detail = "100 %", f": {_soc(was.soc)} -> 100 %"
                elif code == 4:
                    learned = core.bank.learned
                    result = f"{len(learned.batteries) if learned is not None else 0} batteries"
                events.append(Event(wall, now, COMMAND_EVENTS[code], "command", result, f"{label}{detail} {by}"))
        for name, old in was.settings.to_dict().items():
            new = getattr(core.settings, name)
            if new != old:
                what, shown, text = _setting_text(name, old, new)
                events.append(Event(wall, now, name, "setting", shown, f"{what} {text} {by}{reset}"))
        return events

    def note_refusal(self, source: str, what: str, refused: Refused) -> None:
        """A refused write or command is an event with who and why; bounded per window (see the module's
        docstring). Front ends call it for the refusals they make themselves (not allowed, not writable)."""
        now, wall = self.clock(), self.wall()
        self.flush_refusals(now)
        if self._window_ends is None:
            self._window_ends = now + REFUSED_EVENT_WINDOW_S
        kind = REFUSAL_KINDS.get(refused.code, f"exception_{refused.code:02d}")
        r = self._refusals
        if r.logged < REFUSED_EVENTS_PER_WINDOW:
            r.logged += 1
            # the exception number means something to a Modbus client only (web and MQTT have their own answers)
            code = f" (Modbus exception {refused.code:02d})" if source.startswith("Modbus") else ""
            self.record([Event(wall, now, what, "refused", kind, f"{refused}{code} by {source}")])
            return
        if r.first_wall is None:
            r.first_wall = wall
        r.last_wall = wall
        r.kinds[kind] += 1
        r.sources[source] += 1

    def flush_refusals(self, now: float | None = None) -> None:
        """When the refusal window is over (or `now` is None: at the stop), write the summary of what it did
        not log one by one, and start a new window."""
        if self._window_ends is None or (now is not None and now < self._window_ends):
            return
        r, self._refusals, self._window_ends = self._refusals, _Refusals(), None
        if not r.suppressed:
            return
        kinds = ", ".join(f"{n} {k}" for k, n in r.kinds.most_common())
        shown = r.sources.most_common(SUMMARY_SOURCES)
        sources = ", ".join(f"{s} ({n})" for s, n in shown)
        if len(r.sources) > len(shown):
            sources += f" and {len(r.sources) - len(shown)} other writers"
        span = f"{_clock(r.first_wall)} to {_clock(r.last_wall)}"
        self.record([Event(self.wall(), self.clock() if now is None else now, "writes", "refused",
                           f"{r.suppressed} more",
                           f"{r.suppressed} more refused writes from {span}, not logged one by one (at most "
                           f"{REFUSED_EVENTS_PER_WINDOW} every {REFUSED_EVENT_WINDOW_S / 3600:g} h are): {kinds}; "
                           f"{sources}")])

    def _undo(self, steps: Sequence[Step], before: dict[str, Any], reason: str) -> bool:
        parts = {part: before[part] for step in steps for part in step.parts}
        if parts:
            self.core.restore_parts(parts, self.clock(), reason)
        return bool(parts)

    async def close(self) -> None:
        """Wait for a write in flight to be answered; refuse later ones (06): the final save follows, with the
        summary of the refusals not logged one by one."""
        async with self._lock:
            self._closed = True
            self.flush_refusals()

    @property
    def closed(self) -> bool:
        return self._closed


class _Before:
    """What the events of a change compare with: the settings and the SoC before it."""

    def __init__(self, core: BmsCore) -> None:
        self.settings: Settings = core.settings
        self.soc = core.monitor.soc(core.bank.topology().bank_capacity_ah)


def _names(change: Change) -> str:
    """What a refused change tried to write, for its event's name: the register names."""
    return ", ".join(dict.fromkeys(name for name, _, _ in change.writes)) or "write"


def _setting_text(name: str, old: Any, new: Any) -> tuple[str, str, str]:
    """(label, new value, "old -> new") of a setting as the event log shows it."""
    spec = SPEC_BY_NAME.get(name)
    if spec is None:  # the GX custom name
        return "custom name", repr(new), f"{old!r} -> {new!r}"
    unit = f" {spec.unit}" if spec.unit else ""
    per_unit = f" {PER_UNIT}" if name.endswith("_per_unit") else ""
    return spec.label, f"{new:g}{unit}", f"{old:g}{unit} -> {new:g}{unit}{per_unit}"


def _soc(soc: float | None) -> str:
    return "unknown" if soc is None else f"{soc:.1f} %"


def _clock(wall: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(wall or 0.0))
