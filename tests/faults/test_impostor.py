"""COM-6 through the running service: a second sender on a learned node (issue 12, seen item 2).

The service runs in-process on a python-can virtual bus with a bank of three batteries (nodes 1..3) from the
simulator. Battery 3 reports CellHighVoltage; then a second simulator sends as node 3 for 6 s with another
serial, no flags and the protocol's frame rates. Seen before the fix: 54 of 124 BMS_STATE frames allowed
charging, the charge output chattered at 10 Hz, 240 events. What the chargers see (BMS_STATE on the bus) and
what the relay board is told are both checked, against the impostor's own send times.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import can
import pytest

from smallbms_bus.bms.alarms import BmsAlarm
from smallbms_bus.bms.core import Decision
from smallbms_bus.link.codec import FrameDecoder
from smallbms_bus.reports import BmsState
from smallbms_bus.sim.runner import Simulator
from tests.faults.campaign import CAMPAIGN
from tests.faults.rigs import CHARGE, LOAD, RecordingBoard, ServiceRig, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.timeout(CAMPAIGN.timeout_s)]

COMM_TIMEOUT = 5.0  # the default
IMPOSTOR_S = 6.0


class BmsStateTap:
    """Another node on the bus: every BMS_STATE the chargers and loads receive, with its send time."""

    def __init__(self, channel: str) -> None:
        self.bus = can.Bus(interface="virtual", channel=channel)
        self.decoder = FrameDecoder()
        self.states: list[tuple[float, BmsState]] = []
        self._offset = time.time() - time.monotonic()  # virtual-bus timestamps are time.time() at send
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bms-state-tap", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            msg = self.bus.recv(0.1)
            if msg is not None and msg.arbitration_id == 0x0F0:
                report = self.decoder.decode(msg)
                if isinstance(report, BmsState):
                    self.states.append((msg.timestamp - self._offset, report))

    def between(self, start: float, end: float) -> list[BmsState]:
        return [s for t, s in list(self.states) if start <= t <= end]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.bus.shutdown()


class SendLog:
    """The impostor's bus, remembering when each of its frames went out (time.monotonic, the service's clock)."""

    def __init__(self, bus: can.BusABC) -> None:
        self.bus = bus
        self.sent: list[float] = []

    def send(self, msg: can.Message, timeout: float | None = None) -> None:
        self.bus.send(msg, timeout)
        self.sent.append(time.monotonic())

    def recv(self, timeout: float | None = None) -> can.Message | None:
        return self.bus.recv(timeout)


class AlarmLog:
    """(now, ATC, alarms, events) of every decision of the running core; its own evaluate does the work."""

    def __init__(self, core: Any) -> None:
        self.entries: list[tuple[float, bool, BmsAlarm, int]] = []
        self.reasons: list[tuple[float, str]] = []
        real = core.evaluate

        def evaluate(now: float, wall: float) -> Decision:
            d = real(now, wall)
            self.entries.append((now, d.atc, d.alarms, len(d.events)))
            if "BANK_CONFIGURATION" in d.reasons:
                self.reasons.append((now, d.reasons["BANK_CONFIGURATION"]))
            return d

        core.evaluate = evaluate


def test_a_second_sender_on_node_3_never_allows_charging_nor_switches_the_charge_relay_on(tmp_path, figures):
    board = RecordingBoard()
    with ServiceRig(tmp_path, bank="1s3p-12v100", board=board) as rig:
        tap = BmsStateTap(rig.channel)
        try:
            wait_until(lambda: rig.on(LOAD, CHARGE), 15, "load and charge on")
            battery_3 = rig.sim.bank.battery(3)
            battery_3.set_cell_voltage(1, 3.95)  # its firmware raises CellHighVoltage at the next step
            charge_off = wait_until(lambda: not rig.on(CHARGE), 3, "charge relay off")
            alarms = AlarmLog(rig.service.core)
            time.sleep(0.5)

            impostor = Simulator.from_scenario("steady", "1s3p-12v100", seed=7)
            for node in (1, 2):
                impostor.bank.battery(node).silent = True  # only node 3 has a second sender
            fake = impostor.bank.battery(3)
            assert fake.serial != battery_3.serial and not fake.active_flags()  # no flags
            log = SendLog(can.Bus(interface="virtual", channel=rig.channel))
            sender = threading.Thread(target=impostor.run, args=(log,), kwargs={"duration": IMPOSTOR_S},
                                      name="impostor", daemon=True)
            sender.start()
            sender.join(IMPOSTOR_S + 10)
            first, last = log.sent[0], log.sent[-1]
            # BANK_CONFIGURATION is held until comm_timeout after the last conflicting frame, then lets go
            cleared = wait_until(lambda: BmsAlarm.BANK_CONFIGURATION not in rig.decision.alarms,
                                 COMM_TIMEOUT + 5, "BANK_CONFIGURATION cleared")
            time.sleep(1.0)
            end = time.monotonic()
            log.bus.shutdown()

            states = tap.between(first, end)
            allowed = sum(s.allowed_to_charge for s in states)
            charge_on_writes = [t for t, c, on in list(board.log) if c == CHARGE and on and t >= charge_off]
            window = [e for e in alarms.entries if e[0] >= first]
            raised = next(now for now, _, a, _ in window if BmsAlarm.BANK_CONFIGURATION in a)
            held = [now for now, _, a, _ in window if BmsAlarm.BANK_CONFIGURATION in a]
            let_go = next(now for now, _, a, _ in window if now > raised and BmsAlarm.BANK_CONFIGURATION not in a)
            events = sum(n for now, _, _, n in window if now <= end)
            reason = next(r for now, r in alarms.reasons if now >= last - 1.0)
            figures(bms_state_frames=len(states), allowing_charge=allowed, charge_relay_on_writes=len(charge_on_writes),
                    raised_after_s=round(raised - first, 3), cleared_after_last_frame_s=round(let_go - last, 3),
                    events=events)

            assert len(states) >= 10 * (IMPOSTOR_S + COMM_TIMEOUT) * 0.8  # the BMS kept talking throughout
            assert allowed == 0, f"{allowed} of {len(states)} BMS_STATE frames allowed charging"
            assert charge_on_writes == [], "the charge relay was switched on"
            assert not any(atc for now, atc, _, _ in window)
            assert raised - first <= 1.5  # "at once": the second counter step back, or the serial half (<= 1 s)
            assert all(raised <= now < let_go for now in held) and let_go <= cleared  # raised once, cleared once
            # held until comm_timeout after the last conflicting frame: the impostor's last BAT_STATUS (sent at most
            # one period before its last frame, or two when its scheduler skipped one under load) or later
            assert last - 0.3 + COMM_TIMEOUT <= let_go <= last + COMM_TIMEOUT + 3.0
            assert events <= 6  # BANK_CONFIGURATION and ATD, raised and cleared: no chattering (seen: 240)
            assert "battery 3" in reason and battery_3.serial in reason and fake.serial in reason, reason
            assert rig.on(LOAD) and not rig.on(CHARGE)  # the loads are back; battery 3 still too high to charge
        finally:
            tap.close()
