"""Home Assistant MQTT discovery: one device per site, its entities as retained config messages (pure).

Every entity's config goes to `<discovery_prefix>/<component>/<node_id>/<object_id>/config` with a
unique id `<node_id>_<object_id>`, the site's device block, the availability topic and the state topic
it reads (a JSON part of the state, picked by `value_template`). Sensors carry the device class, unit
and state class pairs Home Assistant accepts (its sensor documentation): voltages V, currents A, power
W, temperatures degC and the SoC % are `measurement`; the energy counters are kWh `total_increasing`,
which is what the energy dashboard's battery section needs. Binary sensors show each alarm and warning.
With `[mqtt] commands = true` the device also gets a switch for the mode, numbers (or switches for on/off
settings) for the settings, with min/max/step from `bms/settings.py` SPECS, and buttons for commands.

The messages are part of the snapshot the client publishes (`MqttFrontEnd.messages`): the per-battery
entities follow the bank, and those of a battery that left are cleared like its state topic.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from smallbms_bus import __version__
from smallbms_bus.bms.alarms import BmsAlarm, BmsWarning
from smallbms_bus.bms.settings import SPECS
from smallbms_bus.mqtt.topics import AVAILABILITY, SET, Names, dumps
from smallbms_bus.protocol import PER_UNIT

V = {"device_class": "voltage", "unit_of_measurement": "V", "state_class": "measurement"}
A = {"device_class": "current", "unit_of_measurement": "A", "state_class": "measurement"}
W = {"device_class": "power", "unit_of_measurement": "W", "state_class": "measurement"}
C = {"device_class": "temperature", "unit_of_measurement": "°C", "state_class": "measurement"}
KWH = {"device_class": "energy", "unit_of_measurement": "kWh", "state_class": "total_increasing"}
DIAGNOSTIC = {"entity_category": "diagnostic"}

# (object id, name, part, JSON key, extra config)
BANK_SENSORS: tuple[tuple[str, str, str, str, dict[str, Any]], ...] = (
    ("voltage", "Voltage", "bank", "voltage", V),
    ("current", "Current", "bank", "current", A),
    ("power", "Power", "bank", "power", W),
    ("soc", "State of charge", "bank", "soc", {"device_class": "battery", "unit_of_measurement": "%",
                                               "state_class": "measurement"}),
    ("consumed_ah", "Consumed", "bank", "consumed_ah", {"unit_of_measurement": "Ah", "state_class": "measurement",
                                                        "icon": "mdi:battery-minus"}),
    ("time_remaining", "Time remaining", "bank", "time_remaining_s",
     {"device_class": "duration", "unit_of_measurement": "s", "state_class": "measurement"}),
    ("min_cell_voltage", "Lowest cell", "bank", "min_cell_voltage", V),
    ("max_cell_voltage", "Highest cell", "bank", "max_cell_voltage", V),
    ("cell_spread", "Cell spread", "bank", "cell_spread", V),
    ("min_cell_temperature", "Lowest cell temperature", "bank", "min_cell_temperature", C),
    ("max_cell_temperature", "Highest cell temperature", "bank", "max_cell_temperature", C),
    ("min_battery_temperature", "Lowest battery temperature", "bank", "min_battery_temperature", C),
    ("max_battery_temperature", "Highest battery temperature", "bank", "max_battery_temperature", C),
    ("charged_energy", "Energy charged", "history", "charged_energy_kwh", KWH),
    ("discharged_energy", "Energy discharged", "history", "discharged_energy_kwh", KWH),
    ("ah_drawn", "Ah drawn", "history", "cumulative_ah_drawn", {"unit_of_measurement": "Ah",
                                                                "state_class": "total_increasing"}),
    ("charge_cycles", "Charge cycles", "history", "charge_cycles", {"state_class": "total_increasing", **DIAGNOSTIC}),
    ("full_discharges", "Full discharges", "history", "full_discharges",
     {"state_class": "total_increasing", **DIAGNOSTIC}),
    ("cvl", "Charge voltage limit", "charge", "cvl", V),
    ("ccl", "Charge current limit", "charge", "ccl", A),
    ("dcl", "Discharge current limit", "charge", "dcl", A),
    ("charge_state", "Charge state", "charge", "state", {"icon": "mdi:battery-charging"}),
    ("bank_phase", "Bank", "bank", "phase", DIAGNOSTIC),
    ("balancer", "Balancer", "state", "balancer", DIAGNOSTIC),
)
# (object id, name, part, JSON key, device class or "")
STATE_BINARY: tuple[tuple[str, str, str, str, str], ...] = (
    ("atc", "Allowed to charge", "state", "atc", ""),
    ("atd", "Allowed to discharge", "state", "atd", ""),
    ("pre_alarm", "Pre-alarm", "state", "pre_alarm", "problem"),
    ("mode", "Mode on", "state", "mode_on", ""),
    ("battery_link", "Battery link", "state", "link_up", "connectivity"),
    ("load_output", "Load output", "outputs", "load_disconnect", "power"),
    ("charge_output", "Charge output", "outputs", "charge_disconnect", "power"),
)
# (object id, name, JSON key, extra config) of each battery's sensors
BATTERY_SENSORS: tuple[tuple[str, str, str, dict[str, Any]], ...] = (
    ("voltage", "voltage", "voltage", V),
    ("current", "current", "current", A),
    ("temperature", "temperature", "temperature", C),
    ("min_cell_voltage", "lowest cell", "min_cell_voltage", V),
    ("max_cell_voltage", "highest cell", "max_cell_voltage", V),
)
# button object id -> (name, the write topic's last level)
BUTTONS = {"synchronise_soc": "Synchronise SoC to 100 %", "reset_history": "Reset history",
           "reset_settings": "Reset settings", "relearn_bank": "Re-learn bank", "alarm_reset": "Reset alarms"}


def _device(names: Names) -> dict[str, Any]:
    return {"identifiers": [names.node_id], "name": f"smallbms {names.site}", "manufacturer": "smallbms-bus",
            "model": "smallbms-bus BMS service", "sw_version": __version__}


class _Builder:
    def __init__(self, names: Names) -> None:
        self.names = names
        self.device = _device(names)
        self.out: dict[str, str] = {}

    def add(self, component: str, object_id: str, name: str, config: dict[str, Any]) -> None:
        n = self.names
        payload = {"name": name, "unique_id": f"{n.node_id}_{object_id}", "object_id": f"{n.node_id}_{object_id}",
                   "device": self.device, "availability_topic": n.topic(AVAILABILITY),
                   "origin": {"name": "smallbms-bus", "sw_version": __version__}, **config}
        self.out[f"{n.discovery_prefix}/{component}/{n.node_id}/{object_id}/config"] = dumps(payload)

    def sensor(self, object_id: str, name: str, part: str, key: str, extra: dict[str, Any]) -> None:
        self.add("sensor", object_id, name, {"state_topic": self.names.topic(part),
                                             "value_template": f"{{{{ value_json.{key} }}}}", **extra})

    def binary(self, object_id: str, name: str, topic: str, template: str, device_class: str,
               extra: dict[str, Any] | None = None) -> None:
        config: dict[str, Any] = {"state_topic": topic, "value_template": template, "payload_on": "ON",
                                  "payload_off": "OFF", **(extra or {})}
        if device_class:
            config["device_class"] = device_class
        self.add("binary_sensor", object_id, name, config)


def discovery(names: Names, batteries: Iterable[int], commands: bool) -> dict[str, str]:
    """Every discovery config message of the site (topic -> JSON); empty when discovery is off."""
    if not names.discovery_prefix:
        return {}
    b = _Builder(names)
    for object_id, name, part, key, extra in BANK_SENSORS:
        b.sensor(object_id, name, part, key, extra)
    for object_id, name, part, key, device_class in STATE_BINARY:
        b.binary(object_id, name, names.topic(part), f"{{{{ 'ON' if value_json.{key} else 'OFF' }}}}", device_class)
    for part, flags in (("alarms", BmsAlarm), ("warnings", BmsWarning)):
        for flag in flags:
            label = (flag.name or "").lower()
            b.binary(f"{part[:-1]}_{label}", f"{'Alarm' if part == 'alarms' else 'Warning'} "
                     f"{label.replace('_', ' ')}", names.topic(part),
                     f"{{{{ 'ON' if '{flag.name}' in value_json.active else 'OFF' }}}}", "problem",
                     {"json_attributes_topic": names.topic(part)})
    for node in sorted(batteries):
        for object_id, name, key, extra in BATTERY_SENSORS:
            b.sensor(f"battery{node}_{object_id}", f"Battery {node} {name}", f"battery/{node}", key, extra)
    if commands:
        _commands(b)
    return b.out


def _label(name: str, label: str) -> str:
    """A setting's name as Home Assistant shows it: what its number is of."""
    per = f" {PER_UNIT}" if name.endswith("_per_unit") else " per cell" if name.endswith("_per_cell") else ""
    return label.capitalize() + per


def _commands(b: _Builder) -> None:
    n = b.names
    b.add("switch", "mode_switch", "Mode", {
        "command_topic": n.topic(SET, "mode"), "state_topic": n.topic("state"),
        "value_template": "{{ 'ON' if value_json.mode_on else 'OFF' }}", "payload_on": "ON", "payload_off": "OFF",
        "state_on": "ON", "state_off": "OFF", "icon": "mdi:power"})
    for spec in SPECS:
        common = {"command_topic": n.topic(SET, "settings", spec.name), "state_topic": n.topic("settings"),
                  "entity_category": "config"}
        if spec.choices:  # an on/off setting
            b.add("switch", spec.name, spec.label.capitalize(), {
                **common, "value_template": f"{{{{ 'ON' if value_json.{spec.name} else 'OFF' }}}}",
                "payload_on": "1", "payload_off": "0", "state_on": "ON", "state_off": "OFF"})
            continue
        config: dict[str, Any] = {**common, "value_template": f"{{{{ value_json.{spec.name} }}}}",
                                  "min": spec.minimum, "max": spec.maximum, "step": spec.resolution, "mode": "box"}
        if spec.unit:
            config["unit_of_measurement"] = spec.unit
        b.add("number", spec.name, _label(spec.name, spec.label), config)
    for object_id, name in BUTTONS.items():
        b.add("button", object_id, name, {"command_topic": n.topic(SET, "command", object_id),
                                          "payload_press": "PRESS", "entity_category": "config"})
