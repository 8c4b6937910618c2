"""MQTT names and state payloads: pure functions of the configuration and a Decision (no I/O, no clock).

Theory of operation
-------------------
`Names.of(section, hostname)` resolves the [mqtt] defaults once (site = the host name made topic-safe,
topic prefix `smallbms/<site>`, client id `smallbms-<site>`). `state(decision, settings, names)` turns one
decision into the retained state: a mapping of topic to JSON payload, one topic per part (docs/mqtt.md
"State topics"). The event loop builds it at most once per `publish_period` and hands it to the client
thread, which sends only the topics whose payload changed since the broker last got them. Floats are
rounded to what the quantity's resolution is, so noise below it does not count as a change.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from smallbms_bus.bank import BatteryView
from smallbms_bus.bms.alarms import names as flag_names
from smallbms_bus.bms.core import Decision
from smallbms_bus.bms.settings import Settings

AVAILABILITY = "status"  # <prefix>/status: online / offline (last will)
ONLINE, OFFLINE = "online", "offline"
RESULT = "result"  # <prefix>/result: the answer to every write over MQTT (not retained)
SET = "set"  # <prefix>/set/<what>: writes (docs/mqtt.md "Commands")
# history keys that are the core's trackers, not facts a user reads
_HISTORY_TRACKERS = frozenset({"cycle_armed", "full_discharge_armed", "discharge_depth_ah", "serials_at_full_charge"})


@dataclass(frozen=True, slots=True)
class Names:
    site: str
    prefix: str  # topic prefix, no trailing /
    discovery_prefix: str  # "" = no Home Assistant discovery
    client_id: str

    @classmethod
    def of(cls, section: Mapping[str, Any], hostname: str) -> Names:
        site = section["site"] or site_of(hostname)
        return cls(site=site, prefix=section["topic_prefix"] or f"smallbms/{site}",
                   discovery_prefix=section["discovery_prefix"], client_id=section["client_id"] or f"smallbms-{site}")

    def topic(self, *levels: str | int) -> str:
        return "/".join((self.prefix, *(str(level) for level in levels)))

    @property
    def node_id(self) -> str:
        """The Home Assistant node id and device identifier of this site."""
        return f"smallbms_{self.site}"


def site_of(hostname: str) -> str:
    """A host name as a topic level and id: its first label, anything but [A-Za-z0-9_-] replaced by _."""
    first = hostname.split(".", 1)[0] or "smallbms"
    return re.sub(r"[^A-Za-z0-9_-]", "_", first)[:64]


def _r(value: float | None, digits: int) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(value, digits)


def dumps(payload: Any) -> str:
    return json.dumps(payload, separators=(",", ":"), sort_keys=True, allow_nan=False)


def state(decision: Decision, settings: Settings, names: Names) -> Mapping[str, str]:
    """Every retained state topic and its JSON payload (docs/mqtt.md)."""
    parts: dict[str, Any] = {
        "bank": bank(decision),
        "state": _state(decision),
        "outputs": _outputs(decision),
        "alarms": _flags(decision, decision.alarms),
        "warnings": _flags(decision, decision.warnings),
        "history": _history(decision),
        "settings": dict(settings.to_dict()),
        "charge": _charge(decision),
    }
    out = {names.topic(key): dumps(value) for key, value in parts.items()}
    for battery in decision.bank.batteries:
        out[names.topic("battery", battery.node)] = dumps(_battery(battery))
    return MappingProxyType(out)


def bank(d: Decision) -> dict[str, Any]:
    a, topo = d.bank.aggregates, d.bank.topology
    remaining = d.time_remaining_s
    return {
        "voltage": _r(a.voltage, 2), "current": _r(a.current, 1), "power": _r(a.power, 0),
        "soc": _r(d.soc, 1), "consumed_ah": _r(d.consumed_ah, 1),
        # MON-5: not discharging = infinite, which JSON has no number for: null with "discharging": false
        "time_remaining_s": None if remaining is None or math.isinf(remaining) else round(remaining),
        "discharging": remaining is not None and not math.isinf(remaining),
        "min_cell_voltage": None if a.min_cell is None else round(a.min_cell.voltage, 3),
        "min_cell": None if a.min_cell is None else {"node": a.min_cell.node, "cell": a.min_cell.cell},
        "max_cell_voltage": None if a.max_cell is None else round(a.max_cell.voltage, 3),
        "max_cell": None if a.max_cell is None else {"node": a.max_cell.node, "cell": a.max_cell.cell},
        "cell_spread": None if a.min_cell is None or a.max_cell is None
        else round(a.max_cell.voltage - a.min_cell.voltage, 3),
        "min_cell_temperature": _r(a.min_cell_temperature, 1), "max_cell_temperature": _r(a.max_cell_temperature, 1),
        "min_battery_temperature": _r(a.min_battery_temperature, 1),
        "max_battery_temperature": _r(a.max_battery_temperature, 1),
        "phase": d.bank.phase, "batteries": topo.batteries, "cells": topo.cells, "series": topo.series,
        "parallel": topo.parallel, "capacity_ah": topo.bank_capacity_ah, "nominal_voltage": topo.nominal_voltage,
        "stale_nodes": list(d.bank.stale_nodes),
    }


def _state(d: Decision) -> dict[str, Any]:
    return {
        "atc": d.atc, "atd": d.atd, "atd_state": d.atd_state.name.lower(), "pre_alarm": d.pre_alarm,
        "mode_on": d.mode_on, "remote_on": d.remote_on, "started": d.started,
        "waiting_for_batteries": d.waiting_for_batteries, "firmware_update": d.firmware_update,
        "link_up": d.link_up, "bus_state": d.bus_state.name.lower(), "link_reason": d.link_reason,
        "balancer": d.balancer.value, "balancer_reason": d.balancer_reason.label,
        "reasons": {k: d.reasons[k] for k in ("ATC", "ATD", "PRE_ALARM") if k in d.reasons},
    }


def _outputs(d: Decision) -> dict[str, Any]:
    o = d.outputs
    return {"load_disconnect": o.load_disconnect, "charge_disconnect": o.charge_disconnect,
            "pre_alarm": o.pre_alarm, "error_led": d.error_led.value, "status_led": d.status_led.value}


def _flags(d: Decision, flags: Any) -> dict[str, Any]:
    active = flag_names(flags)
    return {"active": active, "reasons": {name: d.reasons.get(name, "") for name in active}}


def _history(d: Decision) -> dict[str, Any]:
    h = {k: v for k, v in d.history.to_dict().items() if k not in _HISTORY_TRACKERS}
    for key, value in h.items():
        if isinstance(value, float):
            h[key] = round(value, 3)
    return h


def _charge(d: Decision) -> dict[str, Any]:
    c = d.charge
    if not c.known:  # CHG-6: nothing is allowed; the limits are not values to chart
        return {"known": False, "cvl": None, "ccl": None, "dcl": None, "dvl": None, "state": None}
    return {"known": True, "cvl": round(c.cvl, 2), "ccl": round(c.ccl, 1), "dcl": round(c.dcl, 1),
            "dvl": round(c.dvl, 2), "state": c.state.name.lower()}


def _battery(b: BatteryView) -> dict[str, Any]:
    s, t, info = b.status, b.temps, b.info
    return {
        "node": b.node, "serial": b.serial, "fresh": b.fresh, "stale_reason": b.stale_text,
        "voltage": None if s is None else round(s.voltage, 2), "current": None if s is None else round(s.current, 1),
        "temperature": None if s is None else round(s.temperature, 1),
        "min_cell_temperature": None if t is None else round(t.cell_temp_min, 1),
        "max_cell_temperature": None if t is None else round(t.cell_temp_max, 1),
        "balancing": None if s is None else s.balancing,
        "cells": [None if c is None else round(c, 3) for c in b.cells],
        "min_cell_voltage": _r(b.summary.low, 3), "min_cell": b.summary.low_cell,
        "max_cell_voltage": _r(b.summary.high, 3), "max_cell": b.summary.high_cell,
        "cell_spread": _r(b.summary.spread, 3),
        "capacity_ah": None if info is None else info.nominal_capacity_ah,
        "nominal_voltage": None if info is None else info.nominal_voltage,
        "firmware": None if info is None else ".".join(str(v) for v in info.firmware),
    }
