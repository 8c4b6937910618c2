"""`smallbms-bus run` as a process, the real deployment shape: the simulator in a second process on
the same bus (SLCAN adapters on a pseudo-terminal wire), relays on a Modbus TCP I/O module."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from smallbms_bus.sim.relay_boards import VirtualModbusTcpModule
from smallbms_bus.sim.slcan_hub import SlcanHub
from smallbms_bus.store import Store

CMD = [sys.executable, "-m", "smallbms_bus.cli"]
LOAD, CHARGE = 1, 2


def write_config(path: Path, bus: str, store: Path, module_port: int) -> Path:
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
        config = write_config(tmp_path / "smallbms-bus.toml", hub.path("slcan1"), tmp_path / "state.db", module.port)
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


def test_kill_9_and_restart_keeps_settings_mode_and_soc(rig):
    config, module, store = rig
    service = start(config)
    try:
        wait_for(lambda: module.relays[LOAD], 20, "load relay on", service)
    finally:
        service.kill()
        service.wait(timeout=10)
    # Change the persisted state the way a PLC would (through the core), then kill -9 again mid-run.
    with Store.open(store) as s:
        state = s.load_state()
    state["mode_on"] = False
    state["settings"]["discharge_floor_pct"] = 15.0
    state["monitor"].update(soc_known=True, consumed_ah=50.0)
    with Store.open(store) as s:
        s.save_state(state, time.time())
    service = start(config)
    try:
        time.sleep(4)
        assert not module.relays[LOAD]  # mode off came back from the store
        service.kill()
        service.wait(timeout=10)
    finally:
        if service.poll() is None:
            service.kill()
    with Store.open(store) as s:
        assert s.pragma("integrity_check") == "ok"
        again = s.load_state()
    assert again["mode_on"] is False and again["settings"]["discharge_floor_pct"] == 15.0
    assert again["monitor"]["soc_known"] and again["monitor"]["consumed_ah"] == pytest.approx(50.0, abs=1.0)


def test_bad_config_exits_2_naming_the_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[outputs]\nbackend = "memory"\nload_disconnect = 2\ncharge_disconnect = 2\n')
    result = subprocess.run([*CMD, "run", "--config", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "outputs.charge_disconnect = 2 is not allowed: a channel not already used by outputs.load_disconnect" \
        in result.stderr
    bad.write_text('[outputs]\nbackend = "modbus"\n[outputs.options]\nbaud = 9600\n')
    result = subprocess.run([*CMD, "run", "--config", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "has no option 'baud'" in result.stderr


def test_systemd_notify_ready_watchdog_and_stopping(rig, tmp_path):
    """Type=notify: READY=1 once serving, WATCHDOG=1 while ticking, STOPPING=1 on SIGTERM."""
    import socket

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
