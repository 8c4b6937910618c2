"""The repository documents itself: README.md and docs/*.md link only to what a clone has, and the numbers and
tables of docs/behaviour.md are the code's (thresholds, settings, alarm and warning bits)."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

from smallbms_bus.bank import (
    DEFAULT_DISCOVERY_WINDOW,
    DEFAULT_WAITING_GRACE,
    MAX_BATTERIES_BY_UNITS,
    MAX_SERIES_UNITS,
    PROTECTIVE_MEMORY_S,
    UNIT_VOLTAGE,
)
from smallbms_bus.bms import charge as charging
from smallbms_bus.bms import core, history, monitor, rules
from smallbms_bus.bms.alarms import AtdState, BmsAlarm, BmsWarning
from smallbms_bus.bms.monitor import PULSE_LIMITS_A
from smallbms_bus.bms.settings import SPEC_BY_NAME, SPECS
from smallbms_bus.config import SCHEMA, ConfigError
from smallbms_bus.link.bus import SEND_DEADLINE_S
from smallbms_bus.link.codec import load_dbc
from smallbms_bus.modbus.regmap import load_map
from smallbms_bus.modbus.writes import COMMANDS, ILLEGAL_VALUE, SETTING_TARGETS, STORE_FAILED
from smallbms_bus.store import EVENT_LOG_SIZE

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
# The team's working notes beside the repository: a user's clone has none of them.
TEAM_FILES = re.compile(r"\.\./shared|\b(?:BEHAVIOUR|PROTOCOL|REGISTERS|DESIGN|LIBRARY_NOTES|INVERTER_CAN)\.md\b")
DOC_PATH = re.compile(r"(?<![\w/.-])((?:docs|deploy|tests|register_maps|dbc|benchmarks|smallbms_bus)/[\w./@-]*\w)")
CREATED_BY_A_RUN = {"tests/vcan/.venv"}  # made by tests/vcan/run-in-vm, not committed


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|<[^>]+>", "", heading).strip().lower()
    text = "".join(c for c in text if c in " -" or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    in_code = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        base = slug(line.lstrip("#"))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def prose(page: Path) -> str:
    """The page without fenced code blocks (commands there may name paths of an installation)."""
    return re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_no_page_points_outside_the_repository(page):
    found = [m.group(0) for m in TEAM_FILES.finditer(page.read_text())]
    assert not found, f"{page.name} names files a clone does not have: {sorted(set(found))}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists() or (ROOT not in file.parents and file != ROOT):
            broken.append(f"{target}: no such file in the repository")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: {file.name} has no heading #{anchor}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_repository_path_named_exists(page):
    missing = sorted({p for p in DOC_PATH.findall(prose(page))
                      if p not in CREATED_BY_A_RUN and not (ROOT / p.split("#")[0].split("::")[0]).exists()})
    assert not missing, f"{page.name} names paths the repository does not have: {missing}"


def test_the_link_check_catches_a_broken_link_and_anchor(tmp_path):
    """The checks above are not vacuous."""
    assert slug("When the store fails") == "when-the-store-fails"
    assert slug("Settings (SET): `mode` & more") == "settings-set-mode--more"
    assert "signals" in anchors(ROOT / "docs" / "store.md")
    assert TEAM_FILES.search("see ../shared/spec/BEHAVIOUR.md") and not TEAM_FILES.search("docs/behaviour.md")


# -- docs/behaviour.md: every number is the code's ------------------------------------------------------------------

BEHAVIOUR = ROOT / "docs" / "behaviour.md"
NUMBER = re.compile(r"(?<![\w])(?<!\d\.)-?\d+(?:\.\d+)?(?!\.?\d|x)")
# What is not a quantity: code spans, ALARM_NAMES, rule ids and id ranges (PRE-1..3), link targets.
NOT_QUANTITIES = re.compile(r"`[^`]*`|\]\([^)]*\)|\b[A-Z]+-\d+(?:\.\.\d+)?\b|\b[A-Z][A-Z0-9]*_[A-Z0-9_]+\b")
ALWAYS_FINE = {0.0, 100.0}  # SoC := 100 %, consumed Ah := 0, "0 turns it off": definitions, not thresholds
RULE = re.compile(r"^- \*\*([A-Z]+-\d+)\*\* ")


def numbers(text: str) -> set[float]:
    return {float(n) for n in NUMBER.findall(NOT_QUANTITIES.sub(" ", text))}


def behaviour_parts() -> tuple[dict[str, str], dict[str, str], dict[str, list[list[str]]]]:
    """(rule id -> its text, section title -> its other prose, table header -> rows of cells)."""
    rules: dict[str, str] = {}
    prose_of: dict[str, str] = {"": ""}
    tables: dict[str, list[list[str]]] = {}
    section, current, header = "", None, None
    for line in BEHAVIOUR.read_text().splitlines():
        if line.startswith("#"):
            section, current, header = line.lstrip("# ").strip(), None, None
            prose_of.setdefault(section, "")
            continue
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if header is None:
                header = " | ".join(cells)
                assert header not in tables, f"two tables headed {header!r}"
                tables[header] = []
            elif not set(line) <= set("|-: "):
                tables[header].append(cells)
            current = None
            continue
        header = None
        match = RULE.match(line)
        if match:
            current = match[1]
            assert current not in rules, f"{current} twice"
            rules[current] = line[match.end():]
        elif current is not None and line.startswith("  "):
            rules[current] += " " + line.strip()
        else:
            current = None
            prose_of[section] += " " + line
    return rules, prose_of, tables


def native_address(**match: str) -> int:

    found = [address for address, _, reg in load_map("native").registers()
             if all(getattr(reg, k) == v for k, v in match.items())]
    assert len(found) == 1, match
    return found[0]


def expected_rule_numbers() -> dict[str, list[float]]:

    spec = SPEC_BY_NAME
    command = {name: code for code, name in COMMANDS.items()}
    comm = SCHEMA["bms"]["comm_timeout"]
    limits = [n for units, most in MAX_BATTERIES_BY_UNITS.items() for n in (most, units * UNIT_VOLTAGE)]
    return {
        "OUT-1": [], "OUT-2": [], "OUT-3": [], "OUT-4": [], "OUT-5": [SCHEMA["outputs"]["reassert_every"].default],
        "ATC-1": [rules.CELL_HIGH_SET_V, rules.CELL_HIGH_CLEAR_V], "ATC-2": [rules.CHARGE_TEMP_LOW_SET_C,
                                                                          rules.CHARGE_TEMP_LOW_CLEAR_C],
        "ATC-3": [rules.CHARGE_TEMP_HIGH_SET_C, rules.CHARGE_TEMP_HIGH_CLEAR_C], "ATC-4": [], "ATC-5": [],
        "ATD-1": [rules.CELL_LOW_SET_V, rules.PRE_ALARM_LEAD_S, rules.CELL_LOW_CLEAR_V],
        "ATD-2": [spec["discharge_floor_pct"].default, rules.SOC_CLEAR_MARGIN_PCT], "ATD-3": [],
        "PRE-1": [spec["pre_alarm_level_per_cell"].default, spec["pre_alarm_level_per_cell"].minimum,
                  spec["pre_alarm_level_per_cell"].maximum, rules.PRE_ALARM_CLEAR_V],
        "PRE-2": [spec["low_soc_warning_pct"].default, rules.SOC_CLEAR_MARGIN_PCT],
        "PRE-3": [rules.PRE_ALARM_LEAD_S, rules.CELL_LOW_CLEAR_V], "PRE-4": [AtdState.PRE_ALARM.value],
        "REM-1": [], "REM-2": [], "REM-3": [],
        "COM-1": [comm.default, *_range_of(comm)], "COM-2": [rules.COMMS_RECOVERY_S], "COM-3": [], "COM-4": [],
        "COM-5": [SEND_DEADLINE_S], "COM-6": [],
        "BANK-1": [], "BANK-2": [DEFAULT_DISCOVERY_WINDOW, DEFAULT_WAITING_GRACE],
        "BANK-3": [*limits, MAX_SERIES_UNITS, UNIT_VOLTAGE], "BANK-4": [], "BANK-5": [],
        "MON-1": [monitor.CHARGE_EFFICIENCY * 100, monitor.PEUKERT_EXPONENT, monitor.ZERO_CURRENT_A],
        "MON-2": [], "MON-3": [], "MON-4": [], "MON-5": [monitor.TIME_REMAINING_WINDOW_S / 60], "MON-6": [],
        "MON-7": [monitor.CONTINUOUS_C_RATE, monitor.CONTINUOUS_HOLD_S, monitor.PULSE_HOLD_S,
                  *monitor.UNLISTED_PULSE_C],
        # exception codes of the write path; the exit statuses are the CLI's (tests/test_cli.py, store tests)
        "SET-1": [ILLEGAL_VALUE], "SET-2": [], "SET-3": [STORE_FAILED], "SET-4": [2, 1],
        "BAL-1": [history.BALANCE_INFO_MAX_AGE_S / 86400, rules.CELL_SPREAD_IMBALANCED_V],
        "FW-1": [command["begin firmware update"]],
        "FW-2": [rules.FIRMWARE_UPDATE_TIMEOUT_S, command["abort firmware update"]],
        "LED-1": [], "LED-2": [core.MODBUS_CLIENT_RECENT_S],
        "CHG-1": [charging.ABSORPTION_WINDOW_V_PER_UNIT, UNIT_VOLTAGE, core.NOT_FULLY_CHARGED_S / 86400,
                  charging.CCL_CELL_FULL_V],
        "CHG-2": [charging.CELL_LIMIT_SET_V, charging.CELL_LIMIT_MAX_DROP_V_PER_UNIT, charging.CELL_LIMIT_CLEAR_V],
        "CHG-3": [monitor.CONTINUOUS_C_RATE, charging.CHARGE_TEMP_ZERO_BELOW_C, charging.CHARGE_TEMP_FULL_FROM_C,
                  charging.CHARGE_TEMP_FULL_UNTIL_C, charging.CHARGE_TEMP_ZERO_AT_C, charging.CCL_CELL_FULL_V,
                  charging.CCL_CELL_MIN_FACTOR, charging.CCL_CELL_MIN_V],
        "CHG-4": [monitor.CONTINUOUS_C_RATE, charging.DCL_CELL_FULL_V, charging.DCL_CELL_MIN_FACTOR,
                  charging.DCL_CELL_MIN_V],
        "CHG-5": [charging.DVL_V_PER_CELL, charging.CELLS_PER_UNIT, UNIT_VOLTAGE], "CHG-6": [],
        "CHG-7": [charging.RISE_PER_S * 100, monitor.CONTINUOUS_C_RATE],
    }


def _range_of(key) -> tuple[float, float]:
    """The range a config key's check allows, read from its own refusal."""

    try:
        key.check("k", -1e9)
    except ConfigError as error:
        low, high = re.search(r"in (-?[\d.]+)\.\.(-?[\d.]+)", error.allowed).groups()
        return float(low), float(high)
    raise AssertionError("no range")


def test_every_rule_is_there_once_with_the_codes_numbers():
    rules, _, _ = behaviour_parts()
    expected = expected_rule_numbers()
    assert set(rules) == set(expected), (set(rules) ^ set(expected))
    wrong = {rule: (sorted(numbers(text) - ALWAYS_FINE), sorted(set(expected[rule])))
             for rule, text in rules.items() if numbers(text) - ALWAYS_FINE != set(expected[rule]) - ALWAYS_FINE}
    assert not wrong, "rule: (numbers in docs/behaviour.md, numbers of the code): " + repr(wrong)


def test_the_prose_numbers_are_the_codes():

    state = load_dbc(None).get_message_by_name("BMS_STATE")
    byte_spans = [n for name in ("Alarms", "Warnings") for s in [state.get_signal_by_name(name)]
                  for n in (s.start // 8, (s.start + s.length) // 8 - 1)]
    expected = {
        "": [], "How the BMS behaves": [], "Terms": [PROTECTIVE_MEMORY_S], "Thresholds": [],
        "Outputs (OUT)": [], "Charge side (ATC)": [], "Discharge side (ATD) and pre-alarm (PRE)": [],
        "Mode and remote on/off (REM)": [], "Communication (COM)": [], "Bank (BANK)": [],
        "Battery monitor (MON)": [],
        "Settings (SET)": [UNIT_VOLTAGE, 2 * UNIT_VOLTAGE, 2 * SPEC_BY_NAME["charged_voltage_per_unit"].default,
                           native_address(name="mode"), native_address(name="command"),
                           native_address(name="set_soc")],
        "History (HIS)": [history.CYCLE_LOW_SOC, history.CYCLE_HIGH_SOC, history.FULL_DISCHARGE_REARM_SOC],
        "Balancer status (BAL)": [], "Firmware update (FW)": [], "LEDs (LED)": [],
        "Events": [EVENT_LOG_SIZE],
        "Alarm and warning bits": [native_address(name="alarms"), native_address(name="warnings"), 802,
                                   *byte_spans],
        "Charge control (CHG)": [],
    }
    _, prose_of, _ = behaviour_parts()
    assert set(prose_of) == set(expected), set(prose_of) ^ set(expected)
    wrong = {title: (sorted(numbers(text) - ALWAYS_FINE), sorted(set(expected[title]) - ALWAYS_FINE))
             for title, text in prose_of.items() if numbers(text) - ALWAYS_FINE != set(expected[title]) - ALWAYS_FINE}
    assert not wrong, "section: (numbers in docs/behaviour.md, numbers of the code): " + repr(wrong)


def test_the_thresholds_table_is_the_cores():

    expected = {
        "cell high voltage": [rules.CELL_HIGH_SET_V, rules.CELL_HIGH_CLEAR_V],
        "cell undervoltage": [rules.CELL_LOW_SET_V, rules.CELL_LOW_CLEAR_V, rules.PRE_ALARM_LEAD_S],
        "cell pre-alarm": [SPEC_BY_NAME["pre_alarm_level_per_cell"].default, rules.PRE_ALARM_CLEAR_V],
        "charge temperature, low": [rules.CHARGE_TEMP_LOW_SET_C, rules.CHARGE_TEMP_LOW_CLEAR_C],
        "charge temperature, high": [rules.CHARGE_TEMP_HIGH_SET_C, rules.CHARGE_TEMP_HIGH_CLEAR_C],
        "discharge temperature": [rules.DISCHARGE_TEMP_MIN_C, rules.DISCHARGE_TEMP_MAX_C,
                                  rules.DISCHARGE_TEMP_MIN_C + rules.DISCHARGE_TEMP_HYSTERESIS_C,
                                  rules.DISCHARGE_TEMP_MAX_C - rules.DISCHARGE_TEMP_HYSTERESIS_C],
        "discharge floor": [SPEC_BY_NAME["discharge_floor_pct"].default, rules.SOC_CLEAR_MARGIN_PCT],
        "low-SoC warning": [SPEC_BY_NAME["low_soc_warning_pct"].default, rules.SOC_CLEAR_MARGIN_PCT],
        "communication": [SCHEMA["bms"]["comm_timeout"].default, rules.COMMS_RECOVERY_S],
        "current, continuous": [monitor.CONTINUOUS_C_RATE, monitor.CONTINUOUS_HOLD_S],
        "current, pulse": [monitor.PULSE_HOLD_S, monitor.CONTINUOUS_C_RATE],
        "firmware update": [rules.FIRMWARE_UPDATE_TIMEOUT_S],
    }
    _, _, tables = behaviour_parts()
    rows = tables["condition | set | clear | raises | action"]
    assert [r[0] for r in rows] == list(expected)
    for row in rows:
        assert numbers(" ".join(row)) - ALWAYS_FINE == set(expected[row[0]]), row


def test_the_settings_table_is_the_cores_and_the_register_maps():

    _, _, tables = behaviour_parts()
    rows = {r[0]: r for r in tables["setting | register | default | range | what it does"]}
    assert list(rows) == [s.label for s in SPECS]  # every setting, in the core's order
    by_setting = {setting: target for target, setting in SETTING_TARGETS.items()}
    for spec in SPECS:
        _, register, default, allowed, _ = rows[spec.label]
        target = by_setting[spec.name]
        assert register == f"{native_address(target=target)} `{target}`", register
        assert float(NUMBER.findall(default)[0]) == spec.default, (spec.name, default)
        low, high = (float(n) for n in NUMBER.findall(allowed)[:2])
        assert (low, high) == (spec.minimum, spec.maximum), (spec.name, allowed)


def test_the_command_and_pulse_tables_are_the_codes():

    _, _, tables = behaviour_parts()
    assert {int(r[0]): r[1] for r in tables["value | command | rule"]} == COMMANDS
    pulses = {}
    for model, discharge, charge in tables["battery model | pulse discharge (10 s) | pulse charge (10 s)"]:
        volts, ah = (float(n) for n in NUMBER.findall(model))
        pulses[(round(volts / UNIT_VOLTAGE), int(ah))] = (float(NUMBER.findall(discharge)[0]),
                                                          float(NUMBER.findall(charge)[0]))
    assert pulses == PULSE_LIMITS_A


def test_the_alarm_and_warning_bit_tables_are_alarms_py():

    _, _, tables = behaviour_parts()
    for kind, flags in (("alarm", BmsAlarm), ("warning", BmsWarning)):
        rows = tables[f"bit | value | {kind} | what happened | what the BMS did" if kind == "alarm"
                      else f"bit | value | {kind} | what it means | what the BMS did"]
        documented = [(int(r[0]), int(r[1], 16), r[2].strip("`")) for r in rows]
        assert documented == [(m.value.bit_length() - 1, m.value, m.name) for m in flags], kind
        assert all(r[3] and r[4] for r in rows), f"every {kind} says what it means and what the BMS did"


def test_every_table_of_behaviour_md_is_checked():
    _, _, tables = behaviour_parts()
    assert set(tables) == {
        "condition | set | clear | raises | action", "setting | register | default | range | what it does",
        "value | command | rule", "battery model | pulse discharge (10 s) | pulse charge (10 s)",
        "bit | value | alarm | what happened | what the BMS did",
        "bit | value | warning | what it means | what the BMS did"}


def test_the_number_check_is_not_vacuous():
    assert numbers("at or above 3.75 V, clears at 3.60 V (PRE-1..3), 0x0001, `CELL_HIGH_VOLTAGE`, 1C") == \
        {3.75, 3.6, 1.0}
    assert numbers("-19 .. 49 °C, 1..50, NOT_FULLY_CHARGED_30_DAYS") == {-19.0, 49.0, 1.0, 50.0}


# -- docs/protocol.md: the DBC, as the service reads it ----------------------------------------------------------------

PROTOCOL = ROOT / "docs" / "protocol.md"
UNITS = {"V": "V", "A": "A", "°C": "degC", "%": "%", "Ah": "Ah", "": None}


def protocol_tables() -> dict[str, list[list[str]]]:
    """Heading (or "messages") -> rows of the table under it."""
    tables: dict[str, list[list[str]]] = {}
    heading = ""
    for line in PROTOCOL.read_text().splitlines():
        if line.startswith("#"):
            heading = line.lstrip("# ").split(" (")[0].strip()
        elif line.startswith("|") and not set(line) <= set("|-: "):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if cells[0] in ("bits", "base"):
                continue  # the header
            tables.setdefault(heading, []).append(cells)
    return tables


def test_protocol_md_messages_are_the_dbcs():

    db = load_dbc(None)
    rows = protocol_tables()["Messages"]
    documented = {r[1]: (int(r[0], 16), int(r[3].split()[0])) for r in rows}
    per_node = {m.name.rsplit("_", 1)[0] for m in db.messages if m.name.endswith("_01")}
    assert set(documented) == per_node | {"BMS_STATE"}
    for name, (base, period) in documented.items():
        message = db.get_message_by_name(name if name == "BMS_STATE" else f"{name}_01")
        assert message.frame_id == (base if name == "BMS_STATE" else base + 1), name
        assert message.cycle_time == period, name
        assert message.length == 8


@pytest.mark.parametrize("message", ["BAT_STATUS", "BAT_CELLS_1_4", "BAT_TEMPS", "BAT_INFO", "BAT_SERIAL",
                                     "BMS_STATE"])
def test_protocol_md_signals_are_the_dbcs(message):

    dbc = load_dbc(None).get_message_by_name(message if message == "BMS_STATE" else f"{message}_01")
    rows = protocol_tables()[message]
    assert sorted(r[1] for r in rows) == sorted(s.name for s in dbc.signals)  # every signal, once
    for bits, name, kind, scale, unit, valid, _ in rows:
        signal = dbc.get_signal_by_name(name)
        first, _, last = bits.partition("-")
        assert (int(first), int(last or first)) == (signal.start, signal.start + signal.length - 1), name
        if kind in ("uint8", "uint16", "int16"):
            assert (kind.startswith("int"), int(kind.lstrip("uint"))) == (signal.is_signed, signal.length), name
            assert float(scale) == signal.scale and UNITS[unit] == signal.unit, name
        if valid:
            low, high = (float(n) for n in valid.split(".."))
            assert (low, high) == (signal.minimum, signal.maximum), name
        else:
            assert signal.minimum is None and signal.maximum is None, f"{name}: the DBC has a valid range"
