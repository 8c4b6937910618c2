"""What a message on `<prefix>/set/<what>` asks for (smallbms_bus/mqtt/commands.py `parse`): the write path's
(name, target, value) writes, or a refusal naming what is allowed, before anything reaches the BMS."""

from __future__ import annotations

import pytest

from smallbms_bus.bms.core import BmsCore
from smallbms_bus.bms.settings import SPECS
from smallbms_bus.modbus.writes import ILLEGAL_VALUE, WriteRefused, plan_writes
from smallbms_bus.mqtt.commands import parse


@pytest.mark.parametrize(("what", "payload", "writes"), [
    ("mode", b"ON", (("mode", "mode", 1.0),)),
    ("mode", b"off", (("mode", "mode", 0.0),)),
    ("settings/discharge_floor_pct", b"15", (("discharge_floor_pct", "discharge_floor_pct", 15.0),)),
    ("settings/dcl_zero_at_pre_alarm", b"ON", (("dcl_zero_at_pre_alarm", "dcl_zero_at_pre_alarm", 1.0),)),
    ("soc", b" 55.5 ", (("soc", "set_soc", 55.5),)),
    ("command/synchronise_soc", b"PRESS", (("synchronise_soc", "command", 1.0),)),
    ("command/relearn_bank", b"PRESS", (("relearn_bank", "command", 4.0),)),
    ("command/alarm_reset", b"PRESS", (("alarm_reset", "alarm_reset", 1.0),)),
])
def test_a_message_becomes_the_writes_of_the_write_path(what, payload, writes):
    assert parse(what, payload) == writes


@pytest.mark.parametrize(("what", "payload", "says"), [
    ("mode", b"maybe", "ON or OFF"),
    ("settings/nope", b"1", "no such setting"),
    ("settings/discharge_floor_pct", b"lots", "a number"),
    ("settings/discharge_floor_pct", b"nan", "0..99"),
    ("soc", b"101", "0..100"),
    ("command/firmware_update", b"PRESS", "one of alarm_reset"),
    ("reboot", b"1", "one of mode"),
    ("mode", b"ON" * 100, "at most 64 bytes"),
])
def test_a_bad_message_is_refused_naming_what_is_allowed(what, payload, says):
    with pytest.raises(WriteRefused) as refused:
        parse(what, payload)
    assert refused.value.code == ILLEGAL_VALUE and says in str(refused.value)


def test_every_setting_is_checked_by_the_core_in_its_own_unit():
    """A setting by its core name reaches the core's checks unscaled (no bank needed, unlike the Modbus per-bank
    voltages): in range it plans, out of range it is refused with the core's words."""
    core = BmsCore(0.0, 0.0)
    for spec in SPECS:
        assert plan_writes(core, parse(f"settings/{spec.name}", f"{spec.default:g}".encode()), 0.0)
        if spec.choices:
            continue
        with pytest.raises(WriteRefused) as refused:
            plan_writes(core, parse(f"settings/{spec.name}", f"{spec.maximum + 10 * spec.resolution:g}".encode()),
                        0.0)
        assert spec.name in str(refused.value)
