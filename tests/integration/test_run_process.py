"""`smallbms-bus run` as a process, the real deployment shape: the simulator in a second process on
the same bus (SLCAN adapters on a pseudo-terminal wire), relays on a Modbus TCP I/O module."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pymodbus.client import ModbusTcpClient

from smallbms_bus.sim.relay_boards import VirtualModbusTcpModule
from smallbms_bus.sim.slcan_hub import SlcanHub
from smallbms_bus.store import Store
from tests.ports import free_port

CMD = [sys.executable, "-m", "smallbms_bus.cli"]
LOAD, CHARGE = 1, 2


def write_config(path: Path, bus: str, store: Path, module_port: int, modbus_port: int = 0) -> Path:
    path.write_text(f"""
[bus]
interface = "slcan"
channel = "{bus}"
[bms]
discovery_window = 1.0
[store]
path = "{store}"
[outputs]
backend = "modbus"
[outputs.options]
transport = "tcp"
host = "127.0.0.1"
port = {module_port}
unit = 1
[metrics]
port = 0
[modbus]
host = "127.0.0.1"
port = {modbus_port}
""")
    return path


def wait_for(predicate, timeout: float, what: str, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if process is not None and process.poll() is not None:
            raise AssertionError(f"{what}: the service exited with {process.returncode}: {process.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError(f"{what} not reached in {timeout} s")


@pytest.fixture
def rig(tmp_path):
    with SlcanHub() as hub, VirtualModbusTcpModule(unit=1) as module:
        config = write_config(tmp_path / "smallbms-bus.toml", hub.path("slcan1"), tmp_path / "state.db", module.port,
                              free_port())
        simulator = subprocess.Popen([*CMD, "simulate", "--interface", "slcan", "--channel", hub.path("slcan0"),
                                      "--bank", "2s1p-12v100", "--scenario", "steady"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            yield config, module, tmp_path / "state.db"
        finally:
            simulator.terminate()
            simulator.wait(timeout=10)


def start(config: Path) -> subprocess.Popen:
    return subprocess.Popen([*CMD, "run", "--config", str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_run_drives_the_relays_and_sigterm_switches_them_off(rig):
    config, module, store = rig
    service = start(config)
    try:
        wait_for(lambda: module.relays[LOAD] and module.relays[CHARGE], 20, "load and charge relays on", service)
        service.send_signal(signal.SIGTERM)
        _, err = service.communicate(timeout=20)
    finally:
        if service.poll() is None:
            service.kill()
    assert service.returncode == 0, err
    assert not module.relays[LOAD] and not module.relays[CHARGE]
    assert "stopped: outputs off, state saved" in err and "Traceback" not in err
    with Store.open(store) as s:
        assert len(s.load_state()["learned_bank"]["batteries"]) == 2


def test_kill_9_after_modbus_writes_keeps_settings_mode_and_soc(rig):
    """A PLC writes mode, a setting and the SoC over Modbus; kill -9 a moment later loses none of it."""
    config, module, store = rig
    port = int(config.read_text().split("[modbus]")[1].split("port = ")[1].split()[0])
    service = start(config)
    try:
        wait_for(lambda: module.relays[LOAD], 20, "load relay on", service)
        client = ModbusTcpClient("127.0.0.1", port=port, timeout=3)
        assert client.connect()
        assert not client.write_register(104, 150, device_id=1).isError()  # discharge floor 15.0 %
        assert not client.write_register(121, 500, device_id=1).isError()  # SoC 50.0 %
        assert not client.write_register(105, 0, device_id=1).isError()  # mode off
        client.close()
        wait_for(lambda: not module.relays[LOAD], 2, "mode off reached the load relay", service)
    finally:
        service.kill()
        service.wait(timeout=10)
    with Store.open(store) as s:
        assert s.pragma("integrity_check") == "ok"
        saved = s.load_state()
    assert saved["mode_on"] is False and saved["settings"]["discharge_floor_pct"] == 15.0
    assert saved["monitor"]["soc_known"] and saved["monitor"]["consumed_ah"] == pytest.approx(50.0, abs=0.5)
    service = start(config)
    try:
        # until the restarted service knows its bank again (a start takes seconds on a loaded machine)
        outputs: list[str] = []

        def known() -> bool:
            status = subprocess.run([*CMD, "status", "--config", str(config)], capture_output=True, text=True,
                                    timeout=20)
            outputs.append(status.stdout)
            assert not module.relays[LOAD]  # mode off came back from the store: the load never comes on
            return status.returncode == 0 and "waiting for batteries" not in status.stdout
        wait_for(known, 30, "the restarted service's status", service)
        assert "off (mode or remote)" in outputs[-1], outputs[-1]
        assert re.search(r"state of charge\s+(49\.\d|50\.0) %", outputs[-1]), outputs[-1]
        time.sleep(1.0)
        assert not module.relays[LOAD]
    finally:
        service.kill()
        service.wait(timeout=10)



def test_bad_config_exits_2_naming_the_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[outputs]\nbackend = "memory"\nload_disconnect = 2\ncharge_disconnect = 2\n')
    result = subprocess.run([*CMD, "run", "--config", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "outputs.charge_disconnect = 2 is not allowed: a channel not already used by outputs.load_disconnect" \
        in result.stderr
    bad.write_text('[outputs]\nbackend = "modbus"\n[outputs.options]\nbaud = 9600\n')
    result = subprocess.run([*CMD, "run", "--config", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "outputs.options.baud = 9600 is not allowed: not an option of the modbus" \
        in result.stderr


def test_systemd_notify_ready_watchdog_and_stopping(rig, tmp_path):
    """Type=notify: READY=1 once serving, WATCHDOG=1 while ticking, STOPPING=1 on SIGTERM."""

    config, _module, _ = rig
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        sock.settimeout(10)
        env = {**os.environ, "NOTIFY_SOCKET": address, "WATCHDOG_USEC": "10000000"}
        service = subprocess.Popen([*CMD, "run", "--config", str(config)], stderr=subprocess.PIPE, text=True, env=env)
        try:
            messages = []
            while "WATCHDOG=1" not in messages:
                messages.append(sock.recv(256).decode())
            assert messages[0] == "READY=1"
            service.send_signal(signal.SIGTERM)
            while messages[-1] != "STOPPING=1":
                messages.append(sock.recv(256).decode())
            assert service.wait(timeout=20) == 0
        finally:
            if service.poll() is None:
                service.kill()


def test_ready_means_modbus_answers(tmp_path):
    """READY=1 (systemd) is sent once the Modbus listener is bound: a PLC that connects at once is served."""
    port = free_port()
    config = tmp_path / "smallbms-bus.toml"
    config.write_text(f'[bus]\ninterface = "virtual"\nchannel = "ready"\n[store]\npath = "{tmp_path / "state.db"}"\n'
                      f'[outputs]\nbackend = "memory"\n[metrics]\nport = 0\n[modbus]\nhost = "127.0.0.1"\n'
                      f"port = {port}\n")
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        sock.settimeout(20)
        for _ in range(3):
            service = subprocess.Popen([*CMD, "run", "--config", str(config)], stderr=subprocess.DEVNULL,
                                       env={**os.environ, "NOTIFY_SOCKET": address})
            try:
                while sock.recv(256) != b"READY=1":
                    pass
                with socket.create_connection(("127.0.0.1", port), timeout=2):
                    pass
            finally:
                service.kill()
                service.wait(timeout=10)
