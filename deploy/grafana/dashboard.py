"""Generate deploy/grafana/smallbms-bus.json, the provisionable Grafana dashboard (never edit the JSON by hand).

    python deploy/grafana/dashboard.py          # rewrite the JSON
    python deploy/grafana/dashboard.py --check  # exit 1 if the committed JSON is not what this writes

Panels are declared as data below; every PromQL expression selects job="smallbms-bus" through the
`$instance` variable (chosen among the instances of the `$site` variable). tests/integration/test_prometheus.py
runs each expression against a real Prometheus scraping `smallbms-bus demo` and requires data.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("smallbms-bus.json")
INST = 'instance=~"$instance"'
IB = f'{INST}, battery=~"$battery"'
DS = {"type": "prometheus", "uid": "${datasource}"}
# Template variables: a site (the target label of deploy/prometheus/prometheus.yml), then its instances. A target
# without a site label matches site=~".*" too (an absent label is the empty string).
SITES = 'label_values(smallbms_build_info{job="smallbms-bus"}, site)'
INSTANCES = 'label_values(smallbms_build_info{job="smallbms-bus", site=~"$site"}, instance)'
ONOFF = [{"type": "value", "options": {"0": {"text": "off", "color": "red", "index": 0},
                                       "1": {"text": "on", "color": "green", "index": 1}}}]
YESNO = [{"type": "value", "options": {"0": {"text": "no", "color": "red", "index": 0},
                                       "1": {"text": "yes", "color": "green", "index": 1}}}]
ACTIVE = [{"type": "value", "options": {"0": {"text": "clear", "color": "green", "index": 0},
                                        "1": {"text": "ACTIVE", "color": "red", "index": 1}}}]
FRESH = [{"type": "value", "options": {"0": {"text": "STALE", "color": "red", "index": 0},
                                       "1": {"text": "fresh", "color": "green", "index": 1}}}]


class Board:
    """Lays panels out on Grafana's 24-column grid, row by row."""

    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self.x = self.y = self.row_height = 0

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append({"type": "row", "title": title, "collapsed": False, "panels": [],
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "id": len(self.panels) + 1})
        self.y += 1

    def _newline(self) -> None:
        if self.x:
            self.x, self.y, self.row_height = 0, self.y + self.row_height, 0

    def add(self, kind: str, title: str, targets: list[tuple[str, str]], *, w: int = 6, h: int = 6,
            unit: str | None = None, mappings: list[dict[str, Any]] | None = None, instant: bool = False,
            table: bool = False, options: dict[str, Any] | None = None, decimals: int | None = None,
            description: str = "", overrides: list[dict[str, Any]] | None = None) -> None:
        if self.x + w > 24:
            self._newline()
        defaults: dict[str, Any] = {}
        if unit:
            defaults["unit"] = unit
        if mappings:
            defaults["mappings"] = mappings
        if decimals is not None:
            defaults["decimals"] = decimals
        panel: dict[str, Any] = {
            "id": len(self.panels) + 1, "type": kind, "title": title, "description": description, "datasource": DS,
            "gridPos": {"h": h, "w": w, "x": self.x, "y": self.y},
            "fieldConfig": {"defaults": defaults, "overrides": overrides or []}, "options": options or {},
            "targets": [{"refId": chr(ord("A") + i), "datasource": DS, "expr": expr, "legendFormat": legend,
                         "instant": instant or table, "range": not (instant or table),
                         **({"format": "table"} if table else {})}
                        for i, (expr, legend) in enumerate(targets)],
        }
        if table:
            panel["transformations"] = [{"id": "labelsToFields", "options": {}}] if kind != "table" else [
                {"id": "organize", "options": {"excludeByName": {"Time": True, "__name__": True, "job": True,
                                                                 "instance": True}}}]
        self.panels.append(panel)
        self.x += w
        self.row_height = max(self.row_height, h)


def stat(board: Board, title: str, expr: str, legend: str = "", **kw: Any) -> None:
    options = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
               "colorMode": "value", "graphMode": kw.pop("graph", "area"), "textMode": "auto"}
    board.add("stat", title, [(expr, legend)], options=options, **kw)


def series(board: Board, title: str, targets: list[tuple[str, str]], **kw: Any) -> None:
    board.add("timeseries", title, targets, w=kw.pop("w", 12), h=kw.pop("h", 8),
              options={"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}}, **kw)


def on_axis(ref_id: str, unit: str, *, right: bool = False, **limits: float) -> dict[str, Any]:
    """A series with its own unit: on the right axis (a second quantity never shares an axis, where the larger
    one would flatten the other), or with its own limits (SoC 0-100 %)."""
    properties: list[dict[str, Any]] = [{"id": "unit", "value": unit}]
    if right:
        properties.append({"id": "custom.axisPlacement", "value": "right"})
    properties += [{"id": key, "value": value} for key, value in limits.items()]
    return {"matcher": {"id": "byFrameRefID", "options": ref_id}, "properties": properties}


def timeline(board: Board, title: str, targets: list[tuple[str, str]], mappings: list[dict[str, Any]],
             **kw: Any) -> None:
    board.add("state-timeline", title, targets, w=kw.pop("w", 24), h=kw.pop("h", 8), mappings=mappings,
              options={"showValue": "never", "mergeValues": True, "rowHeight": 0.8}, **kw)


def charge_control(b: Board) -> None:
    """CHG: what inverters and chargers are told (CVL, CCL, DCL, DVL), against what the bank does."""
    b.row("Charge control")
    stat(b, "Charge state", f"smallbms_charge_state{{{INST}}} == 1", "{{state}}", graph="none", w=4,
         description="absorption (CVL = absorption voltage) or float (CVL = float voltage), CHG-1.")
    stat(b, "CVL", f"smallbms_charge_voltage_limit_volts{{{INST}}}", unit="volt", decimals=2, w=4,
         description="Charge voltage limit. No data until the bank is proven (then nothing is allowed).")
    stat(b, "CCL", f"smallbms_charge_current_limit_amperes{{{INST}}}", unit="amp", decimals=1, w=4,
         description="Charge current limit: 0 = do not charge.")
    stat(b, "DCL", f"smallbms_discharge_current_limit_amperes{{{INST}}}", unit="amp", decimals=1, w=4,
         description="Discharge current limit: 0 = do not discharge.")
    stat(b, "DVL", f"smallbms_discharge_voltage_limit_volts{{{INST}}}", unit="volt", decimals=2, w=4)
    stat(b, "Cell-voltage limiting", f"smallbms_charge_cell_voltage_limiting{{{INST}}}", mappings=ACTIVE,
         graph="none", w=4, description="Active: a cell reached 3.55 V and CVL is held below the bank voltage.")
    series(b, "Voltage limits against the bank voltage",
           [(f"smallbms_charge_voltage_limit_volts{{{INST}}}", "CVL"),
            (f"smallbms_bank_voltage_volts{{{INST}}}", "bank voltage"),
            (f"smallbms_discharge_voltage_limit_volts{{{INST}}}", "DVL")], unit="volt",
           description="The charger keeps the bank voltage at or below CVL; an inverter stops discharging at DVL.")
    series(b, "Current limits against the bank current",
           [(f"smallbms_charge_current_limit_amperes{{{INST}}}", "CCL"),
            (f"smallbms_bank_current_amperes{{{INST}}}", "bank current"),
            (f"-smallbms_discharge_current_limit_amperes{{{INST}}}", "-DCL")], unit="amp",
           description="Positive = charging: the bank current stays between -DCL and CCL.")


def build() -> dict[str, Any]:
    b = Board()
    b.row("Bank overview")
    stat(b, "State of charge", f"smallbms_bank_state_of_charge_percent{{{INST}}}", unit="percent", decimals=1,
         description="Absent (No data) while the SoC is unknown: warning SOC_UNKNOWN.")
    stat(b, "Bank voltage", f"smallbms_bank_voltage_volts{{{INST}}}", unit="volt", decimals=2)
    stat(b, "Bank current", f"smallbms_bank_current_amperes{{{INST}}}", unit="amp", decimals=1,
         description="Positive = charging. Absent while a battery is stale.")
    stat(b, "Bank power", f"smallbms_bank_power_watts{{{INST}}}", unit="watt", decimals=0)
    stat(b, "Time remaining", f"smallbms_bank_time_remaining_seconds{{{INST}}}", unit="s",
         description="To the discharge floor at the 3-minute average current; infinite when not discharging.")
    stat(b, "Consumed", f"smallbms_bank_consumed_coulombs{{{INST}}} / 3600", unit="amph", decimals=1)
    stat(b, "Allowed to charge", f"smallbms_allowed_to_charge{{{INST}}}", mappings=YESNO, graph="none", w=4)
    stat(b, "Allowed to discharge", f"smallbms_allowed_to_discharge{{{INST}}}", mappings=YESNO, graph="none", w=4)
    stat(b, "Pre-alarm", f"smallbms_pre_alarm{{{INST}}}", mappings=ACTIVE, graph="none", w=4)
    stat(b, "Mode", f"smallbms_mode_on{{{INST}}}", mappings=ONOFF, graph="none", w=3)
    stat(b, "Remote", f"smallbms_remote_on{{{INST}}}", mappings=ONOFF, graph="none", w=3)
    stat(b, "Batteries fresh", f"sum(smallbms_battery_up{{{INST}}})", graph="none", w=3,
         description="Fresh batteries; the bank size is on the right.")
    stat(b, "Batteries", f"smallbms_bank_batteries{{{INST}}}", graph="none", w=3)
    stat(b, "Outputs", f"smallbms_output_high{{{INST}}}", "{{output}}", mappings=ONOFF, graph="none", w=8,
         description="What the BMS wants: load_disconnect high = loads may run, charge_disconnect high = chargers may "
                     "run, pre_alarm high = alarm.")
    stat(b, "Relays (read back)", f"smallbms_relay_read_back{{{INST}}}", "{{output}} ch{{channel}}", mappings=ONOFF,
         graph="none", w=8)
    stat(b, "Balancer", f"smallbms_balancer_status{{{INST}}} == 1", "{{state}}", graph="none", w=4)
    stat(b, "LEDs", f"smallbms_led_state{{{INST}}} == 1", "{{led}} {{state}}", graph="none", w=4)
    series(b, "Bank voltage and current", [(f"smallbms_bank_voltage_volts{{{INST}}}", "voltage"),
                                           (f"smallbms_bank_current_amperes{{{INST}}}", "current")],
           unit="volt", overrides=[on_axis("B", "amp", right=True)],
           description="Voltage on the left axis, current (positive = charging) on the right.")
    series(b, "State of charge and power", [(f"smallbms_bank_state_of_charge_percent{{{INST}}}", "SoC"),
                                            (f"smallbms_bank_power_watts{{{INST}}}", "power")],
           unit="percent", overrides=[on_axis("A", "percent", min=0, max=100), on_axis("B", "watt", right=True)],
           description="SoC on the left axis (0-100 %), power (positive = charging) on the right.")
    charge_control(b)

    b.row("Alarms and warnings")
    timeline(b, "Alarms (an action was taken)", [(f"smallbms_alarm{{{INST}}}", "{{alarm}}")], ACTIVE, h=9)
    timeline(b, "Warnings", [(f"smallbms_warning{{{INST}}}", "{{warning}}")], ACTIVE, h=9)
    timeline(b, "States", [(f"smallbms_allowed_to_charge{{{INST}}}", "allowed to charge"),
                           (f"smallbms_allowed_to_discharge{{{INST}}}", "allowed to discharge"),
                           (f"smallbms_pre_alarm{{{INST}}}", "pre-alarm"), (f"smallbms_bus_up{{{INST}}}", "bus up"),
                           (f"smallbms_relay_board_up{{{INST}}}", "relay board up")], ONOFF, h=7)

    b.row("Batteries")
    timeline(b, "Battery freshness", [(f"smallbms_battery_up{{{IB}}}", "battery {{battery}} {{serial}}")], FRESH,
             h=7, description="STALE: readings withheld; smallbms_battery_stale_reason says why.")
    series(b, "Battery voltage", [(f"smallbms_battery_voltage_volts{{{IB}}}", "{{battery}} {{serial}}")], unit="volt")
    series(b, "Battery current", [(f"smallbms_battery_current_amperes{{{IB}}}", "{{battery}} {{serial}}")],
           unit="amp")
    series(b, "Status age", [(f"smallbms_battery_status_age_seconds{{{IB}}}", "{{battery}}")], unit="s",
           description="Seconds since each battery's last BAT_STATUS; stale after [bms] comm_timeout.")
    b.add("table", "Batteries", [(f"smallbms_battery_info{{{IB}}}", "")], w=12, h=8, table=True)

    b.row("Cells")
    b.add("heatmap", "Cell voltages (all cells)", [(f"smallbms_cell_voltage_volts{{{IB}}}", "{{battery}}/{{cell}}")],
          w=12, h=9, options={"calculate": True, "yAxis": {"unit": "volt"}, "cellGap": 1,
                               "color": {"mode": "scheme", "scheme": "Spectral", "exponent": 0.5}})
    series(b, "Bank cell extremes", [(f"smallbms_bank_cell_voltage_min_volts{{{INST}}}", "lowest cell"),
                                     (f"smallbms_bank_cell_voltage_max_volts{{{INST}}}", "highest cell")], unit="volt",
           h=9)
    series(b, "Cell spread per battery", [(f"smallbms_battery_cell_voltage_spread_volts{{{IB}}}", "{{battery}}")],
           unit="volt", description="Imbalanced above 0.10 V (BAL-1).")
    b.add("table", "Cell voltages now", [(f"smallbms_cell_voltage_volts{{{IB}}}", "")], w=12, h=8, table=True,
          unit="volt")

    b.row("Temperatures")
    series(b, "Cell temperatures per battery", [
        (f"smallbms_battery_cell_temperature_min_celsius{{{IB}}}", "{{battery}} min"),
        (f"smallbms_battery_cell_temperature_max_celsius{{{IB}}}", "{{battery}} max")], unit="celsius")
    series(b, "Battery and bank temperatures", [
        (f"smallbms_battery_temperature_celsius{{{IB}}}", "battery {{battery}}"),
        (f"smallbms_bank_cell_temperature_min_celsius{{{INST}}}", "bank lowest cell"),
        (f"smallbms_bank_cell_temperature_max_celsius{{{INST}}}", "bank highest cell")], unit="celsius")

    b.row("History")
    stat(b, "Deepest discharge", f"smallbms_history_deepest_discharge_coulombs{{{INST}}} / 3600", unit="amph",
         graph="none", w=4)
    stat(b, "Ah drawn", f"smallbms_history_drawn_coulombs_total{{{INST}}} / 3600", unit="amph", graph="none", w=4)
    stat(b, "Discharged energy", f"smallbms_history_discharged_energy_joules_total{{{INST}}} / 3.6e6", unit="kwatth",
         decimals=2, graph="none", w=4)
    stat(b, "Charged energy", f"smallbms_history_charged_energy_joules_total{{{INST}}} / 3.6e6", unit="kwatth",
         decimals=2, graph="none", w=4)
    stat(b, "Last full charge", f"smallbms_history_last_full_charge_timestamp_seconds{{{INST}}} * 1000",
         unit="dateTimeFromNow", graph="none", w=4, description="No data: no full charge (synchronisation) yet.")
    stat(b, "Synchronisations", f"smallbms_history_synchronisations_total{{{INST}}}", graph="none", w=4)
    stat(b, "Charge cycles", f"smallbms_history_charge_cycles_total{{{INST}}}", graph="none", w=4)
    stat(b, "Full discharges", f"smallbms_history_full_discharges_total{{{INST}}}", graph="none", w=4)
    stat(b, "Bank voltage min", f"smallbms_history_bank_voltage_min_volts{{{INST}}}", "min", unit="volt",
         graph="none", w=4)
    stat(b, "Bank voltage max", f"smallbms_history_bank_voltage_max_volts{{{INST}}}", "max", unit="volt", graph="none",
         w=4)
    stat(b, "Cell voltage min", f"smallbms_history_cell_voltage_min_volts{{{INST}}}", unit="volt", graph="none", w=4)
    stat(b, "Cell voltage max", f"smallbms_history_cell_voltage_max_volts{{{INST}}}", unit="volt", graph="none", w=4)
    stat(b, "Battery temperature min", f"smallbms_history_battery_temperature_min_celsius{{{INST}}}", unit="celsius",
         graph="none", w=4)
    stat(b, "Battery temperature max", f"smallbms_history_battery_temperature_max_celsius{{{INST}}}", unit="celsius",
         graph="none", w=4)

    b.row("Bus, relays, Modbus and the service")
    series(b, "Bus frames per second", [
        (f"rate(smallbms_bus_frames_received_total{{{INST}}}[$__rate_interval])", "received"),
        (f"rate(smallbms_bus_frames_decoded_total{{{INST}}}[$__rate_interval])", "decoded"),
        (f"rate(smallbms_bus_frames_sent_total{{{INST}}}[$__rate_interval])", "sent (BMS_STATE)")], unit="pps", w=8)
    series(b, "Malformed frames by kind", [
        (f"sum by (kind) (rate(smallbms_bus_frames_malformed_total{{{INST}}}[$__rate_interval]))", "{{kind}}")],
        unit="pps", w=8, description="COM-3: dropped and counted, never acted on.")
    series(b, "Link losses, reconnects, send errors", [
        (f"increase(smallbms_bus_link_lost_total{{{INST}}}[$__rate_interval])", "link lost"),
        (f"increase(smallbms_bus_reconnects_total{{{INST}}}[$__rate_interval])", "bus reconnects"),
        (f"increase(smallbms_bus_send_errors_total{{{INST}}}[$__rate_interval])", "send errors")], w=8)
    series(b, "Relay board", [
        (f"increase(smallbms_relay_commands_total{{{INST}}}[$__rate_interval])", "commands"),
        (f"increase(smallbms_relay_faults_total{{{INST}}}[$__rate_interval])", "faults"),
        (f"increase(smallbms_relay_reconnects_total{{{INST}}}[$__rate_interval])", "reconnects")], w=8)
    series(b, "Modbus requests by function and outcome", [
        (f"sum by (function, outcome) (rate(smallbms_modbus_requests_total{{{INST}}}[$__rate_interval]))",
         "{{function}} {{outcome}}")], unit="reqps", w=8)
    series(b, "Modbus connections and refusals", [
        (f"smallbms_modbus_connections{{{INST}}}", "open"),
        (f"increase(smallbms_modbus_refused_writes_total{{{INST}}}[$__rate_interval])", "refused writes"),
        (f"increase(smallbms_modbus_connections_refused_total{{{INST}}}[$__rate_interval])", "refused connections"),
        (f"sum by (reason) (increase(smallbms_modbus_connections_closed_total{{{INST}}}[$__rate_interval]))",
         "closed: {{reason}}")], w=8)
    series(b, "Store and events", [
        (f"increase(smallbms_store_writes_total{{{INST}}}[$__rate_interval])", "saves"),
        (f"increase(smallbms_store_write_failures_total{{{INST}}}[$__rate_interval])", "failed saves"),
        (f"increase(smallbms_events_total{{{INST}}}[$__rate_interval])", "events"),
        (f"increase(smallbms_task_restarts_total{{{INST}}}[$__rate_interval])", "task restarts")], w=6)
    series(b, "Service CPU", [(f"rate(process_cpu_seconds_total{{{INST}}}[$__rate_interval])", "CPU")],
           unit="percentunit", w=6, description="Share of one CPU core the service uses.")
    series(b, "Scrape cost and decision age", [
        (f"smallbms_metrics_encode_seconds{{{INST}}}", "last scrape encode"),
        (f"smallbms_decision_age_seconds{{{INST}}}", "decision age")], unit="s", w=6,
        description="Decision age grows when the BMS core is stuck (it decides every 0.1 s).")
    series(b, "Service memory", [(f"process_resident_memory_bytes{{{INST}}}", "resident")], unit="bytes", w=6)

    return {
        "__inputs": [], "uid": "smallbms-bus", "title": "smallbms-bus", "description":
        "A software smallBMS NG: bank, batteries, cells, alarms, history, bus and Modbus health (deploy/grafana).",
        "tags": ["smallbms-bus", "battery", "bms"], "timezone": "browser", "editable": True, "graphTooltip": 1,
        "schemaVersion": 39, "version": 1, "refresh": "10s", "time": {"from": "now-1h", "to": "now"},
        "annotations": {"list": []}, "links": [],
        "templating": {"list": [
            {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0, "refresh": 1, "options": []},
            {"name": "site", "label": "Site", "type": "query", "datasource": DS, "refresh": 2,
             "query": {"query": SITES, "refId": "site"}, "definition": SITES, "current": {},
             "multi": False, "includeAll": True, "allValue": ".*", "options": [], "sort": 1, "hide": 0,
             "description": "The site label prometheus.yml gives each installation (deploy/prometheus)."},
            {"name": "instance", "label": "Instance", "type": "query", "datasource": DS, "refresh": 2,
             "query": {"query": INSTANCES, "refId": "instance"}, "definition": INSTANCES, "current": {},
             "multi": False, "includeAll": False, "options": [], "sort": 1, "hide": 0},
            {"name": "battery", "label": "Battery", "type": "query", "datasource": DS, "refresh": 2,
             "query": {"query": 'label_values(smallbms_battery_up{instance=~"$instance"}, battery)',
                       "refId": "battery"},
             "definition": 'label_values(smallbms_battery_up{instance=~"$instance"}, battery)', "current": {},
             "multi": True, "includeAll": True, "allValue": ".+", "options": [], "sort": 3, "hide": 0},
        ]},
        "panels": b.panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed JSON is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if OUT.read_text() != text:
            print(f"{OUT} is stale: run python {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
