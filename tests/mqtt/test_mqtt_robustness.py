"""`smallbms-bus run` with [mqtt] against a real Mosquitto, where the broker's own memory matters: the last
will says `offline` for a service killed without a goodbye, and a write left retained on a `set/` topic is
never acted upon (a replay, not a request), neither on the first connection nor after a reconnect."""

from __future__ import annotations

import json
import time

from tests.integration.test_run_process import LOAD, rig, start, wait_for  # noqa: F401 (rig is a fixture)
from tests.mqtt.broker import Mosquitto, Observer, needs_mosquitto, tear_down
from tests.mqtt.test_mqtt_service import modbus, stop, with_mqtt

pytestmark = needs_mosquitto


def test_a_service_killed_with_sigkill_is_offline_by_its_last_will(rig, tmp_path):  # noqa: F811
    config, _, _ = rig
    broker = Mosquitto(tmp_path).start()
    with_mqtt(config, broker.port, "shed", commands=False)
    observer = Observer(broker.port, topics=("smallbms/shed/status",))  # subscribed before the kill
    late: Observer | None = None
    service = start(config)
    try:
        observer.wait(lambda: observer.retained["smallbms/shed/status"] == b"online", 30, "online")
        service.kill()  # SIGKILL: no clean stop, so no `offline` of its own; only the broker can say it
        service.wait(timeout=10)
        observer.wait(lambda: observer.retained["smallbms/shed/status"] == b"offline", 30, "offline by the will")
        # retained: a client that comes later is told too (delivered as a retained message)
        late = Observer(broker.port, topics=("smallbms/shed/status",))
        late.wait(lambda: ("smallbms/shed/status", b"offline", True) in late.messages, 10, "the retained offline")
    finally:
        if service.poll() is None:
            service.kill()
        observer.close()
        if late is not None:
            late.close()
        broker.stop()


def results(observer: Observer, prefix: str) -> list[dict]:
    return [json.loads(p) for t, p, _ in list(observer.messages) if t == f"{prefix}/result"]


def test_a_retained_write_is_ignored_and_a_fresh_one_is_acted_upon(rig, tmp_path):  # noqa: F811
    config, module, _ = rig
    broker = Mosquitto(tmp_path, persistence=True).start()
    port = with_mqtt(config, broker.port, "loft", commands=True)
    observer = Observer(broker.port)
    # left on the broker before the service ever connects: an old write the broker replays on subscribe
    observer.publish("smallbms/loft/set/mode", "OFF", retain=True)
    observer.publish("smallbms/loft/set/settings/discharge_floor_pct", "15", retain=True)
    service = start(config)
    try:
        observer.wait(lambda: observer.json("smallbms/loft/bank")["phase"] == "learned", 30, "the learned bank")
        wait_for(lambda: module.relays[LOAD], 20, "load relay on (the retained mode OFF was not obeyed)", service)
        # a reconnect with the bank learned (where a write would be accepted): the broker, restarted with its
        # retained messages, replays the old writes to the new subscription
        observer.close()
        broker.terminate()
        broker.start()
        observer = Observer(broker.port)
        observer.wait(lambda: ("smallbms/loft/set/mode", b"OFF", True) in observer.messages, 10,
                      "the old write still retained on the broker")
        # a fresh write, repeated until answered (until then the service has not subscribed again); the broker
        # replays retained messages on subscribe, so once it is answered the old ones have been delivered too
        sent_at = [-10.0]

        def answered() -> list[dict]:
            if not (found := results(observer, "smallbms/loft")) and time.monotonic() - sent_at[0] > 2:
                observer.publish("smallbms/loft/set/settings/discharge_floor_pct", "12")
                sent_at[0] = time.monotonic()
            return found

        answer = observer.wait(answered, 120, "an answer to the fresh write")[0]
        assert answer["ok"] is True and answer["payload"] == "12", answer
        client = modbus(port)
        assert client.read_holding_registers(104, count=1, device_id=1).registers == [120]  # 12 %, not 15 %
        assert client.read_holding_registers(105, count=1, device_id=1).registers == [1]  # mode still on
        client.close()
        assert module.relays[LOAD]
        # a fresh mode OFF is obeyed
        observer.publish("smallbms/loft/set/mode", "OFF")
        wait_for(lambda: not module.relays[LOAD], 10, "the fresh mode OFF reached the load relay", service)
        observer.wait(lambda: observer.json("smallbms/loft/state")["mode_on"] is False, 10, "mode off published")
        answers = results(observer, "smallbms/loft")
        err = stop(service)
    finally:
        tear_down(service, observer, broker)
    # nothing ever answered (so nothing handled) the retained writes; the fresh ones were logged as writes
    assert all(a["payload"] in ("12", "OFF") and a["ok"] for a in answers), answers
    assert [a["topic"] for a in answers].count("set/mode") == 1, answers
    assert "-> 15 %" not in err and "discharge floor 10 % -> 12 % by MQTT smallbms-loft" in err
