"""A battery taken out and the bank re-learned (BANK-4): the bank forgets it, so MQTT clears its retained state
and its Home Assistant entities on a real Mosquitto (an empty retained message deletes one), and a client that
subscribes afterwards sees no trace of it. The messages come from a real core (tests/bms/rig.py)."""

from __future__ import annotations

import functools

from smallbms_bus.config import parse_config
from smallbms_bus.mqtt import MqttFrontEnd
from tests.bms.rig import Rig
from tests.mqtt.broker import Mosquitto, Observer, needs_mosquitto

pytestmark = needs_mosquitto

BATTERY_2 = "smallbms/dock/battery/2"
BATTERY_2_ENTITY = "homeassistant/sensor/smallbms_dock/battery2_voltage/config"


async def never_called(change):  # pragma: no cover - this test writes nothing
    raise AssertionError("no write expected")


def test_a_battery_taken_out_and_the_bank_relearned_leaves_the_broker(tmp_path):
    broker = Mosquitto(tmp_path).start()
    section = parse_config(f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\nsite = "dock"\n')["mqtt"]
    front = MqttFrontEnd(section, never_called, lambda *refusal: None)
    rig = Rig(1, 2)  # two strings of one 12.8 V battery
    observer = Observer(broker.port)
    try:
        front.link.start()
        front.link.offer(functools.partial(front.messages, rig.start(), rig.core.settings))
        observer.wait(lambda: observer.retained[BATTERY_2] and observer.retained[BATTERY_2_ENTITY], 30,
                      "battery 2 and its entities published")
        rig.battery(2).silent = True  # taken out
        rig.run(6.0)
        rig.core.relearn_bank(rig.t)
        decision = rig.run(2.5)
        assert [b.node for b in decision.bank.batteries] == [1]
        front.link.offer(functools.partial(front.messages, decision, rig.core.settings))
        observer.wait(lambda: observer.retained[BATTERY_2] == b"" and observer.retained[BATTERY_2_ENTITY] == b"",
                      30, "battery 2's state and entity cleared")
        assert observer.json("smallbms/dock/bank")["batteries"] == 1
        late = Observer(broker.port)  # subscribes now: the broker's retained messages only
        try:
            late.wait(lambda: late.retained.get("smallbms/dock/bank") and late.retained.get("smallbms/dock/battery/1"),
                      10, "the retained bank and battery 1")
            assert not [t for t in late.retained if "battery/2" in t or "battery2_" in t]
        finally:
            late.close()
    finally:
        front.link.stop()
        observer.close()
        broker.stop()
