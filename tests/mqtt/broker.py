"""A real Mosquitto for the tests (Debian's `mosquitto`, installed by tests/run) and a real paho observer."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.ports import free_port

MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
needs_mosquitto = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed (tests/run installs it "
                                     "with apt as root)")


class Mosquitto:
    """mosquitto on a free loopback port with its own config; `stop`/`start` keep the port (a broker restart)."""

    def __init__(self, directory: Path, acl: Path | None = None, passwords: Path | None = None,
                 persistence: bool = False, pki: Path | None = None) -> None:
        self.port = free_port()
        self.config = directory / "mosquitto.conf"
        # persistence: retained messages survive a `terminate` (saved on a clean exit), not a `stop` (SIGKILL)
        lines = [f"listener {self.port} 127.0.0.1", f"persistence {str(persistence).lower()}", "log_dest stderr",
                 "log_type error", "log_type warning"]
        if pki is not None:  # TLS only, and only for clients with a certificate of that CA
            lines += [f"cafile {pki / 'ca.pem'}", f"certfile {pki / 'server.pem'}", f"keyfile {pki / 'server.key'}",
                      "require_certificate true"]
        if persistence:
            lines.append(f"persistence_location {directory}/")
        if os.geteuid() == 0:  # as root mosquitto would become user "mosquitto", who cannot read pytest's tmp dirs
            lines.append("user root")
        if passwords is None:
            lines.append("allow_anonymous true")
        else:
            lines += ["allow_anonymous false", f"password_file {passwords}"]
        if acl is not None:
            lines.append(f"acl_file {acl}")
        self.config.write_text("\n".join(lines) + "\n")
        self.log = directory / "mosquitto.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> Mosquitto:
        assert MOSQUITTO is not None
        self.process = subprocess.Popen([MOSQUITTO, "-c", str(self.config)], stdout=subprocess.DEVNULL,
                                        stderr=self.log.open("a"))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                assert self.process.poll() is None, self.log.read_text()
                time.sleep(0.05)
        raise AssertionError("mosquitto did not listen within 20 s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()  # a broker that dies, not one that says goodbye
            self.process.wait(timeout=10)

    def terminate(self) -> None:
        """A clean shutdown (SIGTERM): with persistence the retained messages are saved for the next start."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=20)


class Observer:
    """A paho client subscribed to `topics`: the last payload of each topic, and every message in order."""

    def __init__(self, port: int, topics: tuple[str, ...] = ("#",), username: str | None = None,
                 password: str | None = None, pki: Path | None = None) -> None:
        self.retained: dict[str, bytes] = {}
        self.messages: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.connected = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"observer-{id(self)}")
        if username is not None:
            self.client.username_pw_set(username, password)
        if pki is not None:
            self.client.tls_set(ca_certs=str(pki / "ca.pem"), certfile=str(pki / "client.pem"),
                                keyfile=str(pki / "client.key"))
        self.client.on_message = self._message
        self.client.on_connect = lambda c, u, f, rc, p: (
            [c.subscribe(t, qos=1) for t in topics], self.connected.set()) if not rc.is_failure else None
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.connected.wait(10), "the observer could not connect"

    def _message(self, client: Any, userdata: Any, message: paho.MQTTMessage) -> None:
        with self.lock:
            self.retained[message.topic] = message.payload
            self.messages.append((message.topic, message.payload, bool(message.retain)))

    def json(self, topic: str) -> Any:
        with self.lock:
            payload = self.retained.get(topic)
        return None if not payload else json.loads(payload)

    def wait(self, predicate, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                value = predicate()
            except (KeyError, TypeError, IndexError):
                value = None
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"{what}: not seen within {timeout} s")

    def publish(self, topic: str, payload: str, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def tear_down(service: subprocess.Popen, observer: Observer, broker: Mosquitto) -> None:
    """After a test, whatever happened: a service still running is killed, the observer and the broker stop."""
    if service.poll() is None:
        service.kill()
    observer.close()
    broker.stop()
