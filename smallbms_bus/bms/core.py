"""The BMS core: every rule of BEHAVIOUR.md in one place. Pure: no clock, socket or file.

Theory of operation
-------------------
Inputs are battery reports (`on_report`), commands (`set_mode`, `set_soc`, ...) and evaluations
(`evaluate(now, wall)`), where `now` is monotonic seconds (every timer runs on it, so a wall-clock
jump cannot shorten the 30 s pre-alarm lead) and `wall` is epoch seconds (timestamps, last full
charge, the 30-day rules). `evaluate` returns a `Decision`: ATC, ATD, pre-alarm, the three outputs,
alarms, warnings, LEDs, balancer status, battery-monitor values, and the events since the last one.
The core owns the `Bank` (bank.py), so the decisions and the data they rest on come from one place.

Each evaluation walks the rules in this order:

1. Start-up (OUT-4, BANK-2). While the bank is "waiting for batteries" nothing is decided and every
   output is off; comms and bank alarms are not raised (partial data is normal then). The core is
   *started* once the bank is learned, consistent, every battery fresh and the link up; until then
   the outputs stay off, whatever else holds.
2. Latched conditions with hysteresis, from fresh data (battery flags AND reported cells: defence in
   depth). See THRESHOLDS below; "set" and "clear" levels are BEHAVIOUR.md's.
3. Faults: comms (COM-2, with 2 s of good data to recover; COM-4 link down counts), bank (BANK-3),
   battery hardware fault or an unmeasured cell (ATC-5/ATD-3), firmware update (FW-1, FW-2 120 s).
4. Battery monitor (MON) and history (HIS): SoC, consumed Ah, time remaining, current limits.
5. Pre-alarm (PRE-1..3): any of cell pre-alarm, low-SoC warning level, pending undervoltage or comms
   loss. An undervoltage disconnects the loads only once the pre-alarm output has been high for
   30 s (PRE-3); `CELL_LOW_VOLTAGE` is raised then, when the action is taken.
6. ATC, ATD and outputs (OUT-1..3, REM-2): load = mode AND remote AND ATD; charge = mode AND remote
   AND ATC; pre-alarm independent of both.
7. Alarms, warnings, LEDs (LED-1, LED-2), balancer (BAL-1); events by difference with the previous
   decision, each with a reason.
8. Charge control (CHG-1..7, bms/charge.py): CVL, CCL, DCL, DVL and the charge state for inverters, from
   this decision's ATC, ATD, pre-alarm, SoC and warnings.

Decisions where BEHAVIOUR.md is silent are marked "project decision" below and in docs/core.md.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from smallbms_bus.bank import Bank, LearnedBank
from smallbms_bus.bms.alarms import AtdState, BalancerStatus, BmsAlarm, BmsWarning, BusState, Led
from smallbms_bus.bms.charge import ChargeControl, ChargeInputs, ChargeLimits
from smallbms_bus.bms.decision import Decision, Event, Outputs, bms_state_report, state_values
from smallbms_bus.bms.diagnostics import Diagnostics
from smallbms_bus.bms.history import History, balancer_status, balancer_unknown_reason
from smallbms_bus.bms.monitor import ZERO_CURRENT_A, BatteryMonitor, CurrentLimits, MonitorReading
from smallbms_bus.bms.rules import (
    CELL_SPREAD_IMBALANCED_V,
    CHARGE_BLOCKERS,
    COMMS_RECOVERY_S,
    DISCHARGE_BLOCKERS,
    FIRMWARE_UPDATE_TIMEOUT_S,
    LATCHES,
    LATCHES_OF_STEP,
    NOT_FULLY_CHARGED_S,
    PRE_ALARM_CAUSES,
    PRE_ALARM_LEAD_S,
    Facts,
    active_reason,
    undervoltage_reason,
    why_not,
)
from smallbms_bus.bms.settings import DEFAULT_SETTINGS, Settings
from smallbms_bus.bms.signature import protective_signature
from smallbms_bus.reports import Report

# Callers (service.py, tests) import the decision types and bms_state_report from here, as before the split.
__all__ = ["BmsCore", "Decision", "Event", "Outputs", "bms_state_report", "protective_signature"]

MODBUS_CLIENT_RECENT_S = 60.0  # LED-2
SNAPSHOT_VERSION = 1


class BmsCore:
    def __init__(self, now: float, wall: float, *, settings: Settings = DEFAULT_SETTINGS, comm_timeout: float = 5.0,
                 discovery_window: float = 10.0, waiting_grace: float = 60.0,
                 charge_efficiency: float | None = None, peukert: float | None = None) -> None:
        self.settings = settings
        self.bank = Bank(now, comm_timeout=comm_timeout, discovery_window=discovery_window,
                         waiting_grace=waiting_grace)
        monitor_options = {k: v for k, v in (("charge_efficiency", charge_efficiency), ("peukert", peukert))
                           if v is not None}
        self.monitor = BatteryMonitor(**monitor_options)
        self.history = History()
        self.diagnostics = Diagnostics()
        self.current_limits = CurrentLimits()
        self.charge_control = ChargeControl()  # CHG: CVL/CCL/DCL/DVL for inverters (bms/charge.py)
        self.first_start_wall = wall
        self.mode_on = True
        self.remote_on = True  # REM-1: "always on" until the service reports an input
        self.link_up = True
        self.link_reason = ""
        self.bus_state = BusState.UP
        self.relay_fault: str | None = None
        self.inverter_silent: str | None = None  # why the BMS-CAN inverter sends no keep-alive (service input)
        self.firmware_update_command = False
        self.firmware_update_since: float | None = None
        self.pre_alarm_since: float | None = None
        self.comms_ok_since: float | None = None
        self.modbus_client_at: float | None = None
        self.controller_heartbeat: int | None = None  # SunSpec CtrlHb as last written; not persisted, not acted on
        self.started = False
        self.latched: dict[str, bool] = dict.fromkeys(LATCHES, False)
        self.state_revision = 0  # bumps when something the store must keep changes (not counters)
        # What the event log says now (events are differences against it; persisted, so a restart compares with
        # what was logged before it), and the alarms and warnings a restart found logged as active and not yet
        # re-evaluated: they make no event until the core has started (then: still active = nothing to say).
        self._logged_states: dict[str, str] = {}
        self._logged_alarms, self._logged_warnings = BmsAlarm(0), BmsWarning(0)
        self._held_alarms, self._held_warnings = BmsAlarm(0), BmsWarning(0)
        self._command_reasons: dict[str, str] = {}
        self._signatures: dict[tuple, tuple] = {}  # per battery and frame kind: the last protective signature
        self._conflict_revision = 0  # the bank's COM-6 evidence as of the last report
        self._frozen = False  # COM-6: a node has two senders, no latch may clear

    # -- inputs --------------------------------------------------------------------------------
    def on_report(self, report: Report, now: float) -> bool:
        """Feed one report. True when it moves a battery across a protective threshold (a flag, a cell
        voltage or a temperature limit, either way) or changes its identity: the caller should evaluate
        at once. Any other report (most of them) only updates the readings the next tick evaluates."""
        self.bank.update(report, now)
        conflict = self.bank.conflict_revision != self._conflict_revision  # COM-6: a second sender, decide at once
        self._conflict_revision = self.bank.conflict_revision
        key, signature = protective_signature(report, self.settings.pre_alarm_level_per_cell)
        if key is None or self._signatures.get(key) == signature:
            return conflict
        self._signatures[key] = signature
        return True

    def set_link(self, up: bool, reason: str = "", state: BusState | None = None) -> None:
        """COM-4, COM-5: the bus going away or not taking frames is a comms loss. `state` says which."""
        self.link_up, self.link_reason = up, reason
        self.bus_state = state if state is not None else BusState.UP if up else BusState.LOST

    def _bus_down(self) -> str | None:
        return None if self.link_up else self.link_reason or self.bus_state.text

    def set_remote(self, on: bool) -> None:
        """REM-1: the remote on/off input as read by the outputs layer (already inverted if configured)."""
        self.remote_on = on
        self._command_reasons["REMOTE"] = "remote input"

    def set_inverter_silent(self, reason: str | None) -> None:
        """Warning INVERTER_SILENT (docs/inverter.md): None while the inverter's keep-alive arrives or none is
        required. Information only: it never changes ATC or ATD."""
        self.inverter_silent = reason

    def set_relay_fault(self, reason: str | None) -> None:
        """OUT-5: None when the relay board reads back what was commanded."""
        self.relay_fault = reason

    def modbus_client_seen(self, now: float) -> None:
        self.modbus_client_at = now

    def controller_heartbeat_seen(self, value: int) -> None:
        """SunSpec CtrlHb: kept so the controller reads back what it wrote. The BMS decides locally
        (LocRemCtl = local): a controller that stops beating changes no output."""
        self.controller_heartbeat = value

    # -- commands (persisted state changes bump state_revision) -------------------------------------
    def set_mode(self, on: bool, reason: str = "command") -> None:
        """REM-3: mode on/off, persisted."""
        if on != self.mode_on:
            self.mode_on = on
            self._command_reasons["MODE"] = reason
            self.state_revision += 1

    def set_settings(self, **changes: Any) -> Settings:
        """SET-1: validated as a whole; a SettingError leaves everything unchanged."""
        self.settings = self.settings.replace_checked(**changes)
        self.state_revision += 1
        return self.settings

    def reset_settings(self) -> Settings:
        """SET-2: every setting of the table returns to its default; nothing else changes."""
        self.settings = self.settings.reset()
        self.state_revision += 1
        return self.settings

    def set_soc(self, soc: float) -> None:
        """MON-6: needs a known bank capacity. Moves SoC and consumed Ah only: the history counts measured steps
        (bms/history.py), so no counter changes because of the command."""
        capacity = self._capacity()
        if not capacity:
            raise ValueError("the bank capacity is not known yet: wait until the batteries are learned")
        self.monitor.set_soc(soc, capacity)
        self.state_revision += 1

    def synchronise_soc(self) -> None:
        """MON-6: SoC := 100 %, consumed Ah := 0 (not counted as a synchronisation in history, and no other
        history counter moves: the last discharge and the discharge depth stay what was measured)."""
        self.monitor.synchronise()
        self.state_revision += 1

    def _capacity(self) -> int | None:
        """The bank capacity SoC is reckoned on: the learned bank's (known from the store at a restart, before any
        BAT_INFO arrives; a bank that differs from it is BANK_CONFIGURATION anyway), else what BAT_INFO says."""
        learned = self.bank.learned
        if learned is not None and (capacity := learned.bank_capacity_ah) is not None:
            return capacity
        return self.bank.topology().bank_capacity_ah

    def reset_history(self) -> None:
        self.history = History()
        self.state_revision += 1

    def relearn_bank(self, now: float) -> LearnedBank:
        """BANK-4."""
        learned = self.bank.relearn(now)
        self.state_revision += 1
        return learned

    def reset_alarms(self, now: float) -> tuple[str, ...]:
        """An alarm reset (SunSpec AlmRst) clears only what BEHAVIOUR.md lets a person clear: a firmware update
        started by command that failed (FW-2: "until the update completes or is aborted") is aborted. Every other
        alarm is a protective latch with its own clearing rule (ATC-1..3, ATD-1..2, COM-2, BANK-3, ...) and
        clears by itself once its condition is gone; a reset never clears one early. Returns what it cleared."""
        since = self.firmware_update_since
        if self.firmware_update_command and since is not None and now - since >= FIRMWARE_UPDATE_TIMEOUT_S:
            self.firmware_update_command = False
            return ("FIRMWARE_UPDATE_FAILED",)
        return ()

    def firmware_update(self, action: str) -> None:
        """FW-1: "start", "complete" or "abort" an update started by command."""
        if action not in ("start", "complete", "abort"):
            raise ValueError(f"firmware update action {action!r}: expected start, complete or abort")
        self.firmware_update_command = action == "start"

    # -- evaluation: the seven steps of the module docstring, each a method reading and filling `Facts` -----------
    def evaluate(self, now: float, wall: float) -> Decision:
        view = self.bank.evaluate(now)
        agg = view.aggregates
        f = Facts(view, self.settings, agg.recent_min_cell, agg.recent_max_cell, agg.recent_min_cell_temperature,
                  agg.recent_max_cell_temperature)
        self._start_up(f)  # 1
        self._latch_step(f, 2)  # 2
        self._faults(f, now)  # 3
        reading = self._monitor(f, now, wall)  # 4
        self._pre_alarm(f, now)  # 5
        atc, atd, outputs = self._allowed(f)  # 6
        decision, events = self._report(f, reading, atc, atd, outputs, now, wall)  # 7
        # one copy of the (large) Decision per evaluation: the events and the charge limits go in together
        return replace(decision, events=events, diagnostics=self.diagnostics, charge=self._charge(f, decision))  # 8

    def _start_up(self, f: Facts) -> None:
        """1. OUT-4, BANK-2: started once the bank is learned, consistent, every battery fresh and the link up."""
        view = f.view
        if not self.started and not view.waiting_for_batteries and view.phase == "learned" and not view.issues \
                and all(b.fresh for b in view.batteries) and self.link_up:
            self.started = True
        f.started = self.started

    def _latch_step(self, f: Facts, step: int) -> None:
        """2 (and the latches of steps 3 and 4): LATCH_TABLE's rows of `step`, on the protective memory. Nothing
        clears while a node has two senders (COM-6): no frame of such a node may switch an output on."""
        latched, flags = self.latched, f.flags
        self._frozen = bool(f.view.conflicted)
        for latch in LATCHES_OF_STEP[step]:
            name = latch.name
            if (latch.flag is not None and flags[latch.flag]) or latch.set(f):
                latched[name] = True
            elif latched[name] and latch.clear(f) and not (self._frozen and latch.holds_on_conflict):
                latched[name] = False
            if latched[name]:
                if latch.bit is not None:
                    if isinstance(latch.bit, BmsAlarm):
                        f.alarms |= latch.bit
                    else:
                        f.warnings |= latch.bit
                if latch.reason_key is not None and latch.reason is not None:
                    f.reasons[latch.reason_key] = latch.reason(f)

    def _faults(self, f: Facts, now: float) -> None:
        """3. Comms (COM-2, COM-4), bank (BANK-3), battery fault (ATC-5, ATD-3), firmware update (FW-1, FW-2),
        relay (OUT-5)."""
        view, reasons = f.view, f.reasons
        stale = [b for b in view.batteries if not b.fresh]
        self._comms(f, stale, now)
        if not view.waiting_for_batteries and view.issues:
            f.alarms |= BmsAlarm.BANK_CONFIGURATION
            reasons["BANK_CONFIGURATION"] = "; ".join(i.reason for i in view.issues)
        faulty = [f"battery {n} reports HardwareFault" for n in view.flags["hardware_fault"]]
        faulty += [f"battery {b.node} cell {i} not measured"  # project decision: it cannot be protected
                   for b in f.fresh for i in b.unmeasured]
        if faulty:
            f.alarms |= BmsAlarm.BATTERY_FAULT
            reasons["BATTERY_FAULT"] = "; ".join(faulty)
        self._firmware_update(f, stale, now)
        if self.relay_fault is not None:
            f.alarms |= BmsAlarm.RELAY_FAULT
            reasons["RELAY_FAULT"] = self.relay_fault
        if self.inverter_silent is not None:
            f.warnings |= BmsWarning.INVERTER_SILENT
            reasons["INVERTER_SILENT"] = self.inverter_silent

    def _comms(self, f: Facts, stale: list[Any], now: float) -> None:
        """COM-2: a stale battery or the link down (not while waiting for batteries); 2 s of good data recover."""
        f.comms_bad = not f.view.waiting_for_batteries and (not self.link_up or bool(stale))
        if f.comms_bad:
            self.comms_ok_since = None
            f.comms_text = (f"bus down: {self.link_reason}" if not self.link_up else
                            "; ".join(f"battery {b.node}: {b.stale_text}" for b in stale))
        elif self.latched["comms_lost"]:
            if self.comms_ok_since is None:
                self.comms_ok_since = now
            f.comms_recovered = now - self.comms_ok_since >= COMMS_RECOVERY_S
            f.comms_text = f"recovering: all batteries fresh for {now - self.comms_ok_since:.1f} s"
            if f.comms_recovered:
                self.comms_ok_since = None
        self._latch_step(f, 3)

    def _firmware_update(self, f: Facts, stale: list[Any], now: float) -> None:
        """FW-1: by command or a battery's FirmwareUpdating flag (a stale battery's last status counts);
        FW-2: FIRMWARE_UPDATE_FAILED once it lasts 120 s."""
        battery_updating = sorted(set(f.view.flags["firmware_updating"]).union(
            b.node for b in stale if b.status is not None and b.status.firmware_updating))
        f.updating = self.firmware_update_command or bool(battery_updating)
        if not f.updating:
            self.firmware_update_since = None
            return
        f.warnings |= BmsWarning.FIRMWARE_UPDATE_IN_PROGRESS
        if self.firmware_update_since is None:
            self.firmware_update_since = now
        f.reasons["FIRMWARE_UPDATE_IN_PROGRESS"] = (
            ("update started by command" if self.firmware_update_command else "")
            + ("; " if self.firmware_update_command and battery_updating else "")
            + (f"battery {', '.join(map(str, battery_updating))} reports FirmwareUpdating"
               if battery_updating else ""))
        if now - self.firmware_update_since >= FIRMWARE_UPDATE_TIMEOUT_S:
            f.alarms |= BmsAlarm.FIRMWARE_UPDATE_FAILED
            f.reasons["FIRMWARE_UPDATE_FAILED"] = f"update not completed within {FIRMWARE_UPDATE_TIMEOUT_S:g} s"

    def _monitor(self, f: Facts, now: float, wall: float) -> MonitorReading:
        """4. Battery monitor (MON) and history (HIS), then the SoC latches (ATD-2, PRE-2)."""
        view, agg = f.view, f.view.aggregates
        # Count charge only from data the core trusts: started, every battery fresh, a consistent bank.
        # (Before start the bank may be partly heard; its current would be partial.)
        trusted = self.started and agg.complete and not view.issues
        reading = self.monitor.step(now, agg.voltage, agg.current if trusted else None, self._capacity(),
                                    view.topology.series_units, self.settings)
        f.soc = reading.soc
        if trusted:
            min_cell, max_cell = f.min_cell, f.max_cell
            self.history.record(
                wall=wall, soc_before=reading.soc_before, soc=f.soc, depth_change_ah=reading.depth_change_ah,
                voltage=agg.voltage, charged_ah=reading.charged_ah, discharged_ah=reading.discharged_ah,
                synchronised=reading.synchronised, serials=f.serials,
                cell_range=(min_cell, max_cell) if min_cell is not None and max_cell is not None else None,
                temperature_range=(agg.min_battery_temperature, agg.max_battery_temperature)  # type: ignore[arg-type]
                if agg.min_battery_temperature is not None else None)
        if reading.synchronised:
            self.state_revision += 1
        self._latch_step(f, 4)
        if f.soc is None:
            f.warnings |= BmsWarning.SOC_UNKNOWN
            f.reasons["SOC_UNKNOWN"] = ("not synchronised or set since the first start" if not self.monitor.soc_known
                                        else "the bank capacity is not known yet (no BAT_INFO heard)")
        return reading

    def _pre_alarm(self, f: Facts, now: float) -> None:
        """5. PRE-1..3, COM-2: the pre-alarm, and the undervoltage disconnect once it has been high for 30 s."""
        latched, reasons = self.latched, f.reasons
        causes = [text for text, name in PRE_ALARM_CAUSES if latched[name]]
        pre_alarm = self.started and bool(causes)
        if pre_alarm:
            f.warnings |= BmsWarning.PRE_ALARM
            if self.pre_alarm_since is None:
                self.pre_alarm_since = now
            reasons["PRE_ALARM"] = "; ".join(causes) + (
                f" ({reasons['PRE_ALARM']})" if "PRE_ALARM" in reasons else "")
        else:
            self.pre_alarm_since = None
        if latched["undervoltage"] and self.pre_alarm_since is not None \
                and now - self.pre_alarm_since >= PRE_ALARM_LEAD_S:
            f.alarms |= BmsAlarm.CELL_LOW_VOLTAGE
            reasons["CELL_LOW_VOLTAGE"] = undervoltage_reason(f)

    def _allowed(self, f: Facts) -> tuple[bool, bool, Outputs]:
        """6. ATC and ATD from ALARM_TABLE's blocking columns (and ATC-4, an update in progress); the outputs
        (OUT-1..3, REM-2): load = mode AND remote AND ATD, charge = mode AND remote AND ATC."""
        charge_blockers, discharge_blockers = f.alarms & CHARGE_BLOCKERS, f.alarms & DISCHARGE_BLOCKERS
        atc = self.started and not charge_blockers and not f.updating
        atd = self.started and not discharge_blockers
        waiting = f.view.waiting_for_batteries
        if not atc:
            f.reasons["ATC"] = why_not(self.started, waiting, charge_blockers,
                                        "firmware update in progress" if f.updating else None, self._bus_down())
        if not atd:
            f.reasons["ATD"] = why_not(self.started, waiting, discharge_blockers, None, self._bus_down())
        enabled = self.mode_on and self.remote_on
        return atc, atd, Outputs(load_disconnect=enabled and atd, charge_disconnect=enabled and atc,
                                 pre_alarm=BmsWarning.PRE_ALARM in f.warnings)

    def _warnings(self, f: Facts, now: float, wall: float) -> None:
        """7a. The warnings no earlier step raises: current limits (MON-7), cell imbalance, 30 days without a
        full charge."""
        fresh = f.fresh
        over_charge, over_discharge = self.current_limits.step(now, [
            (b.node, b.info.nominal_units, b.info.nominal_capacity_ah, b.status.current)  # type: ignore[union-attr]
            for b in fresh])
        for nodes, warning in ((over_charge, BmsWarning.HIGH_CHARGE_CURRENT),
                               (over_discharge, BmsWarning.HIGH_DISCHARGE_CURRENT)):
            if nodes:
                f.warnings |= warning
                f.reasons[warning.name or ""] = "above 1C for 60 s or the pulse limit for 10 s: battery " + \
                    ", ".join(map(str, nodes))
        imbalanced = [b.node for b in fresh if (sp := b.cell_spread) is not None and sp > CELL_SPREAD_IMBALANCED_V]
        imbalanced += f.view.flags["cell_imbalance"]
        if imbalanced:
            f.warnings |= BmsWarning.CELL_IMBALANCE
            f.reasons["CELL_IMBALANCE"] = "battery " + ", ".join(map(str, sorted(set(imbalanced)))) + \
                f" reports CellImbalance or a cell spread above {CELL_SPREAD_IMBALANCED_V:.2f} V"
        since_full = self.history.time_since_full_charge(wall)
        if (since_full if since_full is not None else wall - self.first_start_wall) > NOT_FULLY_CHARGED_S:
            f.warnings |= BmsWarning.NOT_FULLY_CHARGED_30_DAYS
            f.reasons["NOT_FULLY_CHARGED_30_DAYS"] = ("no full charge for more than 30 days" if since_full is not None
                                                      else "no full charge since the first start, over 30 days ago")

    def _report(self, f: Facts, reading: MonitorReading, atc: bool, atd: bool, outputs: Outputs, now: float,
                wall: float) -> tuple[Decision, tuple[Event, ...]]:
        """7. Warnings, LEDs (LED-1, LED-2), balancer (BAL-1); events by difference with the event log."""
        self._warnings(f, now, wall)
        view, alarms, warnings, soc, pre_alarm = f.view, f.alarms, f.warnings, f.soc, outputs.pre_alarm
        client_recent = self.modbus_client_at is not None and now - self.modbus_client_at < MODBUS_CLIENT_RECENT_S
        decision = Decision(
            now=now, wall=wall, started=self.started, waiting_for_batteries=view.waiting_for_batteries, atc=atc,
            atd=atd, atd_state=AtdState.NO if not atd else AtdState.PRE_ALARM if pre_alarm else AtdState.YES,
            pre_alarm=pre_alarm, outputs=outputs, mode_on=self.mode_on, remote_on=self.remote_on,
            firmware_update=f.updating, link_up=self.link_up, alarms=alarms, warnings=warnings,
            reasons={k: v for k, v in f.reasons.items() if active_reason(k, alarms, warnings, atc, atd, pre_alarm)},
            error_led=Led.SOLID if alarms else Led.BLINKING if warnings else Led.OFF,
            status_led=Led.SOLID if client_recent else Led.BLINKING, balancer=self._balancer(f, wall),
            soc=soc, consumed_ah=None if soc is None else reading.consumed_ah,
            time_remaining_s=reading.time_remaining_s, average_current=reading.average_current, bank=view,
            history=replace(self.history), events=(), bus_state=self.bus_state, link_reason=self.link_reason,
            balancer_reason=balancer_unknown_reason(soc_known=soc is not None, history=self.history, wall=wall,
                                                    serials=f.serials),
        )
        events, raised = self._events(decision)
        self.diagnostics = self.diagnostics.record(raised, alarms & (CHARGE_BLOCKERS | DISCHARGE_BLOCKERS), wall)
        return decision, tuple(events)

    def _charge(self, f: Facts, d: Decision) -> ChargeLimits:
        """8. CHG-1..7 (bms/charge.py) from what this evaluation decided; a new charge state is persisted at once."""
        view, agg, topo = f.view, f.view.aggregates, f.view.topology
        before = self.charge_control.state
        limits = self.charge_control.step(ChargeInputs(
            d.now, topo.series_units, topo.parallel, topo.capacity_ah, agg.voltage, f.max_cell, f.min_cell, f.tmin,
            f.tmax, d.soc, d.atc, d.atd, d.pre_alarm, self.started and agg.complete and not view.issues,
            BmsWarning.NOT_FULLY_CHARGED_30_DAYS in d.warnings, self.started), self.settings)
        if self.charge_control.state is not before:
            self.state_revision += 1
        return limits

    def _balancer(self, f: Facts, wall: float) -> BalancerStatus:
        """BAL-1 from the fresh batteries' cell spreads and flags."""
        view, current = f.view, f.view.aggregates.current
        spreads = [sp for b in f.fresh if (sp := b.cell_spread) is not None]
        return balancer_status(soc_known=f.soc is not None, history=self.history, wall=wall, serials=f.serials,
                               charging=current is not None and current >= ZERO_CURRENT_A,
                               any_balancing=bool(view.flags["balancing"]),
                               any_imbalance_flag=bool(view.flags["cell_imbalance"]),
                               max_cell_spread=max(spreads, default=None))

    def _events(self, d: Decision) -> tuple[list[Event], BmsAlarm]:
        """The changes against the event log, and the alarms raised (the GX's last errors record those)."""
        events: list[Event] = []

        def emit(name: str, kind: str, value: str, reason: str) -> None:
            events.append(Event(d.wall, d.now, name, kind, value, reason))

        reasons = {"ATC": d.reasons.get("ATC", "all conditions met"), "ATD": d.reasons.get("ATD", "all conditions met"),
                   "PRE_ALARM": d.reasons.get("PRE_ALARM", "cleared" if d.started else d.reasons.get("ATC", "")),
                   "MODE": self._command_reasons.get("MODE", "start"),
                   "REMOTE": self._command_reasons.get("REMOTE", "start")}
        states = state_values(d)
        for name, value in states.items():
            if self._logged_states.get(name) != value:
                emit(name, "state", value, reasons[name])
        self._logged_states = states
        raised = BmsAlarm(0)
        held_alarms, held_warnings = self._held_alarms, self._held_warnings
        if d.started:  # every condition is evaluated on fresh data now: what the restart found is settled here
            self._held_alarms, self._held_warnings = BmsAlarm(0), BmsWarning(0)
        for kind, now_flags, logged, held in (("alarm", d.alarms, self._logged_alarms, held_alarms),
                                              ("warning", d.warnings, self._logged_warnings, held_warnings)):
            if now_flags == logged:  # nothing changed (nearly every evaluation): no member to compare
                continue
            for member in type(now_flags):
                on, was_on = member in now_flags, member in logged
                if on == was_on or (member in held and not d.started):
                    continue
                if on:
                    emit(member.name or "", kind, "raised", d.reasons.get(member.name or "", ""))
                    if kind == "alarm":
                        raised |= member  # type: ignore[assignment]
                else:
                    emit(member.name or "", kind, "cleared",
                         "condition gone (found when the bank was known again after a restart)" if member in held
                         else "condition gone")
        keep = BmsAlarm(0) if d.started else held_alarms
        self._logged_alarms = (d.alarms & ~keep) | (self._logged_alarms & keep)
        keep_w = BmsWarning(0) if d.started else held_warnings
        self._logged_warnings = (d.warnings & ~keep_w) | (self._logged_warnings & keep_w)
        return events, raised

    # -- persistence ---------------------------------------------------------------------------
    def snapshot(self, now: float) -> dict[str, Any]:
        """Everything the service persists; timers as elapsed seconds, since monotonic time restarts."""
        return {
            "version": SNAPSHOT_VERSION,
            "settings": self.settings.to_dict(),
            "mode_on": self.mode_on,
            "monitor": self.monitor.snapshot(now),
            "history": self.history.to_dict(),
            "diagnostics": self.diagnostics.to_dict(),
            "learned_bank": None if self.bank.learned is None else self.bank.learned.to_dict(),
            "first_start_wall": self.first_start_wall,
            "latched": dict(self.latched),
            "charge": self.charge_control.to_dict(),
            "logged": {"states": dict(self._logged_states), "alarms": int(self._logged_alarms),
                       "warnings": int(self._logged_warnings)},
            "timers": {
                "firmware_update_command": self.firmware_update_command,
                "firmware_update_elapsed_s": _elapsed(self.firmware_update_since, now),
                "pre_alarm_elapsed_s": _elapsed(self.pre_alarm_since, now),
            },
        }

    def restore_parts(self, parts: dict[str, Any], now: float, reason: str) -> None:
        """Put back snapshot parts taken earlier (SET-3: a change the store could not commit is undone).

        Only what a command changes: settings, mode_on, monitor (SoC), history, learned_bank, and of
        `timers` the firmware update command (its timer follows at the next evaluation)."""
        if "settings" in parts:
            self.settings = Settings.from_dict(parts["settings"])
        if "mode_on" in parts:
            self.set_mode(bool(parts["mode_on"]), reason)
        if "monitor" in parts:
            self.monitor.restore(parts["monitor"], now)
        if "history" in parts:
            self.history = History.from_dict(parts["history"])
        if "learned_bank" in parts:
            learned = parts["learned_bank"]
            self.bank.learned = None if learned is None else LearnedBank.from_dict(learned)
            self.bank.learned_revision += 1
        if "timers" in parts:
            self.firmware_update_command = bool(parts["timers"]["firmware_update_command"])
        self.state_revision += 1

    @classmethod
    def from_snapshot(cls, data: dict[str, Any], now: float, wall: float, **options: Any) -> BmsCore:
        version = data.get("version")
        if version != SNAPSHOT_VERSION:
            raise ValueError(f"state snapshot version {version!r} is not supported (this build reads "
                             f"{SNAPSHOT_VERSION})")
        core = cls(now, wall, settings=Settings.from_dict(data["settings"]), **options)
        core.mode_on = bool(data["mode_on"])
        core.monitor.restore(data["monitor"], now)
        core.history = History.from_dict(data["history"])
        core.diagnostics = Diagnostics.from_dict(data.get("diagnostics"))
        if data["learned_bank"] is not None:
            core.bank.learned = LearnedBank.from_dict(data["learned_bank"])
        core.first_start_wall = float(data["first_start_wall"])
        core.charge_control = ChargeControl.from_dict(data.get("charge"))  # CHG-1; absent in an older store
        # COM-2's comms loss is not restored: a restart is "waiting for batteries" (BANK-2, a state, not an
        # alarm) until every learned battery is fresh again, and the outputs stay off until then (OUT-4).
        core.latched.update({k: bool(v) for k, v in data["latched"].items() if k in core.latched and k != "comms_lost"})
        logged = data.get("logged")  # absent in a store written before this: everything is logged afresh
        if logged is not None:
            core._logged_states = {str(k): str(v) for k, v in logged["states"].items()}
            # REM-1: the remote input as last read until the outputs layer reads it again (it does at its first
            # apply): off is the safe assumption, and the log does not hear "on" then "off" again.
            core.remote_on = core._logged_states.get("REMOTE", "on") == "on"
            core._held_alarms = core._logged_alarms = BmsAlarm(int(logged["alarms"]))
            core._held_warnings = core._logged_warnings = BmsWarning(int(logged["warnings"]))
        timers = data["timers"]
        core.firmware_update_command = bool(timers["firmware_update_command"])
        core.firmware_update_since = _since(timers["firmware_update_elapsed_s"], now)
        core.pre_alarm_since = _since(timers["pre_alarm_elapsed_s"], now)
        return core


def _elapsed(since: float | None, now: float) -> float | None:
    return None if since is None else now - since


def _since(elapsed: float | None, now: float) -> float | None:
    return None if elapsed is None else now - float(elapsed)
