"""Issue 14: one owner per fact and neutral seams, checked on the real modules (not on text)."""

from __future__ import annotations

import subprocess
import sys


def _modules_after_import(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return set(out.split())


def test_the_outputs_do_not_import_the_can_link_for_their_backoff():
    loaded = _modules_after_import("smallbms_bus.outputs.controller")
    assert "smallbms_bus.backoff" in loaded
    assert not {m for m in loaded if m.startswith("smallbms_bus.link")}, "outputs/ pulls in the CAN link"


# -- item 2: one protocol table, read from the DBC -------------------------------------------------------
def test_frame_periods_are_the_dbc_cycle_times_as_cantools_reads_them():
    from smallbms_bus.bank import CELLS_PERIOD, TEMPS_PERIOD
    from smallbms_bus.link.codec import load_dbc
    from smallbms_bus.protocol import frame_periods, message_kind
    from smallbms_bus.service import TICK_S
    from smallbms_bus.sim.runner import CELLS_PERIOD_S, SLOW_PERIOD_S, STATUS_PERIOD_S

    db = load_dbc()
    periods = frame_periods()
    for message in db.messages:
        assert periods[message_kind(message.name)[0]] == message.cycle_time / 1000, message.name
    assert (TICK_S, STATUS_PERIOD_S, CELLS_PERIOD_S, SLOW_PERIOD_S) == (0.1, 0.1, 0.5, 1.0)
    assert (CELLS_PERIOD, TEMPS_PERIOD) == (CELLS_PERIOD_S, SLOW_PERIOD_S)
    assert {periods[k] for k in ("BAT_TEMPS", "BAT_INFO", "BAT_SERIAL")} == {SLOW_PERIOD_S}  # one sim stream


def test_the_table_maps_every_signal_of_every_message_once():
    from smallbms_bus.link.codec import PROTOCOL, load_dbc
    from smallbms_bus.protocol import message_kind

    by_kind = {spec.kind: spec for spec in PROTOCOL}
    for message in load_dbc().messages:
        spec = by_kind[message_kind(message.name)[0]]
        mapped = []
        for f in spec.fields:
            mapped += getattr(f, "signals", None) or [f.signal]
        if spec.kind == "BAT_SERIAL":
            assert [f.field for f in spec.fields] == ["part", "chars"]
        assert sorted(mapped) == sorted(s.name for s in message.signals), message.name


def test_every_report_kind_round_trips_through_the_one_table():
    from smallbms_bus.link.codec import FrameDecoder, FrameEncoder
    from smallbms_bus.reports import (
        BatteryInfo,
        BatteryStatus,
        BatteryTemps,
        BmsState,
        CellVoltages,
        SerialFragment,
    )

    reports = [
        BatteryStatus(7, 13.312, -12.5, 24.5, True, False, True, False, True, False, True, 255),
        *(CellVoltages(50, first, (3.301, None, 3.299, 3.3)) for first in (1, 5, 9, 13)),
        BatteryTemps(3, -5.5, 41.2),
        BatteryInfo(2, 4, 200, (1, 2, 3), 5, 1),
        SerialFragment(1, 0, "ABC1234"), SerialFragment(1, 1, "XYZ"),
        BmsState(True, False, True, True, False, False, 57.5, 0x8001, 0x0100, 50, 17),
        BmsState(False, True, False, False, True, True, None, 0, 0, 0, 0),
    ]
    encoder, decoder = FrameEncoder(), FrameDecoder()
    assert [decoder.decode(encoder.encode(r)) for r in reports] == reports
    assert decoder.malformed_total == 0
    # counters and bit words wrap into their signal's width when sent, as before the table
    wrapped = BmsState(True, True, False, True, False, False, 50.0, 0x1_0002, 0x1_0004, 3, 256 + 9)
    assert decoder.decode(encoder.bms_state(wrapped)) == BmsState(True, True, False, True, False, False, 50.0,
                                                                   2, 4, 3, 9)


def test_unit_and_cell_facts_agree_with_the_dbc_and_are_stated_once():
    import tokenize
    from pathlib import Path

    import smallbms_bus
    from smallbms_bus.link.codec import load_dbc
    from smallbms_bus.protocol import CELLS_PER_FRAME, MAX_CELLS, SERIAL_PART_CHARS, VALID_UNITS

    db = load_dbc()
    info = db.get_message_by_name("BAT_INFO_01").get_signal_by_name("NominalVoltage")
    assert tuple(sorted(int(k) for k in info.choices)) == VALID_UNITS
    assert db.get_message_by_name("BAT_SERIAL_01").get_signal_by_name("SerialChars1to7").length == 8 * SERIAL_PART_CHARS
    cells = [s.name for m in db.messages if m.name.startswith("BAT_CELLS_") and m.name.endswith("_01")
             for s in m.signals]
    assert len(cells) == MAX_CELLS and len(db.get_message_by_name("BAT_CELLS_1_4_01").signals) == CELLS_PER_FRAME
    package = Path(smallbms_bus.__file__).parent
    literal = []
    for path in package.rglob("*.py"):
        with path.open("rb") as f:
            literal += [str(path.relative_to(package)) for t in tokenize.tokenize(f.readline)
                        if t.type == tokenize.NUMBER and t.string == "12.8"]
    assert literal == ["protocol.py"], literal


# -- item 3: one vocabulary per concept ----------------------------------------------------------------
def test_output_roles_phases_stale_reasons_and_flags_have_one_definition():
    from smallbms_bus import config, vocabulary
    from smallbms_bus.bank import Bank, BankPhase, StaleReason
    from smallbms_bus.metrics import catalog
    from smallbms_bus.modbus import sources
    from smallbms_bus.outputs import controller
    from smallbms_bus.protocol import FLAG_FIELDS

    assert config.OUTPUT_ROLES is vocabulary.OUTPUT_ROLES and controller.ROLES is vocabulary.OUTPUT_ROLES
    assert catalog.OUTPUT_NAMES is vocabulary.RELAY_ROLES
    assert catalog.BATTERY_FLAGS is FLAG_FIELDS and sources.FLAG_FIELDS is FLAG_FIELDS
    assert tuple(BankPhase) == catalog.PHASES and tuple(StaleReason) == catalog.STALE_REASONS
    bank = Bank(0.0)
    view = bank.evaluate(0.0)
    assert type(view.phase) is BankPhase and view.phase == "waiting"  # a StrEnum: the plain label still matches


def test_the_config_offers_the_backends_the_outputs_registry_has(tmp_path):
    import pytest

    from smallbms_bus.config import ConfigError, load_config
    from smallbms_bus.outputs import BACKENDS

    path = tmp_path / "c.toml"
    path.write_text('[outputs]\nbackend = "nonesuch"\n')
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert all(name in str(error.value) for name in BACKENDS), str(error.value)


def test_modbus_codes_are_pymodbus_exccodes_and_one_table_both_ways():
    from pymodbus.constants import ExcCodes

    from smallbms_bus.bms.alarms import BalancerStatus, Led
    from smallbms_bus.modbus import codes, stats, status, writes
    from smallbms_bus.modbus.regmap import load_map

    assert {writes.ILLEGAL_VALUE, writes.STORE_FAILED, writes.BUSY} <= set(ExcCodes)
    assert stats.outcome_name(ExcCodes.DEVICE_BUSY) == "server_device_busy" and stats.outcome_name(9) == "exception_9"
    assert set(codes.LED_CODES) == set(Led) and set(codes.BALANCER_CODES) == set(BalancerStatus)
    values = {r.name: r.values for b in load_map("native").blocks for r in b.registers}
    # the register map documents the same numbers the server sends and `status` reads back
    assert values["error_led"] == ", ".join(f"{c} {led.value}" for led, c in codes.LED_CODES.items())
    assert values["balancer_status"] == ", ".join(f"{c} {s.value}" for s, c in
                                                  sorted(codes.BALANCER_CODES.items(), key=lambda i: i[1]))
    assert values["allowed_to_discharge"] == ", ".join(f"{c} {t}" for c, t in status.ATD.items())
    assert status.LEDS == {0: "off", 1: "blinking", 2: "solid"}


def test_every_setting_register_reads_and_writes_through_one_descriptor():
    from types import SimpleNamespace

    from smallbms_bus.bms.settings import SPECS, Settings
    from smallbms_bus.modbus import sources, writes
    from smallbms_bus.modbus.regmap import load_map
    from smallbms_bus.modbus.setting_registers import SETTING_REGISTERS

    assert [r.spec for r in SETTING_REGISTERS] == list(SPECS)  # every core setting has its register descriptor
    assert {r.target: r.spec.name for r in SETTING_REGISTERS} == writes.SETTING_TARGETS
    native = {r.source: r for b in load_map("native").blocks for r in b.registers if r.target}
    snap = SimpleNamespace(settings=Settings(), series_units=2)
    for r in SETTING_REGISTERS:
        assert native[r.target].target == r.target, r.target  # read and written under one name
        expected = getattr(Settings(), r.spec.name) * (2 if r.per_unit else 1)
        assert sources.BANK[r.target](snap) == expected, r.target
    assert sources.BANK["charged_voltage"](SimpleNamespace(settings=Settings(), series_units=None)) is None



def test_a_refused_read_is_not_called_a_refused_write():
    from smallbms_bus.modbus.writes import Refused, WriteRefused

    assert issubclass(WriteRefused, Refused) and not issubclass(Refused, WriteRefused)


def test_the_config_asks_the_outputs_registry_which_backends_can_read_the_remote_input(tmp_path):
    import pytest

    from smallbms_bus.config import ConfigError, load_config
    from smallbms_bus.outputs import BACKENDS, may_have_inputs

    assert {b for b in BACKENDS if not may_have_inputs(b)} == {"lcus"}
    path = tmp_path / "c.toml"
    for backend in BACKENDS:
        path.write_text(f'[outputs]\nbackend = "{backend}"\n[remote]\nsource = "board"\nchannel = 1\n')
        if may_have_inputs(backend):
            assert load_config(path)["remote"]["source"] == "board"
        else:
            with pytest.raises(ConfigError, match=r"remote\.source.*LCUS relay boards have no inputs"):
                load_config(path)
