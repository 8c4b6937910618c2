"""`smallbms-bus run` with [mqtt] against a real Mosquitto, observed by a real paho client: the state follows the
simulated bank, writes over MQTT go through the write path (read back over Modbus), refused ones change nothing,
and a broker killed mid-run costs no protection and gets the retained state again when it is back."""

from __future__ import annotations

import contextlib
import json
import signal
import sqlite3
import subprocess
import urllib.request
from pathlib import Path

from pymodbus.client import ModbusTcpClient

from smallbms_bus.sim.relay_boards import VirtualModbusTcpModule
from smallbms_bus.sim.slcan_hub import SlcanHub
from tests.integration.test_run_process import (  # noqa: F401 (rig is a fixture)
    CHARGE,
    CMD,
    LOAD,
    rig,
    start,
    wait_for,
    write_config,
)
from tests.mqtt.broker import Mosquitto, Observer, needs_mosquitto, tear_down
from tests.mqtt.ha_rules import check_config
from tests.ports import free_port

pytestmark = needs_mosquitto


def with_mqtt(config, port: int, site: str, commands: bool) -> int:
    """Adds [mqtt] to the rig's configuration; returns the service's Modbus port."""
    text = config.read_text()
    config.write_text(text + f'\n[mqtt]\nhost = "127.0.0.1"\nport = {port}\nsite = "{site}"\n'
                             f'commands = {str(commands).lower()}\npublish_period = 0.5\n')
    return int(text.split("[modbus]")[1].split("port = ")[1].split()[0])


def stop(service: subprocess.Popen) -> str:
    service.send_signal(signal.SIGTERM)
    try:
        _, err = service.communicate(timeout=30)
    finally:
        if service.poll() is None:
            service.kill()
    assert service.returncode == 0, err
    return err


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
        return page.read().decode()


def modbus(port: int) -> ModbusTcpClient:
    client = ModbusTcpClient("127.0.0.1", port=port, timeout=3)
    assert client.connect()
    return client


def test_state_follows_the_bank_and_a_setting_written_over_mqtt_reads_back_over_modbus(rig, tmp_path):  # noqa: F811
    config, module, _ = rig
    broker = Mosquitto(tmp_path).start()
    port = with_mqtt(config, broker.port, "home", commands=True)
    observer = Observer(broker.port)
    service = start(config)
    try:
        observer.wait(lambda: observer.retained["smallbms/home/status"] == b"online", 30, "online")
        bank = observer.wait(lambda: (b := observer.json("smallbms/home/bank")) and b["phase"] == "learned" and b,
                             30, "the learned bank")
        assert bank["batteries"] == 2 and bank["cells"] == 8 and 24 < bank["voltage"] < 29
        assert json.loads(observer.retained["smallbms/home/battery/1"])["cells"][0] > 3.0
        # discovery as Home Assistant reads it from the broker: every message follows its rules, one device
        discovered = observer.wait(lambda: (d := {t: p for t, p in observer.retained.items()
                                                  if t.startswith("homeassistant/")})
                                   and "homeassistant/sensor/smallbms_home/battery2_voltage/config" in d and d,
                                   30, "discovery of both batteries")
        configs = [check_config(t, p) for t, p in discovered.items()]
        assert len({c["unique_id"] for c in configs}) == len(configs)
        assert {c["device"]["identifiers"][0] for c in configs} == {"smallbms_home"}
        assert any(t.startswith("homeassistant/number/") for t in discovered)  # commands = true
        observer.wait(lambda: observer.json("smallbms/home/outputs")["load_disconnect"], 30, "load on")
        client = modbus(port)
        # mode off over Modbus: the relay and the MQTT state follow
        assert not client.write_register(105, 0, device_id=1).isError()
        wait_for(lambda: not module.relays[LOAD], 5, "mode off reached the load relay", service)
        observer.wait(lambda: observer.json("smallbms/home/state")["mode_on"] is False, 10, "mode off published")
        observer.wait(lambda: not observer.json("smallbms/home/outputs")["load_disconnect"], 10, "load off published")
        # a setting over MQTT: committed, answered on the result topic, read back over Modbus
        observer.publish("smallbms/home/set/settings/discharge_floor_pct", "15")
        result = observer.wait(lambda: [json.loads(p) for t, p, _ in observer.messages
                                        if t == "smallbms/home/result"], 20, "the result")[-1]
        assert result["ok"] is True and "discharge_floor_pct=15" in result["message"], result
        assert client.read_holding_registers(104, count=1, device_id=1).registers == [150]
        observer.wait(lambda: observer.json("smallbms/home/settings")["discharge_floor_pct"] == 15, 10, "published")
        # a bad value: refused with the reason, nothing changed
        observer.publish("smallbms/home/set/settings/discharge_floor_pct", "150")
        refused = observer.wait(lambda: [r for t, p, _ in observer.messages if t == "smallbms/home/result"
                                         and not (r := json.loads(p))["ok"]], 20, "the refusal")[-1]
        assert refused["code"] == 3 and "discharge_floor_pct" in refused["message"]
        assert client.read_holding_registers(104, count=1, device_id=1).registers == [150]
        # mode on over MQTT: the relay follows
        observer.publish("smallbms/home/set/mode", "ON")
        wait_for(lambda: module.relays[LOAD], 10, "mode on over MQTT reached the load relay", service)
        client.close()
        err = stop(service)
    finally:
        tear_down(service, observer, broker)
    assert "discharge floor 10 % -> 15 % by MQTT smallbms-home" in err
    assert observer.retained["smallbms/home/status"] == b"offline"  # the clean stop said so


def test_writes_are_refused_when_commands_are_off_and_change_nothing(rig, tmp_path):  # noqa: F811
    config, module, store = rig
    broker = Mosquitto(tmp_path).start()
    port = with_mqtt(config, broker.port, "cabin", commands=False)
    observer = Observer(broker.port)
    service = start(config)
    try:
        observer.wait(lambda: observer.json("smallbms/cabin/bank")["batteries"] == 2, 30, "the learned bank")
        wait_for(lambda: module.relays[LOAD], 20, "load relay on", service)
        observer.publish("smallbms/cabin/set/settings/discharge_floor_pct", "15")
        observer.publish("smallbms/cabin/set/mode", "OFF")
        results = observer.wait(lambda: len(r := [json.loads(p) for t, p, _ in observer.messages
                                                  if t == "smallbms/cabin/result"]) == 2 and r, 20, "two refusals")
        assert all(not r["ok"] and r["code"] == 1 and "commands = false" in r["message"] for r in results)
        client = modbus(port)
        assert client.read_holding_registers(104, count=1, device_id=1).registers == [100]  # still 10.0 %
        client.close()
        assert module.relays[LOAD]  # mode stayed on
        # discovery offers no switch, number or button: nothing to press
        assert not [t for t in observer.retained if t.startswith(("homeassistant/switch", "homeassistant/number",
                                                                  "homeassistant/button"))]
        err = stop(service)
    finally:
        tear_down(service, observer, broker)
    assert "refused" in err and "set/mode" in err
    db = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    refused = db.execute("SELECT name, value, reason FROM events WHERE kind = 'refused'").fetchall()
    db.close()
    assert {row[0] for row in refused} >= {"set/mode", "set/settings/discharge_floor_pct"}
    assert all(row[1] == "not_allowed" and "by MQTT smallbms-cabin" in row[2] for row in refused)


def test_broker_killed_mid_run_loses_no_protection_and_the_state_is_republished(rig, tmp_path):  # noqa: F811
    config, module, _ = rig
    broker = Mosquitto(tmp_path).start()
    port = with_mqtt(config, broker.port, "barn", commands=False)
    metrics_port = free_port()
    config.write_text(config.read_text().replace("[metrics]\nport = 0", f"[metrics]\nport = {metrics_port}"))
    service = start(config)
    observer = Observer(broker.port)
    try:
        observer.wait(lambda: observer.json("smallbms/barn/bank")["batteries"] == 2, 30, "the learned bank")
        wait_for(lambda: module.relays[LOAD] and module.relays[CHARGE], 20, "relays on", service)
        observer.close()
        broker.stop()  # killed: no goodbye, its retained messages are gone with it (persistence false)
        client = modbus(port)
        assert not client.write_register(105, 0, device_id=1).isError()  # mode off: the decision loop still runs
        wait_for(lambda: not module.relays[LOAD] and not module.relays[CHARGE], 5, "relays off without a broker",
                 service)
        assert not client.write_register(105, 1, device_id=1).isError()
        wait_for(lambda: module.relays[LOAD] and module.relays[CHARGE], 5, "relays on again", service)
        client.close()
        wait_for(lambda: "smallbms_mqtt_connected 0.0" in scrape(metrics_port), 10, "the metric says disconnected")
        assert "smallbms_mqtt_outages_total 1.0" in scrape(metrics_port)
        broker.start()  # the same port, empty: everything must be published again
        observer = Observer(broker.port)
        observer.wait(lambda: observer.retained["smallbms/barn/status"] == b"online", 90, "online after the outage")
        bank = observer.wait(lambda: observer.json("smallbms/barn/bank"), 30, "the bank republished")
        assert bank["batteries"] == 2
        observer.wait(lambda: observer.json("smallbms/barn/outputs")["load_disconnect"], 30, "outputs republished")
        assert any(t.startswith("homeassistant/sensor/smallbms_barn/") for t in observer.retained)
        assert "smallbms_mqtt_connected 1.0" in scrape(metrics_port)
        err = stop(service)
    finally:
        tear_down(service, observer, broker)
    assert "WARNING" in err and "MQTT: broker 127.0.0.1" in err and "again; republishing" in err


@contextlib.contextmanager
def site_rig(directory: Path):
    """A second, independent site: its own SLCAN wire, simulated bank, relay module and store."""
    directory.mkdir()
    with SlcanHub() as hub, VirtualModbusTcpModule(unit=1) as module:
        config = write_config(directory / "smallbms-bus.toml", hub.path("slcan1"), directory / "state.db",
                              module.port, free_port())
        simulator = subprocess.Popen([*CMD, "simulate", "--interface", "slcan", "--channel", hub.path("slcan0"),
                                      "--bank", "1s2p-12v100", "--scenario", "steady"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            yield config, module
        finally:
            simulator.terminate()
            simulator.wait(timeout=10)


def test_two_sites_on_one_broker_keep_their_topics_apart(rig, tmp_path):  # noqa: F811
    config, module, _ = rig
    broker = Mosquitto(tmp_path).start()
    with site_rig(tmp_path / "cabin") as (cabin_config, cabin_module):
        home_port = with_mqtt(config, broker.port, "home", commands=True)
        with_mqtt(cabin_config, broker.port, "cabin", commands=True)
        observer = Observer(broker.port)
        home, cabin = start(config), start(cabin_config)
        try:
            home_bank = observer.wait(lambda: (b := observer.json("smallbms/home/bank")) and b["phase"] == "learned"
                                      and b, 40, "home's bank")
            cabin_bank = observer.wait(lambda: (b := observer.json("smallbms/cabin/bank")) and b["phase"] == "learned"
                                       and b, 40, "cabin's bank")
            assert (home_bank["series"], home_bank["parallel"]) == (2, 1)  # each site its own bank
            assert (cabin_bank["series"], cabin_bank["parallel"]) == (1, 2)
            wait_for(lambda: module.relays[LOAD] and cabin_module.relays[LOAD], 20, "both load relays on", home)
            # a command for cabin reaches cabin only
            observer.publish("smallbms/cabin/set/mode", "OFF")
            wait_for(lambda: not cabin_module.relays[LOAD], 10, "cabin's load relay off", cabin)
            observer.wait(lambda: observer.json("smallbms/cabin/state")["mode_on"] is False, 10, "cabin mode off")
            assert module.relays[LOAD] and observer.json("smallbms/home/state")["mode_on"] is True
            client = modbus(home_port)
            assert client.read_holding_registers(105, count=1, device_id=1).registers == [1]  # home still on
            client.close()
            # two devices in Home Assistant, each entity under its own site's node and state topics
            devices = {}
            for topic, payload in list(observer.retained.items()):
                if topic.startswith("homeassistant/") and payload:
                    c = check_config(topic, payload)
                    site = c["device"]["identifiers"][0].removeprefix("smallbms_")
                    devices.setdefault(site, set()).add(c["unique_id"])
                    assert topic.split("/")[2] == f"smallbms_{site}"
                    assert all(c[k].startswith(f"smallbms/{site}/") for k in ("state_topic", "command_topic",
                                                                              "availability_topic") if k in c)
            assert set(devices) == {"home", "cabin"} and not devices["home"] & devices["cabin"]
            stop(cabin)
            observer.wait(lambda: observer.retained["smallbms/cabin/status"] == b"offline", 10, "cabin offline")
            assert observer.retained["smallbms/home/status"] == b"online"
            stop(home)
        finally:
            for service in (home, cabin):
                if service.poll() is None:
                    service.kill()
            observer.close()
            broker.stop()
