"""The core's rules are tables (bms/rules.py) that docs/core.md shows row for row, and the core stays small."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from smallbms_bus.bms import core, rules
from smallbms_bus.bms.alarms import BmsAlarm, BmsWarning

ROOT = Path(__file__).resolve().parents[2]
BMS = ROOT / "smallbms_bus" / "bms"


def _doc_table(first_header: str, second_header: str) -> list[list[str]]:
    """The rows of the docs/core.md table whose header starts with these two columns."""
    rows: list[list[str]] = []
    inside = False
    for line in (ROOT / "docs" / "core.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[:2] == [first_header, second_header]:
            inside = True
            continue
        if inside and not line.startswith("|"):
            break
        if inside and not set(line) <= set("|-"):
            rows.append(cells)
    return rows


def test_the_latch_table_in_the_docs_is_the_codes():
    rows = _doc_table("rule", "latch")
    shown = [(r[0], r[1].strip("`"), None if r[2] == "-" else r[2].strip("`")) for r in rows]
    assert shown == [(latch.rule, latch.name, latch.flag) for latch in rules.LATCH_TABLE]
    for row, latch in zip(rows, rules.LATCH_TABLE, strict=True):
        if latch.bit is not None:  # the bit it raises is named in the row
            kind = "alarm" if isinstance(latch.bit, BmsAlarm) else "warning"
            assert f"{kind} `{latch.bit.name}`" in row[5], row
    assert tuple(core.BmsCore(0.0, 0.0).latched) == core.LATCHES, "the snapshot's latched keys are the table's"


def test_the_alarm_table_in_the_docs_is_the_codes_and_covers_every_alarm():
    shown = [(r[0], r[1].strip("`"), r[2] == "yes", r[3] == "yes") for r in _doc_table("rule", "alarm")]
    assert shown == [(a.rule, a.bit.name, a.blocks_charge, a.blocks_discharge) for a in rules.ALARM_TABLE]
    assert [a.bit for a in rules.ALARM_TABLE] == list(BmsAlarm)


def test_blocking_masks_are_the_atc_and_atd_rules():
    # ATC-1..3 and ATC-5 (plus comms and bank, which block both); ATD-1..3, FW-2; RELAY_FAULT blocks neither.
    assert rules.CHARGE_BLOCKERS == (BmsAlarm.CELL_HIGH_VOLTAGE | BmsAlarm.LOW_TEMPERATURE_CHARGE
                                     | BmsAlarm.HIGH_TEMPERATURE_CHARGE | BmsAlarm.BATTERY_COMMS_LOST
                                     | BmsAlarm.BANK_CONFIGURATION | BmsAlarm.BATTERY_FAULT)
    assert rules.DISCHARGE_BLOCKERS == (BmsAlarm.CELL_LOW_VOLTAGE | BmsAlarm.LOW_SOC | BmsAlarm.BATTERY_COMMS_LOST
                                        | BmsAlarm.BANK_CONFIGURATION | BmsAlarm.BATTERY_FAULT
                                        | BmsAlarm.FIRMWARE_UPDATE_FAILED)


def test_every_latch_bit_and_pre_alarm_cause_is_a_real_member():
    names = {latch.name for latch in rules.LATCH_TABLE}
    assert {name for _, name in rules.PRE_ALARM_CAUSES} <= names
    for latch in rules.LATCH_TABLE:
        assert latch.bit is None or latch.bit in (*BmsAlarm, *BmsWarning)
        assert re.fullmatch(r"[A-Z]+(-\d+)?|[A-Z_]+", latch.rule), latch.rule


def _functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]


def test_the_core_is_small_functions_in_small_modules():
    too_long = []
    for path in sorted(BMS.glob("*.py")):
        text = path.read_text()
        assert len(text.splitlines()) <= 600, f"{path.name}: {len(text.splitlines())} lines"
        for fn in _functions(ast.parse(text)):
            length = (fn.end_lineno or fn.lineno) - fn.lineno + 1
            if length > 60:
                too_long.append(f"{path.name}:{fn.name} {length} lines")
    assert not too_long


def test_evaluate_is_its_seven_steps_none_over_40_lines():
    tree = ast.parse((BMS / "core.py").read_text())
    methods = {fn.name: fn for fn in _functions(tree)}
    calls = [c.func.attr for c in ast.walk(methods["evaluate"]) if isinstance(c, ast.Call)
             and isinstance(c.func, ast.Attribute) and isinstance(c.func.value, ast.Name) and c.func.value.id == "self"]
    steps = ["_start_up", "_latch_step", "_faults", "_monitor", "_pre_alarm", "_allowed", "_report"]
    assert [c for c in calls if c in steps] == steps
    for name in ["evaluate", *steps]:
        fn = methods[name]
        assert (fn.end_lineno or fn.lineno) - fn.lineno + 1 <= 40, name
