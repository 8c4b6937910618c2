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

Decisions where BEHAVIOUR.md is silent are marked "project decision" below and in docs/core.md.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from smallbms_bus.bank import Bank, BankView, LearnedBank
from smallbms_bus.bms.alarms import AtdState, BalancerReason, BalancerStatus, BmsAlarm, BmsWarning, BusState, Led
from smallbms_bus.bms.charge import NO_CHARGE_LIMITS, ChargeLimits
from smallbms_bus.bms.diagnostics import NO_DIAGNOSTICS, Diagnostics
from smallbms_bus.bms.history import History, balancer_status, balancer_unknown_reason
from smallbms_bus.bms.monitor import ZERO_CURRENT_A, BatteryMonitor, CurrentLimits
from smallbms_bus.bms.settings import DEFAULT_SETTINGS, Settings
from smallbms_bus.reports import (
    BatteryInfo,
    BatteryStatus,
    BatteryTemps,
    BmsState,
    CellVoltages,
    Report,
    SerialFragment,
)

# -- thresholds (BEHAVIOUR.md) -------------------------------------------------------------------
CELL_HIGH_SET_V = 3.75  # ATC-1: any cell >= -> CELL_HIGH_VOLTAGE
CELL_HIGH_CLEAR_V = 3.60  # ... clears when every cell <=
CELL_LOW_SET_V = 2.80  # ATD-1: any cell <= -> undervoltage
CELL_LOW_CLEAR_V = 3.20  # ... clears when every cell >=
# PRE-1: any cell <= the pre-alarm level (a setting, default 3.10 V: settings.py) -> pre-alarm
PRE_ALARM_CLEAR_V = 3.20  # ... clears when every cell >=
CHARGE_TEMP_LOW_SET_C = 5.0  # ATC-2: lowest cell temperature < -> LOW_TEMPERATURE_CHARGE
CHARGE_TEMP_LOW_CLEAR_C = 6.0  # ... clears at >=
CHARGE_TEMP_HIGH_SET_C = 50.0  # ATC-3: highest cell temperature > -> HIGH_TEMPERATURE_CHARGE
CHARGE_TEMP_HIGH_CLEAR_C = 48.0  # ... clears at <=
DISCHARGE_TEMP_MIN_C = -20.0  # warning DISCHARGE_TEMPERATURE outside -20..50 degC
DISCHARGE_TEMP_MAX_C = 50.0
DISCHARGE_TEMP_HYSTERESIS_C = 1.0  # project decision: clears 1 K inside the range
SOC_CLEAR_MARGIN_PCT = 5.0  # ATD-2 clears at floor + 5 pp; project decision: PRE-2 likewise (capped at 100)
PRE_ALARM_LEAD_S = 30.0  # PRE-3
COMMS_RECOVERY_S = 2.0  # COM-2
FIRMWARE_UPDATE_TIMEOUT_S = 120.0  # FW-2
MODBUS_CLIENT_RECENT_S = 60.0  # LED-2
NOT_FULLY_CHARGED_S = 30 * 24 * 3600.0  # warning NOT_FULLY_CHARGED_30_DAYS
SNAPSHOT_VERSION = 1

LATCHES = ("cell_high", "undervoltage", "cell_pre_alarm", "temp_low", "temp_high", "low_soc", "low_soc_warning",
           "discharge_temp", "comms_lost")


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

    def set_relay_fault(self, reason: str | None) -> None:
        """OUT-5: None when the relay board reads back what was commanded."""
        self.relay_fault = reason

    def set_inverter_silent(self, reason: str | None) -> None:
        """Warning INVERTER_SILENT (docs/inverter.md): None while the inverter's keep-alive arrives or none is
        required. Information only: it never changes ATC or ATD."""
        self.inverter_silent = reason

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

    # -- evaluation ----------------------------------------------------------------------------
    def evaluate(self, now: float, wall: float) -> Decision:
        view = self.bank.evaluate(now)
        agg = view.aggregates
        topo = view.topology
        s = self.settings
        latched = self.latched
        reasons: dict[str, str] = {}
        waiting = view.waiting_for_batteries
        fresh = [b for b in view.batteries if b.fresh]

        # 2. latched cell and temperature conditions (fresh data only; no data keeps the latch). They decide on
        # the worst frame of each battery in the last 2 s (the bank's protective memory), and nothing clears
        # while a node has two senders (COM-6): no frame of such a node may switch an output on.
        flags = view.flags
        self._frozen = bool(view.conflicted)
        min_ref, max_ref = agg.recent_min_cell, agg.recent_max_cell
        min_cell = min_ref.voltage if min_ref is not None else None
        max_cell = max_ref.voltage if max_ref is not None else None
        high_by_value = max_cell is not None and max_cell >= CELL_HIGH_SET_V
        low_by_value = min_cell is not None and min_cell <= CELL_LOW_SET_V
        pre_by_value = min_cell is not None and min_cell <= s.pre_alarm_level_per_cell
        self._latch("cell_high", flags["cell_high_voltage"], high_by_value,
                    max_cell is not None and max_cell <= CELL_HIGH_CLEAR_V)
        self._latch("undervoltage", flags["cell_low_voltage"], low_by_value,
                    min_cell is not None and min_cell >= CELL_LOW_CLEAR_V)
        self._latch("cell_pre_alarm", flags["cell_low_pre_alarm"], pre_by_value,
                    min_cell is not None and min_cell >= PRE_ALARM_CLEAR_V)
        tmin, tmax = agg.recent_min_cell_temperature, agg.recent_max_cell_temperature
        self._latch("temp_low", (), tmin is not None and tmin < CHARGE_TEMP_LOW_SET_C,
                    tmin is not None and tmin >= CHARGE_TEMP_LOW_CLEAR_C)
        self._latch("temp_high", (), tmax is not None and tmax > CHARGE_TEMP_HIGH_SET_C,
                    tmax is not None and tmax <= CHARGE_TEMP_HIGH_CLEAR_C)
        outside = ((tmin is not None and tmin < DISCHARGE_TEMP_MIN_C)
                   or (tmax is not None and tmax > DISCHARGE_TEMP_MAX_C))
        self._latch("discharge_temp", (), outside,
                    tmin is not None and tmax is not None
                    and tmin >= DISCHARGE_TEMP_MIN_C + DISCHARGE_TEMP_HYSTERESIS_C
                    and tmax <= DISCHARGE_TEMP_MAX_C - DISCHARGE_TEMP_HYSTERESIS_C)
        if latched["cell_high"]:
            reasons["CELL_HIGH_VOLTAGE"] = _cell_reason(
                flags["cell_high_voltage"], "CellHighVoltage", max_ref, "highest", high_by_value,
                f">= {CELL_HIGH_SET_V:.2f} V", f"every cell is <= {CELL_HIGH_CLEAR_V:.2f} V")
        if latched["temp_low"]:
            reasons["LOW_TEMPERATURE_CHARGE"] = (
                f"lowest cell temperature {_fmt(tmin, '°C')} (charging needs >= {CHARGE_TEMP_LOW_SET_C} °C, "
                f"resumes at {CHARGE_TEMP_LOW_CLEAR_C} °C)")
        if latched["temp_high"]:
            reasons["HIGH_TEMPERATURE_CHARGE"] = (
                f"highest cell temperature {_fmt(tmax, '°C')} (charging allowed <= {CHARGE_TEMP_HIGH_SET_C} °C, "
                f"resumes at {CHARGE_TEMP_HIGH_CLEAR_C} °C)")
        if latched["discharge_temp"]:
            reasons["DISCHARGE_TEMPERATURE"] = (
                f"cell temperatures {_fmt(tmin, '°C')} .. {_fmt(tmax, '°C')} outside "
                f"{DISCHARGE_TEMP_MIN_C:g} .. {DISCHARGE_TEMP_MAX_C:g} °C")

        # 3. faults
        stale = [b for b in view.batteries if not b.fresh]
        comms_bad = not waiting and (not self.link_up or bool(stale))
        if comms_bad:
            latched["comms_lost"] = True
            self.comms_ok_since = None
            reasons["BATTERY_COMMS_LOST"] = (f"bus down: {self.link_reason}" if not self.link_up else
                                             "; ".join(f"battery {b.node}: {b.stale_text}" for b in stale))
        elif latched["comms_lost"]:
            if self.comms_ok_since is None:
                self.comms_ok_since = now
            if now - self.comms_ok_since >= COMMS_RECOVERY_S:
                latched["comms_lost"] = False
                self.comms_ok_since = None
            else:
                reasons["BATTERY_COMMS_LOST"] = f"recovering: all batteries fresh for {now - self.comms_ok_since:.1f} s"
        bank_fault = not waiting and bool(view.issues)
        if bank_fault:
            reasons["BANK_CONFIGURATION"] = "; ".join(i.reason for i in view.issues)
        faulty = [f"battery {n} reports HardwareFault" for n in flags["hardware_fault"]]
        faulty += [f"battery {b.node} cell {i} not measured"  # project decision: it cannot be protected
                   for b in fresh for i in b.unmeasured]
        if faulty:
            reasons["BATTERY_FAULT"] = "; ".join(faulty)
        battery_updating = sorted(set(flags["firmware_updating"]).union(
            b.node for b in stale if b.status is not None and b.status.firmware_updating))
        updating = self.firmware_update_command or bool(battery_updating)
        if updating:
            if self.firmware_update_since is None:
                self.firmware_update_since = now
            reasons["FIRMWARE_UPDATE_IN_PROGRESS"] = (
                ("update started by command" if self.firmware_update_command else "")
                + ("; " if self.firmware_update_command and battery_updating else "")
                + (f"battery {', '.join(map(str, battery_updating))} reports FirmwareUpdating"
                   if battery_updating else ""))
        else:
            self.firmware_update_since = None
        update_failed = updating and now - self.firmware_update_since >= FIRMWARE_UPDATE_TIMEOUT_S  # type: ignore[operator]
        if update_failed:
            reasons["FIRMWARE_UPDATE_FAILED"] = f"update not completed within {FIRMWARE_UPDATE_TIMEOUT_S:g} s"
        if self.relay_fault is not None:
            reasons["RELAY_FAULT"] = self.relay_fault
        if self.inverter_silent is not None:
            reasons["INVERTER_SILENT"] = self.inverter_silent

        if not self.started and not waiting and view.phase == "learned" and not view.issues and not stale \
                and self.link_up:
            self.started = True

        # 4. battery monitor and history
        capacity = self._capacity()
        series_units = topo.series_units
        # Count charge only from data the core trusts: started, every battery fresh, a consistent bank.
        # (Before start the bank may be partly heard; its current would be partial.)
        trusted = self.started and agg.complete and not view.issues
        reading = self.monitor.step(now, agg.voltage, agg.current if trusted else None, capacity, series_units, s)
        soc = reading.soc
        if trusted:
            self.history.record(
                wall=wall, soc_before=reading.soc_before, soc=soc, depth_change_ah=reading.depth_change_ah,
                voltage=agg.voltage,
                charged_ah=reading.charged_ah, discharged_ah=reading.discharged_ah,
                synchronised=reading.synchronised, serials=[b.serial for b in view.batteries if b.serial],
                cell_range=(min_cell, max_cell) if min_cell is not None and max_cell is not None else None,
                temperature_range=(agg.min_battery_temperature, agg.max_battery_temperature)  # type: ignore[arg-type]
                if agg.min_battery_temperature is not None else None)
        if reading.synchronised:
            self.state_revision += 1
        floor, level = s.discharge_floor_pct, s.low_soc_warning_pct
        self._latch("low_soc", (), floor > 0 and soc is not None and soc <= floor,
                    floor == 0 or soc is None or soc >= min(floor + SOC_CLEAR_MARGIN_PCT, 100.0))
        self._latch("low_soc_warning", (), soc is not None and soc <= level,
                    soc is None or soc >= min(level + SOC_CLEAR_MARGIN_PCT, 100.0))
        if latched["low_soc"]:
            reasons["LOW_SOC"] = f"SoC {_fmt(soc, '%')} at or below the discharge floor {floor:g} %"
        if latched["low_soc_warning"]:
            reasons["LOW_SOC_WARNING"] = f"SoC {_fmt(soc, '%')} at or below the warning level {level:g} %"
        if soc is None:
            reasons["SOC_UNKNOWN"] = ("not synchronised or set since the first start" if not self.monitor.soc_known
                                      else "the bank capacity is not known yet (no BAT_INFO heard)")
        over_charge, over_discharge = self.current_limits.step(now, [
            (b.node, b.info.nominal_units, b.info.nominal_capacity_ah, b.status.current)  # type: ignore[union-attr]
            for b in fresh])
        if over_charge:
            reasons["HIGH_CHARGE_CURRENT"] = "above 1C for 60 s or the pulse limit for 10 s: battery " + \
                ", ".join(map(str, over_charge))
        if over_discharge:
            reasons["HIGH_DISCHARGE_CURRENT"] = "above 1C for 60 s or the pulse limit for 10 s: battery " + \
                ", ".join(map(str, over_discharge))
        spreads = [(b.node, sp) for b in fresh if (sp := b.cell_spread) is not None]
        max_spread = max((sp for _, sp in spreads), default=None)
        imbalanced = [n for n, sp in spreads if sp > 0.10] + list(flags["cell_imbalance"])
        if imbalanced:
            reasons["CELL_IMBALANCE"] = "battery " + ", ".join(map(str, sorted(set(imbalanced)))) + \
                " reports CellImbalance or a cell spread above 0.10 V"
        since_full = self.history.time_since_full_charge(wall)
        if (since_full if since_full is not None else wall - self.first_start_wall) > NOT_FULLY_CHARGED_S:
            reasons["NOT_FULLY_CHARGED_30_DAYS"] = ("no full charge for more than 30 days" if since_full is not None
                                                    else "no full charge since the first start, over 30 days ago")

        # 5. pre-alarm and the undervoltage lead (PRE-1..3, COM-2)
        if latched["cell_pre_alarm"]:
            reasons["PRE_ALARM"] = _cell_reason(
                flags["cell_low_pre_alarm"], "CellLowPreAlarm", min_ref, "lowest", pre_by_value,
                f"<= the pre-alarm level {s.pre_alarm_level_per_cell:.3f} V",
                f"every cell is >= {PRE_ALARM_CLEAR_V:.2f} V")
        pre_causes = [name for name, on in (("cell pre-alarm", latched["cell_pre_alarm"]),
                                            ("low-SoC warning level", latched["low_soc_warning"]),
                                            ("cell undervoltage", latched["undervoltage"]),
                                            ("battery comms lost", latched["comms_lost"])) if on]
        pre_alarm = self.started and bool(pre_causes)
        if pre_alarm:
            if self.pre_alarm_since is None:
                self.pre_alarm_since = now
            reasons["PRE_ALARM"] = "; ".join(pre_causes) + (
                f" ({reasons['PRE_ALARM']})" if "PRE_ALARM" in reasons else "")
        else:
            self.pre_alarm_since = None
        undervoltage_disconnect = latched["undervoltage"] and self.pre_alarm_since is not None \
            and now - self.pre_alarm_since >= PRE_ALARM_LEAD_S
        if undervoltage_disconnect:
            reasons["CELL_LOW_VOLTAGE"] = _cell_reason(
                flags["cell_low_voltage"], "CellLowVoltage", min_ref, "lowest", low_by_value,
                f"<= {CELL_LOW_SET_V:.2f} V", f"every cell is >= {CELL_LOW_CLEAR_V:.2f} V") + \
                f"; loads off {PRE_ALARM_LEAD_S:g} s after the pre-alarm"

        # 6. ATC, ATD, outputs
        alarms = BmsAlarm(0)
        for alarm, on in ((BmsAlarm.CELL_LOW_VOLTAGE, undervoltage_disconnect),
                          (BmsAlarm.CELL_HIGH_VOLTAGE, latched["cell_high"]),
                          (BmsAlarm.LOW_TEMPERATURE_CHARGE, latched["temp_low"]),
                          (BmsAlarm.HIGH_TEMPERATURE_CHARGE, latched["temp_high"]),
                          (BmsAlarm.LOW_SOC, latched["low_soc"]),
                          (BmsAlarm.BATTERY_COMMS_LOST, latched["comms_lost"]),
                          (BmsAlarm.BANK_CONFIGURATION, bank_fault),
                          (BmsAlarm.FIRMWARE_UPDATE_FAILED, update_failed),
                          (BmsAlarm.RELAY_FAULT, self.relay_fault is not None),
                          (BmsAlarm.BATTERY_FAULT, bool(faulty))):
            if on:
                alarms |= alarm
        charge_blockers = alarms & (BmsAlarm.CELL_HIGH_VOLTAGE | BmsAlarm.LOW_TEMPERATURE_CHARGE
                                    | BmsAlarm.HIGH_TEMPERATURE_CHARGE | BmsAlarm.BATTERY_COMMS_LOST
                                    | BmsAlarm.BANK_CONFIGURATION | BmsAlarm.BATTERY_FAULT)
        discharge_blockers = alarms & (BmsAlarm.CELL_LOW_VOLTAGE | BmsAlarm.LOW_SOC | BmsAlarm.BATTERY_COMMS_LOST
                                       | BmsAlarm.BANK_CONFIGURATION | BmsAlarm.BATTERY_FAULT
                                       | BmsAlarm.FIRMWARE_UPDATE_FAILED)
        atc = self.started and not charge_blockers and not updating
        atd = self.started and not discharge_blockers
        if not atc:
            reasons["ATC"] = _why_not(self.started, waiting, charge_blockers,
                                      "firmware update in progress" if updating else None, self._bus_down())
        if not atd:
            reasons["ATD"] = _why_not(self.started, waiting, discharge_blockers, None, self._bus_down())
        enabled = self.mode_on and self.remote_on
        outputs = Outputs(load_disconnect=enabled and atd, charge_disconnect=enabled and atc, pre_alarm=pre_alarm)

        # 7. warnings, LEDs, balancer, events
        warnings = BmsWarning(0)
        for warning, on in ((BmsWarning.PRE_ALARM, pre_alarm),
                            (BmsWarning.LOW_SOC_WARNING, latched["low_soc_warning"]),
                            (BmsWarning.CELL_IMBALANCE, bool(imbalanced)),
                            (BmsWarning.SOC_UNKNOWN, soc is None),
                            (BmsWarning.FIRMWARE_UPDATE_IN_PROGRESS, updating),
                            (BmsWarning.HIGH_CHARGE_CURRENT, bool(over_charge)),
                            (BmsWarning.HIGH_DISCHARGE_CURRENT, bool(over_discharge)),
                            (BmsWarning.NOT_FULLY_CHARGED_30_DAYS, "NOT_FULLY_CHARGED_30_DAYS" in reasons),
                            (BmsWarning.DISCHARGE_TEMPERATURE, latched["discharge_temp"]),
                            (BmsWarning.INVERTER_SILENT, self.inverter_silent is not None)):
            if on:
                warnings |= warning
        error_led = Led.SOLID if alarms else Led.BLINKING if warnings else Led.OFF
        client_recent = self.modbus_client_at is not None and now - self.modbus_client_at < MODBUS_CLIENT_RECENT_S
        charging = agg.current is not None and agg.current >= ZERO_CURRENT_A
        serials = [b.serial for b in view.batteries if b.serial]
        balancer = balancer_status(soc_known=soc is not None, history=self.history, wall=wall, serials=serials,
                                   charging=charging, any_balancing=bool(flags["balancing"]),
                                   any_imbalance_flag=bool(flags["cell_imbalance"]), max_cell_spread=max_spread)
        balancer_reason = balancer_unknown_reason(soc_known=soc is not None, history=self.history, wall=wall,
                                                  serials=serials)
        decision = Decision(
            now=now, wall=wall, started=self.started, waiting_for_batteries=waiting, atc=atc, atd=atd,
            atd_state=AtdState.NO if not atd else AtdState.PRE_ALARM if pre_alarm else AtdState.YES,
            pre_alarm=pre_alarm, outputs=outputs, mode_on=self.mode_on, remote_on=self.remote_on,
            firmware_update=updating, link_up=self.link_up, alarms=alarms, warnings=warnings,
            reasons={k: v for k, v in reasons.items() if _active(k, alarms, warnings, atc, atd, pre_alarm)},
            error_led=error_led, status_led=Led.SOLID if client_recent else Led.BLINKING, balancer=balancer,
            soc=soc, consumed_ah=None if soc is None else reading.consumed_ah,
            time_remaining_s=reading.time_remaining_s,
            average_current=reading.average_current, bank=view, history=replace(self.history), events=(),
            bus_state=self.bus_state, link_reason=self.link_reason, balancer_reason=balancer_reason,
        )
        events, raised = self._events(decision)
        self.diagnostics = self.diagnostics.record(raised, charge_blockers | discharge_blockers, wall)
        decision = replace(decision, events=tuple(events), diagnostics=self.diagnostics)
        return decision

    def _latch(self, name: str, flagged: tuple[int, ...], set_by_value: bool, clear_by_value: bool) -> None:
        """Set on a battery flag or a value past the set level; clear only when no flag and the value is back,
        and no node has two senders (COM-6)."""
        if flagged or set_by_value:
            self.latched[name] = True
        elif self.latched[name] and clear_by_value and not self._frozen:
            self.latched[name] = False

    def _events(self, d: Decision) -> tuple[list[Event], BmsAlarm]:
        """The changes against the event log, and the alarms raised (the GX's last errors record those)."""
        events: list[Event] = []

        def emit(name: str, kind: str, value: str, reason: str) -> None:
            events.append(Event(d.wall, d.now, name, kind, value, reason))

        reasons = {"ATC": d.reasons.get("ATC", "all conditions met"), "ATD": d.reasons.get("ATD", "all conditions met"),
                   "PRE_ALARM": d.reasons.get("PRE_ALARM", "cleared" if d.started else d.reasons.get("ATC", "")),
                   "MODE": self._command_reasons.get("MODE", "start"),
                   "REMOTE": self._command_reasons.get("REMOTE", "start")}
        states = _state_values(d)
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


def _temperature_zone(celsius: float) -> tuple[bool, bool, bool, bool]:
    return (celsius < CHARGE_TEMP_LOW_SET_C, celsius > CHARGE_TEMP_HIGH_SET_C, celsius < DISCHARGE_TEMP_MIN_C,
            celsius > DISCHARGE_TEMP_MAX_C)


# Called for every frame (hundreds a second): plain attribute reads, no generators.
def _status_signature(r: BatteryStatus, _: float) -> tuple[tuple, tuple]:
    return ("status", r.node), (r.cell_high_voltage, r.cell_low_voltage, r.cell_low_pre_alarm, r.hardware_fault,
                                r.firmware_updating, r.cell_imbalance, _temperature_zone(r.temperature))


def _cells_signature(r: CellVoltages, pre_alarm_level: float) -> tuple[tuple, tuple]:
    cells = [v for v in r.voltages if v is not None]
    if not cells:
        return ("cells", r.node, r.first_cell), ()
    low, high = min(cells), max(cells)
    return ("cells", r.node, r.first_cell), (high >= CELL_HIGH_SET_V, low <= CELL_LOW_SET_V, low <= pre_alarm_level)


def _temps_signature(r: BatteryTemps, _: float) -> tuple[tuple, tuple]:
    return ("temps", r.node), (_temperature_zone(r.cell_temp_min), _temperature_zone(r.cell_temp_max))


def _identity_signature(r: BatteryInfo | SerialFragment, _: float) -> tuple[tuple, tuple]:
    return ("identity", r.node, type(r).__name__, getattr(r, "part", 0)), (r,)


_SIGNATURES: dict[type, Any] = {BatteryStatus: _status_signature, CellVoltages: _cells_signature,
                                BatteryTemps: _temps_signature, BatteryInfo: _identity_signature,
                                SerialFragment: _identity_signature}


def protective_signature(report: Report, pre_alarm_level: float) -> tuple[tuple | None, tuple]:
    """What of a report can change outputs, alarms or the bank: the thresholds are the ones `evaluate` uses
    (flags, cell voltages at CELL_HIGH_SET_V / the pre-alarm level setting / CELL_LOW_SET_V, the temperature
    limits, identity)."""
    signature = _SIGNATURES.get(type(report))
    return (None, ()) if signature is None else signature(report, pre_alarm_level)


def _state_values(d: Decision) -> dict[str, str]:
    """The observable states whose changes are events, as the event log spells them."""
    return {"ATC": "yes" if d.atc else "no", "ATD": d.atd_state.name.lower().replace("_", "-"),
            "PRE_ALARM": "on" if d.pre_alarm else "off", "MODE": "on" if d.mode_on else "off",
            "REMOTE": "on" if d.remote_on else "off"}


def _elapsed(since: float | None, now: float) -> float | None:
    return None if since is None else now - since


def _since(elapsed: float | None, now: float) -> float | None:
    return None if elapsed is None else now - float(elapsed)


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "unknown"
    return f"{value:.1f} {unit}" if unit != "%" else f"{value:.1f} %"


def _cell_reason(flagged: tuple[int, ...], flag: str, cell: Any, extreme: str, by_value: bool, set_rule: str,
                 clear_rule: str) -> str:
    """Says what fired: the battery's own flag (its own threshold, so the cell value is only shown, not
    compared), this BMS's cell rule with the value that crossed it, or neither any more (the latch holds
    until its clearing rule is met)."""
    parts = [f"battery {', '.join(map(str, flagged))} reports {flag} (its own threshold)"] if flagged else []
    if cell is not None:
        parts.append(f"cell {cell.cell} of battery {cell.node} at {cell.voltage:.3f} V ({set_rule})" if by_value
                     else f"{extreme} cell {cell.voltage:.3f} V (battery {cell.node} cell {cell.cell})")
    if not flagged and not by_value:
        parts.insert(0, f"held until {clear_rule} and no battery reports {flag}")
    return "; ".join(parts)


def _why_not(started: bool, waiting: bool, blockers: BmsAlarm, extra: str | None, bus_down: str | None) -> str:
    if not started:
        why = "waiting for batteries" if waiting else "not started: the bank is not known and fresh yet"
        return f"{why} (bus down: {bus_down})" if bus_down else why
    parts = [m.name for m in BmsAlarm if m in blockers and m.name]
    if extra:
        parts.append(extra)
    return ", ".join(parts)


def _active(name: str, alarms: BmsAlarm, warnings: BmsWarning, atc: bool, atd: bool, pre_alarm: bool) -> bool:
    if name in BmsAlarm.__members__:
        return BmsAlarm[name] in alarms
    if name in BmsWarning.__members__:
        return BmsWarning[name] in warnings
    return {"ATC": not atc, "ATD": not atd}.get(name, False)



def bms_state_report(decision: Decision, alive_counter: int) -> BmsState:
    """The BMS_STATE frame's content (PROTOCOL.md) for a decision; chargers and loads obey it."""
    return BmsState(
        allowed_to_charge=decision.atc, allowed_to_discharge=decision.atd, pre_alarm=decision.pre_alarm,
        mode_on=decision.mode_on, remote_on=decision.remote_on, firmware_update=decision.firmware_update,
        state_of_charge=None if decision.soc is None else round(decision.soc * 2) / 2,
        alarms=int(decision.alarms), warnings=int(decision.warnings),
        battery_count=decision.bank.topology.batteries, alive_counter=alive_counter & 0xFF)
