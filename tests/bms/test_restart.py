"""A restart says true things and brings the outputs back as soon as the learned bank is proven (BANK-2, OUT-4,
COM-2, COM-6, MON-3), on an injected clock. The batteries are the simulator's, frames on the protocol's periods
(BAT_STATUS 100 ms, cells 500 ms, BAT_INFO and the serial halves 1 s alternating), through the DBC."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pytest

from smallbms_bus.bms.alarms import BmsAlarm, BmsWarning
from smallbms_bus.bms.core import BmsCore, Decision, Event
from smallbms_bus.link.codec import FrameDecoder
from smallbms_bus.reports import BatteryStatus, BmsState, SerialFragment
from smallbms_bus.sim.runner import Simulator
from tests.bms.rig import WALL0, Rig

DISCOVERY_WINDOW = 10.0  # the default: a first start waits for it, a restart must not
STEP = 0.01  # frames are delivered at their due time to within 10 ms; the core evaluates every 100 ms


@dataclass
class Wire:
    """The simulator's frames, decoded, fed to a core; decisions every 100 ms of the injected clock."""

    core: BmsCore
    sim: Simulator
    decoder: FrameDecoder
    t: float = 0.0
    decisions: list[Decision] = field(default_factory=list)
    first_frame_at: float | None = None
    silent: bool = False
    foreign_serial_on: int | None = None  # a node whose serial halves are rewritten to another battery's
    clone_on: int | None = None  # a node with a second sender: same identity, its own AliveCounter

    def run(self, seconds: float) -> Decision | None:
        end = self.t + seconds - 1e-9
        steps = 0
        while self.t < end:
            self.t = round(self.t + STEP, 6)
            steps += 1
            frames = self.sim.step(self.t)
            for msg in [] if self.silent else frames:
                report = self.decoder.decode(msg)
                if isinstance(report, BmsState):
                    continue
                if isinstance(report, SerialFragment) and report.node == self.foreign_serial_on:
                    report = SerialFragment(report.node, report.part, "XY9999999999Z9"[7 * report.part:][:7])
                if self.first_frame_at is None:
                    self.first_frame_at = self.t
                self.core.on_report(report, self.t)
                if isinstance(report, BatteryStatus) and report.node == self.clone_on:
                    self.core.on_report(replace(report, alive_counter=(report.alive_counter + 100) & 0xFF), self.t)
            if round(self.t * 100) % 10 == 0:
                self.decisions.append(self.core.evaluate(self.t, WALL0 + self.t))
        return self.decisions[-1] if self.decisions else None

    @property
    def events(self) -> list[Event]:
        return [e for d in self.decisions for e in d.events]

    def outputs_on_at(self) -> float | None:
        return next((d.now for d in self.decisions if d.outputs.load_disconnect and d.outputs.charge_disconnect),
                    None)


def first_start(decoder: FrameDecoder, **options) -> Wire:
    wire = Wire(BmsCore(0.0, WALL0, discovery_window=DISCOVERY_WINDOW, **options),
                Simulator.from_scenario("steady", "2s1p-12v100"), decoder)
    wire.run(DISCOVERY_WINDOW + 3.0)
    assert wire.decisions[-1].started and wire.decisions[-1].outputs.load_disconnect
    return wire


def restart(wire: Wire, *, pause: float = 30.0, listen_after: float = 0.0, **options) -> Wire:
    """Stop (snapshot), keep the batteries running for `pause` s, start a new core from the snapshot. The new
    core hears nothing until `listen_after` s after its start (the bus opening mid-stream)."""
    stored = wire.core.snapshot(wire.t)
    sim = wire.sim
    wire.silent = True
    wire.run(pause)
    core = BmsCore.from_snapshot(stored, wire.t, WALL0 + wire.t, discovery_window=DISCOVERY_WINDOW, **options)
    again = Wire(core, sim, wire.decoder, t=wire.t)
    again.silent = True
    again.run(listen_after)
    again.silent = False
    return again


@pytest.mark.parametrize("listen_after", [0.0, 0.05, 0.5, 0.95])
def test_a_restart_with_a_learned_bank_has_the_outputs_back_within_3_s_of_the_first_frame(decoder, listen_after):
    """Seen: every output held off for the full 10 s discovery window although the learned bank was stored.
    Starting to listen just after a battery's serial half 0 is the worst case: half 1, then half 0 again."""
    wire = restart(first_start(decoder), listen_after=listen_after)
    wire.run(DISCOVERY_WINDOW + 2.0)
    on_at = wire.outputs_on_at()
    assert on_at is not None and wire.first_frame_at is not None
    delay = on_at - wire.first_frame_at
    assert delay <= 2.2, f"outputs back {delay:.2f} s after the first frame"
    # OUT-4: not before every learned battery was fresh with its learned identity (both serial halves: >= 1 s)
    assert delay >= 1.0
    # nothing went off again: the bank was known
    after = [d for d in wire.decisions if d.now >= on_at]
    assert all(d.outputs.load_disconnect and d.outputs.charge_disconnect for d in after)
    assert not any(d.alarms for d in wire.decisions)


def test_a_restart_with_a_foreign_serial_on_a_learned_node_never_switches_on(decoder):
    """COM-6 at a restart: a battery must prove its learned identity before anything comes on."""
    wire = restart(first_start(decoder))
    wire.foreign_serial_on = 2
    wire.run(DISCOVERY_WINDOW + 5.0)
    assert wire.outputs_on_at() is None
    assert BmsAlarm.BANK_CONFIGURATION in wire.decisions[-1].alarms
    assert "instead of the learned" in wire.decisions[-1].reasons["BANK_CONFIGURATION"]


def test_a_restart_with_a_clone_of_a_learned_battery_never_switches_on(decoder):
    """COM-6: a second sender with the learned serial and BAT_INFO (a clone) is caught by its AliveCounter
    before the bank is proven: the fast path never switches anything on."""
    wire = restart(first_start(decoder))
    wire.clone_on = 2
    wire.run(DISCOVERY_WINDOW + 5.0)
    assert wire.outputs_on_at() is None
    d = wire.decisions[-1]
    assert BmsAlarm.BANK_CONFIGURATION in d.alarms and "two senders on node 2" in d.reasons["BANK_CONFIGURATION"]


def test_a_restart_with_a_learned_battery_missing_waits_for_the_window_and_keeps_everything_off(decoder):
    wire = restart(first_start(decoder))
    wire.sim.bank.batteries[1].silent = True
    wire.run(DISCOVERY_WINDOW + 3.0)
    assert wire.outputs_on_at() is None
    d = wire.decisions[-1]
    assert BmsAlarm.BANK_CONFIGURATION in d.alarms and "learned battery not heard" in d.reasons["BANK_CONFIGURATION"]


def test_a_restart_with_a_known_soc_never_says_soc_unknown(decoder):
    """Seen: every restart raised and stored SOC_UNKNOWN "not synchronised or set since the first start"
    although the SoC came back."""
    wire = first_start(decoder)
    wire.core.set_soc(80.0)
    wire.run(1.0)
    wire = restart(wire, pause=30.5)  # the first BAT_INFO comes ~0.5 s after the first frame
    wire.run(5.0)
    assert all(BmsWarning.SOC_UNKNOWN not in d.warnings for d in wire.decisions)
    assert all(d.soc == pytest.approx(80.0, abs=0.5) for d in wire.decisions)
    assert not [e for e in wire.events if e.name == "SOC_UNKNOWN"]


def test_soc_unknown_says_why():
    rig = Rig()
    d = rig.start()
    assert d.reasons["SOC_UNKNOWN"] == "not synchronised or set since the first start"
    core = BmsCore(0.0, WALL0)
    core.synchronise_soc()  # before any battery was heard: the SoC is 100 % of a capacity not known yet
    d = core.evaluate(0.1, WALL0)
    assert d.soc is None and d.reasons["SOC_UNKNOWN"] == "the bank capacity is not known yet (no BAT_INFO heard)"


def test_a_restart_after_a_comms_loss_with_nothing_on_the_wire_says_nothing_false(decoder):
    """Seen: with nothing on the wire BATTERY_COMMS_LOST was raised as "recovering ... 0.0 s" and cleared 2 s
    later. Nothing is heard: there is no recovery to report, and "waiting for batteries" is a state (BANK-2)."""
    wire = first_start(decoder)
    wire.silent = True
    d = wire.run(6.0)
    assert BmsAlarm.BATTERY_COMMS_LOST in d.alarms
    wire = restart(wire, pause=1.0)
    wire.silent = True
    wire.run(70.0)
    assert not [e for e in wire.events if e.name == "BATTERY_COMMS_LOST"]
    assert not [d for d in wire.decisions if "recovering" in d.reasons.get("BATTERY_COMMS_LOST", "")]
    assert all(not d.outputs.load_disconnect for d in wire.decisions)
    last = wire.decisions[-1]  # after the 60 s grace: nothing heard is a bank fault, said as such
    assert BmsAlarm.BANK_CONFIGURATION in last.alarms and "no battery heard" in last.reasons["BANK_CONFIGURATION"]
    # the batteries come back: the comms loss the log still shows is cleared once the bank is proven
    wire.silent = False
    wire.run(5.0)
    assert wire.outputs_on_at() is not None
    assert [(e.name, e.value) for e in wire.events if e.name == "BATTERY_COMMS_LOST"] == \
        [("BATTERY_COMMS_LOST", "cleared")]


def test_a_restart_does_not_fabricate_events_or_last_errors_for_conditions_already_active(decoder):
    """An alarm active before the restart and still active after it is not raised again (no event, no new GX
    last error); mode and remote did not change, so they are no event either. What did change is said."""
    wire = first_start(decoder)
    wire.sim.bank.batteries[0].set_cell_voltage(0, 3.80)  # ATC-1 by value
    wire.run(2.0)
    before = wire.decisions[-1]
    assert BmsAlarm.CELL_HIGH_VOLTAGE in before.alarms and BmsWarning.SOC_UNKNOWN in before.warnings
    errors_before = before.diagnostics
    assert [name for name, _ in errors_before.last_errors] == ["CELL_HIGH_VOLTAGE"]
    wire = restart(wire)
    wire.run(5.0)
    names = [(e.name, e.value) for e in wire.events]
    assert ("CELL_HIGH_VOLTAGE", "raised") not in names and ("SOC_UNKNOWN", "raised") not in names
    assert not [n for n in names if n[0] in ("MODE", "REMOTE")]
    # ATD went off (true: the outputs are off until the bank is proven) and came back; ATC was already "no" (ATC-1)
    assert [n for n in names if n[0] in ("ATC", "ATD")] == [("ATD", "no"), ("ATD", "yes")]
    assert wire.decisions[-1].diagnostics == errors_before
    # an alarm that is new after the restart is an event and a last error as always
    wire.sim.bank.batteries[0].set_cell_voltage(0, 3.40)
    wire.core.set_link(False, "adapter unplugged")
    d = wire.run(0.2)
    assert BmsAlarm.BATTERY_COMMS_LOST in d.alarms
    assert ("BATTERY_COMMS_LOST", "raised") in [(e.name, e.value) for e in wire.events]
    assert d.diagnostics.last_errors[0][0] == "BATTERY_COMMS_LOST"


def test_a_restart_with_the_remote_input_off_says_nothing_about_the_remote_until_it_is_read(decoder):
    """The remote input as last read is what the core assumes until the outputs layer reads it again: no
    "REMOTE on" at the restart followed by "REMOTE off" a moment later, and the loads stay off meanwhile."""
    wire = first_start(decoder)
    wire.core.set_remote(False)
    wire.run(1.0)
    wire = restart(wire)
    wire.run(4.0)
    assert not [e for e in wire.events if e.name in ("REMOTE", "MODE", "PRE_ALARM")]
    assert not any(d.outputs.load_disconnect or d.outputs.charge_disconnect for d in wire.decisions)
    assert wire.decisions[-1].started and not wire.decisions[-1].remote_on
    wire.core.set_remote(True)  # the outputs layer read the input: on now
    wire.run(0.2)
    remote = [(e.name, e.value, e.reason) for e in wire.events if e.name == "REMOTE"]
    assert remote == [("REMOTE", "on", "remote input")]
    assert wire.decisions[-1].outputs.load_disconnect


def test_an_alarm_gone_during_the_restart_is_cleared_once_the_bank_is_proven(decoder):
    wire = first_start(decoder)
    wire.sim.bank.batteries[0].set_cell_voltage(0, 3.80)
    wire.run(2.0)
    # the cell settles while the service is down (restart() snapshots the core first, then the batteries run
    # on for 30 s): the frames after the restart no longer carry the flag
    wire.sim.bank.batteries[0].set_cell_voltage(0, 3.40)
    wire = restart(wire)
    wire.run(8.0)
    cleared = [e for e in wire.events if e.name == "CELL_HIGH_VOLTAGE"]
    assert [(e.value) for e in cleared] == ["cleared"]
    assert not any(BmsAlarm.CELL_HIGH_VOLTAGE in d.alarms for d in wire.decisions if d.started)
