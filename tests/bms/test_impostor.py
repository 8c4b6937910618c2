"""COM-6: a second sender on a learned node, replayed frame by frame at the protocol's real rates on an
injected clock (status 100 ms, cells 500 ms, temps/info/serial 1 s with the serial halves alternating).

The seen defect (issue 12): battery 3 reports CellHighVoltage; a second sender on node 3 (other serial, no
flags, real frame rates) for 6 s made 54 of 124 BMS_STATE frames allow charging, the charge output
chattered at 10 Hz, and BANK_CONFIGURATION showed only while the latest serial was the wrong one."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pytest

from smallbms_bus.bms.alarms import BmsAlarm
from smallbms_bus.bms.core import BmsCore, Decision
from smallbms_bus.reports import BatteryInfo, BatteryStatus, BatteryTemps, CellVoltages, SerialFragment
from tests.bms.rig import WALL0

COMM_TIMEOUT = 5.0
REAL_3 = "HQ000000000003"
IMPOSTOR = "HQ000000000099"  # same first half as the real one: only the second half (every 2 s) differs
NO_FLAGS = dict.fromkeys(("cell_high_voltage", "cell_low_voltage", "cell_low_pre_alarm", "balancing",
                          "cell_imbalance", "hardware_fault", "firmware_updating"), False)


@dataclass
class Sender:
    """One transmitter of one node's frames, on the protocol's schedule from `phase_ms`."""

    node: int
    serial: str
    string: int
    capacity: int = 100
    cells: tuple[float, ...] = (3.30, 3.30, 3.30, 3.30)
    flags: dict[str, bool] = field(default_factory=dict)
    alive: int = 0
    phase_ms: int = 0
    active: bool = True
    part: int = 0

    def due(self, ms: int) -> list:
        k = ms - self.phase_ms
        if not self.active or k < 0:
            return []
        out: list = []
        if k % 100 == 0:
            voltage = round(sum(self.cells), 3)
            out.append(BatteryStatus(self.node, voltage, 0.0, 20.0, **(NO_FLAGS | self.flags),
                                     alive_counter=self.alive))
            self.alive = (self.alive + 1) % 256
        if k % 500 == 0:
            out.append(CellVoltages(self.node, 1, self.cells))
        if k % 1000 == 0:
            out += [BatteryTemps(self.node, 19.0, 21.0),
                    BatteryInfo(self.node, 1, self.capacity, (1, 2, 3), self.string, 1),
                    SerialFragment(self.node, self.part, self.serial[7 * self.part:7 * self.part + 7])]
            self.part = 1 - self.part
        return out


@dataclass
class Replay:
    """Three 12.8 V 100 Ah batteries in parallel (nodes 1..3) and the BMS core, driven like the service drives
    it: every report fed at its time, an evaluation at once when `on_report` says so, and a 100 ms tick."""

    batch_ms: int = 10  # the service hands frames over in batches (its poll is 50 ms): evaluated per batch
    core: BmsCore = field(init=False)
    senders: list[Sender] = field(init=False)
    ms: int = 0
    decisions: list[Decision] = field(default_factory=list)
    frames: list[tuple[float, Sender, object]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.core = BmsCore(0.0, WALL0, comm_timeout=COMM_TIMEOUT, discovery_window=1.0)
        self.senders = [Sender(n, f"HQ{n:012d}", string=n, phase_ms=20 * n) for n in (1, 2, 3)]

    def run_until(self, seconds: float) -> Decision:
        end = round(seconds * 1000)
        while self.ms < end:
            self.ms += 10
            now = self.ms / 1000
            urgent = False
            for sender in self.senders:
                for report in sender.due(self.ms):
                    self.frames.append((now, sender, report))
                    urgent |= self.core.on_report(report, now)
            if (urgent and self.ms % self.batch_ms == 0) or self.ms % 100 == 0:
                self.decisions.append(self.core.evaluate(now, WALL0 + now))
        return self.decisions[-1]

    def since(self, seconds: float) -> list[Decision]:
        return [d for d in self.decisions if d.now >= seconds]

    def events(self, since: float) -> list[tuple[str, str]]:
        return [(e.name, e.value) for d in self.since(since) for e in d.events]


def started_replay(**kw) -> Replay:
    replay = Replay(**kw)
    d = replay.run_until(3.0)
    assert d.started and d.atc and d.outputs.charge_disconnect, d.reasons
    return replay


def impostor_on_node_3(replay: Replay, counter_offset: int, **kw) -> Sender:
    """A second sender on node 3: another serial, no flags, the protocol's frame rates, its own AliveCounter
    `counter_offset` ahead of the real battery's."""
    real = replay.senders[2]
    impostor = Sender(3, IMPOSTOR, string=3, alive=(real.alive + counter_offset) % 256,
                      phase_ms=replay.ms + 50, **kw)
    replay.senders.append(impostor)
    return impostor


def last_conflicting_frame(replay: Replay, impostor: Sender) -> float:
    """COM-6 by the book, from the frame log: a serial half that differs from the learned one, or a BAT_STATUS
    whose AliveCounter steps backwards with another such step on the node less than the identity memory before."""
    learned = (REAL_3[:7], REAL_3[7:])
    times = [t for t, s, r in replay.frames if s is impostor and isinstance(r, SerialFragment)
             and r.chars != learned[r.part]]
    previous = None
    regressions: list[float] = []
    for t, _, r in replay.frames:
        if isinstance(r, BatteryStatus) and r.node == 3:
            if previous is not None and (r.alive_counter - previous) % 256 >= 128:
                if regressions and t - regressions[-1] < COMM_TIMEOUT:
                    times.append(t)
                regressions.append(t)
            previous = r.alive_counter
    return max(times)


@pytest.mark.parametrize("batch_ms", [10, 50])
@pytest.mark.parametrize("counter_offset", [0, 1, 2, 100, 200, 255])
def test_an_impostor_on_node_3_never_lets_the_charge_on(counter_offset, batch_ms):
    """The seen scenario: battery 3 reports CellHighVoltage (its cells at 3.58 V, so only its flag holds the
    alarm); a second sender on node 3, other serial, no flags, for 6 s. Counter offset 0 is an attacker who
    mirrors the real counter (no backward step at all, like 255): then only the serial half tells."""
    replay = started_replay(batch_ms=batch_ms)
    battery_3 = replay.senders[2]
    battery_3.flags["cell_high_voltage"] = True
    battery_3.cells = (3.58, 3.58, 3.58, 3.58)
    d = replay.run_until(4.0)
    assert not d.atc and BmsAlarm.CELL_HIGH_VOLTAGE in d.alarms
    impostor = impostor_on_node_3(replay, counter_offset)
    first_frame = (replay.ms + 50) / 1000
    replay.run_until(first_frame + 6.0 - 0.01)
    impostor.active = False
    last_frame = max(t for t, s, _ in replay.frames if s is impostor)
    replay.run_until(last_frame + COMM_TIMEOUT + 1.0)
    during = replay.since(first_frame)

    assert [d.now for d in during if d.atc] == []  # seen: 54 of 124 BMS_STATE frames allowed charging
    assert not any(d.outputs.charge_disconnect for d in during)
    assert all(BmsAlarm.CELL_HIGH_VOLTAGE in d.alarms for d in during)  # the real battery's latch never let go
    raised = [d.now for d in during if BmsAlarm.BANK_CONFIGURATION in d.alarms]
    # at once: with a mirrored counter (offsets 0 and 255: the two counters repeat each other, never step back)
    # at the impostor's first serial half that differs (1 s after its start), otherwise at the second step back
    assert raised[0] - first_frame <= (1.0 if counter_offset in (0, 255) else 0.2)
    expected_clear = last_conflicting_frame(replay, impostor) + COMM_TIMEOUT
    cleared = next(d.now for d in during if d.now > raised[0] and BmsAlarm.BANK_CONFIGURATION not in d.alarms)
    assert expected_clear <= cleared <= expected_clear + 0.1 + 1e-9  # held, then the next evaluation lets go
    assert all(raised[0] <= t < cleared for t in raised)  # raised once, cleared once: no chattering
    events = Counter(replay.events(first_frame))
    assert events == Counter({("BANK_CONFIGURATION", "raised"): 1, ("BANK_CONFIGURATION", "cleared"): 1,
                              ("ATD", "no"): 1, ("ATD", "yes"): 1})  # seen: 240 events in 6 s

    reason = next(d for d in during if d.now >= last_frame).reasons["BANK_CONFIGURATION"]
    assert "battery 3" in reason and REAL_3 in reason and IMPOSTOR in reason, reason


def test_the_real_battery_clears_its_flag_after_the_impostor_left_and_charging_resumes_once():
    replay = started_replay()
    battery_3 = replay.senders[2]
    battery_3.flags["cell_high_voltage"] = True
    replay.run_until(4.0)
    impostor = impostor_on_node_3(replay, 100)
    replay.run_until(10.0)
    impostor.active = False
    replay.run_until(17.0)
    battery_3.flags["cell_high_voltage"] = False
    d = replay.run_until(20.0)
    assert d.atc and d.outputs.charge_disconnect and d.alarms == BmsAlarm(0)
    assert replay.events(4.0).count(("ATC", "yes")) == 1


def test_cell_voltages_alone_the_impostor_cannot_release_them_either():
    """No flag from the real battery, just its cells at 3.76 V; the impostor's read 3.30 V."""
    replay = started_replay()
    replay.senders[2].cells = (3.30, 3.76, 3.30, 3.30)
    replay.run_until(4.0)
    impostor_on_node_3(replay, 0)
    replay.run_until(10.0)
    assert not any(d.atc for d in replay.since(3.6))


@pytest.mark.parametrize("flag", ["hardware_fault", "firmware_updating"])
def test_an_impostor_cannot_blink_a_battery_fault_away(flag):
    replay = started_replay()
    replay.senders[2].flags[flag] = True
    replay.run_until(4.0)
    impostor_on_node_3(replay, 0)
    replay.run_until(10.0)
    during = replay.since(3.6)
    assert not any(d.atc for d in during)
    if flag == "hardware_fault":
        assert all(BmsAlarm.BATTERY_FAULT in d.alarms and not d.atd for d in during)


def test_charging_and_loads_go_off_at_once_and_come_back_once_after_the_hold():
    """A healthy bank: the impostor switches nothing on, it switches everything off (fail-safe) until
    comm_timeout after its last conflicting frame; then the outputs come back once, without chattering."""
    replay = started_replay()
    impostor = impostor_on_node_3(replay, 100)
    first_frame = (replay.ms + 50) / 1000
    replay.run_until(first_frame + 6.0 - 0.01)
    impostor.active = False
    replay.run_until(first_frame + 6.0 + COMM_TIMEOUT + 2.0)
    during = replay.since(first_frame)
    off = [d for d in during if not d.outputs.charge_disconnect]
    assert off[0].now - first_frame <= 0.2
    back = next(d.now for d in during if d.now > off[0].now and d.outputs.charge_disconnect)
    assert back >= last_conflicting_frame(replay, impostor) + COMM_TIMEOUT
    assert all(d.outputs.charge_disconnect and d.outputs.load_disconnect for d in during if d.now >= back)
    assert Counter(replay.events(first_frame)) == Counter({
        ("BANK_CONFIGURATION", "raised"): 1, ("BANK_CONFIGURATION", "cleared"): 1, ("ATC", "no"): 1,
        ("ATC", "yes"): 1, ("ATD", "no"): 1, ("ATD", "yes"): 1})


def test_a_clone_with_the_learned_serial_is_caught_by_its_alive_counter():
    replay = started_replay()
    clone = impostor_on_node_3(replay, 100)
    clone.serial = REAL_3
    replay.run_until(5.0)
    d = replay.decisions[-1]
    assert BmsAlarm.BANK_CONFIGURATION in d.alarms and not d.atc and not d.atd
    assert "battery 3 (learned serial HQ000000000003): its AliveCounter jumps back and forth: two senders " \
           "on node 3" in d.reasons["BANK_CONFIGURATION"]


def test_a_different_bat_info_on_a_learned_node_is_caught_at_its_first_frame():
    replay = started_replay()
    replay.senders[2].alive = 0  # and a counter that cannot be told apart either: only BAT_INFO differs
    impostor = impostor_on_node_3(replay, 0, capacity=200)
    impostor.serial = REAL_3
    first_frame = (replay.ms + 50) / 1000
    replay.run_until(first_frame + 0.3)
    d = next(d for d in replay.decisions if BmsAlarm.BANK_CONFIGURATION in d.alarms)
    assert d.now == pytest.approx(first_frame)
    assert "BAT_INFO 12.8 V 200 Ah string 3 position 1 instead of the learned 12.8 V 100 Ah string 3 position 1" \
        in d.reasons["BANK_CONFIGURATION"]
