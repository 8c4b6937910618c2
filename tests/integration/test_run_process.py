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


def write_config(path: Path, bus: str, store: Path, module_port: int, modbus_port: int = 0,
                 discovery_window: float = 1.0) -> Path:
    path.write_text(f"""
[bus]
interface = "slcan"
channel = "{bus}"
[bms]
discovery_window = {discovery_window}
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
[web]
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



class StampedHub(SlcanHub):
    """The wire, stamping each frame a port transmits when it crosses the wire (the hub's own clock)."""

    def __init__(self) -> None:
        self.sent_at: dict[str, list[float]] = {}
        super().__init__()

    def _broadcast(self, sender, line: bytes) -> None:  # type: ignore[no-untyped-def]
        self.sent_at.setdefault(sender.name, []).append(time.monotonic())
        super()._broadcast(sender, line)


class StampedModule(VirtualModbusTcpModule):
    """The relay module, stamping each change of a relay when the write that made it arrives."""

    def __init__(self) -> None:
        self.changes: list[tuple[float, int, bool]] = []
        super().__init__(unit=1)

    async def _action(self, function_code, start_address, address, count, registers, set_values):  # type: ignore[no-untyped-def]
        before = self.relays
        answer = await super()._action(function_code, start_address, address, count, registers, set_values)
        at = time.monotonic()
        self.changes += [(at, channel, on) for channel, on in self.relays.items() if before[channel] != on]
        return answer

    def all_on_at(self, *channels: int, since: float) -> float | None:
        state = {c: False for c in channels}
        for at, channel, on in self.changes:
            if channel in state:
                state[channel] = on
                if at >= since and all(state.values()):
                    return at
        return None


def simulate(hub: SlcanHub) -> subprocess.Popen:
    return subprocess.Popen([*CMD, "simulate", "--interface", "slcan", "--channel", hub.path("slcan0"),
                             "--bank", "2s1p-12v100", "--scenario", "steady"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(process: subprocess.Popen) -> str:
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    return err


def test_a_restart_with_a_learned_bank_has_the_outputs_back_within_3_s_of_the_first_frame(tmp_path):
    """BANK-2, seen: a restart held every output off for the full 10 s discovery window although the learned bank
    was in the store. Timed on the wire (the hub stamps the simulator's first frame) and at the relay module (it
    stamps the write that switched the relays), both on this process's monotonic clock."""
    with StampedHub() as hub, StampedModule() as module:
        store = tmp_path / "state.db"
        modbus_port = free_port()
        config = write_config(tmp_path / "smallbms-bus.toml", hub.path("slcan1"), store, module.port, modbus_port,
                              discovery_window=10.0)  # the default: a first start learns for 10 s
        simulator = simulate(hub)
        service = start(config)
        try:
            wait_for(lambda: module.relays[LOAD] and module.relays[CHARGE], 40, "first start: relays on", service)
            stop(service)
            assert not module.relays[LOAD] and not module.relays[CHARGE]
            simulator.terminate()
            simulator.wait(timeout=10)
            service = start(config)  # nothing on the wire while it starts

            def answers() -> bool:
                try:
                    with socket.create_connection(("127.0.0.1", modbus_port), timeout=0.5):
                        return True
                except OSError:
                    return False
            wait_for(answers, 30, "the restarted service serves Modbus", service)
            time.sleep(1.0)  # its bus is open and it is deciding: waiting for batteries
            assert not module.relays[LOAD] and not module.relays[CHARGE]
            frames_before = len(hub.sent_at.get("slcan0", []))
            simulator = simulate(hub)
            wait_for(lambda: len(hub.sent_at.get("slcan0", [])) > frames_before, 20, "the simulator's first frame")
            first_frame = hub.sent_at["slcan0"][frames_before]
            wait_for(lambda: module.all_on_at(LOAD, CHARGE, since=first_frame) is not None, 20,
                     "restart: load and charge relays on", service)
            delay = module.all_on_at(LOAD, CHARGE, since=first_frame) - first_frame
            print(f"outputs back {delay:.2f} s after the first frame")
            assert delay <= 3.0, f"outputs back {delay:.2f} s after the first frame"
            stop(service)
        finally:
            if service.poll() is None:
                service.kill()
            simulator.terminate()
            simulator.wait(timeout=10)
        with Store.open(store) as s:
            events = s.events(limit=None)[::-1]
        assert not [e for e in events if "recovering" in e["reason"]], events
        assert sum(1 for e in events if (e["name"], e["value"]) == ("SOC_UNKNOWN", "raised")) == 1  # the first start
        assert sum(1 for e in events if e["name"] == "MODE") == 1, events  # mode did not change at the restart


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
                      f'[outputs]\nbackend = "memory"\n[metrics]\nport = 0\n[web]\nport = 0\n'
                      f'[modbus]\nhost = "127.0.0.1"\nport = {port}\n')
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
