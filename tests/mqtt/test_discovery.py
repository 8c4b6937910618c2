"""Home Assistant discovery as its documentation requires (tests/mqtt/ha_rules.py): required keys, unique ids,
one device per site, device class / unit / state class pairs, energy counters the energy dashboard accepts; and the
settings' numbers take their limits from the settings table (one source of truth)."""

from __future__ import annotations

import json

import pytest

from smallbms_bus.bms.alarms import BmsAlarm, BmsWarning
from smallbms_bus.bms.settings import SPECS
from smallbms_bus.config import parse_config
from smallbms_bus.mqtt.discovery import discovery
from smallbms_bus.mqtt.topics import Names, site_of
from tests.mqtt.ha_rules import check_config, energy_dashboard_ok


def names(text: str = "") -> Names:
    return Names.of(parse_config('[mqtt]\nhost = "b"\n' + text)["mqtt"], "bms-1.example.org")


@pytest.mark.parametrize("commands", [False, True])
def test_every_message_follows_home_assistants_rules_and_ids_are_unique(commands):
    messages = discovery(names(), [1, 2, 3], commands)
    configs = [check_config(topic, payload) for topic, payload in messages.items()]
    ids = [c["unique_id"] for c in configs]
    assert len(ids) == len(set(ids)), "unique ids repeat"
    assert {json.dumps(c["device"], sort_keys=True) for c in configs} == {json.dumps(configs[0]["device"],
                                                                                     sort_keys=True)}
    assert configs[0]["device"]["identifiers"] == ["smallbms_bms-1"]
    components = {topic.split("/")[1] for topic in messages}
    assert components == ({"sensor", "binary_sensor", "switch", "number", "button"} if commands
                          else {"sensor", "binary_sensor"})


def test_the_energy_counters_are_what_the_energy_dashboard_accepts():
    configs = {t.split("/")[3]: json.loads(p) for t, p in discovery(names(), [], False).items()}
    assert energy_dashboard_ok(configs["charged_energy"]) and energy_dashboard_ok(configs["discharged_energy"])
    assert configs["charged_energy"]["value_template"] == "{{ value_json.charged_energy_kwh }}"
    assert configs["soc"]["device_class"] == "battery" and configs["soc"]["unit_of_measurement"] == "%"


def test_every_alarm_and_warning_is_a_binary_sensor():
    topics = discovery(names(), [], False)
    for part, flags in (("alarm", BmsAlarm), ("warning", BmsWarning)):
        for flag in flags:
            config = json.loads(topics[f"homeassistant/binary_sensor/smallbms_bms-1/{part}_{flag.name.lower()}/config"])
            assert flag.name in config["value_template"] and config["device_class"] == "problem"


def test_numbers_take_their_limits_from_the_settings_table():
    configs = {json.loads(p)["command_topic"]: json.loads(p) for t, p in discovery(names(), [], True).items()
               if "/number/" in t}
    plain = [s for s in SPECS if not s.choices]
    assert len(configs) == len(plain)
    for spec in plain:
        config = configs[f"smallbms/bms-1/set/settings/{spec.name}"]
        assert (config["min"], config["max"], config["step"]) == (spec.minimum, spec.maximum, spec.resolution)


def test_discovery_prefix_empty_means_no_messages_and_prefixes_are_configurable():
    assert discovery(names('discovery_prefix = ""\n'), [1], True) == {}
    n = names('site = "cabin"\ntopic_prefix = "fleet/north/cabin"\ndiscovery_prefix = "ha"\nclient_id = "c1"\n')
    messages = discovery(n, [1], False)
    assert all(t.startswith("ha/") and "/smallbms_cabin/" in t for t in messages)
    for topic, payload in messages.items():
        config = check_config(topic, payload, prefix="ha")
        assert config["state_topic"].startswith("fleet/north/cabin/")
    assert n.client_id == "c1" and names().client_id == "smallbms-bms-1"


def test_a_host_name_becomes_a_safe_site():
    assert site_of("pi.local") == "pi" and site_of("bms #2") == "bms__2" and site_of("") == "smallbms"
