"""The BMS-CAN link on a real SocketCAN interface (vcan1, beside the battery suite's vcan0): the service sends the
frame set, the virtual inverter obeys 0x351 and sends its keep-alive, 0x351 gaps are measured on the kernel's
receive timestamps, and the interface taken down and up is re-opened. Runs in the VM suite (tests/vcan/run-in-vm,
as root: vcan1 is created with deploy/can/vcan-up.sh); skipped where the kernel has no vcan."""

from __future__ import annotations

import itertools
import os
import subprocess
import threading
import time
from pathlib import Path

import can
import pytest

from smallbms_bus.bms.alarms import BmsWarning
from smallbms_bus.link.bus import socketcan_is_up
from smallbms_bus.sim.inverter import InverterPeer, VirtualInverter
from tests.metrics_rig import RunningBms
from tests.transports import NO_VCAN

pytestmark = [pytest.mark.vcan, pytest.mark.timeout(600)]
CHANNEL = "vcan1"
VCAN_UP = Path(__file__).resolve().parents[2] / "deploy" / "can" / "vcan-up.sh"
MAX_GAP_S = 1.5


@pytest.fixture(scope="module")
def vcan1() -> str:
    if not socketcan_is_up(CHANNEL) and os.geteuid() == 0:
        subprocess.run(["bash", str(VCAN_UP), CHANNEL], capture_output=True, timeout=30)
    if not socketcan_is_up(CHANNEL):
        pytest.skip(NO_VCAN.replace("vcan0", CHANNEL))
    return CHANNEL


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} not reached within {timeout} s")


class Recorder:
    """A third socket on vcan1 that records every 0x351 with the kernel's timestamp."""

    def __init__(self, channel: str) -> None:
        self.bus = can.Bus(interface="socketcan", channel=channel, can_filters=[{"can_id": 0x351, "can_mask": 0x7FF}])
        self.stamps: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                frame = self.bus.recv(0.1)
            except can.CanError:  # the interface is down for a moment (the down/up test)
                time.sleep(0.1)
                continue
            if frame is not None:
                self.stamps.append(frame.timestamp)

    def gaps(self) -> list[float]:
        return [b - a for a, b in itertools.pairwise(list(self.stamps))]

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        self.bus.shutdown()


def test_closed_loop_on_vcan1_with_gaps_keepalive_and_interface_down_up(tmp_path, vcan1):
    extra = f'[inverter]\ninterface = "socketcan"\nchannel = "{vcan1}"\nkeepalive_timeout = 3\n'
    rig = RunningBms(tmp_path, metrics_extra=extra)
    inverter = VirtualInverter(charge_a=500.0)
    rig.sim.devices.charger.max_current = 500.0  # the inverter's own charger: far more than any CCL here
    rig.sim.devices.load.enabled = False
    rig.sim.devices.inverter = inverter
    peer = InverterPeer(can.Bus(interface="socketcan", channel=vcan1), inverter).start()
    recorder = Recorder(vcan1)
    try:
        with rig:
            rig.started(60)
            wait_for(lambda: inverter.limits is not None and inverter.limits.ccl > 0, 60, "a CCL above 0")
            wait_for(lambda: len(recorder.stamps) >= 10, 60, "ten 0x351 on vcan1")
            assert max(recorder.gaps()) <= MAX_GAP_S
            assert rig.service.inverter.keepalives > 0
            assert BmsWarning.INVERTER_SILENT not in rig.service.decision.warnings
            if os.geteuid() == 0:  # the interface down and up: the link re-opens and the limits come again
                opens = rig.service.inverter.opens
                subprocess.run(["ip", "link", "set", vcan1, "down"], check=True, timeout=10)
                wait_for(lambda: not rig.service.inverter.up, 10, "the link down")
                subprocess.run(["ip", "link", "set", vcan1, "up"], check=True, timeout=10)
                wait_for(lambda: rig.service.inverter.opens > opens, 20, "the link re-opened")
                count = len(recorder.stamps)
                wait_for(lambda: len(recorder.stamps) >= count + 3, 20, "0x351 again after the re-open")
            assert rig.shutdown() == 0
            wait_for(lambda: inverter.limits.ccl == 0 and inverter.limits.dcl == 0, 10, "zero limits at the stop")
    finally:
        recorder.close()
        peer.close()
