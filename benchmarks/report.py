"""One benchmark report: runs every benchmark script, writes benchmarks/results.json and results.md.

    benchmarks/run [--quick] [--faults] [--only NAME ...]

Each script runs as its own process (as documented in its docstring) and hands its figures back in a
JSON file; this collects them, with the machine and the command, into `results.json` and a summary
table against the targets of the issues into `results.md` (the README's Performance section shows
it). `--quick` runs every measurement shorter (a smoke run: the figures are noisier). `--faults`
then runs the long fault campaign (tests/faults) and records its outcome. Benchmarks, not tests:
a missed target is reported, not failed; only a script that crashes makes the exit status non-zero.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# script -> (full arguments, --quick arguments)
SCRIPTS: dict[str, tuple[list[str], list[str]]] = {
    "ingest": (["--seconds", "60", "--repeats", "7"], ["--seconds", "20", "--repeats", "2"]),
    "core": (["--repeats", "7"], ["--repeats", "2"]),
    "service": (["--trials", "200", "--low-trials", "50", "--starts", "5", "--nominal", "60"],
                ["--trials", "40", "--low-trials", "10", "--starts", "2", "--nominal", "15"]),
    "modbus": (["--seconds", "3", "--repeats", "3"], ["--seconds", "1", "--repeats", "1"]),
    "metrics": (["--scrapes", "200"], ["--scrapes", "50"]),
    "inverter": (["--seconds", "600"], ["--seconds", "30"]),  # issue 15: 0x351 gaps under Modbus and scrape load
}
FAULTS_COMMAND = ["bash", "tests/faults/run-long", "-q"]  # about 30 minutes; its figures go to --report FILE


def run_script(name: str, args: list[str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{name}.json"
        command = [sys.executable, str(HERE / f"{name}.py"), *args, "--json", str(out)]
        print(f"\n$ {shlex.join([os.path.relpath(c) if c.startswith(str(ROOT)) else c for c in command[1:]])}",
              flush=True)
        started = time.monotonic()
        subprocess.run(command, check=True, cwd=ROOT)
        data = json.loads(out.read_text())
    return {"command": f"{os.path.relpath(sys.executable, ROOT)} benchmarks/{name}.py {shlex.join(args)}",
            "seconds": round(time.monotonic() - started, 1), "results": data["results"]}


def run_faults() -> dict[str, Any]:
    print(f"\n$ {shlex.join(FAULTS_COMMAND[1:])}", flush=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        figures = Path(tmp) / "faults.json"
        done = subprocess.run([*FAULTS_COMMAND[:2], "--report", str(figures), *FAULTS_COMMAND[2:]], cwd=ROOT,
                              capture_output=True, text=True)
        sys.stdout.write(done.stdout[-6000:])
        report = json.loads(figures.read_text()) if figures.exists() else None
    summary = next((line for line in reversed(done.stdout.splitlines())
                    if " in " in line and (" passed" in line or " failed" in line or " error" in line)), "")
    return {"command": shlex.join(FAULTS_COMMAND[1:]), "exit_status": done.returncode,
            "summary": summary.strip("= "), "seconds": round(time.monotonic() - started, 1), "figures": report}


# -- the summary table ----------------------------------------------------------------------------------------
def _row(figure: str, workload: str, result: str, target: str, met: bool | None) -> dict[str, Any]:
    return {"figure": figure, "workload": workload, "result": result, "target": target,
            "met": "n/a" if met is None else ("yes" if met else "NO")}


def summary(b: dict[str, Any]) -> list[dict[str, Any]]:
    """The headline figures of issue 7 from the scripts' results (a missing script just has no rows)."""
    rows: list[dict[str, Any]] = []
    if "ingest" in b:
        for r in b["ingest"]["results"]:
            rows.append(_row("ingest through decode + bank + core", f"{r['name']}, one core",
                             f"{r['through_core_frames_per_s']:,} frames/s (decode + bank alone "
                             f"{r['decode_plus_bank_frames_per_s']:,})", ">= 50,000 frames/s",
                             r["through_core_frames_per_s"] >= 50_000))
    if "core" in b:
        big = b["core"]["results"][0]
        rows.append(_row("BMS core evaluation", big["bank"], f"{big['all_cells_new_ms']} ms (status only "
                         f"{big['status_only_ms']} ms)", "<= 0.5 ms", big["all_cells_new_ms"] <= 0.5))
    if "service" in b:
        s = b["service"]["results"]
        r = s["reaction"]
        for key, what, rule in (("charge", "CellHighVoltage -> charge output command", "immediate"),
                                ("load", "CellLowVoltage -> load output command, after the 30 s lead",
                                 "beyond the 30 s lead")):
            x = r[key]
            if x.get("measured"):
                rows.append(_row(what, r["workload"], f"p50 {x['p50_ms']} ms, p99 {x['p99_ms']} ms, max "
                                 f"{x['max_ms']} ms ({x['measured']} trials)", f"p99 <= 5 ms {rule}",
                                 x["p99_ms"] <= 5.0))
        st = s["startup"]
        rows.append(_row("start-up to serving", st["workload"], f"{st['serving_median_s']} s median (READY=1 at "
                         f"{st['ready_median_s']} s)", "<= 2 s", st["serving_median_s"] <= 2.0))
        for key, label in (("nominal_virtual", "virtual bus"), ("nominal_slcan", "SLCAN")):
            n = s[key]
            rows.append(_row(f"CPU at nominal load ({label})", n["workload"], f"{n['cpu_percent_of_one_core']} % "
                             "of one core", "<= 10 %", n["cpu_percent_of_one_core"] <= 10.0))
        n = s["nominal_slcan"]
        rows += [_row("peak RSS at nominal load", n["workload"], f"{n['peak_rss_mb']} MB", "<= 80 MB",
                      n["peak_rss_mb"] <= 80.0), *ratio_rows(s)]
    if "modbus" in b:
        m = b["modbus"]["results"]
        ours, bare = m["smallbms-bus"], m["bare"]
        for clients in sorted(ours, key=int):
            o, k = ours[clients], bare[clients]
            ratio = o["requests_per_s"] / k["requests_per_s"]
            p99_ok = o["p99_ms"] <= 10.0 if int(clients) == 32 else True
            rows.append(_row(f"Modbus block-A reads, {clients} client(s)", "the running demo vs a bare pymodbus "
                             "server with a static block, same run", f"{o['requests_per_s']:,.0f} req/s, p50 "
                             f"{o['p50_ms']:.2f} ms, p99 {o['p99_ms']:.2f} ms; bare {k['requests_per_s']:,.0f} "
                             f"req/s; ratio {ratio:.2f}", ">= 0.8 x bare" + (", p99 <= 10 ms" if int(clients) == 32
                                                                          else ""),
                             ratio >= 0.8 and p99_ok))
    if "metrics" in b:
        x = b["metrics"]["results"]
        rows.append(_row("/metrics scrape time", f"50 x 51.2 V, 800 cells, {x.get('series', '?')} series",
                         f"p50 {x['scrape_p50_ms']:.2f} ms, p99 {x['scrape_p99_ms']:.2f} ms",
                         "p50 <= 10 ms", x["scrape_p50_ms"] <= 10.0))
        rows.append(_row("CPU of a 5 s scrape interval", "same", f"{x['cpu_share_at_5s_pct']:.3f} % of one core",
                         "", None))
    if "inverter" in b:
        x = b["inverter"]["results"]
        rows.append(_row("longest gap between two 0x351 (BMS-CAN)", f"{x['seconds']:g} s: {x['workload']}",
                         f"{x['max_gap_s']} s over {x['frames_0x351']} frames (mean {x['mean_gap_s']} s)",
                         "<= 1.5 s", x["max_gap_s"] is not None and x["max_gap_s"] <= 1.5))
    return rows


def ratio_rows(s: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 14's targets as ratios of two figures of the same run (a run without those figures has no rows)."""
    rows: list[dict[str, Any]] = []
    for key, label, bound in (("nominal_slcan", "SLCAN", None), ("nominal_virtual", "virtual bus", 5.0)):
        n = s.get(key, {})
        d = n.get("decode_alone")
        if d is None:
            continue
        ratio = n["cpu_percent_of_one_core"] / max(d["cpu_percent_of_one_core"], 1e-9)
        met = ratio <= 3.0 and (bound is None or n["cpu_percent_of_one_core"] <= bound)
        rows.append(_row(f"service CPU / decoding alone ({label})", n["workload"] + "; vs plain cantools decoding "
                         "of the same frames, same run", f"{n['cpu_percent_of_one_core']} % vs "
                         f"{d['cpu_percent_of_one_core']} % of one core ({d['frames']} frames) = {ratio:.1f} x",
                         "<= 3 x" + (f", <= {bound:g} % of a core" if bound else ""), met))
        r = n.get("receive_alone")
        if r is not None:  # what reading through python-can costs before the BMS does anything
            rows.append(_row(f"floor: a bare python-can reader / decoding alone ({label})",
                             "python-can recv() + cantools decoding of the same traffic at real frame rates, nothing "
                             "else, same run", f"{r['us_per_frame']} us vs {d['us_per_frame']} us a frame = "
                             f"{r['us_per_frame'] / max(d['us_per_frame'], 1e-9):.1f} x "
                             f"({r['cpu_percent_of_one_core']} % of one core)", "", None))
    loaded = s.get("reaction", {}).get("charge", {})
    quiet = s.get("reaction_quiet", {}).get("charge", {})
    if loaded.get("measured") and quiet.get("measured"):
        ratio = loaded["p99_ms"] / max(quiet["p99_ms"], 1e-9)
        rows.append(_row("reaction p99 with clients / without", "CellHighVoltage -> charge output command; 32 "
                         "pollers at 10 Hz and 1 s scrapes vs no client, same run",
                         f"{loaded['p99_ms']} ms vs {quiet['p99_ms']} ms = {ratio:.1f} x", "<= 2 x, <= 20 ms",
                         ratio <= 2.0 and loaded["p99_ms"] <= 20.0))
    return rows


def to_markdown(report: dict[str, Any]) -> str:
    lines = [f"Measured {report['date']} with `{report['command']}` on {report['machine']}.", "",
             "| figure | workload | result | target | met |", "|---|---|---|---|---|"]
    lines += [f"| {r['figure']} | {r['workload']} | {r['result']} | {r['target']} | {r['met']} |"
              for r in report["summary"]]
    if "faults" in report:
        f = report["faults"]
        lines += ["", f"Fault campaign (`{f['command']}`): {f['summary'] or 'no summary'}, exit status "
                      f"{f['exit_status']}, {f['seconds']} s."]
    lines += ["", "Each script's full output, with every run's figures: `results.json`."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (noisier figures)")
    parser.add_argument("--faults", action="store_true", help="also run the long fault campaign")
    parser.add_argument("--only", nargs="+", choices=sorted(SCRIPTS), help="only these benchmarks")
    parser.add_argument("--out", default=str(HERE), help="directory for results.json and results.md")
    args = parser.parse_args(argv)
    command = "benchmarks/run" + (" --quick" if args.quick else "") + (" --faults" if args.faults else "")
    benchmarks: dict[str, Any] = {}
    failed = []
    for name, (full, quick) in SCRIPTS.items():
        if args.only and name not in args.only:
            continue
        try:
            benchmarks[name] = run_script(name, quick if args.quick else full)
        except subprocess.CalledProcessError as error:
            failed.append(name)
            print(f"benchmarks/run: {name} failed with exit status {error.returncode}", file=sys.stderr)
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"), "command": command,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
                   f"{platform.system()} {platform.release()}",
        "benchmarks": benchmarks, "summary": summary(benchmarks), "failed": failed,
    }
    if args.faults:
        report["faults"] = run_faults()
    out = Path(args.out)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "results.md").write_text(to_markdown(report))
    print("\n" + to_markdown(report))
    faults_failed = args.faults and report["faults"]["exit_status"] != 0
    return 1 if failed or faults_failed else 0


if __name__ == "__main__":
    sys.exit(main())
