"""Bank shapes, chain order and identities, and how parallel strings share the current."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smallbms_bus.sim.bank import PRESETS, BankShape, VirtualBank, preset_list


@pytest.mark.parametrize(("text", "expected"), [
    ("4s1p-12v100", (4, 1, 1, 100)),
    ("2s2p-12v100", (2, 2, 1, 100)),
    ("1s2p-24v200", (1, 2, 2, 200)),
    ("1s25p-48v100", (1, 25, 4, 100)),
    ("2s25p-12v100", (2, 25, 1, 100)),
    ("2S2P-24V300", (2, 2, 2, 300)),
    (" 1s50p-12v150 ", (1, 50, 1, 150)),
])
def test_shapes_parse(text: str, expected: tuple[int, int, int, int]) -> None:
    shape = BankShape.parse(text)
    assert (shape.series, shape.parallel, shape.units, shape.capacity_ah) == expected
    assert BankShape.parse(shape.name) == shape


def test_shape_properties() -> None:
    shape = BankShape.parse("2s3p-24v200")
    assert (shape.count, shape.units_in_series, shape.nominal_voltage, shape.capacity_total_ah) == (6, 4, 51.2, 600)


@pytest.mark.parametrize(("text", "reason"), [
    ("5s1p-12v100", "51.2 V"),
    ("3s1p-24v100", "51.2 V"),
    ("2s1p-48v100", "51.2 V"),
    ("1s51p-12v100", "at most 50"),
    ("2s26p-12v100", "at most 50"),
    ("1s51p-24v100", "at most 50"),
    ("1s26p-48v100", "at most 25"),
    ("2s2p-36v100", "12v, 24v or 48v"),
    ("0s1p-12v100", "at least 1"),
    ("1s0p-12v100", "at least 1"),
    ("1s1p-12v0", "capacity"),
    ("2s2p", "shape like"),
    ("banana", "preset"),
])
def test_impossible_shapes_are_rejected_with_the_reason(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        BankShape.parse(text)


def test_presets_are_valid_shapes() -> None:
    assert [name for name, _ in preset_list()] == list(PRESETS)
    for name, shape in preset_list():
        assert BankShape.parse(name) == shape


def test_batteries_in_chain_order_with_positions_and_serials() -> None:
    bank = VirtualBank("2s3p-12v100", seed=1)
    assert [b.node for b in bank.batteries] == [1, 2, 3, 4, 5, 6]
    assert [(b.string_index, b.series_index) for b in bank.batteries] == [
        (1, 1), (1, 2), (2, 1), (2, 2), (3, 1), (3, 2)]
    assert [[b.node for b in s] for s in bank.strings] == [[1, 2], [3, 4], [5, 6]]
    serials = [b.serial for b in bank.batteries]
    assert len(set(serials)) == 6
    assert all(len(s) == 14 and s.startswith("HQ2234") and s[6:].isdigit() for s in serials)
    assert bank.battery(4).node == 4


def test_banks_are_deterministic_per_seed() -> None:
    a, b, c = VirtualBank("2s2p-12v100", seed=3), VirtualBank("2s2p-12v100", seed=3), VirtualBank("2s2p-12v100", seed=4)
    assert [x.serial for x in a.batteries] == [x.serial for x in b.batteries]
    assert [x.cell_voltages() for x in a.batteries] == [x.cell_voltages() for x in b.batteries]
    assert [x.serial for x in a.batteries] != [x.serial for x in c.batteries]


def test_largest_bank_has_50_distinct_nodes() -> None:
    bank = VirtualBank("max-chain")
    assert len(bank.batteries) == 50 and len({b.serial for b in bank.batteries}) == 50


def test_series_voltage_adds_up() -> None:
    bank = VirtualBank("4s1p-12v100", soc=60.0)
    assert bank.voltage == pytest.approx(sum(b.voltage for b in bank.batteries))
    assert 52.0 < bank.voltage < 54.0  # 16 cells at ~3.31 V


@settings(max_examples=60, deadline=None)
@given(
    current=st.floats(min_value=-500.0, max_value=500.0),
    socs=st.lists(st.floats(min_value=5.0, max_value=95.0), min_size=3, max_size=3),
)
def test_parallel_strings_share_the_bank_current(current: float, socs: list[float]) -> None:
    bank = VirtualBank("1s3p-24v100")
    for battery, soc in zip(bank.batteries, socs, strict=True):
        battery.set_soc(soc)
    volts, shares = bank.share(current)
    assert sum(shares) == pytest.approx(current, abs=1e-6)
    for string, share in zip(bank.strings, shares, strict=True):
        ocv = sum(b.ocv for b in string)
        resistance = sum(b.resistance for b in string)
        assert volts == pytest.approx(ocv + share * resistance, abs=1e-9)


def test_fuller_string_takes_less_charge_and_the_step_applies_shares() -> None:
    bank = VirtualBank("2s2p-12v100", soc=50.0)
    for b in bank.strings[1]:
        b.set_soc(90.0)
    bank.step(50.0, 10.0)
    low, high = bank.string_currents
    assert low > high and low + high == pytest.approx(50.0)
    assert [b.current for b in bank.batteries] == pytest.approx([low, low, high, high])


def test_idle_bank_still_balances_strings_between_themselves() -> None:
    bank = VirtualBank("1s2p-12v100", soc=30.0)
    bank.batteries[1].set_soc(80.0)
    bank.step(0.0, 1.0)
    into_empty, out_of_full = bank.string_currents
    assert into_empty > 0 > out_of_full and into_empty == pytest.approx(-out_of_full)


def test_operating_current_meets_a_falling_characteristic() -> None:
    bank = VirtualBank("2s1p-12v100", soc=50.0)
    ocv, resistance = bank.equivalent()
    target = ocv + 0.5

    def charger(volts: float) -> float:  # 100 A, tapering to 0 over 1 V up to `target`
        return 100.0 * min(1.0, max(0.0, target - volts))

    current = bank.operating_current(charger)
    volts = ocv + current * resistance
    assert current == pytest.approx(charger(volts), abs=1e-4)
    assert 0 < current < 100.0
    assert bank.operating_current(lambda v: -30.0) == pytest.approx(-30.0)


def test_ambient_reaches_every_battery() -> None:
    bank = VirtualBank("1s2p-12v100", ambient=25.0)
    bank.set_ambient(-5.0)
    assert {b.ambient for b in bank.batteries} == {-5.0}
