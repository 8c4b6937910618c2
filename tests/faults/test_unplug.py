"""Devices unplugged and back: the relay board's serial port, the Modbus TCP I/O module, the SLCAN adapter.

- Modbus RTU relay board (`VirtualModbusRelayBoard`, a pseudo-terminal behind a stable path): the port is
  closed (the USB RS-485 adapter pulled) -> RELAY_FAULT within 2 s; while it is away the board loses power
  (every relay released); the port comes back -> every output re-asserted and RELAY_FAULT cleared.
- Modbus TCP I/O module (`VirtualModbusTcpModule`): the module goes away (its server stops) -> RELAY_FAULT
  within 2 s; a new module on the same port (relays all released, as after a power cycle) -> outputs
  re-asserted.
- SLCAN adapter (`SlcanHub.unplug/replug` under `smallbms-bus run`): comms loss (COM-4) switches load and
  charge off within comm_timeout + 0.5 s (in fact at once: the link goes down), then the link re-opens with
  back-off and the outputs come back after COM-2's 2 s of fresh data.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from smallbms_bus.bms.alarms import BmsAlarm
from smallbms_bus.sim.relay_boards import VirtualModbusRelayBoard, VirtualModbusTcpModule
from tests.faults.campaign import CAMPAIGN
from tests.faults.rigs import CHARGE, LOAD, ProcessRig, ServiceRig, metric, wait_until
from tests.ports import free_port

pytestmark = [pytest.mark.faults, pytest.mark.timeout(CAMPAIGN.timeout_s)]

FAULT_BOUND_S = 2.0
BACK_BOUND_S = 6.0  # the board is re-opened with back-off (0.1 s doubling to 5 s), then everything re-asserted


def relay_fault(rig: ServiceRig) -> bool:
    decision = rig.decision
    return decision is not None and BmsAlarm.RELAY_FAULT in decision.alarms


def board_trials(rig: ServiceRig, relays: Callable[[], dict[int, bool]], unplug: Callable[[], None],
                 replug: Callable[[], None], trials: int, rng: random.Random, what: str) -> dict[str, float]:
    detect: list[float] = []
    back: list[float] = []
    wait_until(lambda: relays()[LOAD] and relays()[CHARGE], 15, f"{what}: load and charge on")
    for trial in range(1, trials + 1):
        label = f"{what}, trial {trial}"
        time.sleep(rng.uniform(0.2, 1.5))  # a random phase against the 100 ms tick and the 5 s re-assert
        assert not relay_fault(rig), f"{label}: RELAY_FAULT before the unplug"
        gone = time.monotonic()
        unplug()
        seen = wait_until(lambda: relay_fault(rig), 10, f"{label}: RELAY_FAULT")
        detect.append(seen - gone)
        assert seen - gone <= FAULT_BOUND_S, f"{label}: RELAY_FAULT {seen - gone:.2f} s after the unplug"
        time.sleep(rng.uniform(0.5, 3.0))
        returned = time.monotonic()
        replug()
        wait_until(lambda: relays()[LOAD] and relays()[CHARGE] and not relay_fault(rig), 15,
                   f"{label}: outputs re-asserted and RELAY_FAULT cleared")
        back.append(time.monotonic() - returned)
        assert back[-1] <= BACK_BOUND_S, f"{label}: outputs re-asserted {back[-1]:.2f} s after the return"
    assert rig.service.stats.task_restarts == 0
    assert rig.shutdown() == 0
    assert not relays()[LOAD] and not relays()[CHARGE]  # and a clean stop still switches them off
    return {"trials": trials, "worst_fault_s": round(max(detect), 3), "worst_reasserted_s": round(max(back), 3)}


def test_relay_board_serial_port_unplugged_and_back(tmp_path: Path, campaign, figures):
    seed = int.from_bytes(os.urandom(4), "big")
    with VirtualModbusRelayBoard(unit=1, directory=str(tmp_path), name="relay-rs485") as board:
        outputs = (f'[outputs]\nbackend = "modbus"\n[outputs.options]\ntransport = "rtu"\nport = "{board.path}"\n'
                   "unit = 1\n")

        def unplug() -> None:
            board.unplug()
            board.reboot()  # and the board loses power while it is away: only a re-assert brings the relays back

        with ServiceRig(tmp_path, outputs=outputs) as rig:
            found = board_trials(rig, lambda: board.relays, unplug, board.replug, campaign.unplug_trials,
                                 random.Random(seed), f"RTU board, seed {seed}")
    figures(seed=seed, **found, bound_fault_s=FAULT_BOUND_S, bound_reasserted_s=BACK_BOUND_S)


def test_modbus_tcp_module_gone_and_back(tmp_path: Path, campaign, figures):
    seed = int.from_bytes(os.urandom(4), "big")
    port = free_port()
    modules = [VirtualModbusTcpModule(unit=1, port=port)]
    outputs = (f'[outputs]\nbackend = "modbus"\n[outputs.options]\ntransport = "tcp"\nhost = "127.0.0.1"\n'
               f"port = {port}\nunit = 1\n")

    def unplug() -> None:
        modules[-1].close()

    def replug() -> None:  # a new module on the same address: every relay released, as after a power cycle
        modules.append(VirtualModbusTcpModule(unit=1, port=port))

    try:
        with ServiceRig(tmp_path, outputs=outputs) as rig:
            found = board_trials(rig, lambda: modules[-1].relays, unplug, replug, campaign.unplug_trials,
                                 random.Random(seed), f"TCP module, seed {seed}")
    finally:
        modules[-1].close()
    figures(seed=seed, **found, bound_fault_s=FAULT_BOUND_S, bound_reasserted_s=BACK_BOUND_S)


def test_slcan_adapter_unplugged_and_back_is_comms_loss_then_recovery(tmp_path: Path, campaign, figures):
    comm_timeout = 5.0  # the default
    rng = random.Random(int.from_bytes(os.urandom(4), "big"))
    off: list[float] = []
    back: list[float] = []
    with ProcessRig(tmp_path, metrics=True) as rig:
        rig.start()
        rig.wait_ready()
        wait_until(lambda: rig.module.relays[LOAD] and rig.module.relays[CHARGE], 20, "load and charge on")
        for trial in range(1, campaign.unplug_trials + 1):
            time.sleep(rng.uniform(0.2, 1.5))
            pulled = time.monotonic()
            rig.hub.unplug("slcan1")
            seen = wait_until(lambda: not (relays := rig.module.relays)[LOAD] and not relays[CHARGE],
                              comm_timeout + 3, f"trial {trial}: load and charge off")
            off.append(seen - pulled)
            assert off[-1] <= comm_timeout + 0.5, f"trial {trial}: outputs off {off[-1]:.2f} s after the unplug"
            values = rig.metrics()
            assert metric(values, "smallbms_bus_up") == 0
            assert metric(values, "smallbms_alarm", alarm="battery_comms_lost") == 1
            time.sleep(rng.uniform(0.5, 3.0))
            returned = time.monotonic()
            rig.hub.replug("slcan1")
            seen = wait_until(lambda: (relays := rig.module.relays)[LOAD] and relays[CHARGE], 15,
                              f"trial {trial}: load and charge back")
            back.append(seen - returned)
        values = rig.metrics()
        assert metric(values, "smallbms_bus_up") == 1
        assert metric(values, "smallbms_bus_link_lost_total") == campaign.unplug_trials
        assert metric(values, "smallbms_task_restarts_total") == 0
        assert rig.stop() == 0
    figures(trials=campaign.unplug_trials, comm_timeout_s=comm_timeout, worst_off_s=round(max(off), 3),
            worst_recovery_s=round(max(back), 3))
