"""Comms loss (COM-1, COM-2): one battery silent, every battery silent, an AliveCounter frozen.

In every trial the load and charge relays must be commanded off within comm_timeout + 0.5 s, measured from
the moment the frames stop (the last BAT_STATUS of the battery that stopped first, as seen on the bus) or
the counter froze (the first BAT_STATUS carrying the frozen value) to the relay write on the board. Then the
batteries come back and the outputs must recover (COM-2: 2 s of fresh data). The service runs in-process
with virtual batteries on a python-can virtual bus and a memory relay board that stamps its writes.
"""

from __future__ import annotations

import concurrent.futures
import os
import random
import statistics
import threading
import time

import can
import pytest

from smallbms_bus.bms.alarms import BmsAlarm
from tests.faults.campaign import CAMPAIGN
from tests.faults.rigs import CHARGE, LOAD, PRE, RecordingBoard, ServiceRig, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.timeout(CAMPAIGN.timeout_s)]

STATUS_BASE = 0x100  # BAT_STATUS_NN = 0x100 + node (dbc/lithium_ng.dbc)
KINDS = {"one battery silent": ("silent", (2,)), "all batteries silent": ("silent", (1, 2)),
         "AliveCounter frozen": ("alive_frozen", (2,))}


class StatusTap:
    """A second node on the bus: when each battery's BAT_STATUS frames were sent and with which counter."""

    def __init__(self, channel: str) -> None:
        self.bus = can.Bus(interface="virtual", channel=channel)
        self.frames: dict[int, list[tuple[float, int]]] = {1: [], 2: []}
        self._offset = time.time() - time.monotonic()  # virtual-bus timestamps are time.time() at send
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tap", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            msg = self.bus.recv(0.1)
            if msg is not None and msg.arbitration_id - STATUS_BASE in self.frames and len(msg.data) == 8:
                self.frames[msg.arbitration_id - STATUS_BASE].append((msg.timestamp - self._offset, msg.data[7]))

    def stopped_at(self, node: int, fault: str, cut: float, before: float) -> float:
        """When the battery's frames stopped (silent) or its counter last advanced (alive_frozen)."""
        frames = [f for f in list(self.frames[node]) if f[0] <= before]
        if fault == "silent":
            assert not [f for f in frames if f[0] > cut + 0.05], f"battery {node} kept sending after the cut"
            return frames[-1][0]
        # The first frame that carries the frozen value is the last advance.
        last_change = next(i for i in range(len(frames) - 1, 0, -1) if frames[i][1] != frames[i - 1][1])
        assert frames[-1][1] == frames[last_change][1]
        return frames[last_change][0]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.bus.shutdown()


def run_trials(tmp_path, kind: str, comm_timeout: float, trials: int, seed: int) -> tuple[list[float], list[float]]:
    """`trials` faults of one kind on one service; returns the latencies and the recovery times."""
    fault, nodes = KINDS[kind]
    rng = random.Random(seed)
    latencies: list[float] = []
    recoveries: list[float] = []
    board = RecordingBoard()
    with ServiceRig(tmp_path, board=board, bms=f"comm_timeout = {comm_timeout}\n") as rig:
        tap = StatusTap(rig.channel)
        try:
            wait_until(lambda: rig.on(LOAD, CHARGE), 10, f"{kind}: load and charge on after start")
            for trial in range(trials):
                what = f"{kind}, trial {trial + 1}, comm_timeout {comm_timeout} s, seed {seed}"
                time.sleep(rng.uniform(0.2, 1.0))  # a random phase against the 100 ms tick and the frames
                assert rig.on(LOAD, CHARGE), f"{what}: outputs not on before the fault"
                cut = time.monotonic()
                for node in nodes:
                    setattr(rig.sim.bank.battery(node), fault, True)
                off = wait_until(lambda: not board.relays[LOAD] and not board.relays[CHARGE],
                                 comm_timeout + 3.0, f"{what}: load and charge off")
                load_off, charge_off = board.first_write(LOAD, False, cut), board.first_write(CHARGE, False, cut)
                assert load_off is not None and charge_off is not None
                stop = min(tap.stopped_at(node, fault, cut, off) for node in nodes)
                latency = max(load_off, charge_off) - stop
                assert latency <= comm_timeout + 0.5, f"{what}: outputs off {latency:.3f} s after the frames stopped"
                decision = rig.decision
                assert decision is not None and BmsAlarm.BATTERY_COMMS_LOST in decision.alarms, what
                wait_until(lambda: board.relays[PRE], 1.0, f"{what}: pre-alarm high (COM-2)")
                latencies.append(latency)
                for node in nodes:
                    setattr(rig.sim.bank.battery(node), fault, False)
                back = time.monotonic()
                wait_until(lambda: rig.on(LOAD, CHARGE), comm_timeout + 6.0, f"{what}: outputs back")
                recoveries.append(time.monotonic() - back)
            assert rig.service.stats.task_restarts == 0
            assert rig.shutdown() == 0
        finally:
            tap.close()
    return latencies, recoveries


def campaign_figures(tmp_path, comm_timeout: float, trials: int) -> dict[str, object]:
    """The three kinds run side by side, each on its own service (the trials mostly wait: CPU stays low)."""
    seed = int.from_bytes(os.urandom(4), "big")
    with concurrent.futures.ThreadPoolExecutor(len(KINDS)) as pool:
        futures = {kind: pool.submit(run_trials, tmp_path / f"k{i}", kind, comm_timeout, trials, seed + i)
                   for i, kind in enumerate(KINDS)}
        found = {kind: f.result() for kind, f in futures.items()}
    out: dict[str, object] = {"comm_timeout_s": comm_timeout, "bound_s": comm_timeout + 0.5, "seed": seed}
    for kind, (latencies, recoveries) in found.items():
        out[kind.replace(" ", "_")] = {"trials": len(latencies), "worst_s": round(max(latencies), 3),
                                       "median_s": round(statistics.median(latencies), 3),
                                       "worst_recovery_s": round(max(recoveries), 3)}
    return out


def test_outputs_off_within_comm_timeout_plus_half_a_second_in_every_trial(tmp_path, campaign, figures):
    figures(**campaign_figures(tmp_path, 1.0, campaign.comms_trials))


@pytest.mark.skipif(CAMPAIGN.comms_trials_default_timeout == 0, reason="long campaign only (SMALLBMS_FAULTS=long)")
def test_outputs_off_within_the_default_comm_timeout_plus_half_a_second(tmp_path, campaign, figures):
    figures(**campaign_figures(tmp_path, 5.0, campaign.comms_trials_default_timeout))
