"""The fields a register can show: every `source` named in register_maps/ is a key of BANK or BATTERY.

A register map says *where* a value lives and how it is encoded; this module says *what* the value
is, read from one `ModbusView` (the core's latest Decision plus the settings), in engineering units.
None means "the service does not have this value" and is encoded as the map's not-available marker.
A test fails when a map names a source that is not defined here.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from smallbms_bus import __version__
from smallbms_bus.bank import BatteryView, Topology
from smallbms_bus.bms.alarms import AtdState, BalancerStatus, BmsAlarm, BmsWarning
from smallbms_bus.bms.core import BmsCore, Decision
from smallbms_bus.bms.monitor import pulse_limits
from smallbms_bus.bms.rules import CELL_HIGH_SET_V
from smallbms_bus.bms.settings import Settings
from smallbms_bus.modbus.codes import (
    BALANCER_CODES,
    LED_CODES,
    STATE_FAULT,
    STATE_FIRMWARE_UPDATE,
    STATE_OFF,
    STATE_ON,
    STATE_WAITING,
)
from smallbms_bus.modbus.setting_registers import SETTING_REGISTERS, SettingRegister
from smallbms_bus.protocol import CELLS_PER_UNIT, FLAG_FIELDS
from smallbms_bus.vocabulary import RELAY_ROLES

PRESENCE_ABSENT, PRESENCE_FRESH, PRESENCE_STALE = 0, 1, 2


@dataclass(frozen=True)
class ModbusView:
    """What one register image is built from: taken on the event loop, never mutated afterwards."""

    decision: Decision
    settings: Settings
    uptime_s: float
    modbus_unit: int = 1
    controller_heartbeat: int | None = None  # SunSpec CtrlHb as last written (not persisted)
    batteries: dict[int, BatteryView] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "batteries", {b.node: b for b in self.decision.bank.batteries})

    @classmethod
    def of(cls, decision: Decision, core: BmsCore, uptime_s: float, modbus_unit: int = 1) -> ModbusView:
        """The view of a decision and what the core holds besides it (settings, the controller heartbeat)."""
        return cls(decision, core.settings, uptime_s, modbus_unit, core.controller_heartbeat)

    @property
    def series_units(self) -> int | None:
        return self.decision.bank.topology.series_units


def state(s: ModbusView) -> int:
    d = s.decision
    if d.firmware_update:
        return STATE_FIRMWARE_UPDATE
    if d.waiting_for_batteries or not d.started:
        return STATE_WAITING
    if not d.mode_on or not d.remote_on:
        return STATE_OFF
    if d.alarms:
        return STATE_FAULT
    return STATE_ON


def _outputs(s: ModbusView) -> int:
    o = s.decision.outputs
    return sum(int(getattr(o, role)) << bit for bit, role in enumerate(RELAY_ROLES))


def _setting(register: SettingRegister) -> Callable[[ModbusView], float | int | None]:
    """A setting register's value, read through its one descriptor (modbus/setting_registers.py)."""
    return lambda s: register.read(s.settings, s.series_units)


def _cell_voltage(ref: Any) -> float | None:
    return None if ref is None else ref.voltage


def _time_remaining(s: ModbusView) -> float | None:
    return s.decision.time_remaining_s  # inf encodes as not available: infinite while the SoC is known, else unknown


def _history_since_full(s: ModbusView) -> float | None:
    return s.decision.history.time_since_full_charge(s.decision.wall)


BANK: dict[str, Callable[[ModbusView], Any]] = {
    "state": state,
    "voltage": lambda s: s.decision.bank.aggregates.voltage,
    "soc": lambda s: s.decision.soc,
    "current": lambda s: s.decision.bank.aggregates.current,
    "power": lambda s: s.decision.bank.aggregates.power,
    "consumed_ah": lambda s: s.decision.consumed_ah,  # None (unknown) exactly while the SoC is
    "time_remaining": _time_remaining,
    "battery_temperature": lambda s: s.decision.bank.aggregates.max_battery_temperature,
    "min_battery_temperature": lambda s: s.decision.bank.aggregates.min_battery_temperature,
    "min_cell_voltage": lambda s: _cell_voltage(s.decision.bank.aggregates.min_cell),
    "max_cell_voltage": lambda s: _cell_voltage(s.decision.bank.aggregates.max_cell),
    "min_cell_temperature": lambda s: s.decision.bank.aggregates.min_cell_temperature,
    "max_cell_temperature": lambda s: s.decision.bank.aggregates.max_cell_temperature,
    "allowed_to_charge": lambda s: int(s.decision.atc),
    "allowed_to_discharge": lambda s: int(AtdState(s.decision.atd_state)),
    "allowed_to_discharge_gx": lambda s: int(s.decision.atd),  # the GX knows only yes/no
    "pre_alarm": lambda s: int(s.decision.pre_alarm),
    "outputs": _outputs,
    "bus_state": lambda s: int(s.decision.bus_state),
    "alarms": lambda s: int(s.decision.alarms),
    "warnings": lambda s: int(s.decision.warnings),
    "remote": lambda s: int(s.decision.remote_on),
    "error_led": lambda s: LED_CODES[s.decision.error_led],
    "status_led": lambda s: LED_CODES[s.decision.status_led],
    "balancer_status": lambda s: BALANCER_CODES[s.decision.balancer],
    "balancer_reason": lambda s: int(s.decision.balancer_reason),
    "batteries": lambda s: s.decision.bank.topology.batteries,
    "cells": lambda s: s.decision.bank.topology.cells,
    "batteries_in_series": lambda s: s.decision.bank.topology.series,
    "batteries_in_parallel": lambda s: s.decision.bank.topology.parallel,
    "capacity": lambda s: s.decision.bank.topology.bank_capacity_ah,
    "nominal_voltage": lambda s: s.decision.bank.topology.nominal_voltage,
    "stale_batteries": lambda s: len(s.decision.bank.stale_nodes),
    "modbus_unit": lambda s: s.modbus_unit,
    "heartbeat": lambda s: int(s.uptime_s) & 0xFFFF,
    "uptime": lambda s: int(s.uptime_s),
    # settings and mode (block B), reported in the map's units
    **{r.target: _setting(r) for r in SETTING_REGISTERS},
    "mode": lambda s: int(s.decision.mode_on),
    "custom_name": lambda s: s.settings.custom_name,
    # history (block D)
    "history.deepest_discharge": lambda s: s.decision.history.deepest_discharge_ah,
    "history.cumulative_ah_drawn": lambda s: s.decision.history.cumulative_ah_drawn,
    "history.discharged_energy": lambda s: s.decision.history.discharged_energy_kwh,
    "history.charged_energy": lambda s: s.decision.history.charged_energy_kwh,
    "history.synchronisations": lambda s: s.decision.history.synchronisations,
    "history.charge_cycles": lambda s: s.decision.history.charge_cycles,
    "history.full_discharges": lambda s: s.decision.history.full_discharges,
    "history.time_since_last_full_charge": _history_since_full,
    "history.min_voltage": lambda s: s.decision.history.min_bank_voltage,
    "history.max_voltage": lambda s: s.decision.history.max_bank_voltage,
    "history.min_cell_voltage": lambda s: s.decision.history.min_cell_voltage,
    "history.max_cell_voltage": lambda s: s.decision.history.max_cell_voltage,
    "history.min_temperature": lambda s: s.decision.history.min_battery_temperature,
    "history.max_temperature": lambda s: s.decision.history.max_battery_temperature,
}


def _fresh(b: BatteryView | None) -> BatteryView | None:
    """Measurements of a stale battery are not shown as if current: they read as not available."""
    return b if b is not None and b.fresh else None


def _presence(b: BatteryView | None) -> int:
    if b is None:
        return PRESENCE_ABSENT
    return PRESENCE_FRESH if b.fresh else PRESENCE_STALE


def _flags(b: BatteryView | None) -> int | None:
    b = _fresh(b)
    if b is None or b.status is None:
        return None
    return sum(1 << bit for bit, name in enumerate(FLAG_FIELDS) if getattr(b.status, name))


def _status(name: str) -> Callable[[BatteryView | None], Any]:
    def get(b: BatteryView | None) -> Any:
        b = _fresh(b)
        return None if b is None or b.status is None else getattr(b.status, name)
    return get


def _temps(name: str) -> Callable[[BatteryView | None], Any]:
    def get(b: BatteryView | None) -> Any:
        b = _fresh(b)
        return None if b is None or b.temps is None else getattr(b.temps, name)
    return get


def _info(get: Callable[[Any], Any]) -> Callable[[BatteryView | None], Any]:
    return lambda b: None if b is None or b.info is None else get(b.info)


def _cells(b: BatteryView | None) -> tuple[float | None, ...] | None:
    b = _fresh(b)
    return None if b is None else b.cells


def _cell_stat(get: Callable[[Any], Any]) -> Callable[[BatteryView | None], Any]:
    def stat(b: BatteryView | None) -> Any:
        cells = [v for v in (_cells(b) or ()) if v is not None]
        return get(cells) if cells else None
    return stat


# Battery sources take the battery's view (None when the node is not in the bank).
BATTERY: dict[str, Callable[[BatteryView | None], Any]] = {
    "battery.serial": lambda b: None if b is None else b.serial,
    "battery.presence": _presence,
    "battery.node": lambda b: None if b is None else b.node,
    "battery.nominal_voltage": _info(lambda i: i.nominal_voltage),
    "battery.nominal_capacity": _info(lambda i: i.nominal_capacity_ah),
    "battery.firmware_major": _info(lambda i: i.firmware[0]),
    "battery.firmware_minor": _info(lambda i: i.firmware[1]),
    "battery.firmware_patch": _info(lambda i: i.firmware[2]),
    "battery.string_index": _info(lambda i: i.string_index),
    "battery.series_index": _info(lambda i: i.series_index),
    "battery.cell_count": _info(lambda i: i.cell_count),
    "battery.voltage": _status("voltage"),
    "battery.current": _status("current"),
    "battery.temperature": _status("temperature"),
    "battery.min_cell_temperature": _temps("cell_temp_min"),
    "battery.max_cell_temperature": _temps("cell_temp_max"),
    "battery.flags": _flags,
    "battery.cells": _cells,
    "battery.min_cell_voltage": _cell_stat(min),
    "battery.max_cell_voltage": _cell_stat(max),
    "battery.average_cell_voltage": _cell_stat(lambda c: sum(c) / len(c)),
    "battery.average_cell_temperature": lambda b: _average_temperature(b),
    "battery.cell_temperatures": lambda b: _cell_temperatures(b),
    "battery.min_cell_index": lambda b: _cell_index(b, min),
    "battery.max_cell_index": lambda b: _cell_index(b, max),
    "battery.balancing_cells": lambda b: None if _fresh(b) is None or b.status is None  # type: ignore[union-attr]
    else (b.info.cell_count if b.status.balancing and b.info else 0),  # type: ignore[union-attr]
    "battery.data_age": lambda b: None if b is None else b.status_age,
}


def _average_temperature(b: BatteryView | None) -> float | None:
    """The battery reports its lowest and highest cell temperature only: their mean stands for the average."""
    b = _fresh(b)
    if b is None or b.temps is None:
        return None
    return (b.temps.cell_temp_min + b.temps.cell_temp_max) / 2.0


def _cell_temperatures(b: BatteryView | None) -> tuple[float, ...] | None:
    average = _average_temperature(b)
    if average is None or b is None or b.info is None:
        return None
    return (average,) * b.info.cell_count


def _cell_index(b: BatteryView | None, pick: Callable[..., Any]) -> int | None:
    cells = [(v, i) for i, v in enumerate(_cells(b) or (), start=1) if v is not None]
    return pick(cells)[1] if cells else None


# -- SunSpec model 802 (battery base) ---------------------------------------------------------------------
# Our alarms and warnings as SunSpec Evt1 bits; the exact bit fields stay readable in EvtVnd1/EvtVnd2.
EVT1_ALARMS = {
    BmsAlarm.BATTERY_COMMS_LOST: 0, BmsAlarm.HIGH_TEMPERATURE_CHARGE: 1, BmsAlarm.LOW_TEMPERATURE_CHARGE: 3,
    BmsAlarm.CELL_HIGH_VOLTAGE: 9, BmsAlarm.CELL_LOW_VOLTAGE: 11, BmsAlarm.LOW_SOC: 13, BmsAlarm.RELAY_FAULT: 20,
    BmsAlarm.BATTERY_FAULT: 25, BmsAlarm.FIRMWARE_UPDATE_FAILED: 25, BmsAlarm.BANK_CONFIGURATION: 28,
}
EVT1_WARNINGS = {
    BmsWarning.HIGH_CHARGE_CURRENT: 6, BmsWarning.HIGH_DISCHARGE_CURRENT: 8, BmsWarning.PRE_ALARM: 12,
    BmsWarning.LOW_SOC_WARNING: 14, BmsWarning.CELL_IMBALANCE: 17, BmsWarning.SOC_UNKNOWN: 26,
    BmsWarning.FIRMWARE_UPDATE_IN_PROGRESS: 26, BmsWarning.NOT_FULLY_CHARGED_30_DAYS: 26,
}
EVT1_OVER_TEMP_WARNING, EVT1_UNDER_TEMP_WARNING = 2, 4
DISCHARGE_TEMPERATURE_HIGH = 50.0  # DISCHARGE_TEMPERATURE is "outside -20..50 degC": which side decides the bit
CHA_ST_OFF, CHA_ST_EMPTY, CHA_ST_DISCHARGING, CHA_ST_CHARGING, CHA_ST_FULL, CHA_ST_HOLDING = 1, 2, 3, 4, 5, 6
SS_STATE_INITIALIZING, SS_STATE_CONNECTED, SS_STATE_STANDBY, SS_STATE_SOC_PROTECTION = 2, 3, 4, 5
SS_STATE_SUSPENDING, SS_STATE_FAULT = 6, 99
SS_SET_OP_CONNECT, SS_SET_OP_DISCONNECT = 1, 2  # SetOp: mode on / off
SS_INVERTER_STOPPED, SS_INVERTER_STANDBY, SS_INVERTER_STARTED = 1, 2, 3  # SetInvState: 1 and 2 are mode off
IDLE_CURRENT_A = 0.5  # below this the bank is neither charging nor discharging (ChaSt holding)


def sunspec_evt1(s: ModbusView) -> int:
    d = s.decision
    bits = 0
    for flag, bit in EVT1_ALARMS.items():
        if flag in d.alarms:
            bits |= 1 << bit
    for flag, bit in EVT1_WARNINGS.items():
        if flag in d.warnings:
            bits |= 1 << bit
    if BmsWarning.DISCHARGE_TEMPERATURE in d.warnings:
        hottest = d.bank.aggregates.max_battery_temperature
        hot = hottest is not None and hottest > DISCHARGE_TEMPERATURE_HIGH
        bits |= 1 << (EVT1_OVER_TEMP_WARNING if hot else EVT1_UNDER_TEMP_WARNING)
    return bits


def sunspec_state(s: ModbusView) -> int:
    code = state(s)
    if code == STATE_FAULT:
        return SS_STATE_SOC_PROTECTION if s.decision.alarms == BmsAlarm.LOW_SOC else SS_STATE_FAULT
    return {STATE_WAITING: SS_STATE_INITIALIZING, STATE_ON: SS_STATE_CONNECTED, STATE_OFF: SS_STATE_STANDBY,
            STATE_FIRMWARE_UPDATE: SS_STATE_SUSPENDING}[code]


def sunspec_charge_status(s: ModbusView) -> int:
    d = s.decision
    if not d.atc and not d.atd:
        return CHA_ST_OFF
    current = d.bank.aggregates.current
    if d.soc is not None and d.soc <= 0.0:
        return CHA_ST_EMPTY
    if current is not None and current < -IDLE_CURRENT_A:
        return CHA_ST_DISCHARGING
    if current is not None and current > IDLE_CURRENT_A:
        return CHA_ST_CHARGING
    if d.soc is not None and d.soc >= 100.0:
        return CHA_ST_FULL
    return CHA_ST_HOLDING


# -- SunSpec scale factors, from the bank: every value the bank can carry fits its register ----------------
# a 12.8 V unit with every cell at ATC-1's 3.75 V (15.0 V): the highest voltage the bank shows
UNIT_MAX_VOLTAGE = CELLS_PER_UNIT * CELL_HIGH_SET_V
UINT16_MAX, INT16_MAX = 0xFFFE, 0x7FFF  # the largest numbers (0xFFFF and 0x8000 read "not implemented")


def _fit(limit: Callable[[Topology], float | None], finest: int, largest: int) -> Callable[[ModbusView], int]:
    """The finest scale factor (10^sf per count, from `finest` up) at which `limit` of the bank still fits
    `largest` counts. Computed from the bank's shape, so it changes only while the bank is heard for the first
    time or re-learned; a client reads a point and its scale factor in one request (pysunspec2 reads the model)."""
    def sf(s: ModbusView) -> int:
        value = limit(s.decision.bank.topology)
        exponent = finest
        while value is not None and value / 10.0 ** exponent > largest:
            exponent += 1
        return exponent
    return sf


def _max_current(t: Topology) -> float | None:
    """The most the bank can carry: every string at its model's pulse limit (manual 4.1, 10 s)."""
    if t.nominal_units is None or t.capacity_ah is None:
        return None
    return t.parallel * max(pulse_limits(t.nominal_units, t.capacity_ah))


def _max_power(t: Topology) -> float | None:
    current, units = _max_current(t), t.series_units
    return None if current is None or units is None else current * UNIT_MAX_VOLTAGE * units


def _energy(t: Topology) -> float | None:
    return None if t.bank_capacity_ah is None or t.nominal_voltage is None else t.bank_capacity_ah * t.nominal_voltage


BANK.update({
    "sunspec.sf.capacity": _fit(lambda t: t.bank_capacity_ah, 0, UINT16_MAX),  # AHRtg
    "sunspec.sf.energy": _fit(_energy, 0, UINT16_MAX),  # WHRtg
    "sunspec.sf.power_rating": _fit(_energy, 0, UINT16_MAX),  # WChaRteMax, WDisChaRteMax: 1C at nominal voltage
    "sunspec.sf.current": _fit(_max_current, -1, INT16_MAX),  # A
    "sunspec.sf.current_limit": _fit(lambda t: t.bank_capacity_ah, -1, UINT16_MAX),  # AChaMax, ADisChaMax: 1C
    "sunspec.sf.power": _fit(_max_power, 0, INT16_MAX),  # W
})


def _one_c_power(s: ModbusView) -> float | None:
    """1C (the Lithium NG continuous limit, MON-7) at nominal voltage."""
    topo = s.decision.bank.topology
    if topo.bank_capacity_ah is None or topo.nominal_voltage is None:
        return None
    return topo.bank_capacity_ah * topo.nominal_voltage


def _charge_limit(name: str) -> Callable[[ModbusView], float | None]:
    """A voltage limit of charge control (CHG): unknown (None) until the bank's size is known."""
    def get(s: ModbusView) -> float | None:
        charge = s.decision.charge
        return getattr(charge, name) if charge.known else None
    return get


def _charge_current(name: str) -> Callable[[ModbusView], float]:
    """CCL or DCL (CHG-3, CHG-4): 0 is SunSpec's and the GX's way to say "do not charge/discharge", and it is
    what the BMS allows while the bank is not proven (CHG-6), so it is never "not available"."""
    return lambda s: getattr(s.decision.charge, name)


def _battery_with(ref_of: Callable[[Any], Any], what: str) -> Callable[[ModbusView], int | None]:
    def get(s: ModbusView) -> int | None:
        ref = ref_of(s.decision.bank.aggregates)
        if ref is None:
            return None
        battery = s.batteries.get(ref.node)
        if what == "node":
            return int(ref.node)
        return None if battery is None or battery.info is None else battery.info.string_index
    return get


BANK.update({
    "software_version": lambda s: __version__,
    "instance_name": lambda s: socket.gethostname(),
    "energy_rating": lambda s: _energy(s.decision.bank.topology),
    "one_c_power": _one_c_power,
    # charge control (CHG, bms/charge.py): the same values on every map, metrics and BMS-CAN
    "max_charge_current": _charge_current("ccl"),
    "max_discharge_current": _charge_current("dcl"),
    "charge_voltage_limit": _charge_limit("cvl"),
    "discharge_voltage_limit": _charge_limit("dvl"),
    "charge_current_rating": _charge_limit("rating"),
    "charge_state": lambda s: int(s.decision.charge.state),
    "cell_voltage_limiting": lambda s: int(s.decision.charge.cell_limiting),
    "sunspec.charge_status": sunspec_charge_status,
    "sunspec.state": sunspec_state,
    "sunspec.evt1": sunspec_evt1,
    "sunspec.set_operation": lambda s: SS_SET_OP_CONNECT if s.decision.mode_on else SS_SET_OP_DISCONNECT,
    "sunspec.inverter_state": lambda s: SS_INVERTER_STARTED if s.decision.mode_on else SS_INVERTER_STOPPED,
    "controller_heartbeat": lambda s: s.controller_heartbeat or 0,
    "max_cell_string": _battery_with(lambda a: a.max_cell, "string"),
    "max_cell_battery": _battery_with(lambda a: a.max_cell, "node"),
    "min_cell_string": _battery_with(lambda a: a.min_cell, "string"),
    "min_cell_battery": _battery_with(lambda a: a.min_cell, "node"),
})


# -- Victron GX (com.victronenergy.battery) -----------------------------------------------------------------
GX_OK, GX_WARNING, GX_ALARM = 0, 1, 2
# GX alarm register source -> (alarms that make it 2, warnings that make it 1)
GX_ALARMS: dict[str, tuple[BmsAlarm, BmsWarning]] = {
    "gx.alarm.low_voltage": (BmsAlarm.CELL_LOW_VOLTAGE, BmsWarning.PRE_ALARM),
    "gx.alarm.high_voltage": (BmsAlarm.CELL_HIGH_VOLTAGE, BmsWarning(0)),
    "gx.alarm.low_soc": (BmsAlarm.LOW_SOC, BmsWarning.LOW_SOC_WARNING),
    "gx.alarm.low_temperature": (BmsAlarm.LOW_TEMPERATURE_CHARGE, BmsWarning(0)),
    "gx.alarm.high_temperature": (BmsAlarm.HIGH_TEMPERATURE_CHARGE, BmsWarning(0)),
    "gx.alarm.high_charge_current": (BmsAlarm(0), BmsWarning.HIGH_CHARGE_CURRENT),
    "gx.alarm.high_discharge_current": (BmsAlarm(0), BmsWarning.HIGH_DISCHARGE_CURRENT),
    "gx.alarm.cell_imbalance": (BmsAlarm(0), BmsWarning.CELL_IMBALANCE),
    "gx.alarm.internal_failure": (BmsAlarm.BATTERY_FAULT, BmsWarning(0)),
    "gx.alarm.high_charge_temperature": (BmsAlarm.HIGH_TEMPERATURE_CHARGE, BmsWarning(0)),
    "gx.alarm.low_charge_temperature": (BmsAlarm.LOW_TEMPERATURE_CHARGE, BmsWarning(0)),
    "gx.alarm.low_cell_voltage": (BmsAlarm.CELL_LOW_VOLTAGE, BmsWarning.PRE_ALARM),
    "gx.alarm.bms_cable": (BmsAlarm.BATTERY_COMMS_LOST, BmsWarning(0)),
    "gx.alarm.contactor": (BmsAlarm.RELAY_FAULT, BmsWarning(0)),
    "gx.alarm.high_current": (BmsAlarm(0), BmsWarning.HIGH_CHARGE_CURRENT | BmsWarning.HIGH_DISCHARGE_CURRENT),
}
# /ErrorCode (1283): the first of our alarms in this order, as the Lynx BMS error it resembles most
GX_ERRORS = ((BmsAlarm.BANK_CONFIGURATION, 5), (BmsAlarm.BATTERY_COMMS_LOST, 23), (BmsAlarm.BATTERY_FAULT, 17),
             (BmsAlarm.CELL_HIGH_VOLTAGE, 13), (BmsAlarm.CELL_LOW_VOLTAGE, 14),
             (BmsAlarm.HIGH_TEMPERATURE_CHARGE, 15), (BmsAlarm.LOW_TEMPERATURE_CHARGE, 16),
             (BmsAlarm.RELAY_FAULT, 26), (BmsAlarm.FIRMWARE_UPDATE_FAILED, 28))
# /State (1282) from our state register
GX_STATES = {STATE_WAITING: 4, STATE_ON: 9, STATE_OFF: 14, STATE_FIRMWARE_UPDATE: 13, STATE_FAULT: 10}
GX_MODE_ON, GX_MODE_STANDBY = 3, 252


def _gx_alarm(alarms: BmsAlarm, warnings: BmsWarning) -> Callable[[ModbusView], int]:
    def level(s: ModbusView) -> int:
        if s.decision.alarms & alarms:
            return GX_ALARM
        return GX_WARNING if s.decision.warnings & warnings else GX_OK
    return level


def _gx_error(s: ModbusView) -> int:
    return next((code for flag, code in GX_ERRORS if flag in s.decision.alarms), 0)


def _negative(get: Callable[[ModbusView], float | None]) -> Callable[[ModbusView], float | None]:
    """Victron reports Ah drawn as negative numbers (the sign of a discharge current)."""
    def value(s: ModbusView) -> float | None:
        v = get(s)
        return None if v is None else -v
    return value


def _cells_per_battery(s: ModbusView) -> int | None:
    topo = s.decision.bank.topology
    return None if topo.nominal_units is None else CELLS_PER_UNIT * topo.nominal_units


def _cell_id(which: str) -> Callable[[ModbusView], str | None]:
    def ident(s: ModbusView) -> str | None:
        ref = getattr(s.decision.bank.aggregates, which)
        return None if ref is None else f"B{ref.node}C{ref.cell}"
    return ident


def _temperature_id(pick: Callable[..., Any], field_name: str) -> Callable[[ModbusView], str | None]:
    """B<node> of the battery with the lowest (highest) cell temperature: a battery reports its extremes,
    not which cell has them."""
    def ident(s: ModbusView) -> str | None:
        temps = [(getattr(b.temps, field_name), b.node) for b in s.batteries.values()
                 if b.fresh and b.temps is not None]
        if not temps:
            return None
        value = pick(t for t, _ in temps)
        return f"B{min(node for t, node in temps if t == value)}"
    return ident


def _average_discharge(s: ModbusView) -> float | None:
    """A BMV's average discharge: the Ah drawn over the charge cycles; none before the first cycle."""
    h = s.decision.history
    return h.cumulative_ah_drawn / h.charge_cycles if h.charge_cycles else None


def _last_errors(s: ModbusView) -> tuple[int, ...]:
    codes = {alarm.name: code for alarm, code in GX_ERRORS}
    return tuple(codes.get(name, 0) for name, _ in s.decision.diagnostics.last_errors)


def _last_error_times(s: ModbusView) -> tuple[int, ...]:
    return tuple(int(wall) for _, wall in s.decision.diagnostics.last_errors)


def _nodes_flagged(*flags: str) -> Callable[[ModbusView], int]:
    return lambda s: len({n for f in flags for n in s.decision.bank.flags.get(f, ())})


BANK.update({name: _gx_alarm(*levels) for name, levels in GX_ALARMS.items()})
BANK.update({
    "gx.consumed_ah": _negative(BANK["consumed_ah"]),
    "gx.deepest_discharge": _negative(BANK["history.deepest_discharge"]),
    "gx.total_ah_drawn": _negative(BANK["history.cumulative_ah_drawn"]),
    "gx.state": lambda s: GX_STATES[state(s)],
    "gx.error": _gx_error,
    "gx.mode": lambda s: GX_MODE_ON if s.decision.mode_on else GX_MODE_STANDBY,
    "gx.balancing": lambda s: int(s.decision.balancer is BalancerStatus.BALANCING),
    "gx.cells_per_battery": _cells_per_battery,
    "gx.modules_online": lambda s: len(s.batteries) - len(s.decision.bank.stale_nodes),
    "gx.modules_blocking_charge": _nodes_flagged("cell_high_voltage", "hardware_fault", "firmware_updating"),
    "gx.modules_blocking_discharge": _nodes_flagged("cell_low_voltage", "hardware_fault"),
    "gx.min_voltage_cell_id": _cell_id("min_cell"),
    "gx.max_voltage_cell_id": _cell_id("max_cell"),
    "gx.min_temperature_cell_id": _temperature_id(min, "cell_temp_min"),
    "gx.max_temperature_cell_id": _temperature_id(max, "cell_temp_max"),
    "gx.last_discharge": _negative(lambda s: s.decision.history.last_discharge_ah),
    "gx.average_discharge": _negative(_average_discharge),
    "gx.last_errors": _last_errors,
    "gx.last_error_times": _last_error_times,
    "gx.shutdowns_due_to_error": lambda s: s.decision.diagnostics.shutdowns,
    "gx.error_communication": lambda s: int(BmsAlarm.BATTERY_COMMS_LOST in s.decision.alarms),
    "gx.error_voltage": lambda s: int(bool(s.decision.alarms & (BmsAlarm.CELL_HIGH_VOLTAGE
                                                                 | BmsAlarm.CELL_LOW_VOLTAGE))),
    "gx.error_battery_number": lambda s: int(BmsAlarm.BANK_CONFIGURATION in s.decision.alarms),
})


def known_sources() -> set[str]:
    return set(BANK) | set(BATTERY)
