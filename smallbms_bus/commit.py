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
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from smallbms_bus.bms.core import BmsCore
from smallbms_bus.modbus.writes import BUSY, STORE_FAILED, Step, WriteRefused, WriteValue, plan_writes
from smallbms_bus.store import PendingSave, Persister

log = logging.getLogger(__name__)

REFUSALS_LOGGED = 10  # refused writes logged at ERROR per run of store failures (then counted only)


@dataclass(frozen=True)
class Change:
    """One request of a front end, applied whole or not at all."""

    writes: tuple[tuple[str, str, WriteValue], ...]  # (name as the client wrote it, target, engineering value)
    source: str  # who, for the log: "Modbus 10.0.0.5 unit 1"
    reason: str = "write"  # what the core's MODE event says: "Modbus write"


@dataclass(frozen=True)
class Committed:
    steps: tuple[str, ...]  # what was applied and is now on disk, e.g. "settings discharge_floor_pct=15"


class WritePath:
    """`commit` is the service's write path; `save` hands a collected save to the store thread and says
    whether it committed (the service's bounded hand-off); `decide` makes the core decide now (never raises)."""

    def __init__(self, core: BmsCore, persister: Persister, save: Callable[[PendingSave], Awaitable[bool]],
                 decide: Callable[[], object], clock: Callable[[], float], wall: Callable[[], float]) -> None:
        self.core, self.persister, self.save, self.decide = core, persister, save, decide
        self.clock, self.wall = clock, wall
        self.committed = 0
        self.refused = 0  # refused because the store could not commit them (04)
        self._lock = asyncio.Lock()
        self._closed = False
        self._logged = 0  # refusals logged at ERROR in the current run of store failures

    async def commit(self, change: Change) -> Committed:
        async with self._lock:
            if self._closed:
                raise WriteRefused(BUSY, "the service is stopping")
            now = self.clock()
            try:
                steps = plan_writes(self.core, change.writes, now, change.reason)
            except WriteRefused as refused:
                log.info("refused a write by %s: %s", change.source, refused)
                raise
            before = self.core.snapshot(now)
            applied: list[Step] = []
            try:
                for step in steps:
                    step.apply()
                    applied.append(step)
            except Exception:  # planned, so a bug: nothing half-done stays
                self._undo(applied, before, "a write that failed half-way")
                raise
            self.decide()
            described = "; ".join(step.describe for step in steps)
            if not any(step.durable for step in steps):  # nothing the store keeps (the SunSpec controller heartbeat)
                log.debug("%s (written by %s)", described, change.source)
                return Committed(tuple(step.describe for step in steps))
            save = self.persister.collect(self.core, self.clock(), self.wall(), force=True)
            assert save is not None  # force=True always collects
            if await self.save(save):
                self.committed += 1
                self._logged = 0
                log.info("%s (written by %s, committed)", described, change.source)
                return Committed(tuple(step.describe for step in steps))
            undone = self._undo([s for s in steps if not s.kept], before,
                                "undone: the store could not commit the write")
            self.decide()
            kept = [step.describe for step in steps if step.kept]
            message = f"{described} by {change.source} refused: the store cannot commit it " \
                      f"({self.persister.last_error})"
            if undone:
                message += "; undone"
            if kept:
                message += f"; {', '.join(kept)} is in effect but will not survive a restart"
            self.refused += 1
            self._logged += 1
            if kept or self._logged <= REFUSALS_LOGGED:
                log.error("%s", message)
                if self._logged == REFUSALS_LOGGED:
                    log.error("further writes refused while the store fails are not logged, only counted "
                              "(smallbms_store_writes_refused_total)")
            raise WriteRefused(STORE_FAILED, message)

    def _undo(self, steps: Sequence[Step], before: dict[str, Any], reason: str) -> bool:
        parts = {part: before[part] for step in steps for part in step.parts}
        if parts:
            self.core.restore_parts(parts, self.clock(), reason)
        return bool(parts)

    async def close(self) -> None:
        """Wait for a write in flight to be answered; refuse later ones (06): the final save follows."""
        async with self._lock:
            self._closed = True
