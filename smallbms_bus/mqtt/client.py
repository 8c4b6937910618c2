"""The MQTT client (paho-mqtt) on its own threads: the safety path never waits for a broker.

Theory of operation
-------------------
paho's network loop (`loop_start`) runs on its own thread "mqtt-network": it connects, reconnects with
back-off (`reconnect_delay_set`, 1 s doubling to 60 s) and delivers incoming writes. A second thread,
"mqtt-publish", builds and sends the state. The event loop only calls `offer(build)`: a latest-wins slot
of one callable over an immutable snapshot (a Decision and the Settings, both never mutated) that returns
the mapping topic -> payload, a lock held for an assignment. The JSON is built here, not on the loop (for
50 batteries it is tens of milliseconds: benchmarks/mqtt.py). The loop never blocks on the broker; when
the client lags, older snapshots are simply overwritten.

The publisher keeps what the broker was last sent and publishes only the topics whose payload changed,
all retained; a topic that is no longer in the snapshot is cleared with an empty retained message (not
reachable today: the bank never drops a battery while it runs, docs/mqtt.md). On every (re)connect that
memory is marked unknown, so the whole state is sent again after `online` (the broker holds it for new
subscribers) and a topic that left during the outage is cleared then. The last will is `offline` (retained) on
the availability topic; a clean stop publishes `offline` itself before disconnecting.

Outages: one WARNING when the broker is lost or refuses the connection, one INFO when it answers again
(`connected`, `outages` are read by the metrics endpoint: smallbms_mqtt_connected).
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import threading
from collections.abc import Callable, Mapping
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from smallbms_bus.config import ConfigError
from smallbms_bus.modbus.tls import _readable
from smallbms_bus.mqtt.topics import AVAILABILITY, OFFLINE, ONLINE, RESULT, SET, Names, dumps

log = logging.getLogger(__name__)

KEEPALIVE_S = 30
RECONNECT_MIN_S, RECONNECT_MAX_S = 1, 60
MAX_QUEUED = 5000  # messages paho may hold for a slow broker; beyond that publish() fails and the topic is retried
STOP_WAIT_S = 2.0  # a clean stop waits this long for "offline" to reach the broker
_UNKNOWN = object()  # a topic published on an earlier connection: what the broker holds now is not known


def tls_check(section: Mapping[str, Any]) -> None:
    """The [mqtt] TLS files load as the client will load them; ConfigError naming the key otherwise."""
    ca, cert, key = section["tls_ca"], section["tls_cert"], section["tls_key"]
    for name, path in (("mqtt.tls_ca", ca), ("mqtt.tls_cert", cert), ("mqtt.tls_key", key)):
        if path is not None:
            _readable(name, path)
    if ca is not None:
        try:
            ssl.create_default_context(cafile=ca)
        except ssl.SSLError as error:
            raise ConfigError("mqtt.tls_ca", ca, f"a PEM file of CA certificates ({error.reason or error})") from None
    if cert is not None:
        try:
            ssl.create_default_context().load_cert_chain(cert, key, password=lambda: b"")
        except ssl.SSLError as error:
            raise ConfigError("mqtt.tls_key" if key else "mqtt.tls_cert", key or cert,
                              f"a PEM client certificate and its unencrypted key ({error.reason or error})") from None


class MqttLink:
    """One broker connection. `on_write(what, payload)` is called on the network thread for every message
    on `<prefix>/set/<what>`; it must not block (commands.py hands it to the event loop)."""

    def __init__(self, section: Mapping[str, Any], names: Names,
                 on_write: Callable[[str, bytes], None] | None = None) -> None:
        self.names, self.on_write = names, on_write
        self.host, self.port = section["host"], section["port"]
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=names.client_id, clean_session=True)
        client.will_set(names.topic(AVAILABILITY), OFFLINE, qos=1, retain=True)
        if section["username"] is not None:
            client.username_pw_set(section["username"], section["password"])
        if section["tls"] or section["tls_ca"] is not None or section["tls_cert"] is not None:
            client.tls_set(ca_certs=section["tls_ca"], certfile=section["tls_cert"], keyfile=section["tls_key"],
                           cert_reqs=ssl.CERT_REQUIRED)
        client.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)
        client.max_queued_messages_set(MAX_QUEUED)
        client.on_connect, client.on_disconnect = self._connected, self._disconnected
        client.on_connect_fail, client.on_message = self._connect_failed, self._message
        self.client = client
        self.connected = False
        self.connects = 0  # successful connections
        self.outages = 0  # times the broker was lost or refused us
        self._in_outage = False
        self._lock = threading.Lock()
        self._latest: Callable[[], Mapping[str, str]] | None = None
        self._built: tuple[Callable[[], Mapping[str, str]], Mapping[str, str]] | None = None  # publisher thread
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._sent: dict[str, Any] = {}  # publisher thread only: topic -> what the broker was sent (or _UNKNOWN)
        self._resend = threading.Event()  # set on (re)connect: forget _sent, send everything
        self._publisher = threading.Thread(target=self._publish_loop, name="mqtt-publish", daemon=True)

    # -- the event loop's side ---------------------------------------------------------------------------
    def start(self) -> None:
        """Non-blocking: the first connection is attempted (and retried) on the network thread."""
        self.client.connect_async(self.host, self.port, keepalive=KEEPALIVE_S)
        self.client.loop_start()
        self._publisher.start()

    def offer(self, build: Callable[[], Mapping[str, str]]) -> None:
        """The newest state (`build()` gives its messages, on the publisher thread); replaces one the publisher
        has not taken yet. Never blocks."""
        with self._lock:
            self._latest = build
        self._wake.set()

    def publish_result(self, result: Mapping[str, Any]) -> None:
        """The answer to a write, on `<prefix>/result` (not retained: it is an event, not a state)."""
        if self.connected:
            self.client.publish(self.names.topic(RESULT), dumps(result), qos=1)

    def stop(self) -> None:
        """Blocking (run it in an executor): `offline`, then disconnect; bounded by STOP_WAIT_S."""
        self._stop.set()
        self._wake.set()
        if self.connected:
            info = self.client.publish(self.names.topic(AVAILABILITY), OFFLINE, qos=1, retain=True)
            with contextlib.suppress(RuntimeError, ValueError):  # the connection went meanwhile: the will says offline
                info.wait_for_publish(STOP_WAIT_S)
        self.client.disconnect()
        self.client.loop_stop()
        self._publisher.join(STOP_WAIT_S)

    # -- paho's network thread ---------------------------------------------------------------------------
    def _connected(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            self._outage(f"the broker refused the connection: {reason}")
            return
        self.connects += 1
        if self._in_outage:
            log.info("MQTT: connected to %s:%s again; republishing the state", self.host, self.port)
        else:
            log.info("MQTT: connected to %s:%s as %s, topics under %s/", self.host, self.port,
                     self.names.client_id, self.names.prefix)
        self._in_outage = False
        client.publish(self.names.topic(AVAILABILITY), ONLINE, qos=1, retain=True)
        client.subscribe(self.names.topic(SET, "#"), qos=1)
        self.connected = True
        self._resend.set()
        self._wake.set()

    def _disconnected(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self.connected = False
        if not self._stop.is_set():
            self._outage(f"connection lost ({reason})")

    def _connect_failed(self, client: paho.Client, userdata: Any) -> None:
        self._outage("cannot connect")

    def _outage(self, why: str) -> None:
        self.connected = False
        if not self._in_outage:
            self._in_outage = True
            self.outages += 1
            log.warning("MQTT: broker %s:%s: %s; retrying with back-off up to %d s (the BMS keeps protecting the "
                        "bank; state is republished on reconnect)", self.host, self.port, why, RECONNECT_MAX_S)

    def _message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        prefix = self.names.topic(SET) + "/"
        if self.on_write is None or not message.topic.startswith(prefix) or message.retain:
            return  # a retained write is an old one replayed by the broker: never act on it
        try:
            self.on_write(message.topic[len(prefix):], message.payload)
        except Exception:  # never let a write kill the network thread
            log.exception("MQTT: handling a write on %s failed", message.topic)

    # -- the publisher thread ----------------------------------------------------------------------------
    def _publish_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            if self._stop.is_set() or not self.connected:
                continue
            if self._resend.is_set():  # a (re)connect: send everything again, and clear what left meanwhile
                self._resend.clear()
                self._sent = dict.fromkeys(self._sent, _UNKNOWN)
            with self._lock:
                latest = self._latest
            if latest is None:
                continue
            try:
                if self._built is None or self._built[0] is not latest:
                    self._built = (latest, latest())
                self._send(self._built[1])
            except Exception:  # a bug must not stop publication for good: the next snapshot retries
                self._built = None
                log.exception("MQTT: building or publishing the state failed")

    def _send(self, latest: Mapping[str, str]) -> None:
        sent: dict[str, Any] = self._sent
        for topic, payload in latest.items():
            if (sent.get(topic) != payload and self.connected
                    and self.client.publish(topic, payload, qos=0, retain=True).rc == paho.MQTT_ERR_SUCCESS):
                sent[topic] = payload
        for topic in [t for t in sent if t not in latest]:  # gone: clear its retained message
            if self.connected and self.client.publish(topic, b"", qos=0, retain=True).rc == paho.MQTT_ERR_SUCCESS:
                del sent[topic]
