"""A real Prometheus (Debian's package) scraping `smallbms-bus demo` with the deployed scrape config and alert
rules: every dashboard expression and every alert rule's selector returns data."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from tests.metrics_rig import scrape
from tests.ports import free_port
from tests.test_prometheus_rules import DASHBOARD, PROMETHEUS_DIR, RULES, alert_rules

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None or shutil.which("promtool") is None,
    reason="Debian's prometheus package is not installed (tests/run installs it with apt-get when run as root)")

RATE_WINDOW = "10s"  # $__rate_interval at the 1 s scrape interval used here
COMPARISON = re.compile(r"^(?P<selector>.+?)\s+(?P<op>==|!=|>=|<=|>|<)\s+(?P<threshold>-?[0-9.]+)$")
# Dashboard expressions a few seconds of demo cannot give data, and why (each still has to be a valid query).
NO_DATA_IN_A_DEMO = {
    "smallbms_history_last_full_charge_timestamp_seconds": "no full charge yet: MON-2 needs the charged voltage "
                                                            "held for the charged-detection time (>= 1 min)",
}


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(f"{p['title']}/{t['refId']}", t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]


def promql(base: str, query: str) -> list[dict]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=10) as response:
        answer = json.load(response)
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def wait_for_data(base: str, query: str, timeout: float = 15.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        result = promql(base, query)
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.5)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    port = free_port()
    logs = tmp_path_factory.mktemp("demo")
    out, err = (logs / "stdout").open("w+"), (logs / "stderr").open("w+")
    command = [sys.executable, "-m", "smallbms_bus.cli", "demo", "--web-port", "0", "--metrics-port", str(port),
               "--soc", "60", "--scenario", "discharge", "--every", "60", "--modbus-port", str(free_port())]
    process = subprocess.Popen(command, stdout=out, stderr=err, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        deadline = time.monotonic() + 30
        while True:  # the demo learns its bank in 10 s (discovery window), then SoC is set
            assert process.poll() is None, (logs / "stderr").read_text()
            try:
                s = scrape(url)
                if s.series("smallbms_bank_state_of_charge_percent"):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the demo did not start: " + (logs / "stderr").read_text()[-2000:]
            time.sleep(0.3)
        modbus = re.search(r"Modbus: serving ([\d.]+):(\d+)", (logs / "stderr").read_text())
        yield {"port": port, "url": url, "stdout": logs / "stdout", "modbus": modbus and (modbus[1], int(modbus[2]))}
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        finally:
            if process.poll() is None:
                process.kill()
        out.close()
        err.close()


@pytest.fixture(scope="module")
def prometheus(demo, tmp_path_factory):
    work = tmp_path_factory.mktemp("prometheus")
    config = (PROMETHEUS_DIR / "prometheus.yml").read_text()
    for old, new in (("127.0.0.1:9108", f"127.0.0.1:{demo['port']}"), ("scrape_interval: 5s", "scrape_interval: 1s"),
                     ("evaluation_interval: 5s", "evaluation_interval: 1s"),
                     ("scrape_timeout: 4s", "scrape_timeout: 1s"), ("- smallbms-bus.rules.yml", f"- {RULES}")):
        assert old in config, old  # the deployed file, changed only where a test must be faster
        config = config.replace(old, new)
    (work / "prometheus.yml").write_text(config)
    port = free_port()
    log = (work / "log").open("w")
    process = subprocess.Popen([PROMETHEUS, f"--config.file={work / 'prometheus.yml'}",
                                f"--storage.tsdb.path={work / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                               stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, (work / "log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, (work / "log").read_text()[-3000:]
            time.sleep(0.2)
        if demo["modbus"] is not None:  # give the Modbus panels requests to count
            from pymodbus.client import ModbusTcpClient

            client = ModbusTcpClient(demo["modbus"][0], port=demo["modbus"][1], timeout=5)
            if client.connect():
                for _ in range(3):
                    client.read_holding_registers(0, count=2, device_id=1)
                    time.sleep(1)
                client.close()
        # two scrapes after the start at least, so rate() and increase() have two points
        assert wait_for_data(base, 'count_over_time(smallbms_bms_started{job="smallbms-bus"}[1m]) >= 3', 20)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=20)
        log.close()


def test_the_demo_prints_its_metrics_url(demo):
    assert f"metrics: {demo['url']}" in demo["stdout"].read_text()


def test_prometheus_scrapes_the_demo_with_the_deployed_config(prometheus, demo):
    (up,) = promql(prometheus, 'up{job="smallbms-bus"}')
    assert up["value"][1] == "1" and up["metric"]["instance"] == f"127.0.0.1:{demo['port']}"
    assert up["metric"]["site"] == "example"
    cells = promql(prometheus, 'count(smallbms_cell_voltage_volts{job="smallbms-bus"})')
    assert cells[0]["value"][1] == "16"  # the demo's 2s2p bank of 12.8 V batteries


def test_the_alert_rules_load_and_evaluate(prometheus):
    deadline = time.monotonic() + 15
    while True:
        with urllib.request.urlopen(f"{prometheus}/api/v1/rules", timeout=10) as response:
            groups = json.load(response)["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        if rules and all(not r.get("lastEvaluation", "0001").startswith("0001") for r in rules):  # all evaluated
            break
        assert time.monotonic() < deadline, rules
        time.sleep(0.5)
    assert {r["name"] for r in rules} == set(alert_rules())
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]


@pytest.mark.parametrize(("alert", "expr"), sorted(alert_rules().items()))
def test_alert_rule_selects_real_series(prometheus, alert, expr):
    """The rule with `bool` returns 0/1 for every series it watches: its selector matches what the demo exports."""
    match = COMPARISON.match(expr)
    assert match, f"{alert}: expr is not '<selector> <comparison> <number>': {expr}"
    result = wait_for_data(prometheus, f"{match['selector']} {match['op']} bool {match['threshold']}")
    assert result, f"{alert}: {match['selector']} matches no series"


@pytest.mark.parametrize(("panel", "expr"), dashboard_queries())
def test_dashboard_query_returns_data(prometheus, demo, panel, expr):
    query = expr.replace("$instance", f"127.0.0.1:{demo['port']}").replace("$battery", ".+") \
        .replace("$__rate_interval", RATE_WINDOW)
    assert "$" not in query, query
    result = wait_for_data(prometheus, query, timeout=10)  # a query error raises in promql()
    if not result:
        for name, why in NO_DATA_IN_A_DEMO.items():
            if name in expr:
                pytest.skip(f"{panel}: {why}")
        if "smallbms_modbus_requests_total" in expr and demo["modbus"] is None:
            pytest.skip(f"{panel}: the demo serves no Modbus here (its port could not be bound), so no requests")
    assert result, f"{panel}: no data for {query}"


def test_dashboard_variables_find_the_demo_by_its_site(prometheus, demo):
    """The Site variable lists the site label of the deployed scrape config, and the Instance variable of that site
    is the demo (Grafana's label_values(selector, label), run as the selector's query)."""
    variables = {v["name"]: v for v in json.loads(DASHBOARD.read_text())["templating"]["list"]}
    values = {"site": "", "instance": ""}
    for name in ("site", "instance", "battery"):
        selector, label = re.fullmatch(r"label_values\((.+), (\w+)\)", variables[name]["query"]["query"]).groups()
        selector = selector.replace("$site", values["site"]).replace("$instance", values["instance"])
        found = {series["metric"].get(label) for series in wait_for_data(prometheus, selector)}
        assert found and None not in found, (name, selector)
        values[name] = sorted(found)[0]
    assert values["site"] == "example" and values["instance"] == f"127.0.0.1:{demo['port']}"
    assert values["battery"] == "1"
