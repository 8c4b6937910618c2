"""The frame scheduler's periods, the Simulator's clocks, and a real-time run over python-can `virtual`."""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections import Counter, defaultdict

import can
import pytest

from smallbms_bus.link.codec import FrameDecoder, FrameEncoder
from smallbms_bus.reports import (
    BatteryInfo,
    BatteryStatus,
    BatteryTemps,
    BmsState,
    CellVoltages,
    SerialFragment,
)
from smallbms_bus.sim.bank import VirtualBank
from smallbms_bus.sim.clock import SimClock
from smallbms_bus.sim.runner import FrameScheduler, Simulator

TICK = 0.005


def bms_state(charge: bool = True, discharge: bool = True, alive: int = 0) -> BmsState:
    return BmsState(allowed_to_charge=charge, allowed_to_discharge=discharge, pre_alarm=False, mode_on=True,
                    remote_on=True, firmware_update=False, state_of_charge=50.0, alarms=0, warnings=0,
                    battery_count=4, alive_counter=alive)


def run_scheduler(scheduler: FrameScheduler, seconds: float, start: float = 1000.0) -> list[tuple[float, can.Message]]:
    frames = []
    for k in range(round(seconds / TICK)):
        now = start + k * TICK
        frames += [(now, f) for f in scheduler.due(now)]
    return frames


@pytest.mark.parametrize("shape", ["2s2p-12v100", "1s4p-48v100", "1s2p-24v200", "max-chain"])
def test_each_message_at_its_period_and_every_frame_decodes(encoder: FrameEncoder, shape: str) -> None:
    bank = VirtualBank(shape)
    frames = run_scheduler(FrameScheduler(bank, encoder), 10.0)
    decoder = FrameDecoder(encoder.db)
    reports = [decoder.decode(f) for _, f in frames]
    assert decoder.malformed_total == 0 and None not in reports
    assert all(f.dlc == 8 and not f.is_extended_id for _, f in frames)

    counts = Counter((type(r).__name__, r.node, getattr(r, "first_cell", None)) for r in reports)
    groups = {1: [1], 2: [1, 5], 4: [1, 5, 9, 13]}[bank.shape.units]
    for b in bank.batteries:
        assert counts[("BatteryStatus", b.node, None)] == 100
        for first in groups:
            assert counts[("CellVoltages", b.node, first)] == 20
        assert counts[("CellVoltages", b.node, 17)] == 0
        for kind in ("BatteryTemps", "BatteryInfo", "SerialFragment"):
            assert counts[(kind, b.node, None)] == 10
    assert len(reports) == len(bank.batteries) * (100 + 20 * len(groups) + 30)


def test_reports_carry_the_battery_and_serial_parts_alternate(encoder: FrameEncoder) -> None:
    bank = VirtualBank("2s2p-12v100", seed=2)
    decoder = FrameDecoder(encoder.db)
    reports = [decoder.decode(f) for _, f in run_scheduler(FrameScheduler(bank, encoder), 10.0)]
    for b in bank.batteries:
        parts = [r for r in reports if isinstance(r, SerialFragment) and r.node == b.node]
        assert [p.part for p in parts] == [0, 1] * 5
        assert parts[0].chars + parts[1].chars == b.serial
        info = next(r for r in reports if isinstance(r, BatteryInfo) and r.node == b.node)
        assert (info.string_index, info.series_index, info.nominal_units, info.nominal_capacity_ah) == (
            b.string_index, b.series_index, 1, 100)
        counters = [r.alive_counter for r in reports if isinstance(r, BatteryStatus) and r.node == b.node]
        assert counters == list(range(100))
        temps = next(r for r in reports if isinstance(r, BatteryTemps) and r.node == b.node)
        assert temps.cell_temp_min <= temps.cell_temp_max


def test_frames_of_one_battery_are_evenly_spaced_and_batteries_are_staggered(encoder: FrameEncoder) -> None:
    bank = VirtualBank("1s4p-12v100")
    frames = run_scheduler(FrameScheduler(bank, encoder), 10.0)
    decoder = FrameDecoder(encoder.db)
    times: dict[tuple[str, int], list[float]] = defaultdict(list)
    for now, frame in frames:
        r = decoder.decode(frame)
        times[(type(r).__name__, r.node)].append(now)
    for (kind, _), ts in times.items():
        period = {"BatteryStatus": 0.1, "CellVoltages": 0.5}.get(kind, 1.0)
        gaps = [b - a for a, b in itertools.pairwise(ts)]
        assert all(abs(g - period) <= TICK + 1e-9 for g in gaps), (kind, set(gaps))
    firsts = sorted(times[("BatteryStatus", b.node)][0] for b in bank.batteries)
    assert len(set(firsts)) == 4 and firsts[-1] - firsts[0] < 0.1


def test_a_late_caller_gets_one_frame_per_stream_not_a_burst(encoder: FrameEncoder) -> None:
    bank = VirtualBank("1s1p-12v100")
    scheduler = FrameScheduler(bank, encoder)
    assert len(scheduler.due(0.0)) == 1 + 1 + 3  # status, cells, temps/info/serial
    assert len(scheduler.due(7.3)) == 5  # 7 s late: still one of each
    assert scheduler.next_due() == pytest.approx(7.4)
    assert scheduler.skipped == 72 + 13 + 6  # counted: status 0.1..7.2, cells 0.5..6.5, slow 1..6 s


def test_a_silent_battery_sends_nothing_and_resumes_in_phase(encoder: FrameEncoder) -> None:
    bank = VirtualBank("1s2p-12v100")
    scheduler = FrameScheduler(bank, encoder)
    decoder = FrameDecoder(encoder.db)
    bank.battery(2).silent = True
    nodes = {decoder.decode(f).node for _, f in run_scheduler(scheduler, 2.0, start=0.0)}
    assert nodes == {1}
    bank.battery(2).silent = False
    nodes = {decoder.decode(f).node for _, f in run_scheduler(scheduler, 1.0, start=2.0)}
    assert nodes == {1, 2}


def test_physics_advance_by_speed_times_elapsed_and_frames_stay_real_time(encoder: FrameEncoder) -> None:
    sim = Simulator.from_scenario("steady", "1s1p-12v100", speed=60.0, encoder=encoder)
    frames = []
    for k in range(101):
        frames += sim.step(k * 0.1)
    assert sim.sim_time == pytest.approx(600.0)  # 10 s of clock at 60x
    statuses = [f for f in frames if f.arbitration_id == 0x101]
    assert len(statuses) == 101  # 100 ms periods of the clock, not of the physics
    sim.speed = 1.0
    sim.step(20.0)
    assert sim.sim_time == pytest.approx(610.0)
    with pytest.raises(ValueError):
        sim.speed = 0.0


def test_scenario_actions_happen_at_their_simulated_time_even_in_big_steps(encoder: FrameEncoder) -> None:
    sim = Simulator.from_scenario("firmware-update", "1s1p-12v100", speed=100.0, encoder=encoder)
    sim.step(0.0)
    sim.step(0.59)
    assert not sim.bank.battery(1).firmware_updating
    sim.step(0.61)  # 61 simulated seconds
    assert sim.bank.battery(1).firmware_updating
    sim.step(2.2)  # 220 s: the update ended at 210 s
    assert not sim.bank.battery(1).firmware_updating


def test_bms_state_frames_reach_the_devices(encoder: FrameEncoder) -> None:
    sim = Simulator.from_scenario("steady", "1s1p-12v100", encoder=encoder)
    sim.step(0.0)
    sim.step(0.5)
    assert sim.bank.current == 0.0  # nothing runs before a BMS_STATE
    report = sim.on_frame(encoder.bms_state(bms_state(charge=False)), now=0.6)
    assert isinstance(report, BmsState) and sim.last_bms_state == report
    sim.step(0.7)
    assert sim.bank.current == pytest.approx(-5.0)  # only the 0.05C load
    sim.on_frame(encoder.bms_state(bms_state()), now=0.8)
    sim.step(0.9)
    assert sim.bank.current == pytest.approx(1.0)  # 0.06C charger - 0.05C load
    sim.step(1.9)  # BMS_STATE missing for 1.1 s
    assert sim.bank.current == 0.0
    assert sim.stats.bms_states == 2


def test_foreign_and_malformed_frames_are_ignored(encoder: FrameEncoder) -> None:
    sim = Simulator.from_scenario("steady", "1s1p-12v100", encoder=encoder)
    assert sim.on_frame(can.Message(arbitration_id=0x7FF, data=bytes(8), is_extended_id=False)) is None
    assert sim.on_frame(can.Message(arbitration_id=0x0F0, data=bytes(3), is_extended_id=False)) is None
    status = sim.on_frame(encoder.status(sim.bank.battery(1).status()))
    assert isinstance(status, BatteryStatus)  # another simulator's battery: decoded, not obeyed
    assert sim.last_bms_state is None and sim.decoder.malformed_total == 2


def test_status_line_summarises_the_bank(encoder: FrameEncoder) -> None:
    sim = Simulator.from_scenario("hardware-fault", "1s2p-12v100", encoder=encoder, ignore_bms=True)
    sim.step(0.0)
    sim.step(61.0)
    line = sim.status_line()
    assert "sim     61.0 s" in line and "HardwareFault@2" in line and "BMS ignored" in line


# --- real time over a python-can virtual bus ------------------------------------------------------

def test_run_in_real_time_over_a_virtual_bus(encoder: FrameEncoder) -> None:
    channel = f"sim-test-{uuid.uuid4().hex}"
    sim_bus = can.Bus(interface="virtual", channel=channel)
    bms_bus = can.Bus(interface="virtual", channel=channel)
    sim = Simulator.from_scenario("steady", "2s2p-12v100", encoder=encoder, speed=10.0)
    result: dict[str, object] = {}
    runner = threading.Thread(target=lambda: result.update(stats=sim.run(sim_bus, duration=1.0)))
    received: list[can.Message] = []
    try:
        runner.start()
        deadline = time.monotonic() + 1.0
        alive = 0
        next_state = 0.0
        while time.monotonic() < deadline + 0.3:
            if time.monotonic() >= next_state:  # the BMS: BMS_STATE every 100 ms
                bms_bus.send(encoder.bms_state(bms_state(alive=alive)))
                alive += 1
                next_state = time.monotonic() + 0.1
            msg = bms_bus.recv(timeout=0.01)
            if msg is not None:
                received.append(msg)
        runner.join(timeout=2.0)
    finally:
        sim_bus.shutdown()
        bms_bus.shutdown()
    assert not runner.is_alive()
    stats = result["stats"]
    decoder = FrameDecoder(encoder.db)
    reports = [decoder.decode(m) for m in received]
    assert decoder.malformed_total == 0
    statuses = Counter(r.node for r in reports if isinstance(r, BatteryStatus))
    assert set(statuses) == {1, 2, 3, 4} and all(8 <= n <= 12 for n in statuses.values())  # 10 per second
    assert any(isinstance(r, CellVoltages) for r in reports) and any(isinstance(r, SerialFragment) for r in reports)
    assert stats.frames_sent == len(received) and stats.send_errors == 0
    assert stats.bms_states >= 5
    assert sim.sim_time == pytest.approx(10.0, abs=0.6)  # 1 s at 10x
    assert sim.bank.current == pytest.approx(2.0)  # the BMS allowed both: 0.06C - 0.05C of 200 Ah


def test_run_survives_a_dead_bus(encoder: FrameEncoder) -> None:
    bus = can.Bus(interface="virtual", channel=f"sim-dead-{uuid.uuid4().hex}")
    bus.shutdown()  # every send and recv now raises CanOperationError
    sim = Simulator.from_scenario("steady", "1s1p-12v100", encoder=encoder)
    stats = sim.run(bus, duration=0.3)
    assert stats.send_errors > 0 and stats.receive_errors > 0 and stats.frames_sent == 0


def test_run_stops_on_the_stop_event(encoder: FrameEncoder) -> None:
    bus = can.Bus(interface="virtual", channel=f"sim-stop-{uuid.uuid4().hex}")
    stop = threading.Event()
    sim = Simulator.from_scenario("steady", "1s1p-12v100", encoder=encoder)
    timer = threading.Timer(0.2, stop.set)
    started = time.monotonic()
    try:
        timer.start()
        sim.run(bus, stop_event=stop)
    finally:
        timer.cancel()
        bus.shutdown()
    assert time.monotonic() - started < 1.0


def test_run_reports_status_periodically(encoder: FrameEncoder) -> None:
    bus = can.Bus(interface="virtual", channel=f"sim-status-{uuid.uuid4().hex}")
    sim = Simulator.from_scenario("steady", "1s1p-12v100", encoder=encoder)
    lines: list[str] = []
    try:
        sim.run(bus, duration=0.45, status_every=0.1, on_status=lambda s: lines.append(s.status_line()))
    finally:
        bus.shutdown()
    assert 3 <= len(lines) <= 5 and all(line.startswith("sim ") for line in lines)


def test_run_on_a_simulation_clock_keeps_the_protocol_periods_in_simulated_time(encoder: FrameEncoder) -> None:
    """The demo's shape: the clock carries the speed (Simulator speed 1, rate 20). BAT_STATUS every 100 ms of
    simulated time, i.e. 200 per real second per battery, and the run's waits are real (20 s take ~1 s)."""
    channel = f"sim-clock-{uuid.uuid4().hex}"
    sim_bus = can.Bus(interface="virtual", channel=channel)
    bms_bus = can.Bus(interface="virtual", channel=channel)
    clock = SimClock(20.0)
    sim = Simulator.from_scenario("steady", "2s2p-12v100", encoder=encoder, ignore_bms=True)
    runner = threading.Thread(target=sim.run, args=(sim_bus,),
                              kwargs={"duration": 20.0, "clock": clock.monotonic, "rate": 20.0})
    received: list[tuple[float, can.Message]] = []
    started = time.monotonic()
    try:
        runner.start()
        while runner.is_alive():
            msg = bms_bus.recv(timeout=0.01)
            if msg is not None:
                received.append((clock.monotonic(), msg))
        real = time.monotonic() - started
    finally:
        sim_bus.shutdown()
        bms_bus.shutdown()
    decoder = FrameDecoder(encoder.db)
    times: dict[int, list[float]] = defaultdict(list)
    for at, msg in received:
        report = decoder.decode(msg)
        if isinstance(report, BatteryStatus):
            times[report.node].append(at)
    assert set(times) == {1, 2, 3, 4}
    for node_times in times.values():
        gaps = sorted(b - a for a, b in itertools.pairwise(node_times))
        assert gaps[len(gaps) // 2] == pytest.approx(0.1, abs=0.02)  # the median period, in simulated seconds
        assert 0.6 * 200 <= len(node_times) <= 201  # a late thread skips frames, never bursts them
    assert sim.sim_time == pytest.approx(20.0, abs=0.5)
    assert 0.9 <= real < 5.0


def test_fast_forward_runs_the_scenario_off_line_then_frames_start(encoder: FrameEncoder) -> None:
    """simulate --start-at: the discharge scenario's first 280 s off-line (the load running as if allowed), so the
    first frames already show cells near the pre-alarm, and from then on the devices obey the BMS again."""
    sim = Simulator.from_scenario("discharge", "2s2p-12v100", encoder=encoder)
    sim.fast_forward(280.0)
    assert sim.sim_time == pytest.approx(280.0) and sim.net_ah == 0.0
    assert 3.10 < sim.bank.cell_voltage_range()[0] < 3.13  # CellLowPreAlarm comes at about 285 s
    frames = sim.step(1000.0)
    assert any(isinstance(FrameDecoder(encoder.db).decode(f), BatteryStatus) for f in frames)
    sim.step(1001.0)
    assert sim.sim_time == pytest.approx(281.0)
    assert sim.bank.current == 0.0  # no BMS_STATE on the bus yet: the load obeys again
    with pytest.raises(RuntimeError):
        sim.fast_forward(10.0)
