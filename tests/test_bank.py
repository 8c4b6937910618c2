"""Bank model: freshness (COM-1), topology (BANK-1), validation (BANK-3), learning (BANK-2, BANK-4),
aggregates (BANK-5). Time is injected: every call gets `now`."""

from __future__ import annotations

from dataclasses import replace

import pytest

from smallbms_bus.bank import Bank, BatteryIdentity, LearnedBank
from smallbms_bus.reports import BatteryInfo, BatteryStatus, BatteryTemps, CellVoltages, SerialFragment


def status(node: int, alive: int = 0, voltage: float = 13.2, current: float = 0.0, temp: float = 20.0,
           **flags: bool) -> BatteryStatus:
    base = dict(cell_high_voltage=False, cell_low_voltage=False, cell_low_pre_alarm=False, balancing=False,
                cell_imbalance=False, hardware_fault=False, firmware_updating=False)
    base.update(flags)
    return BatteryStatus(node, voltage, current, temp, **base, alive_counter=alive % 256)


def feed_battery(bank: Bank, node: int, now: float, *, string: int = 1, series: int = 1, units: int = 1,
                 capacity: int = 100, voltage: float = 13.2, current: float = 0.0, cells: float | list = 3.3,
                 alive: int = 0, serial: str | None = None, temps: tuple[float, float] = (19.0, 21.0)) -> None:
    """Everything one battery sends in one second (one of each frame)."""
    serial = serial or f"HQ{node:012d}"
    bank.update(BatteryInfo(node, units, capacity, (1, 2, 3), string, series), now)
    bank.update(SerialFragment(node, 0, serial[:7]), now)
    bank.update(SerialFragment(node, 1, serial[7:]), now)
    volts = cells if isinstance(cells, list) else [cells] * (4 * units)
    for group in range(units):
        bank.update(CellVoltages(node, 4 * group + 1, tuple(volts[4 * group:4 * group + 4])), now)
    bank.update(BatteryTemps(node, *temps), now)
    bank.update(status(node, alive, voltage, current), now)


def bank_of(shape: list[tuple[int, int]], now: float = 0.0, **kw) -> Bank:
    """shape: (string, series) per node 1..N."""
    bank = Bank(0.0, **kw)
    for node, (string, series) in enumerate(shape, start=1):
        feed_battery(bank, node, now, string=string, series=series)
    return bank


# -- freshness (COM-1) ---------------------------------------------------------------------------------

def test_fresh_until_comm_timeout_without_status():
    bank = Bank(0.0, comm_timeout=5.0)
    feed_battery(bank, 1, 0.0)
    assert bank.evaluate(4.99).stale_nodes == ()
    view = bank.evaluate(5.0)
    assert view.stale_nodes == (1,)
    assert view.batteries[0].stale_reason == "status_timeout"


def test_stale_when_alive_counter_does_not_advance():
    bank = Bank(0.0, comm_timeout=5.0)
    feed_battery(bank, 1, 0.0, alive=7)
    for t in range(1, 60):  # status keeps arriving every 0.1 s, but the counter is frozen
        bank.update(status(1, alive=7), t / 10)
        bank.update(BatteryTemps(1, 19.0, 21.0), t / 10)
        bank.update(CellVoltages(1, 1, (3.3,) * 4), t / 10)
    assert bank.evaluate(4.99).stale_nodes == ()
    view = bank.evaluate(5.0)
    assert view.batteries[0].stale_reason == "alive_stuck"
    bank.update(status(1, alive=8), 5.1)
    assert bank.evaluate(5.1).stale_nodes == ()


def test_alive_counter_wrap_is_an_advance():
    bank = Bank(0.0, comm_timeout=1.0)
    feed_battery(bank, 1, 0.0, alive=255)
    bank.update(status(1, alive=0), 0.9)
    assert bank.batteries[1].alive_changed_at == 0.9


@pytest.mark.parametrize(("missing", "reason"), [
    ("info", "no_info"), ("temps", "no_temps"), ("cells", "no_cells"),
])
def test_incomplete_battery_is_not_fresh(missing, reason):
    bank = Bank(0.0)
    if missing != "info":
        bank.update(BatteryInfo(1, 2, 100, (1, 0, 0), 1, 1), 0.0)
    if missing != "temps":
        bank.update(BatteryTemps(1, 20.0, 21.0), 0.0)
    if missing != "cells":
        bank.update(CellVoltages(1, 1, (3.3,) * 4), 0.0)
        bank.update(CellVoltages(1, 5, (3.3,) * 4), 0.0)
    bank.update(status(1), 0.0)
    assert bank.evaluate(0.1).batteries[0].stale_reason == reason


def test_a_25v_battery_without_its_second_cell_group_is_not_fresh():
    bank = Bank(0.0)
    bank.update(BatteryInfo(1, 2, 100, (1, 0, 0), 1, 1), 0.0)
    bank.update(BatteryTemps(1, 20.0, 21.0), 0.0)
    bank.update(CellVoltages(1, 1, (3.3,) * 4), 0.0)
    bank.update(status(1), 0.0)
    assert bank.evaluate(0.1).batteries[0].stale_reason == "no_cells"


def test_cell_and_temperature_frames_time_out_after_their_period_plus_comm_timeout():
    bank = Bank(0.0, comm_timeout=2.0)
    feed_battery(bank, 1, 0.0)
    bank.update(status(1, alive=1), 2.4)
    bank.update(BatteryTemps(1, 20.0, 21.0), 2.4)
    assert bank.evaluate(2.49).batteries[0].fresh  # cells due at 0.5 s, allowed until 2.5 s
    assert bank.evaluate(2.5).batteries[0].stale_reason == "cells_timeout"
    bank.update(CellVoltages(1, 1, (3.3,) * 4), 2.5)
    bank.update(CellVoltages(1, 1, (3.3,) * 4), 4.3)
    bank.update(status(1, alive=2), 4.3)
    assert bank.evaluate(5.39).batteries[0].fresh  # temps due at 3.4 s, allowed until 5.4 s
    assert bank.evaluate(5.4).batteries[0].stale_reason == "temps_timeout"


def test_frame_periods_match_the_dbc(dbc):
    from smallbms_bus.bank import CELLS_PERIOD, TEMPS_PERIOD

    assert dbc.get_message_by_name("BAT_CELLS_1_4_01").cycle_time / 1000 == CELLS_PERIOD
    assert dbc.get_message_by_name("BAT_TEMPS_01").cycle_time / 1000 == TEMPS_PERIOD


def test_comm_timeout_range_is_enforced():
    with pytest.raises(ValueError, match="comm_timeout"):
        Bank(0.0, comm_timeout=0.5)
    with pytest.raises(ValueError, match="comm_timeout"):
        Bank(0.0, comm_timeout=61)


# -- topology (BANK-1) and aggregates (BANK-5) --------------------------------------------------------------

def test_topology_2s2p_and_aggregates():
    bank = Bank(0.0)
    # string 1: 13.0 + 13.2 V at 10.0/10.2 A; string 2: 13.1 + 13.3 V at 20.0 A
    feed_battery(bank, 1, 0.0, string=1, series=1, voltage=13.0, current=10.0)
    feed_battery(bank, 2, 0.0, string=1, series=2, voltage=13.2, current=10.2)
    feed_battery(bank, 3, 0.0, string=2, series=1, voltage=13.1, current=20.0,
                 cells=[3.30, 3.28, 3.31, 3.45], temps=(12.0, 30.0))
    feed_battery(bank, 4, 0.0, string=2, series=2, voltage=13.3, current=20.0, cells=[3.30, 3.25, 3.3, 3.3])
    view = bank.evaluate(0.5)
    t = view.topology
    assert (t.batteries, t.cells, t.series, t.parallel, t.nominal_units, t.capacity_ah) == (4, 16, 2, 2, 1, 100)
    assert t.nominal_voltage == 25.6 and t.bank_capacity_ah == 200
    a = view.aggregates
    assert a.voltage == pytest.approx((26.2 + 26.4) / 2)  # mean over strings of series sums
    assert a.current == pytest.approx(10.1 + 20.0)  # sum over strings of the string mean
    assert a.power == pytest.approx(round(a.voltage * a.current, 1))
    assert (a.min_cell.node, a.min_cell.cell, a.min_cell.voltage) == (4, 2, 3.25)
    assert (a.max_cell.node, a.max_cell.cell, a.max_cell.voltage) == (3, 4, 3.45)
    assert (a.min_cell_temperature, a.max_cell_temperature) == (12.0, 30.0)
    assert a.complete and view.issues == () and view.stale_nodes == ()
    assert view.batteries[2].cell_spread == pytest.approx(0.17)


def test_stale_battery_leaves_aggregates_incomplete_and_drops_its_string_from_voltage():
    bank = bank_of([(1, 1), (1, 2), (2, 1), (2, 2)])
    for node in (1, 2, 3):
        feed_battery(bank, node, 4.0, string=1 if node < 3 else 2, series=node if node < 3 else 1, alive=1)
    view = bank.evaluate(5.0)  # battery 4 last heard at 0.0
    assert view.stale_nodes == (4,)
    assert not view.aggregates.complete
    assert view.aggregates.voltage == pytest.approx(26.4)  # string 2 is incomplete


def test_flags_are_collected_from_fresh_batteries_only():
    bank = bank_of([(1, 1), (2, 1)])
    bank.update(status(1, alive=1, cell_high_voltage=True, balancing=True), 0.1)
    view = bank.evaluate(0.2)
    assert view.flags["cell_high_voltage"] == (1,) and view.flags["balancing"] == (1,)
    assert view.flags["cell_low_voltage"] == ()


# -- validation (BANK-3) --------------------------------------------------------------------------

def codes(view) -> list[str]:
    return [i.code for i in view.issues]


def test_valid_shapes_have_no_issues():
    for shape in ([(1, 1)], [(1, 1), (1, 2), (1, 3), (1, 4)], [(s, 1) for s in range(1, 51)]):
        assert bank_of(shape).evaluate(0.5).issues == ()


def test_mixed_nominal_voltage_and_capacity():
    bank = Bank(0.0)
    feed_battery(bank, 1, 0.0, string=1, units=1, capacity=100)
    feed_battery(bank, 2, 0.0, string=2, units=2, capacity=200)
    view = bank.evaluate(0.5)
    assert codes(view) == ["mixed_nominal_voltage", "mixed_capacity"]
    assert "12.8 V x1, 25.6 V x1" in view.issues[0].reason
    assert view.topology.nominal_units is None and view.topology.capacity_ah is None


def test_duplicate_position_unequal_strings_and_gaps():
    view = bank_of([(1, 1), (1, 1)]).evaluate(0.5)
    assert "duplicate_position" in codes(view)
    assert "string 1 position 1 is claimed by batteries 1, 2" in view.issues[0].reason
    assert "unequal_strings" in codes(bank_of([(1, 1), (1, 2), (2, 1)]).evaluate(0.5))
    gap = bank_of([(1, 1), (1, 3)]).evaluate(0.5)
    assert codes(gap) == ["position_gap"] and "position 2" in gap.issues[0].reason
    strings = bank_of([(1, 1), (3, 1)]).evaluate(0.5)
    assert codes(strings) == ["string_gap"] and "string 2" in strings.issues[0].reason


def test_limits():
    too_many_48 = Bank(0.0)
    for n in range(1, 27):
        feed_battery(too_many_48, n, 0.0, string=n, units=4)
    view = too_many_48.evaluate(0.5)
    assert codes(view) == ["too_many_batteries"] and "at most 25 of 51.2 V" in view.issues[0].reason
    fine_48 = Bank(0.0)
    for n in range(1, 26):
        feed_battery(fine_48, n, 0.0, string=n, units=4)
    assert fine_48.evaluate(0.5).issues == ()
    series_24 = Bank(0.0)
    for n in range(1, 4):
        feed_battery(series_24, n, 0.0, series=n, units=2)
    assert codes(series_24.evaluate(0.5)) == ["too_many_in_series"]
    two_24 = Bank(0.0)
    for n in (1, 2):
        feed_battery(two_24, n, 0.0, series=n, units=2)
    assert two_24.evaluate(0.5).issues == ()


# -- discovery and learning (BANK-2, BANK-4) --------------------------------------------------------------

def test_waiting_then_discovery_then_learned():
    bank = Bank(0.0, discovery_window=10.0)
    view = bank.evaluate(3.0)
    assert view.phase == "waiting" and view.waiting_for_batteries and view.issues == ()
    feed_battery(bank, 1, 5.0)
    assert bank.evaluate(14.9).phase == "discovering"
    feed_battery(bank, 2, 14.0, series=2)
    view = bank.evaluate(15.0)
    assert view.phase == "learned" and not view.waiting_for_batteries
    assert bank.learned_revision == 1
    assert [b.node for b in bank.learned.batteries] == [1, 2]
    assert bank.learned.batteries[1] == BatteryIdentity(2, "HQ000000000002", 1, 100, 1, 2)


def test_batteries_first_heard_late_still_get_the_whole_discovery_window():
    """BANK-2: the window is 10 s after the first frame, whenever that comes. Batteries powered up 55 s after the
    service (or heard late on a slow start) are learned together: the 60 s waiting grace must not cut the
    window short and learn the bank from whichever battery spoke first (seen in the SocketCAN suite in its VM:
    outputs on 1.15 s after the first frame)."""
    bank = Bank(0.0, discovery_window=10.0, waiting_grace=60.0)
    feed_battery(bank, 1, 55.0)
    view = bank.evaluate(61.0)
    assert view.phase == "discovering" and bank.learned is None and view.issues == ()
    feed_battery(bank, 2, 64.0, series=2)  # inside the window: part of the bank
    view = bank.evaluate(64.5)
    assert view.phase == "discovering" and view.issues == ()
    view = bank.evaluate(65.0)
    assert view.phase == "learned" and [b.node for b in bank.learned.batteries] == [1, 2] and view.issues == ()


def test_a_battery_without_identity_after_a_late_window_is_an_issue():
    bank = Bank(0.0, discovery_window=10.0, waiting_grace=60.0)
    feed_battery(bank, 1, 58.0)
    bank.update(status(2), 58.5)  # battery 2 never sends BAT_INFO / serial
    assert bank.evaluate(67.0).issues == ()  # still discovering: nothing is missing yet
    view = bank.evaluate(68.0)
    assert view.phase == "learning" and codes(view) == ["identity_incomplete"] and view.issues[0].nodes == (2,)


def test_no_battery_within_the_grace_is_an_issue():
    bank = Bank(0.0, waiting_grace=60.0)
    assert bank.evaluate(59.9).issues == ()
    view = bank.evaluate(60.0)
    assert codes(view) == ["no_batteries"] and not view.waiting_for_batteries


def test_learning_waits_for_identity_until_grace():
    bank = Bank(0.0, discovery_window=10.0, waiting_grace=60.0)
    feed_battery(bank, 1, 0.0)
    bank.update(status(2), 1.0)  # battery 2 never sends BAT_INFO / serial
    view = bank.evaluate(30.0)
    assert view.phase == "learning" and bank.learned is None and view.issues == ()
    view = bank.evaluate(60.0)
    assert codes(view) == ["identity_incomplete"] and view.issues[0].nodes == (2,)


def test_learned_bank_round_trips_and_detects_changes():
    bank = bank_of([(1, 1), (1, 2)])
    bank.evaluate(20.0)
    stored = LearnedBank.from_dict(bank.learned.to_dict())
    assert stored == bank.learned

    restart = Bank(100.0, learned=stored)
    feed_battery(restart, 1, 100.0)  # battery 2 is not heard yet: still discovery, no alarm
    assert restart.evaluate(105.0).issues == ()
    view = restart.evaluate(110.0)
    assert codes(view) == ["learned_missing"] and "battery 2 (HQ000000000002" in view.issues[0].reason

    swapped = Bank(0.0, learned=stored)
    feed_battery(swapped, 1, 0.0)
    feed_battery(swapped, 2, 0.0, series=2, serial="HQ999999999999")
    feed_battery(swapped, 3, 0.0, string=2)
    view = swapped.evaluate(10.0)
    assert codes(view) == ["unequal_strings", "learned_mismatch", "unknown_battery"]
    assert "now battery 2 (HQ999999999999" in view.issues[1].reason
    assert "battery 3 is not part of the learned bank" in view.issues[2].reason

    feed_battery(swapped, 1, 10.0)  # still sending: heard when the re-learn comes
    feed_battery(swapped, 2, 10.0, series=2, serial="HQ999999999999")
    feed_battery(swapped, 3, 10.0, string=2)
    swapped.relearn(10.0)  # BANK-4: accept the bank as it is now
    view = swapped.evaluate(10.1)
    assert codes(view) == ["unequal_strings"]  # still a shape problem, but now the learned bank
    assert {b.serial for b in swapped.learned.batteries} >= {"HQ999999999999"}
    assert swapped.learned_revision == 1


def test_learned_bank_rejects_unknown_versions():
    with pytest.raises(ValueError, match="version"):
        LearnedBank.from_dict({"version": 2, "batteries": []})


def test_bms_state_frames_do_not_create_batteries():
    from smallbms_bus.reports import BmsState

    bank = Bank(0.0)
    bank.update(BmsState(True, True, False, True, True, False, 50.0, 0, 0, 1, 1), 0.1)
    assert bank.batteries == {} and bank.first_frame_at is None


def test_changed_info_is_revalidated():
    bank = bank_of([(1, 1), (1, 2)])
    assert bank.evaluate(0.5).issues == ()
    # later than the identity memory (5 s): a battery re-positioned, not a second sender (COM-6)
    bank.update(replace(bank.batteries[2].info, series_index=1), 5.1)
    assert codes(bank.evaluate(5.2)) == ["duplicate_position"]


# -- COM-6: two senders on one node ----------------------------------------------------------------

def serial_halves(bank: Bank, node: int, serial: str, now: float) -> None:
    bank.update(SerialFragment(node, 0, serial[:7]), now)
    bank.update(SerialFragment(node, 1, serial[7:]), now)


def test_two_serials_on_one_node_during_discovery_are_not_learned_as_one_battery():
    bank = Bank(0.0, discovery_window=10.0)
    for second in range(12):  # the real battery and a second sender on node 1, interleaved, for 12 s
        feed_battery(bank, 1, second, alive=second)
        serial_halves(bank, 1, "HQ000000000077", second + 0.5)
    view = bank.evaluate(12.0)
    assert view.phase == "learning" and bank.learned is None and view.conflicted == (1,)
    assert view.waiting_for_batteries  # outputs off, no alarm yet (BANK-2): but nothing is learned either
    assert codes(view) == ["learned_mismatch"]
    assert "battery 1: serials HQ000000000001 and HQ000000000077 within 5 s: two senders on node 1" \
        in view.issues[0].reason
    for second in range(12, 20):  # the second sender is gone; its serial is remembered 5 s, then held 5 s
        feed_battery(bank, 1, second, alive=second)
    assert bank.evaluate(19.0).conflicted == (1,) and bank.learned is None
    # the last conflicting frame: the real battery's halves at 16.0, less than 5 s after the other's at 11.5
    view = bank.evaluate(20.99)
    assert view.conflicted == (1,)
    view = bank.evaluate(21.0)
    assert view.conflicted == () and view.issues == () and view.phase == "learned"
    assert bank.learned.batteries[0].serial == "HQ000000000001"


def test_past_the_grace_a_node_with_two_senders_is_bank_configuration():
    bank = Bank(0.0, discovery_window=10.0, waiting_grace=60.0)
    for second in range(61):
        feed_battery(bank, 1, second, alive=second)
        bank.update(BatteryInfo(1, 1, 200, (1, 2, 3), 1, 1), second + 0.5)  # 200 Ah between the 100 Ah frames
    view = bank.evaluate(60.5)
    assert not view.waiting_for_batteries and bank.learned is None and codes(view) == ["learned_mismatch"]
    assert "BAT_INFO 12.8 V 100 Ah string 1 position 1 and 12.8 V 200 Ah string 1 position 1 within 5 s" \
        in view.issues[0].reason


def test_two_serials_are_remembered_for_2_5_s_even_with_a_1_s_comm_timeout():
    """Each serial half comes round every 2 s per sender: with memory = comm_timeout = 1 s two senders whose
    halves fall 1 s apart would never be "within comm_timeout" of each other."""
    bank = Bank(0.0, comm_timeout=1.0, discovery_window=10.0)
    assert bank.identity_memory == 2.5
    bank.update(SerialFragment(1, 1, "0000001"), 0.0)
    bank.update(SerialFragment(1, 1, "0000077"), 1.0)
    view = bank.evaluate(1.5)
    assert view.conflicted == (1,) and "within 2.5 s" in view.issues[0].reason
    assert bank.evaluate(1.99).conflicted == (1,)
    assert bank.evaluate(2.0).conflicted == ()  # held comm_timeout (1 s) after the last conflicting frame
    bank.update(SerialFragment(1, 1, "0000077"), 3.6)  # 3.6 s after the other value: forgotten
    assert bank.evaluate(3.7).conflicted == ()


def test_a_restart_with_a_learned_bank_needs_the_learned_identity():
    stored = LearnedBank((BatteryIdentity(1, "HQ000000000001", 1, 100, 1, 1),
                          BatteryIdentity(2, "HQ000000000002", 1, 100, 1, 2)))
    restart = Bank(100.0, learned=stored, discovery_window=10.0)
    for second in range(100, 112):
        feed_battery(restart, 1, second, alive=second)
        feed_battery(restart, 2, second, series=2, alive=second)
        serial_halves(restart, 2, "HQ000000000077", second + 0.5)
    view = restart.evaluate(105.0)
    assert view.phase == "discovering" and view.conflicted == (2,) and codes(view) == ["learned_mismatch"]
    view = restart.evaluate(112.0)
    assert view.phase == "learned" and codes(view) == ["learned_mismatch"] and view.issues[0].nodes == (2,)
    assert view.issues[0].reason.startswith(
        "battery 2 (learned serial HQ000000000002): serial HQ000000000077 instead of the learned "
        "HQ000000000002: two senders on node 2")

    swapped = Bank(100.0, learned=stored, discovery_window=10.0)  # node 2 is another battery now
    for second in range(100, 112):
        feed_battery(swapped, 1, second, alive=second)
        feed_battery(swapped, 2, second, series=2, alive=second, serial="HQ000000000077")
    view = swapped.evaluate(112.0)
    assert codes(view) == ["learned_mismatch"] and view.conflicted == (2,)
    assert "serial HQ000000000077 instead of the learned HQ000000000002: not the learned battery" \
        in view.issues[0].reason


def test_relearn_keeps_the_learned_identity_of_a_node_with_two_senders():
    bank = bank_of([(1, 1), (1, 2)])
    bank.evaluate(20.0)
    for second in range(20, 24):
        feed_battery(bank, 1, second, alive=second)
        feed_battery(bank, 2, second, series=2, alive=second)
        serial_halves(bank, 2, "HQ000000000077", second + 0.5)
    learned = bank.relearn(24.0)  # BANK-4 pressed while a second sender is on node 2
    assert [b.serial for b in learned.batteries] == ["HQ000000000001", "HQ000000000002"]
    assert bank.evaluate(24.0).conflicted == (2,)


def test_relearn_accepts_a_swapped_battery_at_once():
    bank = bank_of([(1, 1), (1, 2)])
    bank.evaluate(20.0)
    feed_battery(bank, 2, 20.0, series=2, alive=1)  # the old battery's last frames
    feed_battery(bank, 2, 21.0, series=2, alive=0, serial="HQ000000000077")  # then the new one's
    feed_battery(bank, 1, 21.0, alive=21)  # battery 1 goes on sending
    assert bank.evaluate(21.0).conflicted == (2,)
    learned = bank.relearn(21.5)
    assert learned.by_node()[2].serial == "HQ000000000077"
    view = bank.evaluate(21.5)
    assert view.conflicted == () and view.issues == ()


def statuses(bank: Bank, node: int, counters: list[int], start: float, period: float = 0.1) -> float:
    for i, counter in enumerate(counters):
        bank.update(status(node, alive=counter), round(start + i * period, 6))
    return round(start + len(counters) * period, 6)


@pytest.mark.parametrize("counters", [
    [1, 2, 3, 0, 1, 2],  # a reboot: the counter restarts once
    [1, 1, 2, 2, 3, 3, 4, 4],  # every frame received twice
    [1] * 20 + [2, 3],  # frozen, then going again (COM-1's business)
    [1, 2, 30, 3, 4],  # one frame from elsewhere (a bit error the CRC missed, a stray sender): one step back
    [1, 2, 3, 5, 9, 10],  # frames lost
], ids=["reboot", "duplicates", "frozen", "one-stray", "lost"])
def test_a_counter_that_steps_back_once_repeats_or_skips_is_not_two_senders(counters):
    bank = bank_of([(1, 1)])
    t = statuses(bank, 1, counters, 0.1)
    assert bank.evaluate(t).conflicted == ()


def test_two_interleaved_alive_counters_are_two_senders():
    bank = bank_of([(1, 1)])
    t = statuses(bank, 1, [1, 2, 200, 3, 201], 0.1)
    view = bank.evaluate(t)
    assert view.conflicted == (1,) and "AliveCounter jumps back and forth" in view.issues[0].reason


def test_counter_steps_back_further_apart_than_the_identity_memory_are_not_two_senders():
    bank = bank_of([(1, 1)])
    statuses(bank, 1, [10, 0], 0.1)  # a reboot
    statuses(bank, 1, [1, 0], 5.1)  # 5 s later: another one
    assert bank.evaluate(5.3).conflicted == ()


def test_a_conflict_is_held_comm_timeout_after_the_last_conflicting_frame():
    bank = bank_of([(1, 1)], discovery_window=0.5)
    assert bank.evaluate(1.0).phase == "learned"
    bank.update(SerialFragment(1, 1, "0000077"), 2.0)
    bank.update(SerialFragment(1, 1, "0000001"), 2.5)  # the real battery's half: not a conflicting frame
    bank.update(SerialFragment(1, 1, "0000077"), 3.0)
    assert bank.evaluate(7.99).conflicted == (1,)
    assert bank.evaluate(8.0).conflicted == () and bank.evaluate(8.0).issues[0].code == "learned_mismatch"
    # ...because the latest half is still the foreign one (identity check); the next real half ends it
    bank.update(SerialFragment(1, 1, "0000001"), 8.1)
    assert bank.evaluate(8.1).issues == ()


# -- protective memory -------------------------------------------------------------------------------

def test_flags_and_extremes_are_remembered_for_2_s():
    bank = bank_of([(1, 1)])
    bank.update(status(1, alive=1, cell_high_voltage=True), 0.1)
    bank.update(CellVoltages(1, 1, (3.3, 3.8, None, 3.3)), 0.1)
    bank.update(BatteryTemps(1, 4.0, 21.0), 0.1)
    bank.update(status(1, alive=2), 0.2)
    bank.update(CellVoltages(1, 1, (3.3, 3.3, 3.3, 3.3)), 0.2)
    bank.update(BatteryTemps(1, 19.0, 21.0), 0.2)
    view = bank.evaluate(2.09)
    assert view.flags["cell_high_voltage"] == (1,)
    a = view.aggregates
    assert (a.max_cell.voltage, a.recent_max_cell.voltage, a.recent_max_cell.cell) == (3.3, 3.8, 2)
    assert (a.min_cell_temperature, a.recent_min_cell_temperature) == (19.0, 4.0)
    assert view.batteries[0].unmeasured == (3,) and view.batteries[0].summary.unmeasured == ()
    view = bank.evaluate(2.1)
    assert view.flags["cell_high_voltage"] == () and view.aggregates.recent_max_cell.voltage == 3.3
    assert view.aggregates.recent_min_cell_temperature == 19.0 and view.batteries[0].unmeasured == ()


def test_relearn_forgets_a_battery_taken_out_and_learns_the_bank_as_it_is_now():
    """BANK-4 "accepts the bank as it is now": a battery no longer heard (taken out deliberately) is neither learned
    nor kept as a stale battery; back again, it is an unknown battery (BANK-3) until the next re-learn."""
    bank = bank_of([(1, 1), (2, 1), (3, 1)])  # three strings of one battery
    bank.evaluate(20.0)
    for second in range(20, 30):  # battery 3 is out of the bank from 20 s
        feed_battery(bank, 1, second, string=1, alive=second)
        feed_battery(bank, 2, second, string=2, alive=second)
    view = bank.evaluate(30.0)
    assert view.stale_nodes == (3,)
    assert bank.heard(30.0) == (1, 2)
    learned = bank.relearn(30.0)
    assert [b.node for b in learned.batteries] == [1, 2]
    view = bank.evaluate(30.0)
    assert [b.node for b in view.batteries] == [1, 2] and view.stale_nodes == () and view.issues == ()
    assert view.topology.batteries == 2 and view.topology.parallel == 2
    feed_battery(bank, 3, 31.0, string=3, alive=1)  # put back without a re-learn
    assert codes(bank.evaluate(31.0)) == ["unknown_battery"]
