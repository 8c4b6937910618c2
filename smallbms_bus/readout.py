"""Human-readable instant readout of the bank (the status and battery pages of the manual).

The words for the monitor's values live here, once, and `smallbms-bus status` uses the same functions on
what it reads over Modbus, so the demo's readout and `status` say the same (docs/core.md, "One value, one
meaning"): consumed Ah and time remaining are "unknown" exactly while the SoC is, time remaining is
"infinite (not discharging)" when nothing is drawn, and the balancer says why it is unknown.
"""

from __future__ import annotations

import math

from smallbms_bus.bank import BankView
from smallbms_bus.bms.alarms import balancer_text, names
from smallbms_bus.bms.core import Decision


def _v(value: float | None, fmt: str, unit: str) -> str:
    return "--" if value is None else f"{value:{fmt}} {unit}"


def format_bank(view: BankView) -> str:
    t, a = view.topology, view.aggregates
    lines = []
    shape = (f"{t.series}S{t.parallel}P {t.nominal_voltage} V {t.bank_capacity_ah} Ah"
             if t.nominal_voltage is not None and t.bank_capacity_ah is not None else "shape unknown")
    state = "waiting for batteries" if view.waiting_for_batteries else view.phase
    lines.append(f"bank     {_v(a.voltage, '.2f', 'V')}  {_v(a.current, '+.1f', 'A')}  {_v(a.power, '+.0f', 'W')}"
                 f"   {shape}, {t.batteries} batteries, {t.cells} cells   [{state}]")
    if a.min_cell is not None and a.max_cell is not None:
        lines.append(f"cells    min {a.min_cell.voltage:.3f} V (battery {a.min_cell.node} cell {a.min_cell.cell})"
                     f"  max {a.max_cell.voltage:.3f} V (battery {a.max_cell.node} cell {a.max_cell.cell})"
                     f"  temperature {_v(a.min_cell_temperature, '.1f', '°C')} .. "
                     f"{_v(a.max_cell_temperature, '.1f', '°C')}")
    flags = ", ".join(f"{name} ({', '.join(map(str, nodes))})" for name, nodes in view.flags.items() if nodes)
    lines.append(f"flags    {flags or 'none'}")
    lines.append("battery  serial            voltage   current    temp   cells min/max      age  state")
    for b in view.batteries:
        s = b.status
        present = [c for c in b.cells if c is not None]
        cells = f"{min(present):.3f}/{max(present):.3f}" if present else "--"
        age = "--" if b.status_age is None else f"{b.status_age:.1f}s"
        lines.append(
            f"{b.node:>7}  {b.serial or '?':<16} {_v(s and s.voltage, '7.3f', 'V'):>9} "
            f"{_v(s and s.current, '+7.1f', 'A'):>9} {_v(s and s.temperature, '5.1f', '°C'):>8}  "
            f"{cells:<15} {age:>6}  {'fresh' if b.fresh else 'STALE: ' + str(b.stale_text)}")
    for issue in view.issues:
        lines.append(f"issue    {issue.reason}")
    return "\n".join(lines)


def format_decision(d: Decision) -> str:
    """The status page: SoC, ATC/ATD, outputs, alarms and warnings with their reasons."""
    onoff = {True: "on", False: "off"}
    soc = "unknown" if d.soc is None else f"{d.soc:.1f} %"
    lines = [
        f"status   SoC {soc}  consumed {consumed_text(d.consumed_ah)}  time remaining "
        f"{time_remaining_text(d.time_remaining_s, d.soc is not None)}  mode {onoff[d.mode_on]}  "
        f"remote {onoff[d.remote_on]}  balancer {balancer_text(d.balancer, d.balancer_reason)}",
        f"bms      allowed to charge {'yes' if d.atc else 'no'}  allowed to discharge "
        f"{d.atd_state.name.lower().replace('_', '-')}  outputs: load {onoff[d.outputs.load_disconnect]}, "
        f"charge {onoff[d.outputs.charge_disconnect]}, pre-alarm {onoff[d.outputs.pre_alarm]}"
        + ("" if d.started else "  [not started: outputs held off]"),
        "charge   " + charge_text(d.charge.known, d.charge.state.name.lower(), d.charge.cvl, d.charge.ccl,
                                  d.charge.dcl, d.charge.dvl, d.charge.cell_limiting),
    ]
    for kind, flags in (("alarm", d.alarms), ("warning", d.warnings)):
        for name in names(flags):
            lines.append(f"{kind:<8} {name}: {d.reasons.get(name, '')}")
    return "\n".join(lines)


def charge_text(known: bool, state: str, cvl: float | None, ccl: float | None, dcl: float | None,
                dvl: float | None, cell_limiting: bool) -> str:
    """CHG: what inverters and chargers are told, in the words of docs/behaviour.md."""
    if not known or cvl is None or dvl is None:
        return f"{state}, limits not known yet (the bank is not proven): charge 0 A, discharge 0 A"
    return (f"{state}  CVL {cvl:.2f} V  CCL {ccl or 0.0:.1f} A  DCL {dcl or 0.0:.1f} A  DVL {dvl:.2f} V"
            + ("  (CVL held down: a cell reached 3.55 V)" if cell_limiting else ""))


def consumed_text(ah: float | None) -> str:
    """MON-4: Ah drawn since the last full charge; unknown while the SoC is (no full charge to count from)."""
    return "unknown" if ah is None else f"{ah:.1f} Ah"


def time_remaining_text(seconds: float | None, soc_known: bool) -> str:
    """MON-5's three states. `seconds` None means infinite while the SoC is known (Modbus has one marker for
    both), unknown while it is not."""
    if not soc_known:
        return "unknown (SoC unknown)"
    if seconds is None or math.isinf(seconds):
        return "infinite (not discharging)"
    if seconds <= 0:
        return "0h00m (at or below the discharge floor)"
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours}h{rest // 60:02d}m"
