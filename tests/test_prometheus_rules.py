"""deploy/prometheus and deploy/grafana as files: promtool checks the config and rules and runs the rule unit tests;
the dashboard JSON is what its generator writes. (Against a live Prometheus: tests/integration/test_prometheus.py.)"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS_DIR / "smallbms-bus.rules.yml"
RULE_TESTS = PROMETHEUS_DIR / "smallbms-bus.rules.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "smallbms-bus.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (tests/run installs Debian's prometheus package as root)")


def alert_rules(text: str | None = None) -> dict[str, str]:
    """alert name -> expr, from the rules file (one-line exprs: the file's own convention)."""
    text = RULES.read_text() if text is None else text
    return dict(re.findall(r"^\s+- alert: (\w+)\n\s+expr: (.+)$", text, flags=re.MULTILINE))


@needs_promtool
def test_config_and_rules_pass_promtool_check():
    result = subprocess.run([PROMTOOL, "check", "config", "prometheus.yml"], cwd=PROMETHEUS_DIR, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    result = subprocess.run([PROMTOOL, "check", "rules", RULES.name], cwd=PROMETHEUS_DIR, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout  # the line parser sees every rule


@needs_promtool
def test_every_alert_rule_has_a_passing_promtool_unit_test():
    tested = set(re.findall(r"^\s+alertname: (\w+)$", RULE_TESTS.read_text(), flags=re.MULTILINE))
    assert tested == set(alert_rules())
    assert {"SmallBmsExporterDown", "SmallBmsBatteryCommsLost", "SmallBmsChargeNotAllowed",
            "SmallBmsDischargeNotAllowed", "SmallBmsPreAlarm", "SmallBmsLowSoc", "SmallBmsHighTemperature",
            "SmallBmsLowTemperature", "SmallBmsRelayFault", "SmallBmsCellImbalance",
            "SmallBmsNotFullyCharged30Days"} <= tested  # the list
    result = subprocess.run([PROMTOOL, "test", "rules", RULE_TESTS.name], cwd=PROMETHEUS_DIR, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_the_rule_tests_catch_a_wrong_threshold(tmp_path):
    """The unit tests are not vacuous: a rule whose threshold moved fails them."""
    for path in (RULES, RULE_TESTS):
        shutil.copy(path, tmp_path / path.name)
    broken = tmp_path / RULES.name
    broken.write_text(broken.read_text().replace("smallbms_battery_cell_temperature_max_celsius > 45",
                                                 "smallbms_battery_cell_temperature_max_celsius > 47"))
    result = subprocess.run([PROMTOOL, "test", "rules", RULE_TESTS.name], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0 and "SmallBmsHighTemperature" in result.stdout + result.stderr


def test_dashboard_json_is_generated_and_provisionable():
    result = subprocess.run([sys.executable, str(DASHBOARD.with_name("dashboard.py")), "--check"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "smallbms-bus" and "id" not in dashboard  # provisioning assigns the id
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"datasource", "site", "instance", "battery"}
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in panels:
        assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert 'instance=~"$instance"' in target["expr"], (panel["title"], target["expr"])
    kinds = {p["type"] for p in panels}
    assert {"stat", "timeseries", "state-timeline", "heatmap", "table"} <= kinds
    provider = (ROOT / "deploy" / "grafana" / "provisioning" / "dashboards" / "smallbms-bus.yml").read_text()
    assert "type: file" in provider and "apiVersion: 1" in provider


def test_alert_rules_rule_tests_dashboard_and_docs_use_the_exported_label_values():
    """The label values the rules, their promtool tests, the dashboard and the docs select are the ones the service
    exports (one casing: the names of docs/behaviour.md in lower case); a selector with another casing matches
    nothing and its alert never fires."""
    from smallbms_bus.bms.alarms import BmsAlarm, BmsWarning
    from smallbms_bus.metrics import BATTERY_FLAGS

    exported = {"alarm": {a.name.lower() for a in BmsAlarm}, "warning": {w.name.lower() for w in BmsWarning},
                "flag": set(BATTERY_FLAGS)}
    files = [RULES, RULE_TESTS, DASHBOARD, DASHBOARD.with_name("dashboard.py"), ROOT / "docs" / "metrics.md",
             ROOT / "docs" / "behaviour.md", ROOT / "README.md"]
    used = {label: set() for label in exported}
    for path in files:
        for label, value in re.findall(r'\b(alarm|warning|flag)=~?\\?"([^"\\]*)', path.read_text()):
            used[label].add(value)
            assert value in exported[label], f"{path.name}: {label}=\"{value}\" is not a value the service exports"
    assert used["alarm"] and used["warning"]  # the rules do select alarms and warnings by label


SUFFIX_QUANTITY = (("_volts", "V"), ("_amperes", "A"), ("_watts", "W"), ("_percent", "%"), ("_celsius", "°C"),
                   ("_seconds", "s"), ("_bytes", "bytes"), ("_coulombs", "C"), ("_joules", "J"))
# The Grafana unit that shows each quantity (None: Grafana's default, a plain number).
GRAFANA_UNITS = {"V": {"volt"}, "A": {"amp"}, "W": {"watt"}, "%": {"percent"}, "°C": {"celsius"}, "s": {"s"},
                 "bytes": {"bytes"}, "count": {None, "short", "none"}, "count/s": {"pps", "reqps", "ops", "cps"},
                 "s/s": {"percentunit"}}


def quantity(expr: str) -> str:
    """What a dashboard expression measures, from its metric's unit suffix and its rate() or increase()."""
    name = re.search(r"\b((?:smallbms|process)_\w+)", expr)[1].removesuffix("_total")
    base = next((q for suffix, q in SUFFIX_QUANTITY if name.endswith(suffix)), "count")
    return f"{base}/s" if "rate(" in expr else base


def axes(panel: dict) -> dict[str, tuple[set[str], str | None]]:
    """"left"/"right" -> (the quantities of its series, the Grafana unit it shows)."""
    right = {}
    for override in panel["fieldConfig"]["overrides"]:
        props = {p["id"]: p["value"] for p in override["properties"]}
        if override["matcher"]["id"] == "byFrameRefID" and props.get("custom.axisPlacement") == "right":
            right[override["matcher"]["options"]] = props.get("unit")
    out: dict[str, tuple[set[str], str | None]] = {}
    for target in panel["targets"]:
        side = "right" if target["refId"] in right else "left"
        unit = right.get(target["refId"]) if side == "right" else panel["fieldConfig"]["defaults"].get("unit")
        quantities, shown = out.get(side, (set(), unit))
        assert shown == unit, f"{panel['title']}: two units on its {side} axis"
        out[side] = (quantities | {quantity(target["expr"])}, unit)
    return out


def test_every_dashboard_graph_has_one_quantity_per_axis_in_its_own_unit():
    """Two units on one axis flatten the smaller one (W beside %: the SoC is a flat line at the bottom)."""
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        if panel["type"] != "timeseries":
            continue
        for side, (quantities, unit) in axes(panel).items():
            assert len(quantities) == 1, f"{panel['title']}: {sorted(quantities)} on its {side} axis"
            (what,) = quantities
            assert unit in GRAFANA_UNITS[what], f"{panel['title']}: {what} shown in unit {unit!r}"
    assert quantity("rate(process_cpu_seconds_total{x}[1m])") == "s/s"
    assert quantity("smallbms_bank_power_watts{x}") == "W"


def test_every_alert_names_its_site_and_the_rule_tests_prove_it():
    """prometheus.yml gives each installation a `site` target label, so every series and every alert carries it;
    each summary names it (when there is one), and the promtool tests feed series with a site and expect it."""
    summaries = re.findall(r"^\s+summary: (.+)$", RULES.read_text(), flags=re.MULTILINE)
    assert len(summaries) == len(alert_rules())
    assert all("{{ with $labels.site }}" in s for s in summaries), [s for s in summaries if "$labels.site" not in s]
    tests = RULE_TESTS.read_text()
    with_site = set(re.findall(r'^\s+summary: "[^"]*\(site home\)[^"]*"$', tests, flags=re.MULTILINE))
    assert len(with_site) >= len(alert_rules()) - 1  # one rule is tested without a site: no "(site )" then
    assert "site: example" in (PROMETHEUS_DIR / "prometheus.yml").read_text()
