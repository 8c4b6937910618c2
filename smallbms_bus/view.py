"""The seam between the service and what only watches it: a typed, immutable `ServiceView`.

The event loop owns the core, the link's counters, the relay controller's status and the store's bookkeeping.
Readers (the metrics scrape today; any front end that only reports) do not reach into those live objects:
they call `Service.view()` on the loop, which returns the latest `Decision` (immutable, built once per
evaluation) with copies of the counters around it, taken at that instant. Nothing in it moves afterwards,
so a scrape encoded on another thread sees one consistent instant. The counters are copied when asked,
not per decision: a refused write or a finished save between two decisions is counted at once, as before.
"""

from __future__ import annotations

import time
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


def summary_line(decision: Decision | None, link: Link, outputs: RelayController, persister: Persister,
                 stalled_since: float | None) -> str:
    """One line of state for the log (SIGUSR1), on the loop; `stalled_since`: when a save began waiting for a
    disk that does not answer (time.monotonic), or None."""
    d = decision
    parts: list[str] = []
    if d is None:
        parts.append("no decision yet")
    else:
        def on(flag: bool) -> str:
            return "on" if flag else "off"
        o = d.outputs
        parts += [f"mode {on(d.mode_on)}", f"remote {on(d.remote_on)}",
                  f"load {on(o.load_disconnect)}, charge {on(o.charge_disconnect)}, pre-alarm {on(o.pre_alarm)}",
                  "SoC unknown" if d.soc is None else f"SoC {d.soc:.1f} %",
                  f"{len(d.bank.batteries)} batteries", f"alarms {d.alarms.name or 'none'}",
                  f"warnings {d.warnings.name or 'none'}"]
    parts.append("bus up" if link.up else f"bus DOWN ({link.reason})")
    fault = outputs.status().fault
    parts.append(f"relay board FAULT ({fault})" if fault else "relay board ok")
    p = persister
    if stalled_since is not None:
        waited = time.monotonic() - stalled_since
        parts.append(f"store STALLED: a save has waited {waited:.0f} s for the disk")
    elif p.ok:
        parts.append(f"store ok ({p.writes} saves)")
    else:
        parts.append(f"store FAILING since {time.strftime('%H:%M:%S', time.localtime(p.failing_since))} "
                     f"({p.last_error})")
    return ", ".join(parts)
