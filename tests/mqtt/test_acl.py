"""deploy/mosquitto/acl.example on a real Mosquitto with a password file made here: a site's service publishes its
state and discovery under its own user, and one site's user cannot write another site's topics."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.integration.test_run_process import rig, start  # noqa: F401 (rig is a fixture)
from tests.mqtt.broker import Mosquitto, Observer, needs_mosquitto
from tests.mqtt.test_mqtt_service import stop

ACL = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto" / "acl.example"
PASSWD = shutil.which("mosquitto_passwd")
pytestmark = [needs_mosquitto, pytest.mark.skipif(PASSWD is None, reason="mosquitto_passwd is not installed")]
USERS = {"home": "home-secret", "cabin": "cabin-secret", "fleet": "fleet-secret"}


@pytest.fixture
def broker(tmp_path):
    passwords = tmp_path / "passwd"
    for i, (user, password) in enumerate(USERS.items()):
        subprocess.run([PASSWD, *(["-c"] if i == 0 else []), "-b", str(passwords), user, password], check=True,
                       capture_output=True)
    passwords.chmod(0o600)
    broker = Mosquitto(tmp_path, acl=ACL, passwords=passwords).start()
    yield broker
    broker.stop()


def test_one_sites_user_cannot_write_another_sites_topics(broker):
    fleet = Observer(broker.port, username="fleet", password=USERS["fleet"])
    home = Observer(broker.port, ("smallbms/home/#",), username="home", password=USERS["home"])
    cabin = Observer(broker.port, ("smallbms/cabin/#",), username="cabin", password=USERS["cabin"])
    try:
        home.publish("smallbms/cabin/set/mode", "OFF")  # denied: another site's command topic
        home.publish("smallbms/cabin/bank", '{"soc": 1}')  # denied: another site's state
        home.publish("homeassistant/switch/smallbms_cabin/mode_switch/config", "{}")  # denied: its discovery
        home.publish("smallbms/home/marker", "1")  # allowed: its own topic, after the others
        cabin.publish("smallbms/cabin/marker", "1")
        fleet.wait(lambda: "smallbms/home/marker" in fleet.retained and "smallbms/cabin/marker" in fleet.retained,
                   10, "the allowed messages")
        cabin.wait(lambda: "smallbms/cabin/marker" in cabin.retained, 10, "cabin's own message")
        # mosquitto delivers one client's messages in order: had the denied ones passed, they would be here now
        assert not [t for t in fleet.retained if t.startswith("smallbms/cabin/") and t != "smallbms/cabin/marker"]
        assert "smallbms/cabin/set/mode" not in cabin.retained
        fleet.publish("smallbms/cabin/set/mode", "OFF")  # the fleet user may send commands
        cabin.wait(lambda: cabin.retained.get("smallbms/cabin/set/mode") == b"OFF", 10, "the fleet's command")
    finally:
        for client in (fleet, home, cabin):
            client.close()


def test_a_site_publishes_its_state_and_discovery_under_its_own_user(rig, broker):  # noqa: F811
    config, _, _ = rig
    config.write_text(config.read_text() + f'\n[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\nsite = "home"\n'
                      f'username = "home"\npassword = "{USERS["home"]}"\npublish_period = 0.5\n')
    fleet = Observer(broker.port, username="fleet", password=USERS["fleet"])
    service = start(config)
    try:
        fleet.wait(lambda: fleet.json("smallbms/home/bank")["batteries"] == 2, 30, "the bank under the ACL")
        assert fleet.retained["smallbms/home/status"] == b"online"
        stop(service)
    finally:
        if service.poll() is None:
            service.kill()
        fleet.close()
    home = Observer(broker.port, ("homeassistant/#",), username="home", password=USERS["home"])
    try:
        home.wait(lambda: "homeassistant/sensor/smallbms_home/voltage/config" in home.retained, 10,
                  "the site's discovery, retained")
    finally:
        home.close()
