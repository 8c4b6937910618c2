"""One vocabulary, one truth: the demo's readout, `smallbms-bus status`, the Modbus registers (native and GX) and
the metrics say the same thing for the same decision (issue 13, item 7).

The core runs on an injected clock (tests/bms/rig.py) behind a real Modbus server on a real socket
(tests/modbus/harness.py); `status` runs as a real subprocess against it; the demo prints `format_decision`
and `format_bank` of the service's decision, so those are called on the same decision; the metrics are the
real collector's families of that decision, encoded as the endpoint encodes them and parsed back with
prometheus-client's parser. Between two ticks the decision does not change, so every interface reads the same.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import defaultdict

import pytest

from smallbms_bus.bms.alarms import BusState
from smallbms_bus.metrics import BmsCollector, Snapshot, TextEncoder
from smallbms_bus.modbus.regmap import decode, load_map
from smallbms_bus.outputs.controller import OutputsStatus
from smallbms_bus.readout import format_bank, format_decision
from tests.bms.rig import Rig
from tests.metrics_rig import Scrape
from tests.modbus.harness import RunningServer

GX = 225
NATIVE = {r.name: r for b in load_map("native").blocks if b.name == "A" for r in b.registers}
GX_MAP = {r.name: r for b in load_map("gx").blocks for r in b.registers}


@pytest.fixture
def server():
    running = RunningServer(Rig(2, 2))  # 2S2P 12.8 V 100 Ah: 200 Ah
    try:
        yield running
    finally:
        running.close()


class Views:
    """Every interface's view of the server's current decision."""

    def __init__(self, server: RunningServer) -> None:
        d = server.on_loop(lambda: server.rig.last)
        self.decision = d
        self.readout = format_decision(d) + "\n" + format_bank(d.bank)
        result = subprocess.run([sys.executable, "-m", "smallbms_bus.cli", "status", "--port", str(server.port)],
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        self.status = result.stdout
        client = server.client()
        try:
            self.native = {name: self._read(client, reg, 1) for name, reg in NATIVE.items()
                           if reg.type != "reserved"}
            self.gx = {name: self._read(client, GX_MAP[name], GX) for name in ("consumed_ah", "time_to_go", "soc")}
            self.native_raw = client.read_holding_registers(0, count=40, device_id=1).registers
        finally:
            client.close()
        self.metrics = metrics_of(d)

    @staticmethod
    def _read(client, reg, unit: int):
        reply = client.read_holding_registers(reg.address, count=reg.words, device_id=unit)
        assert not reply.isError(), reply
        return decode(reg, reply.registers)

    def status_line(self, label: str) -> str:
        return next(line for line in self.status.splitlines() if line.startswith(label))

    def readout_field(self, pattern: str) -> str:
        found = re.search(pattern, self.readout)
        assert found, (pattern, self.readout)
        return found.group(1)


def metrics_of(decision) -> Scrape:
    """The collector's families for this decision (the service's counters around it are empty)."""
    outputs = OutputsStatus(fault=None, board_up=True, commanded={}, read_back={}, remote=None, commands=0, faults=0,
                            reconnects=0)
    snapshot = Snapshot(now=decision.now, decision=decision, link=defaultdict(int), link_up=True,
                        link_state=(BusState.UP, ""), bus=("virtual", "test"), outputs=outputs, channels={},
                        store=(0, 0, 0, 1, 0), service=(0, 0, 0), modbus=None, metrics=None)
    families = list(BmsCollector(None).families(snapshot))
    return Scrape(TextEncoder().encode(families).decode())


def series(scrape: Scrape, name: str) -> dict[tuple, float]:
    return {tuple(sorted(labels.items())): value for labels, value in scrape.samples.get(name, [])}


def test_soc_unknown_reads_unknown_everywhere(server):
    """Seen: consumed Ah 0.0 in the demo and metrics, 0xFFFFFFFF on Modbus, "unknown" in status; time remaining
    "not discharging" in status at -100 A; "balancer unknown" without its reason."""
    server.on_loop(server.rig.set_current, -100.0)
    server.tick(60.0)
    v = Views(server)
    assert v.decision.soc is None and v.decision.bank.aggregates.current == -100.0
    # consumed Ah: unknown (Ah drawn since the last full charge cannot be known before one)
    assert v.readout_field(r"consumed (\S+)") == "unknown"
    assert re.search(r"consumed unknown\b", v.status_line("state of charge")), v.status
    assert v.native["consumed_ah"] is None and v.native_raw[8:10] == [0xFFFF, 0xFFFF]
    assert v.gx["consumed_ah"] == 0.0 and v.gx["soc"] == 0.0  # the GX's own "no value": it reads 0 for what it has not
    assert "smallbms_bank_consumed_coulombs" not in v.metrics.samples
    # time remaining: unknown because the SoC is
    text = "unknown (SoC unknown)"
    assert v.readout_field(r"time remaining (unknown \(SoC unknown\)|\S+)") == text
    assert v.status_line("time remaining").split(None, 2)[2] == text
    assert v.native["time_remaining"] is None and v.gx["time_to_go"] == 0.0
    assert "smallbms_bank_time_remaining_seconds" not in v.metrics.samples
    # the balancer: unknown, and why (BAL-1's first condition)
    assert "balancer unknown (SoC unknown)" in v.readout and "balancer unknown (SoC unknown)" in v.status
    assert v.native["balancer_status"] == 0 and v.native["balancer_reason"] == 1
    assert series(v.metrics, "smallbms_balancer_unknown_reason")[(("reason", "soc_unknown"),)] == 1.0
    assert sum(series(v.metrics, "smallbms_balancer_unknown_reason").values()) == 1.0


def test_discharging_with_a_known_soc_reads_the_same_numbers_everywhere(server):
    server.on_loop(server.rig.core.set_soc, 80.0)
    server.on_loop(server.rig.set_current, -100.0)
    server.tick(60.0)
    v = Views(server)
    d = v.decision
    assert d.consumed_ah is not None and 41.0 < d.consumed_ah < 43.0 and d.time_remaining_s is not None
    consumed = f"{d.consumed_ah:.1f} Ah"
    assert v.readout_field(r"consumed (\S+ Ah)") == consumed
    assert f"consumed {consumed}" in v.status_line("state of charge")
    assert v.native["consumed_ah"] == pytest.approx(d.consumed_ah, abs=0.05)
    assert v.gx["consumed_ah"] == pytest.approx(-d.consumed_ah, abs=0.05)  # Victron: Ah drawn is negative
    assert v.metrics.value("smallbms_bank_consumed_coulombs") == pytest.approx(d.consumed_ah * 3600)
    remaining = v.readout_field(r"time remaining (\d+h\d\dm)")
    assert v.status_line("time remaining").split(None, 2)[2] == remaining
    assert v.native["time_remaining"] == round(d.time_remaining_s)
    assert v.gx["time_to_go"] == pytest.approx(d.time_remaining_s, abs=50)  # the GX counts in 100 s
    assert v.metrics.value("smallbms_bank_time_remaining_seconds") == pytest.approx(d.time_remaining_s)
    hours, minutes = divmod(int(d.time_remaining_s) // 60, 60)
    assert remaining == f"{hours}h{minutes:02d}m"
    text = "balancer unknown (never fully charged)"
    assert text in v.readout and text in v.status and v.native["balancer_reason"] == 2
    assert series(v.metrics, "smallbms_balancer_unknown_reason")[(("reason", "never_fully_charged"),)] == 1.0


def test_not_discharging_reads_infinite_everywhere(server):
    server.on_loop(server.rig.core.set_soc, 80.0)
    server.on_loop(server.rig.set_current, 20.0)
    server.tick(10.0)
    v = Views(server)
    assert v.decision.time_remaining_s == float("inf")
    text = "infinite (not discharging)"
    assert v.readout_field(r"time remaining (infinite \(not discharging\)|\S+)") == text
    assert v.status_line("time remaining").split(None, 2)[2] == text
    assert v.native["time_remaining"] is None  # the marker: infinite while the SoC register is known
    assert v.native["soc"] == pytest.approx(v.decision.soc, abs=0.05)
    assert v.metrics.value("smallbms_bank_time_remaining_seconds") == float("inf")


def test_a_battery_flag_is_quoted_as_the_battery_s_flag_with_the_real_cell_value(server):
    """Seen: "cell 4 at 3.712 V (>= 3.75 V)" when battery 2's own CellHighVoltage fired, not the 3.75 V rule."""
    battery = server.rig.battery(2)
    battery.cells[3] = 3.712
    battery.flags["cell_high_voltage"] = True
    server.tick(1.0)
    v = Views(server)
    reason = v.decision.reasons["CELL_HIGH_VOLTAGE"]
    assert reason.startswith("battery 2 reports CellHighVoltage (its own threshold); highest cell 3.712 V "
                             "(battery 2 cell 4)"), reason
    assert ">= 3.75" not in reason
    assert f"CELL_HIGH_VOLTAGE: {reason}" in v.readout
    assert "CELL_HIGH_VOLTAGE" in v.status_line("alarms")
    assert re.search(r"\.\. 3\.712 V", v.status_line("cell voltage")), v.status
    assert "max 3.712 V (battery 2 cell 4)" in v.readout
    assert v.native["max_cell_voltage"] == pytest.approx(3.712) and v.native["alarms"] & 0b10
    assert v.metrics.value("smallbms_bank_cell_voltage_max_volts") == pytest.approx(3.712)
    alarm = {labels["alarm"].lower(): value for labels, value in v.metrics.samples["smallbms_alarm"]}
    assert alarm["cell_high_voltage"] == 1.0
    # the value rule fires too once the cell reaches 3.75 V: both are said
    battery.cells[3] = 3.760
    server.tick(0.2)
    reason = server.on_loop(lambda: server.rig.last).reasons["CELL_HIGH_VOLTAGE"]
    assert reason.startswith("battery 2 reports CellHighVoltage (its own threshold); cell 4 of battery 2 at "
                             "3.760 V (>= 3.75 V)"), reason
    # the flag gone and the cell back in the hysteresis band: held, said as held
    battery.flags["cell_high_voltage"] = False
    battery.cells[3] = 3.70
    reason = server.on_loop(lambda: server.rig.run(3.0)).reasons["CELL_HIGH_VOLTAGE"]
    assert reason == "held until every cell is <= 3.60 V and no battery reports CellHighVoltage; highest cell " \
                     "3.700 V (battery 2 cell 4)", reason


def test_stale_reasons_and_bank_issues_are_human_text_and_the_metric_keeps_the_code(server):
    server.on_loop(setattr, server.rig.battery(3), "silent", True)
    server.tick(6.0)
    v = Views(server)
    reason = v.decision.reasons["BATTERY_COMMS_LOST"]
    assert re.fullmatch(r"battery 3: no BAT_STATUS for [56]\.\d s \(comm_timeout 5 s\)", reason), reason
    assert "status_timeout" not in v.readout and "STALE: no BAT_STATUS for" in v.readout
    stale = {labels["battery"]: labels["reason"] for labels, _ in v.metrics.samples["smallbms_battery_stale_reason"]}
    assert stale == {"3": "status_timeout"}  # a machine label, documented in docs/metrics.md
    server.on_loop(setattr, server.rig.battery(3), "silent", False)
    server.on_loop(setattr, server.rig.battery(4), "capacity", 200)  # a battery of another capacity: BANK-3
    server.tick(3.0)
    v = Views(server)
    assert "issue    batteries of mixed capacity: 100 Ah x3, 200 Ah x1" in v.readout
    assert not re.search(r"issue    \w+_\w+:", v.readout), v.readout
