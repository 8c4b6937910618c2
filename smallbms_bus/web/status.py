"""The instant readout as JSON (GET /api/v1/status and the stream's "status" events), from one Decision.

Pure: the decision (and the history inside it) is all it reads. Values the BMS does not know are null, never
a guess; the words for the monitor's values (time remaining, consumed Ah, the balancer) are readout.py's, so
the page, `status` and the demo say the same.
"""

from __future__ import annotations

import math
from typing import Any

from smallbms_bus.bank import BatteryView, CellRef
from smallbms_bus.bms.alarms import balancer_text, names
from smallbms_bus.bms.core import Decision
from smallbms_bus.bms.history import History
from smallbms_bus.readout import consumed_text, time_remaining_text

BATTERY_FLAGS = ("cell_high_voltage", "cell_low_voltage", "cell_low_pre_alarm", "balancing", "cell_imbalance",
                 "hardware_fault", "firmware_updating")


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, digits)


def _cell(ref: CellRef | None) -> dict[str, Any] | None:
    return None if ref is None else {"battery": ref.node, "cell": ref.cell, "voltage": round(ref.voltage, 3)}


def battery_json(b: BatteryView) -> dict[str, Any]:
    s, t, info = b.status, b.temps, b.info
    return {
        "node": b.node,
        "serial": b.serial,
        "fresh": b.fresh,
        "stale": b.stale_text,
        "status_age_s": _round(b.status_age, 1),
        "voltage": None if s is None else round(s.voltage, 3),
        "current": None if s is None else round(s.current, 2),
        "temperature": None if s is None else round(s.temperature, 1),
        "cell_temperature_min": None if t is None else round(t.cell_temp_min, 1),
        "cell_temperature_max": None if t is None else round(t.cell_temp_max, 1),
        "nominal_voltage": None if info is None else info.nominal_voltage,
        "capacity_ah": None if info is None else info.nominal_capacity_ah,
        "firmware": None if info is None else ".".join(map(str, info.firmware)),
        "cells": [None if v is None else round(v, 3) for v in b.cells],
        "flags": [] if s is None else [flag for flag in BATTERY_FLAGS if getattr(s, flag)],
        "conflicted": b.conflicted,
    }


def history_json(h: History, wall: float) -> dict[str, Any]:
    """The manual's history page (bms/history.py); the trackers that only survive restarts are left out."""
    keys = ("deepest_discharge_ah", "last_discharge_ah", "cumulative_ah_drawn", "discharged_energy_kwh",
            "charged_energy_kwh", "synchronisations", "charge_cycles", "full_discharges", "last_full_charge_wall",
            "min_bank_voltage", "max_bank_voltage", "min_cell_voltage", "max_cell_voltage",
            "min_battery_temperature", "max_battery_temperature")
    out: dict[str, Any] = {k: getattr(h, k) for k in keys}
    out["time_since_full_charge_s"] = h.time_since_full_charge(wall)
    return out


def status_json(d: Decision) -> dict[str, Any]:
    view, a, topo = d.bank, d.bank.aggregates, d.bank.topology
    charge = d.charge
    return {
        "time": d.wall,
        "started": d.started,
        "phase": "waiting for batteries" if d.waiting_for_batteries else view.phase,
        "link": {"up": d.link_up, "state": d.bus_state.name.lower(), "reason": d.link_reason},
        "mode": "on" if d.mode_on else "off",
        "remote": "on" if d.remote_on else "off",
        "firmware_update": d.firmware_update,
        "soc": _round(d.soc, 1),
        "consumed_ah": _round(d.consumed_ah, 2),
        "consumed": consumed_text(d.consumed_ah),
        "time_remaining_s": _round(d.time_remaining_s, 0),
        "time_remaining": time_remaining_text(d.time_remaining_s, d.soc is not None),
        "atc": d.atc,
        "atd": d.atd,
        "atd_state": d.atd_state.name.lower().replace("_", "-"),
        "pre_alarm": d.pre_alarm,
        "outputs": {"load_disconnect": d.outputs.load_disconnect, "charge_disconnect": d.outputs.charge_disconnect,
                    "pre_alarm": d.outputs.pre_alarm},
        "alarms": [{"name": n, "reason": d.reasons.get(n, "")} for n in names(d.alarms)],
        "warnings": [{"name": n, "reason": d.reasons.get(n, "")} for n in names(d.warnings)],
        "reasons": dict(d.reasons),
        "balancer": balancer_text(d.balancer, d.balancer_reason),
        "charge": ({"known": True, "cvl": round(charge.cvl, 2), "ccl": round(charge.ccl, 1),
                    "dcl": round(charge.dcl, 1), "dvl": round(charge.dvl, 2), "state": charge.state.name.lower()}
                   if charge.known else {"known": False}),
        "bank": {
            "voltage": _round(a.voltage, 2), "current": _round(a.current, 2), "power": _round(a.power, 0),
            "batteries": topo.batteries, "cells": topo.cells, "series": topo.series, "parallel": topo.parallel,
            "nominal_voltage": topo.nominal_voltage, "capacity_ah": topo.bank_capacity_ah,
            "min_cell": _cell(a.min_cell), "max_cell": _cell(a.max_cell),
            "min_cell_temperature": _round(a.min_cell_temperature, 1),
            "max_cell_temperature": _round(a.max_cell_temperature, 1),
            "min_battery_temperature": _round(a.min_battery_temperature, 1),
            "max_battery_temperature": _round(a.max_battery_temperature, 1),
            "issues": [issue.reason for issue in view.issues],
        },
        "batteries": [battery_json(b) for b in view.batteries],
    }
