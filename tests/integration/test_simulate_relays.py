"""`smallbms-bus simulate --relay-board`: the simulated charger and load follow the relays `smallbms-bus run` drives
(issue 13 item 2). Two real processes on an SLCAN pseudo-terminal wire, the relays on a virtual Modbus TCP
module that the service writes and the simulator reads; the bank current as the service reports it."""

from __future__ import annotations

import re
import signal
import subprocess
import time

import pytest
from pymodbus.client import ModbusTcpClient

from smallbms_bus.sim.relay_boards import VirtualModbusTcpModule
from smallbms_bus.sim.slcan_hub import SlcanHub
from tests.integration.test_run_process import CHARGE, CMD, LOAD, start, wait_for, write_config
from tests.ports import free_port


def bank_current(client: ModbusTcpClient) -> float:
    """Registers 4-5: the bank current from the batteries' frames, int32 in 0.01 A (docs/registers.md)."""
    high, low = client.read_holding_registers(4, count=2, device_id=1).registers
    raw = (high << 16) | low
    return (raw - (1 << 32) if raw & 0x80000000 else raw) / 100


def settles_at(client: ModbusTcpClient, amps: float, timeout: float, service: subprocess.Popen) -> float:
    """Real seconds until the service reads `amps` (the service runs in real time: these are its seconds)."""
    started = time.monotonic()
    wait_for(lambda: bank_current(client) == pytest.approx(amps, abs=0.05), timeout, f"bank current {amps} A",
             service)
    return time.monotonic() - started


@pytest.fixture
def rig(tmp_path):
    with SlcanHub() as hub, VirtualModbusTcpModule(unit=1) as module:
        modbus_port = free_port()
        config = write_config(tmp_path / "smallbms-bus.toml", hub.path("slcan1"), tmp_path / "state.db", module.port,
                              modbus_port)
        simulator = subprocess.Popen([*CMD, "simulate", "--interface", "slcan", "--channel", hub.path("slcan0"),
                                      "--bank", "2s1p-12v100", "--scenario", "steady", "--status-every", "0.5",
                                      "--relay-board", f"modbus-tcp:127.0.0.1:{module.port}"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        service = start(config)
        client = ModbusTcpClient("127.0.0.1", port=modbus_port, timeout=3)
        try:
            yield module, service, client
        finally:
            client.close()
            service.send_signal(signal.SIGTERM)
            service.communicate(timeout=20)
            simulator.send_signal(signal.SIGINT)
            _, err = simulator.communicate(timeout=20)
            assert simulator.returncode == 0 and "Traceback" not in err, err[-2000:]
            assert "charger: switched by the charge relay, load: switched by the load relay of modbus-tcp" in err


def test_mode_off_opens_the_relays_and_the_simulated_devices_stop_within_2_s(rig):
    """steady on 2s1p-12v100: a 6 A charger and a 5 A load, +1 A. Mode off over Modbus: both relays open and the
    bank reads 0 A within 2 s; mode on: +1 A again. Before the fix the devices followed BMS_STATE only and the
    bank kept +1 A with every relay open."""
    module, service, client = rig
    wait_for(lambda: module.relays[LOAD] and module.relays[CHARGE], 20, "load and charge relays on", service)
    wait_for(client.connect, 10, "the service's Modbus server", service)
    settles_at(client, 1.0, 10, service)
    assert not client.write_register(105, 0, device_id=1).isError()
    assert settles_at(client, 0.0, 5, service) <= 2.0
    assert not module.relays[LOAD] and not module.relays[CHARGE]
    assert not client.write_register(105, 1, device_id=1).isError()
    assert settles_at(client, 1.0, 5, service) <= 2.0


def test_a_relay_that_does_not_open_is_visible(rig):
    """A welded load relay (the module's coil ignores the write): mode off stops the charger only, the bank reads
    -5 A (the load still runs although `status` says the load output is low) and `status` says RELAY_FAULT."""
    module, service, client = rig
    wait_for(lambda: module.relays[LOAD] and module.relays[CHARGE], 20, "load and charge relays on", service)
    wait_for(client.connect, 10, "the service's Modbus server", service)
    settles_at(client, 1.0, 10, service)
    module.stuck = {LOAD}
    assert not client.write_register(105, 0, device_id=1).isError()
    assert settles_at(client, -5.0, 5, service) <= 2.0
    status = subprocess.run([*CMD, "status", "--port", str(client.comm_params.port)], capture_output=True, text=True,
                            timeout=20)
    assert re.search(r"^alarms\s+RELAY_FAULT", status.stdout, re.M), status.stdout
    assert module.relays[LOAD] and not module.relays[CHARGE]
