"""Home Assistant's MQTT discovery rules, as its documentation states them (MQTT discovery; the sensor, binary
sensor, switch, number and button integrations; the sensor device classes and the energy dashboard)."""

from __future__ import annotations

import json
import re
from typing import Any

# sensor device class -> the units Home Assistant accepts (a subset of its table: the classes a BMS uses)
SENSOR_UNITS = {"voltage": {"V", "mV", "µV", "kV", "MV"}, "current": {"A", "mA"}, "power": {"W", "kW", "MW", "mW"},
                "energy": {"Wh", "kWh", "MWh", "mWh", "GWh", "J", "kJ", "MJ", "GJ"}, "battery": {"%"},
                "temperature": {"°C", "°F", "K"}, "duration": {"d", "h", "min", "s", "ms"}}
# sensor device class -> the state classes it may have (energy: never measurement)
SENSOR_STATE_CLASSES = {"voltage": {"measurement"}, "current": {"measurement"}, "power": {"measurement"},
                        "energy": {"total", "total_increasing"}, "battery": {"measurement"},
                        "temperature": {"measurement"}, "duration": {"measurement", "total", "total_increasing"}}
STATE_CLASSES = {"measurement", "total", "total_increasing"}
BINARY_DEVICE_CLASSES = {"battery", "battery_charging", "connectivity", "problem", "power", "running", "safety"}
REQUIRED = {"sensor": {"state_topic"}, "binary_sensor": {"state_topic"}, "switch": {"command_topic"},
            "number": {"command_topic"}, "button": {"command_topic"}}
DISCOVERY_TOPIC = re.compile(r"(?P<component>[a-z_]+)/(?:(?P<node>[a-zA-Z0-9_-]+)/)?(?P<object>[a-zA-Z0-9_-]+)/config")
ENTITY_CATEGORIES = {"config", "diagnostic"}


def check_config(topic: str, payload: bytes | str, prefix: str = "homeassistant") -> dict[str, Any]:
    """The parsed config of one discovery message; AssertionError naming the rule it breaks."""
    m = DISCOVERY_TOPIC.fullmatch(topic.removeprefix(prefix + "/")) if topic.startswith(prefix + "/") else None
    assert m, f"{topic}: not {prefix}/<component>/[<node_id>/]<object_id>/config"
    component = m["component"]
    assert component in REQUIRED, f"{topic}: component {component}"
    config = json.loads(payload)
    assert isinstance(config, dict), topic
    missing = REQUIRED[component] - config.keys()
    assert not missing, f"{topic}: missing {missing}"
    assert config.get("unique_id"), f"{topic}: no unique_id (needed for the device registry)"
    device = config.get("device") or {}
    assert device.get("identifiers") or device.get("connections"), f"{topic}: device without identifiers"
    assert config.get("availability_topic"), f"{topic}: no availability"
    if "entity_category" in config:
        assert config["entity_category"] in ENTITY_CATEGORIES, topic
    if component == "sensor":
        _check_sensor(topic, config)
    if component == "binary_sensor" and "device_class" in config:
        assert config["device_class"] in BINARY_DEVICE_CLASSES, f"{topic}: {config['device_class']}"
    if component == "number":
        assert config["min"] < config["max"] and config["step"] > 0, topic
        assert config.get("mode", "auto") in {"auto", "box", "slider"}, topic
    for key in ("state_topic", "command_topic", "availability_topic", "json_attributes_topic"):
        if key in config:
            assert "+" not in config[key] and "#" not in config[key], f"{topic}: {key} has a wildcard"
    return config


def _check_sensor(topic: str, config: dict[str, Any]) -> None:
    device_class, unit, state_class = (config.get(k) for k in ("device_class", "unit_of_measurement", "state_class"))
    if state_class is not None:
        assert state_class in STATE_CLASSES, f"{topic}: state_class {state_class}"
    if device_class is None:
        return
    assert device_class in SENSOR_UNITS, f"{topic}: device_class {device_class}"
    assert unit in SENSOR_UNITS[device_class], f"{topic}: {unit!r} is not a unit of {device_class}"
    if state_class is not None:
        assert state_class in SENSOR_STATE_CLASSES[device_class], f"{topic}: {device_class} with {state_class}"


def energy_dashboard_ok(config: dict[str, Any]) -> bool:
    """What the energy dashboard lists as a battery's energy in or out."""
    return (config.get("device_class") == "energy" and config.get("unit_of_measurement") in {"Wh", "kWh", "MWh"}
            and config.get("state_class") in {"total", "total_increasing"})
