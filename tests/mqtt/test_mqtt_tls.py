"""[mqtt] over TLS (docs/mqtt.md): `smallbms-bus run` against a real Mosquitto that serves TLS only and requires a
client certificate of its CA. With `tls_ca`, `tls_cert` and `tls_key` the service publishes as over plain TCP;
without the client certificate the broker refuses the handshake: WARNING, and the relays stay driven by the BMS."""

from __future__ import annotations

import urllib.request
from pathlib import Path

from tests.integration.test_run_process import (  # noqa: F401 (rig is a fixture)
    CHARGE,
    LOAD,
    rig,
    start,
    wait_for,
)
from tests.modbus.test_tls_and_fuzz import pki  # noqa: F401 (a fixture: a CA, server and client certificates)
from tests.mqtt.broker import Mosquitto, Observer, needs_mosquitto, tear_down
from tests.mqtt.test_mqtt_service import stop
from tests.ports import free_port

pytestmark = needs_mosquitto


def mqtt_over_tls(base: str, broker: Mosquitto, pki: Path, metrics_port: int,  # noqa: F811
                  client_certificate: bool) -> str:
    """The rig's configuration with /metrics on `metrics_port` and [mqtt] to the TLS broker."""
    certificate = (f'tls_cert = "{pki / "client.pem"}"\ntls_key = "{pki / "client.key"}"\n' if client_certificate
                   else "")
    return (base.replace("[metrics]\nport = 0", f"[metrics]\nport = {metrics_port}")
            + f'\n[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\nsite = "boat"\npublish_period = 0.5\n'
              f'tls_ca = "{pki / "ca.pem"}"\n' + certificate)


def metric(port: int, line: str) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
        return line in page.read().decode()


def test_over_tls_with_a_client_certificate_it_publishes_and_without_one_it_warns_and_keeps_protecting(
        rig, pki, tmp_path):  # noqa: F811
    config, module, _ = rig
    base = config.read_text()
    broker = Mosquitto(tmp_path, pki=pki).start()
    metrics_port = free_port()
    observer = Observer(broker.port, pki=pki)
    config.write_text(mqtt_over_tls(base, broker, pki, metrics_port, client_certificate=True))
    service = start(config)
    try:
        observer.wait(lambda: observer.retained["smallbms/boat/status"] == b"online", 30, "online over TLS")
        bank = observer.wait(lambda: (b := observer.json("smallbms/boat/bank")) and b["batteries"] == 2 and b,
                             30, "the learned bank over TLS")
        assert bank["cells"] == 8
        assert metric(metrics_port, "smallbms_mqtt_connected 1.0")
        err = stop(service)
        assert "MQTT: connected to 127.0.0.1" in err and "WARNING" not in err
        # the same service without its client certificate: the broker refuses it, the BMS does not care
        config.write_text(mqtt_over_tls(base, broker, pki, metrics_port, client_certificate=False))
        service = start(config)
        wait_for(lambda: module.relays[LOAD] and module.relays[CHARGE], 30, "relays on without the broker", service)
        wait_for(lambda: metric(metrics_port, "smallbms_mqtt_outages_total 1.0"), 20, "the outage counted", service)
        assert metric(metrics_port, "smallbms_mqtt_connected 0.0")
        err = stop(service)
    finally:
        tear_down(service, observer, broker)
    assert "WARNING" in err and "MQTT: broker 127.0.0.1" in err, err[-3000:]
    assert "MQTT: connected" not in err
