"""What one evaluation decides (`Decision`), the events it logs, and the BMS_STATE frame made from it."""

from __future__ import annotations

from dataclasses import dataclass

from smallbms_bus.bank import BankView
from smallbms_bus.bms.alarms import AtdState, BalancerReason, BalancerStatus, BmsAlarm, BmsWarning, BusState, Led
from smallbms_bus.bms.charge import NO_CHARGE_LIMITS, ChargeLimits
from smallbms_bus.bms.diagnostics import NO_DIAGNOSTICS, Diagnostics
from smallbms_bus.bms.history import History
from smallbms_bus.reports import BmsState


@dataclass(frozen=True, slots=True)
class Outputs:
    load_disconnect: bool  # high = loads may run
    charge_disconnect: bool  # high = chargers may run
    pre_alarm: bool  # high = alarm


@dataclass(frozen=True, slots=True)
class Event:
    wall: float
    now: float
    name: str  # "ATC", "ATD", "PRE_ALARM", "MODE", "REMOTE", or an alarm / warning name
    kind: str  # "state", "alarm" or "warning"
    value: str  # new value: "on"/"off", "yes"/"no"/"pre-alarm", "raised"/"cleared"
    reason: str


@dataclass(frozen=True, slots=True)
class Decision:
    now: float
    wall: float
    started: bool  # OUT-4: bank known and ATC/ATD computed from fresh data
    waiting_for_batteries: bool
    atc: bool
    atd: bool
    atd_state: AtdState
    pre_alarm: bool
    outputs: Outputs
    mode_on: bool
    remote_on: bool
    firmware_update: bool
    link_up: bool
    alarms: BmsAlarm
    warnings: BmsWarning
    reasons: dict[str, str]  # alarm/warning/"ATC"/"ATD"/"PRE_ALARM" name -> why, for the active ones
    error_led: Led
    status_led: Led
    balancer: BalancerStatus
    soc: float | None
    consumed_ah: float | None  # MON-4, Ah drawn since the last full charge: unknown (None) exactly while the SoC is
    time_remaining_s: float | None  # MON-5: math.inf when not discharging, None while the SoC is unknown
    average_current: float | None
    bank: BankView
    history: History
    events: tuple[Event, ...]
    diagnostics: Diagnostics = NO_DIAGNOSTICS  # the last errors, for the GX (bms/diagnostics.py)
    bus_state: BusState = BusState.UP  # the battery link (COM-4, COM-5); shown even while waiting for batteries
    link_reason: str = ""  # why the link is not up
    balancer_reason: BalancerReason = BalancerReason.NONE  # why `balancer` is unknown (BAL-1), NONE while known
    charge: ChargeLimits = NO_CHARGE_LIMITS  # CVL/CCL/DCL/DVL for inverters (CHG, bms/charge.py)


def state_values(d: Decision) -> dict[str, str]:
    """The observable states whose changes are events, as the event log spells them."""
    return {"ATC": "yes" if d.atc else "no", "ATD": d.atd_state.name.lower().replace("_", "-"),
            "PRE_ALARM": "on" if d.pre_alarm else "off", "MODE": "on" if d.mode_on else "off",
            "REMOTE": "on" if d.remote_on else "off"}


def bms_state_report(decision: Decision, alive_counter: int) -> BmsState:
    """The BMS_STATE frame's content (PROTOCOL.md) for a decision; chargers and loads obey it. The SoC goes as it
    is: the encoder rounds it to the DBC's 0.5 % step (link/codec.py), like every scaled signal."""
    return BmsState(
        allowed_to_charge=decision.atc, allowed_to_discharge=decision.atd, pre_alarm=decision.pre_alarm,
        mode_on=decision.mode_on, remote_on=decision.remote_on, firmware_update=decision.firmware_update,
        state_of_charge=decision.soc,
        alarms=int(decision.alarms), warnings=int(decision.warnings),
        battery_count=decision.bank.topology.batteries, alive_counter=alive_counter & 0xFF)
