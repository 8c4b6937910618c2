"""The register map files: valid, single-sourced, documented, and SunSpec-exact."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import sunspec2
from hypothesis import given
from hypothesis import strategies as st

from smallbms_bus.cli import main
from smallbms_bus.modbus.regmap import (
    MAP_NAMES,
    TYPES,
    PlacedBlock,
    Register,
    RegisterMapError,
    decode,
    encode,
    load_maps,
    parse_map,
    to_markdown,
    validate,
)
from smallbms_bus.modbus.sources import known_sources
from smallbms_bus.modbus.writes import TARGETS, target_range

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", MAP_NAMES)
def test_every_shipped_map_is_valid(name):
    regmap = load_maps()[name]
    validate(regmap, known_sources(), set(TARGETS), nodes=tuple(range(1, 51)))


def _map(registers: str, *, start: int = 0, length: int = 2, extra: str = "") -> str:
    return (f'[map]\nname = "t"\n[[block]]\nname = "X"\nstart = {start}\nlength = {length}\n{extra}'
            f"registers = [\n{registers}\n]\n")


@pytest.mark.parametrize(("text", "message"), [
    (_map('{ address = 0, name = "a", type = "uint32", source = "voltage" },\n'
          '{ address = 1, name = "b", type = "uint16", source = "voltage" }'), "overlaps"),
    (_map('{ address = 0, name = "a", type = "uint16", source = "voltage" }'), "gap at address 1"),
    (_map('{ address = 0, name = "a", type = "uint16", source = "voltage" },\n'
          '{ address = 1, name = "b", type = "uint16", source = "no_such_field" }'), "does not exist"),
    (_map('{ address = 0, name = "a", type = "uint16", source = "voltage" },\n'
          '{ address = 1, name = "b", type = "uint16", access = "rw", source = "mode", target = "launch" }'),
     "target 'launch' does not exist"),
    (_map('{ address = 0, name = "a", type = "uint16", source = "voltage" },\n'
          '{ address = 2, name = "b", type = "uint16", source = "voltage" }'), "outside the block"),
    (_map('{ address = 0, name = "a", type = "float", source = "voltage" }', length=1), "type 'float'"),
    (_map('{ address = 0, name = "a", type = "uint16" }', length=1), "needs a source or a value"),
    (_map('{ address = 0, name = "a", type = "uint32", access = "rw", source = "mode", target = "mode" }'),
     "single-word"),
])
def test_validation_refuses_each_kind_of_broken_map(text, message):
    with pytest.raises(RegisterMapError, match=message):
        validate(parse_map(text, "test"), known_sources(), set(TARGETS))


def test_two_blocks_that_overlap_are_refused():
    text = (_map('{ address = 0, name = "a", type = "uint32", source = "voltage" }')
            + '[[block]]\nname = "Y"\nstart = 1\nlength = 1\n'
              'registers = [ { address = 1, name = "b", type = "uint16", source = "soc" } ]\n')
    with pytest.raises(RegisterMapError, match="block Y at 1 overlaps block X"):
        validate(parse_map(text, "test"), known_sources(), set(TARGETS))


def test_native_map_addresses_are_those_of_registers_md():
    native = load_maps()["native"]
    at = {address: reg.name for address, _, reg in native.registers()}
    assert (at[0], at[2], at[4], at[13], at[33], at[34]) == ("map_version", "voltage", "current", "min_cell_voltage",
                                                             "heartbeat", "uptime")
    assert (at[100], at[105], at[120], at[121], at[200], at[221]) == (
        "charged_voltage", "mode", "command", "set_soc", "deepest_discharge", "max_temperature")
    assert (at[1000], at[1007], at[1022], at[1038], at[1040 * 1 + 0], at[2960 + 38]) == (
        "serial", "presence", "cell_1", "data_age", "serial", "data_age")


@given(st.sampled_from([t for t in TYPES if t not in ("string", "reserved", "pad", "acc32", "sunssf")]),
       st.integers(-(1 << 31), (1 << 32) - 1), st.sampled_from([1.0, 0.1, 0.01, 0.001, 10.0]))
def test_encode_then_decode_gives_the_value_back_or_the_nearer_limit(kind, raw, scale):
    """A value that does not fit reads as the type's limit (never the not-available marker, never 0)."""
    words, signed, marker = TYPES[kind]
    reg = Register(0, "r", kind, words, scale=scale)
    bits = 16 * words
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    encoded = encode(reg, raw * scale, "sentinel")
    assert len(encoded) == words and all(0 <= w <= 0xFFFF for w in encoded)
    back = decode(reg, encoded)
    if low <= raw <= high and (raw if raw >= 0 else raw + (1 << bits)) != marker:
        assert back == pytest.approx(raw * scale)
    elif low <= raw <= high:
        assert back is None  # the marker itself, as a map's constant uses it
    else:
        limit = (high - 1 if marker == high else high) if raw > high else (low + 1 if signed else low)
        assert back == pytest.approx(limit * scale)


def test_strings_are_two_ascii_characters_per_register_high_byte_first():
    reg = Register(0, "s", "string", 3)
    assert encode(reg, "HQ1", "sentinel") == [0x4851, 0x3100, 0]
    assert decode(reg, [0x4851, 0x3100, 0]) == "HQ1"


def test_docs_registers_md_is_generated_from_the_maps():
    expected = to_markdown(list(load_maps().values()), target_range)
    assert (ROOT / "docs" / "registers.md").read_text() == expected, (
        "docs/registers.md is stale: run `smallbms-bus regmap --format md > docs/registers.md`")


def test_regmap_command_exports_csv_json_and_md(capsys):
    assert main(["regmap", "--format", "csv", "--map", "native"]) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    native = load_maps()["native"]
    assert len(table) == sum(1 for _ in native.registers())
    assert {r["name"] for r in table} >= {"voltage", "battery_50.cell_16", "mode"}
    row = next(r for r in table if r["name"] == "charged_voltage")
    assert (row["address"], row["register"], row["access"], row["range"]) == (
        "100", "101", "rw", "13.00-14.60 V x 12.8 V units in series")
    assert main(["regmap", "--format", "json", "--map", "sunspec", "--batteries", "3"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert sum(1 for r in rows if r["name"].endswith(".ID")) == 3  # one model 805 per battery
    assert rows[-1]["name"] == "end_L" and rows[-1]["address"] == 40000 + 2 + 68 + 64 + 3 * (44 + 4 * 4) + 1
    assert main(["regmap", "--format", "json", "--map", "sunspec", "--batteries", "2", "--cells", "16"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[-1]["address"] == 40000 + 2 + 68 + 64 + 2 * (44 + 4 * 16) + 1
    assert sum(1 for r in rows if r["name"].startswith("battery_2.CellV_") and r["name"][-1].isdigit()) == 16
    assert main(["regmap", "--format", "md", "--map", "gx"]) == 0
    assert "(`gx`, unit from `modbus.gx_unit`)" in capsys.readouterr().out


def test_one_source_of_truth_no_register_address_is_written_twice():
    """Addresses live in register_maps/ only: the Python package names none of REGISTERS.md's registers."""
    offenders = []
    for path in (ROOT / "smallbms_bus").rglob("*.py"):
        text = path.read_text()
        for literal in ("40000", "1322", "1297", "1298"):
            if literal in text and path.name not in ("writes.py",):
                offenders.append(f"{path.relative_to(ROOT)}: {literal}")
    assert not offenders, offenders


@pytest.mark.parametrize("model_id", [1, 802, 805])
def test_sunspec_models_match_pysunspec2_definitions(model_id):
    """Point names, order, sizes and scale factors against SunSpec's own model definitions."""
    path = Path(sunspec2.__file__).parent / "models" / "json" / f"model_{model_id}.json"
    definition = json.loads(path.read_text())
    group = definition["group"]
    expected = [(p["name"], p.get("size", 1), p.get("sf")) for p in group["points"]]
    block = next(b for b in load_maps()["sunspec"].blocks if b.name == f"model_{model_id}")
    for cells in (4, 8, 16) if model_id == 805 else (0,):
        listed = list(expected)
        if model_id == 805:
            cell = group["groups"][0]
            listed += [(f"{p['name']}_{i + 1}", p.get("size", 1), p.get("sf")) for i in range(cells)
                       for p in cell["points"]]
        placed = PlacedBlock(block, 0, 0, 1, cells)
        ours = sorted(placed.registers, key=lambda r: r.address)
        assert [(r.name, r.words) for r in ours] == [(n, s) for n, s, _ in listed]
        assert ours[1].value == block.length - 2 if model_id != 805 else ours[1].source == "model.length"  # L
        assert placed.length == sum(s for _, s, _ in listed)
        for reg, (_, _, sf) in zip(ours, listed, strict=True):
            if reg.source is not None and reg.type != "sunssf":
                assert reg.sf == sf, f"{reg.name}: scale factor {reg.sf} vs SunSpec's {sf}"


def test_setting_registers_use_the_resolution_of_the_core_specs():
    """The register scale is the step a PLC can set; the core's SPECS must agree on it."""
    from smallbms_bus.bms.settings import SPEC_BY_NAME
    from smallbms_bus.modbus.writes import SETTING_TARGETS

    native = load_maps()["native"]
    checked = 0
    for _, _, reg in native.registers():
        if reg.target in SETTING_TARGETS:
            assert reg.scale == SPEC_BY_NAME[SETTING_TARGETS[reg.target]].resolution, reg.name
            checked += 1
    assert checked == len(SETTING_TARGETS)
