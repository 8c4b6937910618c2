"""The Prometheus endpoint of a running service (real sockets, real HTTP, the real service and collector)."""

from __future__ import annotations

import http.client
import logging
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client.exposition import generate_latest

from smallbms_bus import metrics
from smallbms_bus.bms.alarms import BmsAlarm, BmsWarning
from smallbms_bus.modbus.stats import ModbusStats
from tests.metrics_rig import RunningBms
from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
PER_BATTERY = ("smallbms_battery_up", "smallbms_battery_status_age_seconds", "smallbms_battery_info",
               "smallbms_battery_voltage_volts", "smallbms_battery_current_amperes",
               "smallbms_battery_temperature_celsius", "smallbms_battery_cell_temperature_min_celsius",
               "smallbms_battery_cell_temperature_max_celsius", "smallbms_battery_cell_voltage_spread_volts")
READINGS = ("smallbms_battery_voltage_volts", "smallbms_battery_current_amperes",
            "smallbms_battery_temperature_celsius", "smallbms_battery_cell_temperature_min_celsius",
            "smallbms_battery_cell_temperature_max_celsius", "smallbms_battery_cell_voltage_spread_volts",
            "smallbms_battery_flag", "smallbms_cell_voltage_volts")
# Declared families a healthy, just-started bank does not have, and why.
CONDITIONAL = {
    "smallbms_battery_stale_reason",  # every battery is fresh
    "smallbms_bank_state_of_charge_percent", "smallbms_bank_time_remaining_seconds",  # SoC unknown at first start
    "smallbms_bank_consumed_coulombs",  # ... and so is consumed charge (no full charge to count from)
    "smallbms_history_last_full_charge_timestamp_seconds",  # no full charge yet
    "smallbms_bus_down_reason_info",  # the bus is up
} | {spec.name for spec in metrics.METRICS.values()  # Modbus is off in this fixture: only modbus_enabled 0
     if spec.group == "modbus" and spec.name != "smallbms_modbus_enabled"} | {
    spec.name for spec in metrics.METRICS.values() if spec.group == "mqtt"} | {  # no [mqtt] here (tests/mqtt have it)
    spec.name for spec in metrics.METRICS.values()  # no [inverter] in this fixture: only inverter_enabled 0
    if spec.group == "inverter" and spec.name != "smallbms_inverter_enabled"}


@pytest.fixture(scope="module")
def bms(tmp_path_factory):
    with RunningBms(tmp_path_factory.mktemp("metrics")) as running:
        yield running.started()


def test_scrape_passes_promtool_check_metrics(bms):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (tests/run installs Debian's prometheus package when run as root)")
    text = bms.scrape().text
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "smallbms_cell_voltage_volts" in text  # a real scrape of a started bank, not an empty one


@pytest.mark.parametrize(("bank", "batteries", "cells_each"), [("2s2p-12v100", 4, 4), ("1s3p-48v100", 3, 16)])
def test_series_counts_match_the_bank(tmp_path, bank, batteries, cells_each):
    with RunningBms(tmp_path, bank) as run:
        s = run.started().scrape()
    assert len(s.series("smallbms_cell_voltage_volts")) == batteries * cells_each
    for name in PER_BATTERY:
        assert len(s.series(name)) == batteries, name
    assert len(s.series("smallbms_battery_flag")) == batteries * len(metrics.BATTERY_FLAGS)
    for node in range(1, batteries + 1):
        cells = s.series("smallbms_cell_voltage_volts", battery=str(node))
        assert sorted(int(labels["cell"]) for labels, _ in cells) == list(range(1, cells_each + 1))
    assert s.value("smallbms_bank_batteries") == batteries and s.value("smallbms_bank_cells") == batteries * cells_each
    assert len(s.series("smallbms_alarm")) == len(BmsAlarm) and len(s.series("smallbms_warning")) == len(BmsWarning)
    assert {labels["alarm"] for labels, _ in s.series("smallbms_alarm")} == {a.name.lower() for a in BmsAlarm}
    assert len(s.series("smallbms_led_state")) == 6 and sum(v for _, v in s.series("smallbms_led_state")) == 2
    assert sum(v for _, v in s.series("smallbms_balancer_status")) == 1
    assert s.value("smallbms_output_high", output="load_disconnect") == 1
    labels, _ = s.series("smallbms_battery_up", battery="1")[0]
    assert labels["serial"].startswith("HQ") and labels["string"] == "1" and labels["position"] == "1"


def test_every_family_is_declared_with_its_type_and_documented(bms):
    s = bms.scrape()
    ours = {name: kind for name, kind in s.types.items() if name.startswith("smallbms_")}
    declared = {spec.name: "gauge" if spec.kind == "info" else spec.kind for spec in metrics.METRICS.values()}
    assert set(ours) <= set(declared), set(ours) - set(declared)
    assert all(declared[name] == kind for name, kind in ours.items())
    with_samples = {name for name in ours if s.samples.get(name)}
    assert set(declared) - with_samples == CONDITIONAL
    assert any(name.startswith("process_") for name in s.types)  # the default process collector
    assert (ROOT / "docs" / "metrics.md").read_text() == metrics.markdown(), \
        "docs/metrics.md is stale: python -m smallbms_bus.metrics --markdown > docs/metrics.md"


def test_one_scrape_is_one_evaluation(bms):
    """Bank values are computed from the same batteries and cells the scrape shows (BANK-5), every time."""
    for _ in range(5):
        s = bms.scrape()
        strings: dict[str, float] = {}
        for labels, volts in s.series("smallbms_battery_voltage_volts"):
            strings[labels["string"]] = strings.get(labels["string"], 0.0) + volts
        assert s.value("smallbms_bank_voltage_volts") == pytest.approx(sum(strings.values()) / len(strings), abs=1e-6)
        cells = [v for _, v in s.series("smallbms_cell_voltage_volts")]
        assert s.value("smallbms_bank_cell_voltage_min_volts") == min(cells)
        assert s.value("smallbms_bank_cell_voltage_max_volts") == max(cells)
        time.sleep(0.15)


def test_encoder_writes_what_prometheus_client_writes(bms):
    families = list(metrics.registry_for(bms.service).collect())

    class Fixed:
        def collect(self):
            return families

    assert metrics.TextEncoder().encode(families) == generate_latest(Fixed())


def test_http_gzip_head_keep_alive_and_errors(bms):
    plain, packed = bms.scrape(), bms.scrape(gzipped=True)
    assert set(plain.types) == set(packed.types)
    connection = http.client.HTTPConnection("127.0.0.1", bms.port, timeout=10)
    try:
        for _ in range(2):  # two requests on one keep-alive connection, as Prometheus scrapes
            connection.request("GET", "/metrics")
            response = connection.getresponse()
            assert response.status == 200 and b"smallbms_build_info" in response.read()
        connection.request("HEAD", "/metrics")
        response = connection.getresponse()
        assert response.status == 200 and int(response.headers["Content-Length"]) > 0 and response.read() == b""
        connection.request("GET", "/nope")
        response = connection.getresponse()
        assert response.status == 404 and b"/metrics" in response.read()
        connection.request("POST", "/metrics", body=b"x")
        response = connection.getresponse()
        assert response.status == 400
        response.read()
    finally:
        connection.close()


def test_stale_battery_readings_disappear_and_up_says_why(tmp_path):
    with RunningBms(tmp_path, "2s2p-12v100", comm_timeout=1.0) as run:
        events = run.started().scrape().value("smallbms_events_total")
        run.sim.bank.battery(2).silent = True
        run.wait_for(lambda: run.scrape().value("smallbms_battery_up", battery="2") == 0, 10, "battery 2 stale")
        s = run.scrape()
        for name in READINGS:
            assert not s.series(name, battery="2"), f"{name} of the stale battery is still exported"
            assert s.series(name, battery="1"), f"{name} of a fresh battery is missing"
        (labels, value), = s.series("smallbms_battery_stale_reason", battery="2")
        assert value == 1 and labels["reason"] in metrics.STALE_REASONS and labels["serial"].startswith("HQ")
        assert not s.series("smallbms_battery_stale_reason", battery="1")
        assert s.value("smallbms_battery_status_age_seconds", battery="2") >= 1.0
        assert s.series("smallbms_battery_info", battery="2")  # identity stays: it is not a reading
        assert not s.series("smallbms_bank_current_amperes") and not s.series("smallbms_bank_power_watts")
        assert s.value("smallbms_bank_complete") == 0
        assert s.value("smallbms_alarm", alarm="battery_comms_lost") == 1
        assert s.value("smallbms_allowed_to_charge") == 0 and s.value("smallbms_allowed_to_discharge") == 0
        assert s.value("smallbms_led_state", led="error", state="solid") == 1  # LED-1: an alarm is active
        assert s.value("smallbms_events_total") > events  # ATC, ATD and the alarm changed: events, counted
        run.sim.bank.battery(2).silent = False
        run.wait_for(lambda: run.scrape().value("smallbms_battery_up", battery="2") == 1, 10, "battery 2 fresh")
        s = run.scrape()
        assert len(s.series("smallbms_cell_voltage_volts", battery="2")) == 4
        assert not s.series("smallbms_battery_stale_reason")


def test_modbus_requests_by_function_and_outcome(tmp_path):
    from pymodbus.client import ModbusTcpClient

    with RunningBms(tmp_path, "1s1p-12v100", modbus_port=free_port()) as run:
        run.started()
        assert run.service.modbus is not None
        port = run.config["modbus"]["port"]
        run.wait_for(lambda: run.scrape().value("smallbms_modbus_enabled") == 1, 5, "modbus metrics")
        client = ModbusTcpClient("127.0.0.1", port=port, timeout=5)
        assert client.connect()
        try:
            client.read_holding_registers(0, count=1, device_id=run.config["modbus"]["unit"])
            client.read_coils(0, count=1, device_id=run.config["modbus"]["unit"])
            s = run.scrape()
            assert s.value("smallbms_modbus_connections") == 1
        finally:
            client.close()
        requests = {(labels["function"], labels["outcome"]): v
                    for labels, v in s.series("smallbms_modbus_requests_total")}
        assert sum(v for (function, _), v in requests.items() if function == "read_holding_registers") == 1
        assert sum(v for (function, _), v in requests.items() if function == "read_coils") == 1
        assert s.value("smallbms_modbus_connections_accepted_total") >= 1


def test_modbus_counters_map_one_to_one(bms):
    """Every ModbusStats counter reaches its metric (the collector reads service.modbus.stats)."""
    stats = ModbusStats(refused_writes=3, connections_open=2, connections_total=9, connections_refused=4,
                        connections_idle_closed=5, connections_slow_closed=6)
    if hasattr(stats, "connections_bad_frame_closed"):
        stats.connections_bad_frame_closed = 7
    stats.connections_evicted, stats.connections_no_request_closed = 10, 11
    stats.count(16, 3)
    stats.count(3, None)
    stats.count(3, None)
    snapshot = metrics.Snapshot.of(SimpleNamespace(**{**vars(bms.service), "modbus": SimpleNamespace(stats=stats)}))
    families = {f.name: f for f in metrics.BmsCollector(bms.service).families(snapshot)}
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert values[("smallbms_modbus_requests_total", (("function", "read_holding_registers"), ("outcome", "ok")))] == 2
    assert values[("smallbms_modbus_requests_total",
                   (("function", "write_multiple_registers"), ("outcome", "illegal_data_value")))] == 1
    assert values[("smallbms_modbus_refused_writes_total", ())] == 3
    assert values[("smallbms_modbus_connections", ())] == 2
    assert values[("smallbms_modbus_connections_accepted_total", ())] == 9
    assert values[("smallbms_modbus_connections_refused_total", ())] == 4
    assert values[("smallbms_modbus_connections_closed_total", (("reason", "idle_timeout"),))] == 5
    assert values[("smallbms_modbus_connections_closed_total", (("reason", "slow_client"),))] == 6
    assert values[("smallbms_modbus_connections_closed_total", (("reason", "evicted"),))] == 10
    assert values[("smallbms_modbus_connections_closed_total", (("reason", "no_request"),))] == 11
    if hasattr(stats, "connections_bad_frame_closed"):
        assert values[("smallbms_modbus_connections_closed_total", (("reason", "bad_frame"),))] == 7


def test_a_busy_port_never_stops_the_bms_and_stop_closes_the_endpoint(tmp_path, caplog):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with caplog.at_level(logging.ERROR, logger="smallbms_bus.metrics"), \
                RunningBms(tmp_path, "1s1p-12v100", metrics_port=port) as run:
            run.wait_for(lambda: run.service.decision is not None and run.service.decision.started, 15, "started")
            assert run.service.metrics is not None and run.service.metrics.bound is None
            assert run.service.decision.outputs.load_disconnect  # the BMS protects and drives the outputs
            assert any("cannot listen" in r.getMessage() for r in caplog.records)
            assert run.shutdown() == 0
    with RunningBms(tmp_path / "second", "1s1p-12v100") as run:
        run.started()
        assert run.scrape().value("smallbms_bms_started") == 1
        assert run.shutdown() == 0
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", run.port), timeout=2).close()


# Labels whose values are free text or identities, not a fixed vocabulary.
FREE_TEXT_LABELS = {"version", "serial", "firmware", "nominal_voltage", "capacity_ah", "interface", "channel",
                    "battery", "cell", "string", "position"}


def test_every_enumerated_label_value_is_lower_snake_case(bms):
    """One casing for every label value of a fixed vocabulary (alarm, warning, flag, state, reason, ...), so
    `alarm="cell_high_voltage"` sits next to `flag="cell_high_voltage"`, never `CELL_HIGH_VOLTAGE`."""
    s = bms.scrape()
    wrong = {(name, label, value) for name, samples in s.samples.items() if name.startswith("smallbms_")
             and not name.endswith("_info") for labels, _ in samples for label, value in labels.items()
             if label not in FREE_TEXT_LABELS and not re.fullmatch(r"[a-z0-9_]+", value)}
    assert not wrong, sorted(wrong)[:10]
    assert {labels["alarm"] for labels, _ in s.series("smallbms_alarm")} == {a.name.lower() for a in BmsAlarm}
    assert {labels["warning"] for labels, _ in s.series("smallbms_warning")} == {w.name.lower() for w in BmsWarning}


def test_docs_metrics_md_types_are_what_the_scrape_says(bms):
    """docs/metrics.md lists each family with the TYPE the endpoint sends (an info family is a gauge in the text
    format, as prometheus-client writes it)."""
    documented = dict(re.findall(r"^\| `(smallbms_\w+)` \| (\w+) \|", (ROOT / "docs" / "metrics.md").read_text(),
                                 flags=re.MULTILINE))
    scraped = {name: kind for name, kind in bms.scrape().types.items() if name.startswith("smallbms_")}
    assert scraped and set(scraped) <= set(documented)
    assert {name: documented[name] for name in scraped} == scraped
