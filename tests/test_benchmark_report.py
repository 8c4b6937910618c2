"""benchmarks/report.py's summary: targets met and missed, read from results shaped as the scripts write them."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _report():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location("bench_report", BENCHMARKS / "report.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


SAMPLE = {
    "ingest": {"results": [{"name": "50 x 12.8 V", "through_core_frames_per_s": 61_000,
                            "decode_plus_bank_frames_per_s": 90_000}]},
    "core": {"results": [{"bank": "50 x 51.2 V (800 cells)", "all_cells_new_ms": 0.61, "status_only_ms": 0.4}]},
    "service": {"results": {
        "startup": {"workload": "w", "ready_median_s": 0.5, "serving_median_s": 0.6},
        "reaction": {"workload": "w", "charge": {"measured": 200, "p50_ms": 0.8, "p99_ms": 3.9, "max_ms": 5.0},
                     "load": {"trials": 50, "measured": 0}},
        "nominal_virtual": {"workload": "w", "cpu_percent_of_one_core": 7.4},
        "nominal_slcan": {"workload": "w", "cpu_percent_of_one_core": 11.3, "peak_rss_mb": 51.5}}},
    "modbus": {"results": {"smallbms-bus": {"32": {"requests_per_s": 20_000, "p50_ms": 1.2, "p99_ms": 12.0}},
                           "bare": {"32": {"requests_per_s": 13_000, "p50_ms": 2.0, "p99_ms": 4.0}}}},
    "metrics": {"results": {"scrape_p50_ms": 8.6, "scrape_p99_ms": 12.4, "cpu_share_at_5s_pct": 0.13}},
}


def test_each_headline_figure_is_judged_against_its_target():
    rows = {r["figure"]: r for r in _report().summary(SAMPLE)}
    assert rows["ingest through decode + bank + core"]["met"] == "yes"
    assert rows["BMS core evaluation"]["met"] == "NO"  # 0.61 ms > 0.5 ms
    assert rows["CellHighVoltage -> charge output command"]["met"] == "yes"
    assert not any(f.startswith("CellLowVoltage") for f in rows)  # no measured trial: no row, not a fake one
    assert rows["CPU at nominal load (virtual bus)"]["met"] == "yes"
    assert rows["CPU at nominal load (SLCAN)"]["met"] == "NO"
    assert rows["peak RSS at nominal load"]["met"] == "yes"
    assert rows["Modbus block-A reads, 32 client(s)"]["met"] == "NO"  # ratio fine, p99 12 ms > 10 ms
    assert rows["/metrics scrape time"]["met"] == "yes"


def test_the_markdown_names_the_command_and_every_row():
    report = _report()
    md = report.to_markdown({"date": "d", "command": "benchmarks/run", "machine": "m",
                             "summary": report.summary(SAMPLE)})
    assert "`benchmarks/run`" in md and md.count("\n| ") == 1 + len(report.summary(SAMPLE))


def test_issue_14_ratios_are_judged_on_both_sides_of_the_same_run():
    """Service CPU against decoding alone, and reaction p99 with clients against without (issue 14 item 7)."""
    service = SAMPLE["service"]["results"]
    results = {**service,
               "nominal_slcan": {**service["nominal_slcan"],
                                 "decode_alone": {"frames": 9000, "cpu_percent_of_one_core": 4.0}},
               "nominal_virtual": {**service["nominal_virtual"],
                                   "decode_alone": {"frames": 9000, "cpu_percent_of_one_core": 3.0,
                                                    "us_per_frame": 2.5},
                                   "receive_alone": {"frames": 9001, "cpu_percent_of_one_core": 2.1,
                                                     "us_per_frame": 27.5}},
               "reaction_quiet": {"workload": "w", "charge": {"measured": 200, "p50_ms": 0.5, "p99_ms": 1.5,
                                                              "max_ms": 2.0}}}
    rows = {r["figure"]: r for r in _report().summary({**SAMPLE, "service": {"results": results}})}
    slcan, virtual = rows["service CPU / decoding alone (SLCAN)"], rows["service CPU / decoding alone (virtual bus)"]
    assert slcan["met"] == "yes" and "11.3 % vs 4.0 %" in slcan["result"] and "2.8 x" in slcan["result"]
    assert virtual["met"] == "NO"  # 2.5 x, but 7.4 % is over the 5 % of a core
    floor = rows["floor: a bare python-can reader / decoding alone (virtual bus)"]
    assert "27.5 us vs 2.5 us a frame = 11.0 x" in floor["result"] and floor["met"] == "n/a"
    assert "floor: a bare python-can reader / decoding alone (SLCAN)" not in rows  # not measured there
    reaction = rows["reaction p99 with clients / without"]
    assert reaction["met"] == "NO" and "3.9 ms vs 1.5 ms = 2.6 x" in reaction["result"]
    assert not any(f.startswith("service CPU /") for f in (r["figure"] for r in _report().summary(SAMPLE)))
