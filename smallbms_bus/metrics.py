"""Prometheus metrics: one consistent snapshot of the service per scrape (prometheus-client custom collector).

Theory of operation
-------------------
Nothing on the hot path touches a metric. A scrape calls `BmsCollector.collect()`, which takes one
`Snapshot` (the service's latest `Decision` -- built once per evaluation and never mutated -- plus the
counters of the link, relay outputs, store, Modbus server and service) and turns it into metric
families. Every value of one scrape therefore comes from the same evaluation: a bank voltage never
sits next to the cells of another tick.

Names follow the Prometheus conventions: prefix `smallbms_`, base units in the name (volts, amperes,
watts, celsius, seconds, percent; energy in joules and charge in coulombs, as `promtool check metrics`
insists: 1 kWh = 3.6e6 J, 1 Ah = 3600 C; the Grafana dashboard shows kWh and Ah), `_total` counters,
`_info` identities (exposed as gauges of value 1, as prometheus-client writes info metrics in the text
format), 0/1 gauges for states, and a `state` label for enumerations (LEDs, balancer, bank phase: exactly
one series of each is 1). Every label value of a fixed vocabulary is lower snake case:
`alarm="cell_high_voltage"` (the alarm CELL_HIGH_VOLTAGE) beside the battery's own
`flag="cell_high_voltage"`. `METRICS` declares every family once; docs/metrics.md is
generated from it (`python -m smallbms_bus.metrics --markdown`).

Freshness: a value nobody measured is absent, never zero. A stale battery keeps only
`smallbms_battery_up 0`, its `smallbms_battery_stale_reason{reason=...}` and the age of its last
BAT_STATUS; its voltage, current, temperatures, flags and cells disappear. Bank current and power
disappear while any battery is stale (a partial sum would read as a real current); SoC, consumed charge and
time remaining disappear while the SoC is unknown (warning SOC_UNKNOWN says so).

Serving: see `MetricsServer`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import gc
import gzip
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.openmetrics.exposition import escape_label_name, escape_metric_name
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from smallbms_bus import __version__
from smallbms_bus.bms.alarms import BalancerReason, BalancerStatus, BmsAlarm, BmsWarning, BusState, Led
from smallbms_bus.bms.core import Decision
from smallbms_bus.config import defaults
from smallbms_bus.connections import (
    ACCEPT_BATCH,
    ConnectionPolicy,
    Limits,
    RateLimitedLog,
    abort_with_reset,
    address_of,
    bytes_waiting,
    fd_budget,
    guarded_sockets,
    quiet_accept_errors,
    release_fds,
)
from smallbms_bus.link.bus import GARBLED
from smallbms_bus.link.codec import MALFORMED_KINDS
from smallbms_bus.link.slcan import LINE_KINDS

if TYPE_CHECKING:
    from smallbms_bus.modbus.stats import ModbusStats
    from smallbms_bus.outputs.controller import OutputsStatus

log = logging.getLogger(__name__)

PREFIX = "smallbms_"
BATTERY_LABELS = ("battery", "serial", "string", "position")
STALE_REASONS = ("no_status", "status_timeout", "alive_stuck", "no_info", "no_temps", "temps_timeout", "no_cells",
                 "cells_timeout")
BATTERY_FLAGS = ("cell_high_voltage", "cell_low_voltage", "cell_low_pre_alarm", "balancing", "cell_imbalance",
                 "hardware_fault", "firmware_updating")
PHASES = ("waiting", "discovering", "learning", "learned")
OUTPUT_NAMES = ("load_disconnect", "charge_disconnect", "pre_alarm")
KWH_TO_JOULES = 3.6e6
AH_TO_COULOMBS = 3600.0
CELL_NUMBERS = tuple(str(i) for i in range(1, 17))
# alarm / warning label values: the names of docs/behaviour.md in lower case, like every other label value
ALARM_LABELS = tuple((m, (m.name or "").lower()) for m in BmsAlarm)
WARNING_LABELS = tuple((m, (m.name or "").lower()) for m in BmsWarning)


@dataclass(frozen=True, slots=True)
class Spec:
    """One metric family. `name` is the exposed name (counters with `_total`, infos with `_info`)."""

    name: str
    kind: str  # gauge | counter | info
    labels: tuple[str, ...]
    help: str
    group: str

    @property
    def base(self) -> str:
        """The name prometheus-client's families take (without the suffix it adds)."""
        if self.kind == "counter":
            return self.name.removesuffix("_total")
        if self.kind == "info":
            return self.name.removesuffix("_info")
        return self.name


METRICS: dict[str, Spec] = {}
_group = ""


def _m(name: str, kind: str, labels: tuple[str, ...], help: str) -> str:
    full = PREFIX + name
    METRICS[full] = Spec(full, kind, labels, help, _group)
    return full


B = BATTERY_LABELS
# -- service ----------------------------------------------------------------------------------------
_group = "service"
BUILD_INFO = _m("build_info", "info", ("version",), "The running smallbms-bus version (always 1).")
DECISION_AGE = _m("decision_age_seconds", "gauge", (),
                  "Seconds since the BMS core's last evaluation (ticks every 0.1 s; growing = the core is stuck).")
STARTED = _m("bms_started", "gauge", (), "1 once the bank is known and ATC/ATD come from fresh data (OUT-4).")
WAITING = _m("waiting_for_batteries", "gauge", (), "1 while the bank is waiting for batteries (BANK-2).")
PHASE = _m("bank_phase", "gauge", ("state",), "Bank learning phase: one of waiting, discovering, learning, learned "
           "is 1.")
EVALUATIONS = _m("evaluations_total", "counter", (), "BMS core evaluations (every frame batch and every tick).")
RESTARTS = _m("task_restarts_total", "counter", (), "Crashed service tasks or decisions (each switched outputs off).")
EVENTS = _m("events_total", "counter", (), "Events (changes of ATC, ATD, pre-alarm, mode, remote, alarms, warnings).")
SCRAPES = _m("metrics_scrapes_total", "counter", (), "Scrapes this endpoint answered before this one.")
ENCODE = _m("metrics_encode_seconds", "gauge", (), "Wall time the previous scrape took to build and encode "
            "(with the pauses that let the BMS run).")
ENDPOINT_CONNECTIONS = _m("metrics_connections", "gauge", (), "Open HTTP connections to this endpoint (this scrape's "
                          "included).")
ENDPOINT_CLOSED = _m("metrics_connections_closed_total", "counter", ("reason",),
                     "HTTP connections to this endpoint closed by the service: evicted (the longest-idle, for a "
                     "newcomer over [metrics] max_connections or max_connections_per_address), refused (on accept: a "
                     "newcomer that sent nothing from an address whose share is full with one that never asked "
                     "either), no_request (nothing within first_request_timeout), idle_timeout.")
# -- states -----------------------------------------------------------------------------------------
_group = "state"
ATC = _m("allowed_to_charge", "gauge", (), "1 = allowed to charge (ATC).")
ATD = _m("allowed_to_discharge", "gauge", (), "1 = allowed to discharge (ATD; still 1 during a pre-alarm).")
PRE_ALARM = _m("pre_alarm", "gauge", (), "1 = pre-alarm active (PRE-1..3).")
MODE = _m("mode_on", "gauge", (), "1 = mode on (REM-3).")
REMOTE = _m("remote_on", "gauge", (), "1 = remote on/off input on (REM-1).")
FIRMWARE_UPDATE = _m("firmware_update", "gauge", (), "1 = firmware update mode (FW-1).")
OUTPUT = _m("output_high", "gauge", ("output",),
            "Output the BMS wants: 1 = high (load_disconnect: loads may run; charge_disconnect: chargers may run; "
            "pre_alarm: alarm).")
ALARM = _m("alarm", "gauge", ("alarm",), "1 = alarm active (an action was taken); `alarm` is its name in "
           "docs/behaviour.md in lower case (cell_low_voltage, ...).")
WARNING = _m("warning", "gauge", ("warning",), "1 = warning active; `warning` is its name in docs/behaviour.md in "
             "lower case (pre_alarm, ...).")
LED = _m("led_state", "gauge", ("led", "state"), "LED state (LED-1, LED-2): for each led one of off, blinking, "
         "solid is 1.")
BALANCER = _m("balancer_status", "gauge", ("state",), "Balancer status (BAL-1): one of unknown, balanced, "
              "imbalanced, balancing is 1.")
BALANCER_REASONS = tuple(r.label for r in BalancerReason)
BALANCER_REASON = _m("balancer_unknown_reason", "gauge", ("reason",),
                     "Why the balancer status is unknown (BAL-1, Modbus balancer_reason): one of "
                     + ", ".join(BALANCER_REASONS) + " is 1 (none while the status is known).")
# -- bank ---------------------------------------------------------------------------------------------
_group = "bank"
BANK_VOLTAGE = _m("bank_voltage_volts", "gauge", (), "Bank voltage (BANK-5).")
BANK_CURRENT = _m("bank_current_amperes", "gauge", (), "Bank current, positive = charging (BANK-5); absent while "
                  "a battery is stale.")
BANK_POWER = _m("bank_power_watts", "gauge", (), "Bank power, positive = charging; absent while a battery is stale.")
SOC = _m("bank_state_of_charge_percent", "gauge", (), "State of charge (MON-1); absent while unknown (MON-3).")
CONSUMED = _m("bank_consumed_coulombs", "gauge", (), "Charge drawn since the last full charge (MON-4; 1 Ah = 3600 C); "
              "absent while the SoC is unknown (no full charge to count from).")
TIME_REMAINING = _m("bank_time_remaining_seconds", "gauge", (),
                    "Time to the discharge floor at the 3-minute average current (MON-5); +Inf when not "
                    "discharging; absent while the SoC is unknown.")
BANK_BATTERIES = _m("bank_batteries", "gauge", (), "Batteries in the bank (BANK-1, from BAT_INFO).")
BANK_CELLS = _m("bank_cells", "gauge", (), "Cells in the bank.")
BANK_SERIES = _m("bank_batteries_in_series", "gauge", (), "Batteries per string (0 when strings are unequal).")
BANK_STRINGS = _m("bank_strings", "gauge", (), "Strings in parallel.")
BANK_NOMINAL = _m("bank_nominal_voltage_volts", "gauge", (), "Nominal bank voltage; absent when unknown.")
BANK_CAPACITY = _m("bank_capacity_coulombs", "gauge", (), "Bank capacity (BANK-5; 1 Ah = 3600 C); absent when "
                   "unknown.")
CELL_MIN = _m("bank_cell_voltage_min_volts", "gauge", (), "Lowest cell voltage of the fresh batteries.")
CELL_MAX = _m("bank_cell_voltage_max_volts", "gauge", (), "Highest cell voltage of the fresh batteries.")
CELL_T_MIN = _m("bank_cell_temperature_min_celsius", "gauge", (), "Lowest cell temperature of the fresh batteries.")
CELL_T_MAX = _m("bank_cell_temperature_max_celsius", "gauge", (), "Highest cell temperature of the fresh batteries.")
BANK_COMPLETE = _m("bank_complete", "gauge", (), "1 when every known battery is fresh (bank values cover all).")
# -- batteries ------------------------------------------------------------------------------------------
_group = "battery"
BAT_UP = _m("battery_up", "gauge", B, "1 = the battery's readings are fresh (COM-1); 0 = stale, readings withheld.")
BAT_STALE = _m("battery_stale_reason", "gauge", (*B, "reason"),
               "1 for the reason a battery is stale (no_status, status_timeout, alive_stuck, no_info, no_temps, "
               "temps_timeout, no_cells, cells_timeout); absent while fresh.")
BAT_AGE = _m("battery_status_age_seconds", "gauge", B, "Seconds since the battery's last BAT_STATUS.")
BAT_INFO = _m("battery_info", "info", (*B, "firmware", "nominal_voltage", "capacity_ah"),
              "Battery identity from BAT_INFO and BAT_SERIAL: firmware version, nominal voltage, capacity.")
BAT_VOLTAGE = _m("battery_voltage_volts", "gauge", B, "Battery terminal voltage.")
BAT_CURRENT = _m("battery_current_amperes", "gauge", B, "Battery current, positive = charging.")
BAT_TEMP = _m("battery_temperature_celsius", "gauge", B, "Battery temperature (BAT_STATUS).")
BAT_CELL_T_MIN = _m("battery_cell_temperature_min_celsius", "gauge", B, "Lowest cell temperature (BAT_TEMPS).")
BAT_CELL_T_MAX = _m("battery_cell_temperature_max_celsius", "gauge", B, "Highest cell temperature (BAT_TEMPS).")
BAT_SPREAD = _m("battery_cell_voltage_spread_volts", "gauge", B, "Highest minus lowest cell voltage (BAL-1: "
                "imbalanced above 0.10 V).")
BAT_FLAG = _m("battery_flag", "gauge", (*B, "flag"), "The battery's own BAT_STATUS flags, 1 = set.")
CELL_VOLTAGE = _m("cell_voltage_volts", "gauge", ("battery", "cell"), "Cell voltage (cells 1..16; an unmeasured "
                  "cell is absent).")
# -- history --------------------------------------------------------------------------------------------
_group = "history"
H_DEEPEST = _m("history_deepest_discharge_coulombs", "gauge", (), "Deepest discharge (1 Ah = 3600 C).")
H_DRAWN = _m("history_drawn_coulombs_total", "counter", (), "Cumulative charge drawn (1 Ah = 3600 C).")
H_DISCHARGED = _m("history_discharged_energy_joules_total", "counter", (), "Discharged energy (1 kWh = 3.6e6 J).")
H_CHARGED = _m("history_charged_energy_joules_total", "counter", (), "Charged energy (1 kWh = 3.6e6 J).")
H_SYNCS = _m("history_synchronisations_total", "counter", (), "Synchronisations to 100 % (MON-2).")
H_CYCLES = _m("history_charge_cycles_total", "counter", (), "Charge cycles (SoC below 65 %, later above 90 %).")
H_FULL = _m("history_full_discharges_total", "counter", (), "Full discharges (SoC reached 0 %).")
H_LAST_FULL = _m("history_last_full_charge_timestamp_seconds", "gauge", (),
                 "Unix time of the last full charge; absent if none yet.")
H_BANK_V_MIN = _m("history_bank_voltage_min_volts", "gauge", (), "Lowest bank voltage seen.")
H_BANK_V_MAX = _m("history_bank_voltage_max_volts", "gauge", (), "Highest bank voltage seen.")
H_CELL_V_MIN = _m("history_cell_voltage_min_volts", "gauge", (), "Lowest cell voltage seen.")
H_CELL_V_MAX = _m("history_cell_voltage_max_volts", "gauge", (), "Highest cell voltage seen.")
H_TEMP_MIN = _m("history_battery_temperature_min_celsius", "gauge", (), "Lowest battery temperature seen.")
H_TEMP_MAX = _m("history_battery_temperature_max_celsius", "gauge", (), "Highest battery temperature seen.")
# -- bus --------------------------------------------------------------------------------------------------
_group = "bus"
BUS_INFO = _m("bus_info", "info", ("interface", "channel"), "The battery bus (python-can interface and channel).")
BUS_UP = _m("bus_up", "gauge", (), "1 = the bus link is open and taking frames (COM-4, COM-5: down is a comms loss).")
BUS_STATES = tuple(s.name.lower() for s in BusState)
BUS_STATE = _m("bus_state", "gauge", ("state",), "The bus link: 1 for its state, one of " + ", ".join(BUS_STATES)
               + " (Modbus bus_state; stalled = BMS_STATE unsent for 1 s, COM-5).")
BUS_DOWN_REASON = _m("bus_down_reason_info", "info", ("reason",), "Why the bus link is down, as the log says it "
                     "(e.g. the serial port's error); present only while smallbms_bus_up is 0.")
BUS_RECEIVED = _m("bus_frames_received_total", "counter", (), "Frames received from the bus.")
BUS_DECODED = _m("bus_frames_decoded_total", "counter", (), "Frames decoded into battery reports.")
BUS_MALFORMED = _m("bus_frames_malformed_total", "counter", ("kind",),
                   "Frames and SLCAN lines dropped (COM-3) by kind: unknown_id, wrong_dlc, out_of_range, "
                   "not_data_frame (the DBC's checks); slcan_non_ascii, slcan_too_long, slcan_bad_length, "
                   "slcan_bad_field, slcan_unknown (a serial line that is not exactly one frame, docs/bus.md); "
                   "garbled (a frame another python-can interface could not parse).")
BUS_SENT = _m("bus_frames_sent_total", "counter", (), "Frames sent (BMS_STATE).")
BUS_SEND_ERRORS = _m("bus_send_errors_total", "counter", (), "Sends that failed with a port error (the link went "
                     "down).")
BUS_UNSENT = _m("bus_frames_unsent_total", "counter", (), "BMS_STATE frames never written: replaced by a newer one "
                "before the link could write them, or dropped while the link was down.")
BUS_STALLS = _m("bus_send_stalls_total", "counter", (), "Times BMS_STATE stayed unsent for 1 s (COM-5): the adapter "
                "or interface stopped taking frames; each also counts as a link loss.")
BUS_ADAPTER_ERRORS = _m("bus_adapter_errors_total", "counter", (), "SLCAN adapter error answers (BELL): a frame or "
                        "command the adapter refused.")
BUS_RECONNECTS = _m("bus_reconnects_total", "counter", (), "Times the link was re-opened after the first open.")
BUS_DOWNS = _m("bus_link_lost_total", "counter", (), "Times the link went down after it was up (adapter unplugged, "
               "interface down, I/O error, stall).")
# -- relay outputs ------------------------------------------------------------------------------------------
_group = "relay"
RELAY_BOARD_UP = _m("relay_board_up", "gauge", (), "1 = the relay board is open.")
RELAY_COMMANDED = _m("relay_commanded", "gauge", ("output", "channel"),
                     "Level the controller last commanded on each mapped board channel (LEDs included).")
RELAY_READ_BACK = _m("relay_read_back", "gauge", ("output", "channel"),
                     "Level read back from the board (OUT-5); absent where the board cannot read back.")
RELAY_COMMANDS = _m("relay_commands_total", "counter", (), "Channel writes to the relay board.")
RELAY_FAULTS = _m("relay_faults_total", "counter", (), "Relay fault events: I/O errors, failed opens, read-back "
                  "mismatches.")
RELAY_RECONNECTS = _m("relay_reconnects_total", "counter", (), "Successful re-opens of a lost relay board.")
# -- store ----------------------------------------------------------------------------------------------------
_group = "store"
STORE_WRITES = _m("store_writes_total", "counter", (), "State saves committed to SQLite.")
STORE_FAILURES = _m("store_write_failures_total", "counter", (), "State saves that failed (retried).")
STORE_PENDING = _m("store_pending_events", "gauge", (), "Events waiting for the next save.")
STORE_UP = _m("store_up", "gauge", (), "1 = the last save committed; 0 = saving fails (settings, mode and commands "
              "are refused, SET-3) or a save has waited more than 10 s for the disk.")
STORE_REFUSED = _m("store_writes_refused_total", "counter", (), "Writes (settings, mode, commands) refused because "
                   "the store could not commit them (Modbus exception 04).")
# -- modbus ---------------------------------------------------------------------------------------------------
_group = "modbus"
MODBUS_ENABLED = _m("modbus_enabled", "gauge", (), "1 = the Modbus TCP server runs (the families below exist only "
                    "then).")
MODBUS_REQUESTS = _m("modbus_requests_total", "counter", ("function", "outcome"),
                     "Modbus requests by function and outcome (ok, or the exception's name).")
MODBUS_REFUSED = _m("modbus_refused_writes_total", "counter", (),
                    "Writes refused because the client may not write (allow_write_from / TLS client certificate).")
MODBUS_CONNECTIONS = _m("modbus_connections", "gauge", (), "Open Modbus TCP connections.")
MODBUS_ACCEPTED = _m("modbus_connections_accepted_total", "counter", (), "Connections accepted.")
MODBUS_REFUSED_CONN = _m("modbus_connections_refused_total", "counter", (), "Connections hung up on accept: a "
                         "newcomer that had sent nothing, from an address already holding max_connections_per_address "
                         "with one that never sent a request either (it would only displace its equal).")
MODBUS_CLOSED = _m("modbus_connections_closed_total", "counter", ("reason",),
                   "Connections closed by the server: evicted (the longest-idle, for a newcomer over max_connections "
                   "or max_connections_per_address), no_request (nothing within first_request_timeout), "
                   "idle_timeout, slow_client (did not read its answers), bad_frame (not Modbus/TCP).")
del B


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything one scrape reports, taken at one instant."""

    now: float
    decision: Decision | None
    link: dict[str, int]
    link_up: bool
    link_state: tuple[BusState, str]  # state, reason
    bus: tuple[str, str]
    outputs: OutputsStatus
    channels: dict[str, int]
    store: tuple[int, int, int, int, int]  # writes, failures, pending events, up, writes refused
    service: tuple[int, int, int]  # evaluations, task restarts, events
    modbus: tuple[dict[tuple[str, str], int], ModbusStats] | None
    metrics: tuple[int, float, int, dict[str, int]] | None  # scrapes, seconds the last took, connections, closed

    @classmethod
    def of(cls, service: Any) -> Snapshot:
        # The decision is read once: it is built per evaluation and never mutated, so all bank, battery,
        # cell and history values below come from the same evaluation. dict() copies are single C calls.
        decision = service.decision
        link = service.link
        persister = service.persister
        stats = service.stats
        server = getattr(service, "modbus", None)
        modbus = None if server is None else (dict(server.stats.requests), server.stats)
        endpoint = getattr(service, "metrics", None)
        up = persister.ok and service.store_stalled_since is None  # failing, or a save stuck on the disk
        store = (persister.writes, persister.failures, persister.pending_events, int(up), service.writes.refused)
        state = link.status()
        return cls(service.clock(), decision, link.counters(), state[0] is BusState.UP, state,
                   (link.config.interface, link.config.channel), service.outputs.status(),
                   dict(service.outputs.channel_map), store,
                   (stats.evaluations, stats.task_restarts, stats.events), modbus,
                   None if endpoint is None else (endpoint.scrapes, endpoint.encode_seconds, len(endpoint.policy),
                                                  dict(endpoint.closed)))


def _family(name: str) -> Any:
    spec = METRICS[name]
    if spec.kind == "counter":
        return CounterMetricFamily(spec.base, spec.help, labels=spec.labels)
    if spec.kind == "info":
        return InfoMetricFamily(spec.base, spec.help, labels=spec.labels)
    return GaugeMetricFamily(spec.base, spec.help, labels=spec.labels)


def _value(name: str, value: float | None) -> Iterator[Metric]:
    """A label-free family, or nothing at all when the value is unknown."""
    if value is not None:
        family = _family(name)
        family.add_metric((), value)
        yield family


def _states(name: str, current: str, states: Iterable[str], *prefix: str) -> Iterator[tuple[tuple[str, ...], float]]:
    for state in states:
        yield (*prefix, state), 1.0 if state == current else 0.0


class BmsCollector(Collector):
    """The service's state as metric families, from one `Snapshot` per `collect()`."""

    def __init__(self, service: Any) -> None:
        self.service = service

    def describe(self) -> list[Metric]:
        return []  # no collect() at registration time (the service may not have decided yet)

    def collect(self) -> Iterator[Metric]:
        return self.families(Snapshot.of(self.service))

    def families(self, s: Snapshot, pace: Callable[[], None] = lambda: None) -> Iterator[Metric]:
        """The families of one snapshot; `pace()` is called between batteries (see MetricsServer)."""
        info = _family(BUILD_INFO)
        info.add_metric((__version__,), {})
        yield info
        yield from self._service(s)
        d = s.decision
        if d is not None:
            yield from self._state(s, d)
            yield from self._bank(d)
            yield from self._batteries(d, pace)
            yield from self._history(d)
        yield from self._bus(s)
        yield from self._relays(s)
        yield from self._store(s)
        yield from self._modbus(s)

    # -- groups -----------------------------------------------------------------------------------------
    def _service(self, s: Snapshot) -> Iterator[Metric]:
        for name, value in zip((EVALUATIONS, RESTARTS, EVENTS), s.service, strict=True):
            yield from _value(name, value)
        if s.metrics is not None:
            yield from _value(SCRAPES, s.metrics[0])
            yield from _value(ENCODE, s.metrics[1])
            yield from _value(ENDPOINT_CONNECTIONS, s.metrics[2])
            family = _family(ENDPOINT_CLOSED)
            for reason in CLOSE_REASONS:
                family.add_metric((reason,), s.metrics[3].get(reason, 0))
            yield family

    def _state(self, s: Snapshot, d: Decision) -> Iterator[Metric]:
        yield from _value(DECISION_AGE, max(0.0, s.now - d.now))
        for name, on in ((STARTED, d.started), (WAITING, d.waiting_for_batteries), (ATC, d.atc), (ATD, d.atd),
                         (PRE_ALARM, d.pre_alarm), (MODE, d.mode_on), (REMOTE, d.remote_on),
                         (FIRMWARE_UPDATE, d.firmware_update), (BANK_COMPLETE, d.bank.aggregates.complete)):
            yield from _value(name, float(on))
        family = _family(PHASE)
        for labels, value in _states(PHASE, d.bank.phase, PHASES):
            family.add_metric(labels, value)
        yield family
        family = _family(OUTPUT)
        outputs = d.outputs
        for output in OUTPUT_NAMES:
            family.add_metric((output,), float(getattr(outputs, output)))
        yield family
        for name, flags, members in ((ALARM, d.alarms, ALARM_LABELS), (WARNING, d.warnings, WARNING_LABELS)):
            family = _family(name)
            for member, label in members:
                family.add_metric((label,), 1.0 if member in flags else 0.0)
            yield family
        family = _family(LED)
        for led, state in (("error", d.error_led), ("status", d.status_led)):
            for labels, value in _states(LED, state.value, (x.value for x in Led), led):
                family.add_metric(labels, value)
        yield family
        family = _family(BALANCER)
        for labels, value in _states(BALANCER, d.balancer.value, (x.value for x in BalancerStatus)):
            family.add_metric(labels, value)
        yield family
        family = _family(BALANCER_REASON)
        for labels, value in _states(BALANCER_REASON, d.balancer_reason.label, BALANCER_REASONS):
            family.add_metric(labels, value)
        yield family

    def _bank(self, d: Decision) -> Iterator[Metric]:
        view = d.bank
        a, t = view.aggregates, view.topology
        yield from _value(BANK_VOLTAGE, a.voltage)
        if a.complete:  # a partial current would read as a real one
            yield from _value(BANK_CURRENT, a.current)
            yield from _value(BANK_POWER, a.power)
        yield from _value(SOC, d.soc)
        yield from _value(CONSUMED, None if d.consumed_ah is None else d.consumed_ah * AH_TO_COULOMBS)
        if d.soc is not None:
            yield from _value(TIME_REMAINING, d.time_remaining_s)
        yield from _value(BANK_BATTERIES, t.batteries)
        yield from _value(BANK_CELLS, t.cells)
        yield from _value(BANK_SERIES, t.series)
        yield from _value(BANK_STRINGS, t.parallel)
        yield from _value(BANK_NOMINAL, t.nominal_voltage)
        capacity = t.bank_capacity_ah
        yield from _value(BANK_CAPACITY, None if capacity is None else capacity * AH_TO_COULOMBS)
        yield from _value(CELL_MIN, None if a.min_cell is None else a.min_cell.voltage)
        yield from _value(CELL_MAX, None if a.max_cell is None else a.max_cell.voltage)
        yield from _value(CELL_T_MIN, a.min_cell_temperature)
        yield from _value(CELL_T_MAX, a.max_cell_temperature)

    def _batteries(self, d: Decision, pace: Callable[[], None]) -> Iterator[Metric]:
        names = (BAT_UP, BAT_STALE, BAT_AGE, BAT_INFO, BAT_VOLTAGE, BAT_CURRENT, BAT_TEMP, BAT_CELL_T_MIN,
                 BAT_CELL_T_MAX, BAT_SPREAD, BAT_FLAG, CELL_VOLTAGE)
        f = {name: _family(name) for name in names}
        up, stale, age, ident = f[BAT_UP], f[BAT_STALE], f[BAT_AGE], f[BAT_INFO]
        volts, amps, temp = f[BAT_VOLTAGE], f[BAT_CURRENT], f[BAT_TEMP]
        tmin, tmax = f[BAT_CELL_T_MIN], f[BAT_CELL_T_MAX]
        spread, flag, cells = f[BAT_SPREAD], f[BAT_FLAG], f[CELL_VOLTAGE]
        for b in d.bank.batteries:
            pace()
            node = str(b.node)
            i = b.info
            labels = (node, b.serial or "", "" if i is None else str(i.string_index),
                      "" if i is None else str(i.series_index))
            up.add_metric(labels, 1.0 if b.fresh else 0.0)
            if b.status_age is not None:
                age.add_metric(labels, b.status_age)
            if i is not None:
                ident.add_metric((*labels, "{}.{}.{}".format(*i.firmware), f"{i.nominal_voltage:g}",
                                  str(i.nominal_capacity_ah)), {})
            if not b.fresh:
                stale.add_metric((*labels, b.stale_reason or "unknown"), 1.0)
                continue  # stale readings are withheld, not exported as if fresh
            st, tp = b.status, b.temps
            assert st is not None and tp is not None  # fresh implies both
            # Samples built directly, one label dict shared by the battery's series (nothing mutates them):
            # this is the bulk of a scrape, and add_metric would zip a new dict for each.
            shared = dict(zip(BATTERY_LABELS, labels, strict=True))
            for family, value in ((volts, st.voltage), (amps, st.current), (temp, st.temperature),
                                  (tmin, tp.cell_temp_min), (tmax, tp.cell_temp_max), (spread, b.cell_spread)):
                if value is not None:
                    family.samples.append(Sample(family.name, shared, value))
            for name in BATTERY_FLAGS:
                flag.samples.append(Sample(flag.name, {**shared, "flag": name}, 1.0 if getattr(st, name) else 0.0))
            samples, cell_name = cells.samples, cells.name
            for index, value in enumerate(b.cells):
                if value is not None:
                    samples.append(Sample(cell_name, {"battery": node, "cell": CELL_NUMBERS[index]}, value))
        yield from f.values()

    def _history(self, d: Decision) -> Iterator[Metric]:
        h = d.history
        yield from _value(H_DEEPEST, h.deepest_discharge_ah * AH_TO_COULOMBS)
        yield from _value(H_DRAWN, h.cumulative_ah_drawn * AH_TO_COULOMBS)
        yield from _value(H_DISCHARGED, h.discharged_energy_kwh * KWH_TO_JOULES)
        yield from _value(H_CHARGED, h.charged_energy_kwh * KWH_TO_JOULES)
        yield from _value(H_SYNCS, h.synchronisations)
        yield from _value(H_CYCLES, h.charge_cycles)
        yield from _value(H_FULL, h.full_discharges)
        yield from _value(H_LAST_FULL, h.last_full_charge_wall)
        yield from _value(H_BANK_V_MIN, h.min_bank_voltage)
        yield from _value(H_BANK_V_MAX, h.max_bank_voltage)
        yield from _value(H_CELL_V_MIN, h.min_cell_voltage)
        yield from _value(H_CELL_V_MAX, h.max_cell_voltage)
        yield from _value(H_TEMP_MIN, h.min_battery_temperature)
        yield from _value(H_TEMP_MAX, h.max_battery_temperature)

    def _bus(self, s: Snapshot) -> Iterator[Metric]:
        c = s.link
        family = _family(BUS_INFO)
        family.add_metric(s.bus, {})
        yield family
        yield from _value(BUS_UP, float(s.link_up))
        state, reason = s.link_state
        family = _family(BUS_STATE)
        for labels, value in _states(BUS_STATE, state.name.lower(), BUS_STATES):
            family.add_metric(labels, value)
        yield family
        if state is not BusState.UP:
            family = _family(BUS_DOWN_REASON)
            family.add_metric((reason or state.text,), {})
            yield family
        yield from _value(BUS_RECEIVED, c["frames_received"])
        yield from _value(BUS_DECODED, c["frames_decoded"])
        family = _family(BUS_MALFORMED)
        for kind in (*MALFORMED_KINDS, *LINE_KINDS, GARBLED):
            family.add_metric((kind,), c.get(f"malformed_{kind}", 0))
        yield family
        yield from _value(BUS_SENT, c["sent"])
        yield from _value(BUS_SEND_ERRORS, c["send_errors"])
        yield from _value(BUS_UNSENT, c["unsent"])
        yield from _value(BUS_STALLS, c["stalls"])
        yield from _value(BUS_ADAPTER_ERRORS, c["adapter_errors"])
        yield from _value(BUS_RECONNECTS, max(0, c["opens"] - 1))
        yield from _value(BUS_DOWNS, c["downs"])

    def _relays(self, s: Snapshot) -> Iterator[Metric]:
        o = s.outputs
        yield from _value(RELAY_BOARD_UP, float(o.board_up))
        commanded, read_back = _family(RELAY_COMMANDED), _family(RELAY_READ_BACK)
        for role, channel in s.channels.items():
            labels = (role, str(channel))
            if role in o.commanded:
                commanded.add_metric(labels, float(o.commanded[role]))
            level = o.read_back.get(role)
            if level is not None:
                read_back.add_metric(labels, float(level))
        yield commanded
        yield read_back
        yield from _value(RELAY_COMMANDS, o.commands)
        yield from _value(RELAY_FAULTS, o.faults)
        yield from _value(RELAY_RECONNECTS, o.reconnects)

    def _store(self, s: Snapshot) -> Iterator[Metric]:
        for name, value in zip((STORE_WRITES, STORE_FAILURES, STORE_PENDING, STORE_UP, STORE_REFUSED), s.store,
                               strict=True):
            yield from _value(name, value)

    def _modbus(self, s: Snapshot) -> Iterator[Metric]:
        yield from _value(MODBUS_ENABLED, float(s.modbus is not None))
        if s.modbus is None:
            return
        requests, stats = s.modbus
        family = _family(MODBUS_REQUESTS)
        for (function, outcome), count in sorted(requests.items()):
            family.add_metric((function, outcome), count)
        yield family
        yield from _value(MODBUS_REFUSED, stats.refused_writes)
        yield from _value(MODBUS_CONNECTIONS, stats.connections_open)
        yield from _value(MODBUS_ACCEPTED, stats.connections_total)
        yield from _value(MODBUS_REFUSED_CONN, stats.connections_refused)
        family = _family(MODBUS_CLOSED)
        family.add_metric(("evicted",), stats.connections_evicted)
        family.add_metric(("no_request",), stats.connections_no_request_closed)
        family.add_metric(("idle_timeout",), stats.connections_idle_closed)
        family.add_metric(("slow_client",), stats.connections_slow_closed)
        bad_frame = getattr(stats, "connections_bad_frame_closed", None)  # newer ModbusStats
        if bad_frame is not None:
            family.add_metric(("bad_frame",), bad_frame)
        yield family


# -- encoding -----------------------------------------------------------------------------------------------
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
CHUNK_SAMPLES = 200  # lines per block handed out by TextEncoder.pieces (the serving thread pauses between blocks)
_OM_SUFFIXES = frozenset({"_created", "_gsum", "_gcount"})
_LABEL_CACHE_MAX = 50_000  # label strings of ~2,000 series; cleared if label values churn past this


class TextEncoder:
    """The Prometheus text format 0.0.4, byte-for-byte what prometheus-client's `generate_latest` writes, about
    3x faster: a series' label string is escaped, sorted and formatted once and then reused (the labels of
    batteries and cells do not change between scrapes). Tests compare the two outputs on a real service."""

    def __init__(self) -> None:
        self._labels: dict[tuple[tuple[str, str], ...], str] = {}
        self._names: dict[str, str] = {}

    def _name(self, name: str) -> str:
        text = self._names.get(name)
        if text is None:
            text = self._names[name] = escape_metric_name(name)
        return text

    def _labelstr(self, labels: dict[str, str]) -> str:
        key = tuple(labels.items())
        text = self._labels.get(key)
        if text is None:
            if len(self._labels) >= _LABEL_CACHE_MAX:
                self._labels.clear()
            inner = ",".join(f'{escape_label_name(k)}="{_escape_value(v)}"' for k, v in sorted(labels.items()))
            text = self._labels[key] = f"{{{inner}}}" if inner else ""
        return text

    def pieces(self, families: Iterable[Metric]) -> Iterator[str]:
        """The exposition in blocks of at most `CHUNK_SAMPLES` lines (a family's header starts a block)."""
        labelstr, sample_name = self._labelstr, self._name
        for metric in families:
            name, kind = metric.name, metric.type
            if kind == "counter":
                name += "_total"
            elif kind == "info":
                name, kind = name + "_info", "gauge"
            elif kind == "stateset":
                kind = "gauge"
            elif kind == "gaugehistogram":
                kind = "histogram"
            elif kind == "unknown":
                kind = "untyped"
            doc = metric.documentation.replace("\\", r"\\").replace("\n", r"\n")
            lines = [f"# HELP {escape_metric_name(name)} {doc}\n# TYPE {escape_metric_name(name)} {kind}\n"]
            extra: dict[str, list[str]] = {}
            own = metric.name
            # Only these kinds carry OpenMetrics-only samples (_created, _gsum, _gcount) that move to the end.
            mixed = metric.type in ("counter", "histogram", "summary", "gaugehistogram")
            cache, last_name, last_text = self._labels, None, ""
            for s in metric.samples:  # the hot loop (~1,700 samples for 800 cells): lookups inlined
                if s.name is not last_name:
                    last_name, last_text = s.name, sample_name(s.name)
                labels = s.labels
                key = tuple(labels.items())
                text = cache.get(key)
                if text is None:
                    text = labelstr(labels)
                value = s.value
                number = repr(value) if value.__class__ is float and -1e6 < value < 1e6 else floatToGoString(value)
                if s.timestamp is None:
                    line = f"{last_text}{text} {number}\n"
                else:
                    line = f"{last_text}{text} {number} {int(float(s.timestamp) * 1000):d}\n"
                if mixed and s.name != own and s.name[len(own):] in _OM_SUFFIXES and s.name.startswith(own):
                    extra.setdefault(s.name[len(own):], []).append(line)  # OpenMetrics-only: last, as gauges
                    continue
                lines.append(line)
                if len(lines) >= CHUNK_SAMPLES:
                    yield "".join(lines)
                    lines = []
            for suffix, more in sorted(extra.items()):
                lines.append(f"# HELP {escape_metric_name(own + suffix)} {doc}\n"
                             f"# TYPE {escape_metric_name(own + suffix)} gauge\n")
                lines += more
            if lines:
                yield "".join(lines)

    def encode(self, families: Iterable[Metric]) -> bytes:
        return "".join(self.pieces(families)).encode()


def _escape_value(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')


def registry_for(service: Any) -> CollectorRegistry:
    """The service's collector plus the process metrics (process_*, python_*), in a registry of its own."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BmsCollector(service))
    return process_metrics(registry)


def process_metrics(registry: CollectorRegistry | None = None) -> CollectorRegistry:
    """prometheus-client's default process, platform and GC collectors (what its global registry exposes)."""
    registry = registry or CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


# -- serving ------------------------------------------------------------------------------------------------
SLICE_S = 0.0005  # encode this long, then pause: the GIL goes to whoever waits for it (the event loop, the bus)
PAUSE_S = 0.0001
MAX_HEAD_BYTES = 16_384
RETRY_BIND_S = 10.0
CLOSE_REASONS = ("evicted", "refused", "no_request", "idle_timeout")


class _HttpConnection:
    """One HTTP connection as the connection policy sees it."""

    __slots__ = ("address", "reader", "writer")

    def __init__(self, address: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.address, self.reader, self.writer = address, reader, writer

    def waiting(self) -> bool:
        # StreamReader has no public length: its buffer holds what arrived and was not yet parsed.
        return bool(getattr(self.reader, "_buffer", b"")) or bytes_waiting(self.writer.transport) > 0


def limits_of(section: dict[str, Any]) -> Limits:
    """The [metrics] keys of the connection policy (config.py holds their defaults)."""
    return Limits(section["max_connections"], section["max_connections_per_address"],
                  section["first_request_timeout"], section["idle_timeout"])


class MetricsServer:
    """`GET /metrics` for Prometheus, served next to the BMS with as little event-loop stall as possible.

    Every way of serving in the service's process costs the event loop something, because building and
    encoding 1,700 series is pure Python (about 4.5 ms of CPU for 800 cells) and holds the GIL. The
    candidates, measured with benchmarks/metrics.py (a thread posting a callback to the loop every 2 ms, as
    the bus receiver does; delay until it runs, p99, while scraping every 50 ms; 2-core VM):

    - encoding on the loop: the loop is blocked for the whole encoding and gzip (p99 ~7 ms);
    - prometheus-client's `start_http_server` (a thread, its generate_latest): p99 ~12 ms; its encoder
      takes ~14 ms of GIL per scrape, and a waiting thread only gets the GIL every switch interval (5 ms);
    - this server's encoding on a worker thread without pauses: p99 ~5.5 ms (the switch interval again);
    - this server as configured: p99 ~0.8 ms, against ~0.5 ms with no scrapes at all. Chosen.

    How it is split, and why:
    - The HTTP side is an asyncio server on the service's own loop: accepting and parsing a request
      costs microseconds and needs no thread of its own.
    - The snapshot is taken on the loop (the core's thread): a handful of references and small dict
      copies, cheap, and it can never see the core half-way through an evaluation.
    - The families are built and encoded on one worker thread that sleeps `PAUSE_S` after every `SLICE_S`
      of work. A real sleep makes the GIL change hands: a thread that only released and re-took it
      (time.sleep(0)) would take it straight back, and the loop or the bus receiver would wait the whole
      switch interval. The pauses add ~1.5 ms to a scrape (p50 ~8.5 ms over HTTP with gzip, 800 cells).
    - gzip (Prometheus asks for it) runs on the same thread; zlib releases the GIL while compressing.
    - The text format 0.0.4 is always served: prometheus-client 0.26's OpenMetrics encoder is 1.6x slower
      than its text encoder and Prometheus reads both; `TextEncoder` writes exactly what generate_latest
      would, from cached label strings, 3x faster.
    - `start` freezes the objects alive after start-up out of the garbage collector's reach (see there).

    A port that cannot be bound is logged and retried every RETRY_BIND_S; the BMS keeps running
    (Prometheus then reports the target down, which is what the exporter-down alert is for).

    Connections follow smallbms_bus/connections.py, as Modbus does: a newcomer is taken and, over
    `[metrics] max_connections_per_address` or `max_connections`, the longest-idle connection (one that never
    sent a complete request head first) is hung up. A connection gets `first_request_timeout` for its first
    request head and `idle_timeout` after each; a client that does not read its answer is hung up by the same
    clock. `limits` defaults to the service's `[metrics]` keys.
    """

    def __init__(self, service: Any, host: str, port: int, *, slice_s: float = SLICE_S,
                 pause_s: float = PAUSE_S, limits: Limits | None = None) -> None:
        self.service = service
        self.host, self.port = host, port
        self.slice_s, self.pause_s = slice_s, pause_s
        self.collector = BmsCollector(service)
        self.encoder = TextEncoder()
        self.extra = process_metrics()  # a registry of its own, not prometheus-client's global one
        self.scrapes = 0
        self.encode_seconds = 0.0
        self._servers: list[asyncio.base_events.Server] = []  # one per address the host resolves to
        self._retry: asyncio.Task[None] | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="metrics")
        if limits is None:  # the service's [metrics] keys, or their defaults
            config = getattr(service, "config", None)
            limits = limits_of(config["metrics"] if config is not None else defaults()["metrics"])
        self.policy = ConnectionPolicy(limits)
        self.connections_total = 0
        self.closed: dict[str, int] = dict.fromkeys(CLOSE_REASONS, 0)
        self._quiet = RateLimitedLog(log)
        self._reaper: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def bound(self) -> tuple[str, int] | None:
        """(host, port) actually listened on, or None while not bound."""
        if not self._servers or not self._servers[0].sockets:
            return None
        host, port = self._servers[0].sockets[0].getsockname()[:2]
        return host, port

    @property
    def url(self) -> str:
        host, port = self.bound or (self.host, self.port)
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"

    async def start(self) -> None:
        """Listen now; if the port cannot be bound, log why and keep retrying in the background."""
        # The objects alive after start-up (modules, the DBC: ~65k) never die; a full collection walking them
        # took 11 ms with the GIL held, and a scrape's thousands of short-lived objects trigger collections.
        # Frozen, they are skipped: a full collection drops to microseconds (measured; benchmarks/metrics.py).
        gc.freeze()
        quiet_accept_errors(asyncio.get_running_loop())
        limits = self.policy.limits
        granted = fd_budget(self, "metrics.max_connections", limits.max_connections)
        self.policy.limits = Limits(granted, *dataclasses.astuple(limits)[1:])
        self._reaper = asyncio.get_running_loop().create_task(self._reap())
        try:
            await self._bind()
        except OSError as error:
            log.error("metrics: cannot listen on %s:%s (%s); retrying every %g s, the BMS runs on",
                      self.host, self.port, error.strerror or error, RETRY_BIND_S)
            self._retry = asyncio.get_running_loop().create_task(self._keep_binding())

    async def _bind(self) -> None:
        sockets = await guarded_sockets(self.host, self.port, self._refuse)
        try:
            while sockets:
                self._servers.append(await asyncio.start_server(self._connection, sock=sockets[0], limit=MAX_HEAD_BYTES,
                                                                backlog=ACCEPT_BATCH))
                sockets.pop(0)
        except OSError:
            for sock in sockets:
                sock.close()
            await self._close_servers()
            raise
        log.info("metrics: serving %s", self.url)

    async def _keep_binding(self) -> None:
        while True:
            await asyncio.sleep(RETRY_BIND_S)
            try:
                await self._bind()
                return
            except OSError as error:
                log.debug("metrics: bind retry failed: %s", error)

    async def close(self) -> None:
        self._closing = True
        for task in (self._retry, self._reaper):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await self._close_servers()
        for conn in list(self.policy):  # idle keep-alive connections: their handlers end on the close
            conn.writer.close()  # type: ignore[attr-defined]
        release_fds(self)
        await asyncio.get_running_loop().run_in_executor(None, self._pool.shutdown, True)

    async def _close_servers(self) -> None:
        for server in self._servers:
            server.close()
            await server.wait_closed()
        self._servers.clear()

    def _refuse(self, address: str) -> bool:
        """GuardedSocket's question for a newcomer that has sent nothing: hang it up on accept?"""
        if not self.policy.crowded(address):
            return False
        self.closed["refused"] += 1
        self._quiet("refused", logging.WARNING, "metrics: refused a connection from %s that sent nothing: it already "
                    "holds its share and one of them never sent a request either (metrics.max_connections_per_address)",
                    address)
        return True

    # -- HTTP ------------------------------------------------------------------------------------------------
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closing:
            writer.close()
            return
        conn = _HttpConnection(address_of(writer.get_extra_info("peername")), reader, writer)
        for victim in self.policy.admit(conn):
            self._drop(victim, "evicted", f"for a newcomer from {conn.address}")  # type: ignore[arg-type]
        self.connections_total += 1
        try:
            while not self._closing and await self._request(conn, reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the client went away, sent garbage, or was hung up (idle, evicted): nothing to answer
        except RuntimeError:  # the encoding thread was shut down under a request: the service is stopping
            if not self._closing:
                raise
        finally:
            self.policy.forget(conn)
            writer.close()

    def _drop(self, conn: _HttpConnection, reason: str, detail: str) -> None:
        """Hang up at once (the policy already forgot it)."""
        self.closed[reason] += 1
        key = {"evicted": "max_connections / max_connections_per_address", "no_request": "first_request_timeout",
               "idle_timeout": "idle_timeout"}[reason]
        self._quiet(reason, logging.WARNING if reason == "evicted" else logging.INFO,
                    "metrics: closing a connection from %s: %s %s (metrics.%s)", conn.address,
                    reason.replace("_", " "), detail, key)
        if conn.writer.transport is not None:
            abort_with_reset(conn.writer.transport)

    async def _reap(self) -> None:
        limits = self.policy.limits
        while True:
            await asyncio.sleep(min(limits.first_request_timeout / 4, limits.idle_timeout / 4, 1.0))
            for conn, why in self.policy.expired():
                reason = "no_request" if why == "no_request" else "idle_timeout"
                timeout = limits.first_request_timeout if why == "no_request" else limits.idle_timeout
                self._drop(conn, reason, f"for {timeout:g} s")  # type: ignore[arg-type]
            self._quiet.flush()

    async def _request(self, conn: _HttpConnection, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> bool:
        """Answer one request; True to keep the connection open for the next. How long the client may take
        to send it is the connection policy's timeouts (the reaper hangs up)."""
        head = await reader.readuntil(b"\r\n\r\n")
        self.policy.request(conn)
        request, *lines = head.decode("latin-1").split("\r\n")
        parts = request.split()
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines if line)}
        if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or "content-length" in headers \
                or "transfer-encoding" in headers:  # Prometheus sends a plain GET: anything else is refused
            await self._send(writer, 400, b"bad request\n", "text/plain; charset=utf-8", close=True)
            return False
        method, target, version = parts
        keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        path = target.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            await self._send(writer, 405, b"only GET\n", "text/plain; charset=utf-8", close=not keep,
                             extra="Allow: GET, HEAD\r\n")
        elif path == "/metrics":
            gzipped = "gzip" in headers.get("accept-encoding", "")
            body = await self.render(gzipped)
            await self._send(writer, 200, body, CONTENT_TYPE, close=not keep, head=method == "HEAD",
                             extra="Content-Encoding: gzip\r\n" if gzipped else "")
        elif path == "/":
            await self._send(writer, 200, b'<html><body><a href="/metrics">/metrics</a></body></html>\n',
                             "text/html; charset=utf-8", close=not keep, head=method == "HEAD")
        else:
            await self._send(writer, 404, b"not found: try /metrics\n", "text/plain; charset=utf-8",
                             close=not keep, head=method == "HEAD")
        return keep

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, status: int, body: bytes, content_type: str, *, close: bool,
                    head: bool = False, extra: str = "") -> None:
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}[status]
        writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
                     f"Content-Length: {len(body)}\r\n{extra}{'Connection: close' + chr(13) + chr(10) if close else ''}"
                     "\r\n".encode("latin-1") + (b"" if head else body))
        await writer.drain()

    # -- encoding --------------------------------------------------------------------------------------------
    async def render(self, gzipped: bool = False) -> bytes:
        """One scrape: the snapshot here on the loop, the encoding on the metrics thread."""
        snapshot = Snapshot.of(self.service)
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._encode, snapshot, gzipped)

    def _encode(self, snapshot: Snapshot, gzipped: bool) -> bytes:
        started = time.perf_counter()
        pace = _Pacer(self.slice_s, self.pause_s)
        families = itertools.chain(self.collector.families(snapshot, pace), self.extra.collect())
        parts = []
        for piece in self.encoder.pieces(families):
            parts.append(piece)
            pace()
        body = "".join(parts).encode()
        if gzipped:
            body = gzip.compress(body, compresslevel=1, mtime=0)  # zlib releases the GIL while it compresses
        self.scrapes += 1
        self.encode_seconds = time.perf_counter() - started
        return body


class _Pacer:
    """Called often while encoding: after every `slice_s` of work, sleep `pause_s` (a real sleep hands the GIL
    over; see MetricsServer)."""

    __slots__ = ("next", "pause_s", "slice_s")

    def __init__(self, slice_s: float, pause_s: float) -> None:
        self.slice_s, self.pause_s = slice_s, pause_s
        self.next = time.perf_counter() + slice_s

    def __call__(self) -> None:
        if self.pause_s and time.perf_counter() >= self.next:
            time.sleep(self.pause_s)
            self.next = time.perf_counter() + self.slice_s


# -- docs ---------------------------------------------------------------------------------------------------
GROUP_TITLES = {"service": "Service", "state": "BMS state", "bank": "Bank", "battery": "Batteries and cells",
                "history": "History (HIS, persisted)", "bus": "Battery bus", "relay": "Relay outputs",
                "store": "Store", "modbus": "Modbus TCP server"}


def markdown() -> str:
    """docs/metrics.md, generated from METRICS (a test keeps the committed file equal to this)."""
    d = defaults()["metrics"]
    lines = ["# Metrics", "",
             "<!-- generated by `python -m smallbms_bus.metrics --markdown > docs/metrics.md`; do not edit -->", "",
             "`GET /metrics` on `[metrics] host:port` (default 127.0.0.1:9108; `port = 0` turns it off) serves the",
             "Prometheus text format. Every value of one scrape comes from the same BMS evaluation. A value nobody",
             "measured is absent, not zero: a stale battery keeps only `smallbms_battery_up 0`, its",
             "`smallbms_battery_stale_reason` and its status age; bank current and power are absent while a battery",
             "is stale; SoC and time remaining while the SoC is unknown (warning `SOC_UNKNOWN`). Charge is in",
             "coulombs (1 Ah = 3600 C) and energy in joules (1 kWh = 3.6e6 J), the base units Prometheus asks for.",
             "Battery labels: `battery` (node 1..50), `serial`, `string` (StringIndex), `position` (SeriesIndex).",
             "Label values of a fixed vocabulary (alarm, warning, flag, state, reason, kind, output, ...) are lower",
             "snake case: `smallbms_alarm{alarm=\"cell_high_voltage\"}` is alarm CELL_HIGH_VOLTAGE of",
             "docs/behaviour.md. An `_info` family is a gauge whose value is always 1 and whose labels carry the",
             "information (prometheus-client's convention for the text format).",
             "The process collectors of prometheus-client add `process_*` and `python_*`.",
             "Alert rules: `deploy/prometheus/`; dashboard: `deploy/grafana/`.", "",
             "**Site.** The installation's name is a Prometheus target label, `site`, set per target in",
             "`deploy/prometheus/prometheus.yml` (`site: example`): Prometheus puts it on every series of that",
             "target and on `up`, so an alert names the site even when the service cannot be reached. Every alert",
             "summary names it (\"Pre-alarm on bms:9108 (site home)\") and the dashboard's Site variable selects",
             "the instances of a site. The service itself exports no `site` label: Prometheus would rename it",
             "`exported_site` beside the target's. Each graph shows one quantity per axis (a second one, such as",
             "right axis and its own unit).", "",
             "## Connections", "",
             "The endpoint follows the same connection policy as Modbus (docs/modbus.md, \"Connections\"), with",
             "its own `[metrics]` keys:", "",
             "| key | default | meaning |", "|---|---|---|",
             f"| `max_connections` | {d['max_connections']:g} | HTTP connections in total; when all are taken, a "
             "newcomer is still let in and the longest-idle connection is closed (one that never sent a request "
             "head goes first; a newcomer that has sent nothing is hung up instead when it would only displace "
             "such a one from its own address) |",
             f"| `max_connections_per_address` | {d['max_connections_per_address']:g} | connections one client IP "
             "address may hold; its newcomer closes that address's own longest-idle connection, so one host "
             "cannot take every slot |",
             f"| `first_request_timeout` | {d['first_request_timeout']:g} s | a new connection that has not sent a "
             "complete request head by then is closed |",
             f"| `idle_timeout` | {d['idle_timeout']:g} s | a keep-alive connection with no new request for this "
             "long is closed; so is one whose client stops reading its answer |", "",
             "Prometheus keeps one connection per target and scrapes on it, so it is never the longest-idle while",
             "a flood's connections have sent nothing: a scraper is answered within 1 s while another address (or",
             "its own) holds 1,000 idle connections, even when they are re-opened as fast as they are dropped",
             "(tests/test_metrics_connections.py, tests/faults/test_connection_flood.py: worst 0.63 s with a CPU",
             "hog beside it). The listening socket uses TCP_DEFER_ACCEPT (a connection that sends nothing waits",
             "in the kernel for a second), dropped connections are reset, closed connections are counted in",
             "`smallbms_metrics_connections_closed_total{reason}`, and evictions, refusals and timeouts are",
             "logged at most once per 10 s each, with how many more there were.", ""]
    for group, title in GROUP_TITLES.items():
        lines += [f"## {title}", "", "| metric | type | labels | meaning |", "|---|---|---|---|"]
        for spec in METRICS.values():
            if spec.group == group:
                labels = ", ".join(f"`{label}`" for label in spec.labels)
                kind = "gauge" if spec.kind == "info" else spec.kind  # what `# TYPE` says in the text format
                lines.append(f"| `{spec.name}` | {kind} | {labels} | {spec.help.replace('|', '/')} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="smallbms-bus metrics: print the metric reference")
    parser.add_argument("--markdown", action="store_true", help="print docs/metrics.md")
    args = parser.parse_args(argv)
    if not args.markdown:
        parser.print_help()
        return 2
    print(markdown(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
