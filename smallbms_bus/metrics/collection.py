"""The service's state as metric families: one consistent `Snapshot` per scrape (prometheus_client's registry
and custom-collector role).

Nothing on the hot path touches a metric. A scrape calls `BmsCollector.collect()`, which takes one
`Snapshot` (the service's latest `Decision` -- built once per evaluation and never mutated -- plus copies of
the counters of the link, relay outputs, store, Modbus server and service) and turns it into metric
families. Every value of one scrape therefore comes from the same evaluation: a bank voltage never
sits next to the cells of another tick.

Freshness: a value nobody measured is absent, never zero. A stale battery keeps only
`smallbms_battery_up 0`, its `smallbms_battery_stale_reason{reason=...}` and the age of its last
BAT_STATUS; its voltage, current, temperatures, flags and cells disappear. Bank current and power
disappear while any battery is stale (a partial sum would read as a real current); SoC, consumed charge and
time remaining disappear while the SoC is unknown (warning SOC_UNKNOWN says so).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from smallbms_bus import __version__
from smallbms_bus.bms.alarms import BalancerStatus, BusState, Led
from smallbms_bus.bms.core import Decision
from smallbms_bus.link.bus import GARBLED
from smallbms_bus.link.codec import MALFORMED_KINDS
from smallbms_bus.link.slcan import LINE_KINDS
from smallbms_bus.metrics import catalog as m

if TYPE_CHECKING:
    from smallbms_bus.modbus.stats import ModbusStats
    from smallbms_bus.outputs.controller import OutputsStatus
    from smallbms_bus.view import ServiceView


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
    inverter: dict[str, Any] | None = None  # the BMS-CAN link's counters and ages, None while [inverter] is off
    mqtt: tuple[bool, int] | None = None  # connected, outages; None without [mqtt]

    @classmethod
    def of(cls, source: Watched) -> Snapshot:
        """The service's view (its last decision and copies of its counters, immutable) with copies of the Modbus
        and endpoint counters: taken on the loop, so none of them moves under the scrape."""
        v = source.view()
        server = source.modbus
        modbus = None
        if server is not None:  # a copy: the live counters go on counting while this scrape is encoded
            modbus = (dict(server.stats.requests), copy.copy(server.stats))
        endpoint = source.metrics
        store = v.store
        return cls(source.clock(), v.decision, v.link, v.link_state[0] is BusState.UP, v.link_state, v.bus,
                   v.outputs, v.channels, (store.writes, store.failures, store.pending_events, int(store.up),
                                           store.writes_refused),
                   (v.evaluations, v.task_restarts, v.events), modbus,
                   None if endpoint is None else (endpoint.scrapes, endpoint.encode_seconds, len(endpoint.policy),
                                                  dict(endpoint.closed)),
                   inverter=v.inverter, mqtt=_mqtt(source))


def _mqtt(source: object) -> tuple[bool, int] | None:
    """The MQTT client's connection state (two plain reads; `mqtt` is absent from test doubles of the service)."""
    front = getattr(source, "mqtt", None)
    return None if front is None else (front.link.connected, front.link.outages)


class _HasModbusStats(Protocol):
    stats: ModbusStats


class _EndpointCounters(Protocol):
    scrapes: int
    encode_seconds: float
    policy: Sized
    closed: dict[str, int]


class Watched(Protocol):
    """What a scrape reads of the service (`smallbms_bus.service.Service` is one): its view, the Modbus server's
    and this endpoint's own counters, and the clock (the decision's age)."""

    view: Callable[[], ServiceView]
    modbus: _HasModbusStats | None
    metrics: _EndpointCounters | None
    clock: Callable[[], float]


def _family(name: str) -> Any:
    spec = m.METRICS[name]
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

    def __init__(self, service: Watched | None) -> None:
        self.service = service  # None: families() of a given snapshot only

    def describe(self) -> list[Metric]:
        return []  # no collect() at registration time (the service may not have decided yet)

    def collect(self) -> Iterator[Metric]:
        assert self.service is not None, "a collector without a service only builds families() of a snapshot"
        return self.families(Snapshot.of(self.service))

    def families(self, s: Snapshot, pace: Callable[[], None] = lambda: None) -> Iterator[Metric]:
        """The families of one snapshot; `pace()` is called between batteries (see MetricsServer)."""
        info = _family(m.BUILD_INFO)
        info.add_metric((__version__,), {})
        yield info
        yield from self._service(s)
        d = s.decision
        if d is not None:
            yield from self._state(s, d)
            yield from self._bank(d)
            yield from self._charge(d)
            yield from self._batteries(d, pace)
            yield from self._history(d)
        yield from self._bus(s)
        yield from self._relays(s)
        yield from self._store(s)
        yield from self._modbus(s)
        yield from self._inverter(s)
        if s.mqtt is not None:
            yield from _value(m.MQTT_CONNECTED, float(s.mqtt[0]))
            yield from _value(m.MQTT_OUTAGES, s.mqtt[1])

    # -- groups -----------------------------------------------------------------------------------------
    def _service(self, s: Snapshot) -> Iterator[Metric]:
        for name, value in zip((m.EVALUATIONS, m.RESTARTS, m.EVENTS), s.service, strict=True):
            yield from _value(name, value)
        if s.metrics is not None:
            yield from _value(m.SCRAPES, s.metrics[0])
            yield from _value(m.ENCODE, s.metrics[1])
            yield from _value(m.ENDPOINT_CONNECTIONS, s.metrics[2])
            family = _family(m.ENDPOINT_CLOSED)
            for reason in m.CLOSE_REASONS:
                family.add_metric((reason,), s.metrics[3].get(reason, 0))
            yield family

    def _state(self, s: Snapshot, d: Decision) -> Iterator[Metric]:
        yield from _value(m.DECISION_AGE, max(0.0, s.now - d.now))
        for name, on in ((m.STARTED, d.started), (m.WAITING, d.waiting_for_batteries), (m.ATC, d.atc), (m.ATD, d.atd),
                         (m.PRE_ALARM, d.pre_alarm), (m.MODE, d.mode_on), (m.REMOTE, d.remote_on),
                         (m.FIRMWARE_UPDATE, d.firmware_update), (m.BANK_COMPLETE, d.bank.aggregates.complete)):
            yield from _value(name, float(on))
        family = _family(m.PHASE)
        for labels, value in _states(m.PHASE, d.bank.phase, m.PHASES):
            family.add_metric(labels, value)
        yield family
        family = _family(m.OUTPUT)
        outputs = d.outputs
        for output in m.OUTPUT_NAMES:
            family.add_metric((output,), float(getattr(outputs, output)))
        yield family
        for name, flags, members in ((m.ALARM, d.alarms, m.ALARM_LABELS), (m.WARNING, d.warnings, m.WARNING_LABELS)):
            family = _family(name)
            for member, label in members:
                family.add_metric((label,), 1.0 if member in flags else 0.0)
            yield family
        family = _family(m.LED)
        for led, state in (("error", d.error_led), ("status", d.status_led)):
            for labels, value in _states(m.LED, state.value, (x.value for x in Led), led):
                family.add_metric(labels, value)
        yield family
        family = _family(m.BALANCER)
        for labels, value in _states(m.BALANCER, d.balancer.value, (x.value for x in BalancerStatus)):
            family.add_metric(labels, value)
        yield family
        family = _family(m.BALANCER_REASON)
        for labels, value in _states(m.BALANCER_REASON, d.balancer_reason.label, m.BALANCER_REASONS):
            family.add_metric(labels, value)
        yield family

    def _bank(self, d: Decision) -> Iterator[Metric]:
        view = d.bank
        a, t = view.aggregates, view.topology
        yield from _value(m.BANK_VOLTAGE, a.voltage)
        if a.complete:  # a partial current would read as a real one
            yield from _value(m.BANK_CURRENT, a.current)
            yield from _value(m.BANK_POWER, a.power)
        yield from _value(m.SOC, d.soc)
        yield from _value(m.CONSUMED, None if d.consumed_ah is None else d.consumed_ah * m.AH_TO_COULOMBS)
        if d.soc is not None:
            yield from _value(m.TIME_REMAINING, d.time_remaining_s)
        yield from _value(m.BANK_BATTERIES, t.batteries)
        yield from _value(m.BANK_CELLS, t.cells)
        yield from _value(m.BANK_SERIES, t.series)
        yield from _value(m.BANK_STRINGS, t.parallel)
        yield from _value(m.BANK_NOMINAL, t.nominal_voltage)
        capacity = t.bank_capacity_ah
        yield from _value(m.BANK_CAPACITY, None if capacity is None else capacity * m.AH_TO_COULOMBS)
        yield from _value(m.CELL_MIN, None if a.min_cell is None else a.min_cell.voltage)
        yield from _value(m.CELL_MAX, None if a.max_cell is None else a.max_cell.voltage)
        yield from _value(m.CELL_T_MIN, a.min_cell_temperature)
        yield from _value(m.CELL_T_MAX, a.max_cell_temperature)

    def _charge(self, d: Decision) -> Iterator[Metric]:
        """CHG: the same values as BMS-CAN 0x351, GX 305-308, SunSpec 802 and native block F."""
        c = d.charge
        yield from _value(m.CHARGE_KNOWN, float(c.known))
        yield from _value(m.CVL, c.cvl if c.known else None)
        yield from _value(m.CCL, c.ccl)
        yield from _value(m.DCL, c.dcl)
        yield from _value(m.DVL, c.dvl if c.known else None)
        yield from _value(m.CHARGE_RATING, c.rating if c.known else None)
        family = _family(m.CHARGE_STATE)
        for labels, value in _states(m.CHARGE_STATE, m.CHARGE_STATES[int(c.state)], m.CHARGE_STATES):
            family.add_metric(labels, value)
        yield family
        yield from _value(m.CELL_LIMITING, float(c.cell_limiting))

    def _batteries(self, d: Decision, pace: Callable[[], None]) -> Iterator[Metric]:
        names = (m.BAT_UP, m.BAT_STALE, m.BAT_AGE, m.BAT_INFO, m.BAT_VOLTAGE, m.BAT_CURRENT, m.BAT_TEMP,
                 m.BAT_CELL_T_MIN, m.BAT_CELL_T_MAX, m.BAT_SPREAD, m.BAT_FLAG, m.CELL_VOLTAGE)
        f = {name: _family(name) for name in names}
        up, stale, age, ident = f[m.BAT_UP], f[m.BAT_STALE], f[m.BAT_AGE], f[m.BAT_INFO]
        volts, amps, temp = f[m.BAT_VOLTAGE], f[m.BAT_CURRENT], f[m.BAT_TEMP]
        tmin, tmax = f[m.BAT_CELL_T_MIN], f[m.BAT_CELL_T_MAX]
        spread, flag, cells = f[m.BAT_SPREAD], f[m.BAT_FLAG], f[m.CELL_VOLTAGE]
        numbers = m.CELL_NUMBERS
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
            shared = dict(zip(m.BATTERY_LABELS, labels, strict=True))
            for family, value in ((volts, st.voltage), (amps, st.current), (temp, st.temperature),
                                  (tmin, tp.cell_temp_min), (tmax, tp.cell_temp_max), (spread, b.cell_spread)):
                if value is not None:
                    family.samples.append(Sample(family.name, shared, value))
            for name in m.BATTERY_FLAGS:
                flag.samples.append(Sample(flag.name, {**shared, "flag": name}, 1.0 if getattr(st, name) else 0.0))
            samples, cell_name = cells.samples, cells.name
            for index, value in enumerate(b.cells):
                if value is not None:
                    samples.append(Sample(cell_name, {"battery": node, "cell": numbers[index]}, value))
        yield from f.values()

    def _history(self, d: Decision) -> Iterator[Metric]:
        h = d.history
        yield from _value(m.H_DEEPEST, h.deepest_discharge_ah * m.AH_TO_COULOMBS)
        yield from _value(m.H_DRAWN, h.cumulative_ah_drawn * m.AH_TO_COULOMBS)
        yield from _value(m.H_DISCHARGED, h.discharged_energy_kwh * m.KWH_TO_JOULES)
        yield from _value(m.H_CHARGED, h.charged_energy_kwh * m.KWH_TO_JOULES)
        yield from _value(m.H_SYNCS, h.synchronisations)
        yield from _value(m.H_CYCLES, h.charge_cycles)
        yield from _value(m.H_FULL, h.full_discharges)
        yield from _value(m.H_LAST_FULL, h.last_full_charge_wall)
        yield from _value(m.H_BANK_V_MIN, h.min_bank_voltage)
        yield from _value(m.H_BANK_V_MAX, h.max_bank_voltage)
        yield from _value(m.H_CELL_V_MIN, h.min_cell_voltage)
        yield from _value(m.H_CELL_V_MAX, h.max_cell_voltage)
        yield from _value(m.H_TEMP_MIN, h.min_battery_temperature)
        yield from _value(m.H_TEMP_MAX, h.max_battery_temperature)

    def _bus(self, s: Snapshot) -> Iterator[Metric]:
        c = s.link
        family = _family(m.BUS_INFO)
        family.add_metric(s.bus, {})
        yield family
        yield from _value(m.BUS_UP, float(s.link_up))
        state, reason = s.link_state
        family = _family(m.BUS_STATE)
        for labels, value in _states(m.BUS_STATE, state.name.lower(), m.BUS_STATES):
            family.add_metric(labels, value)
        yield family
        if state is not BusState.UP:
            family = _family(m.BUS_DOWN_REASON)
            family.add_metric((reason or state.text,), {})
            yield family
        yield from _value(m.BUS_RECEIVED, c["frames_received"])
        yield from _value(m.BUS_DECODED, c["frames_decoded"])
        family = _family(m.BUS_MALFORMED)
        for kind in (*MALFORMED_KINDS, *LINE_KINDS, GARBLED):
            family.add_metric((kind,), c.get(f"malformed_{kind}", 0))
        yield family
        yield from _value(m.BUS_SENT, c["sent"])
        yield from _value(m.BUS_SEND_ERRORS, c["send_errors"])
        yield from _value(m.BUS_UNSENT, c["unsent"])
        yield from _value(m.BUS_STALLS, c["stalls"])
        yield from _value(m.BUS_ADAPTER_ERRORS, c["adapter_errors"])
        yield from _value(m.BUS_RECONNECTS, max(0, c["opens"] - 1))
        yield from _value(m.BUS_DOWNS, c["downs"])

    def _relays(self, s: Snapshot) -> Iterator[Metric]:
        o = s.outputs
        yield from _value(m.RELAY_BOARD_UP, float(o.board_up))
        commanded, read_back = _family(m.RELAY_COMMANDED), _family(m.RELAY_READ_BACK)
        for role, channel in s.channels.items():
            labels = (role, str(channel))
            if role in o.commanded:
                commanded.add_metric(labels, float(o.commanded[role]))
            level = o.read_back.get(role)
            if level is not None:
                read_back.add_metric(labels, float(level))
        yield commanded
        yield read_back
        yield from _value(m.RELAY_COMMANDS, o.commands)
        yield from _value(m.RELAY_FAULTS, o.faults)
        yield from _value(m.RELAY_RECONNECTS, o.reconnects)

    def _store(self, s: Snapshot) -> Iterator[Metric]:
        names = (m.STORE_WRITES, m.STORE_FAILURES, m.STORE_PENDING, m.STORE_UP, m.STORE_REFUSED)
        for name, value in zip(names, s.store, strict=True):
            yield from _value(name, value)

    def _modbus(self, s: Snapshot) -> Iterator[Metric]:
        yield from _value(m.MODBUS_ENABLED, float(s.modbus is not None))
        if s.modbus is None:
            return
        requests, stats = s.modbus
        family = _family(m.MODBUS_REQUESTS)
        for (function, outcome), count in sorted(requests.items()):
            family.add_metric((function, outcome), count)
        yield family
        yield from _value(m.MODBUS_REFUSED, stats.refused_writes)
        yield from _value(m.MODBUS_CONNECTIONS, stats.connections_open)
        yield from _value(m.MODBUS_ACCEPTED, stats.connections_total)
        yield from _value(m.MODBUS_REFUSED_CONN, stats.connections_refused)
        family = _family(m.MODBUS_CLOSED)
        family.add_metric(("evicted",), stats.connections_evicted)
        family.add_metric(("no_request",), stats.connections_no_request_closed)
        family.add_metric(("idle_timeout",), stats.connections_idle_closed)
        family.add_metric(("slow_client",), stats.connections_slow_closed)
        bad_frame = getattr(stats, "connections_bad_frame_closed", None)  # newer ModbusStats
        if bad_frame is not None:
            family.add_metric(("bad_frame",), bad_frame)
        yield family


    def _inverter(self, s: Snapshot) -> Iterator[Metric]:
        c = s.inverter
        yield from _value(m.INVERTER_ENABLED, float(c is not None))
        if c is None:
            return
        yield from _value(m.INVERTER_UP, float(c["up"]))
        yield from _value(m.INVERTER_SETS, c["sets_sent"])
        yield from _value(m.INVERTER_SENT, c["frames_sent"])
        yield from _value(m.INVERTER_SEND_ERRORS, c["send_errors"])
        yield from _value(m.INVERTER_RECONNECTS, max(0, c["opens"] - 1))
        family = _family(m.INVERTER_RECEIVED)
        for kind, key in (("keepalive", "keepalives"), ("identification", "identifications"),
                          ("other", "other_received")):
            family.add_metric((kind,), c[key])
        yield family
        yield from _value(m.INVERTER_GAP_MAX, c["max_limits_gap_s"])
        yield from _value(m.INVERTER_LIMITS_AGE, c["limits_age"])
        yield from _value(m.INVERTER_KEEPALIVE_AGE, c["keepalive_age"])


def registry_for(service: Watched) -> CollectorRegistry:
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


