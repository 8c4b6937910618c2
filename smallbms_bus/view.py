"""The seam between the service and what only watches it: one typed, immutable `ServiceView` per decision.

The event loop owns the core, the link's counters, the relay controller's status and the store's bookkeeping.
Readers on other paths (the metrics scrape today; any front end that only reports) do not reach into those
live objects: after every decision the service builds a `ServiceView` on the loop -- the `Decision` itself
(already immutable) plus copies of the counters around it -- and publishes it by replacing one reference.
A reader takes that reference once and sees one consistent instant: the bus counters, relay status and store
state of the same evaluation as the bank values. Building it is a handful of small dict copies (~20 µs),
about 15 times a second.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from smallbms_bus.bms.alarms import BusState
from smallbms_bus.bms.core import Decision

if TYPE_CHECKING:
    from smallbms_bus.link.bus import Link
    from smallbms_bus.outputs.controller import OutputsStatus, RelayController
    from smallbms_bus.store import Persister


@dataclass
class ServiceStats:
    """In-process counters the tests and the demo read. `bms_state_sent` counts BMS_STATE frames handed to the
    bus thread; it is not a metric on purpose: bus_frames_sent_total + bus_frames_unsent_total already add up
    to it from the link's side, which is the one that knows what reached the wire."""

    evaluations: int = 0
    bms_state_sent: int = 0
    task_restarts: int = 0
    events: int = 0


@dataclass(frozen=True, slots=True)
class StoreState:
    """The store as a reader sees it (copied from the Persister and the service's stall watch)."""

    writes: int
    failures: int
    pending_events: int
    up: bool  # the last save committed and none has waited STORE_STALL_S for the disk
    writes_refused: int  # settings, mode or commands refused because the store could not commit them


@dataclass(frozen=True, slots=True)
class ServiceView:
    """Everything a watcher reads of the service at one decision; never mutated (its dicts are copies)."""

    decision: Decision | None  # None before the first evaluation
    link: dict[str, int]  # Link.counters(), copied
    link_state: tuple[BusState, str]  # state, reason
    bus: tuple[str, str]  # python-can interface, channel
    outputs: OutputsStatus
    channels: dict[str, int]  # output role -> board channel
    store: StoreState
    evaluations: int
    task_restarts: int
    events: int
    inverter: dict[str, Any] | None = None  # InverterLink.view(): the BMS-CAN link's counters, None while off

    @classmethod
    def build(cls, decision: Decision | None, now: float, link: Link, outputs: RelayController, persister: Persister,
              store_up: bool, writes_refused: int, stats: ServiceStats) -> ServiceView:
        """On the event loop (the owner of every object read here), after a decision."""
        store = StoreState(persister.writes, persister.failures, persister.pending_events,
                           persister.ok and store_up, writes_refused)
        return cls(decision, link.counters(), link.status(now), (link.config.interface, link.config.channel),
                   outputs.status(), dict(outputs.channel_map), store, stats.evaluations, stats.task_restarts,
                   stats.events)
