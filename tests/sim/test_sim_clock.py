"""The simulation clock: speed x real time, a wall clock that moves with it, and the governor that loses
simulated time rather than let a lagging part see a jump (driven by a fake real clock: no sleeping)."""

from __future__ import annotations

import asyncio

import pytest

from smallbms_bus.sim.clock import GIVE_UP_S, MAX_LEAD_S, SimClock


class Real:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def clock(speed: float = 20.0, **kwargs) -> tuple[SimClock, Real]:
    real = Real()
    return SimClock(speed, real=real, real_wall=lambda: 1.7e9, **kwargs), real


def test_speed_times_real_time_and_a_wall_clock_that_moves_with_it() -> None:
    c, real = clock(20.0)
    start, wall = c.monotonic(), c.wall()
    assert start == 1000.0 and wall == 1.7e9  # starts at the real clocks' values
    real.t += 0.5
    assert c.monotonic() - start == pytest.approx(10.0)
    assert c.wall() - wall == pytest.approx(10.0)
    assert c.elapsed() == pytest.approx(10.0) and c.real_elapsed() == pytest.approx(0.5)
    assert c.to_real(10.0) == pytest.approx(0.5)


def test_a_stopped_clock_stands_until_started() -> None:
    c, real = clock(20.0, running=False)
    real.t += 5.0
    assert c.monotonic() == 1000.0
    c.start()
    real.t += 0.1
    assert c.elapsed() == pytest.approx(2.0)


@pytest.mark.parametrize("speed", [0.0, -1.0, float("nan"), float("inf")])
def test_speed_must_be_positive_and_finite(speed: float) -> None:
    with pytest.raises(ValueError, match="speed"):
        SimClock(speed)


def test_the_clock_never_runs_more_than_max_lead_ahead_of_a_watched_part() -> None:
    c, real = clock(20.0)
    progress: list[float | None] = [None]
    c.watch("part", lambda: progress[0])
    real.t += 0.1  # not started yet (None): not waited for
    assert c.elapsed() == pytest.approx(2.0)
    progress[0] = c.monotonic()  # the part is at "now"
    real.t += 0.06  # a 60 ms stall of the part: 1.2 s at speed 20
    assert c.elapsed() == pytest.approx(2.0 + MAX_LEAD_S)  # held, not jumped
    assert c.held_s == pytest.approx(1.2 - MAX_LEAD_S)
    progress[0] = c.monotonic()  # it catches up
    real.t += 0.01
    assert c.elapsed() == pytest.approx(2.0 + MAX_LEAD_S + 0.2)  # runs at full speed again; the lost time stays lost


def test_the_slowest_part_sets_the_limit() -> None:
    c, real = clock(10.0)
    a, b = [c.monotonic()], [c.monotonic() - 0.3]
    c.watch("a", lambda: a[0])
    c.watch("b", lambda: b[0])
    real.t += 1.0
    assert c.elapsed() == pytest.approx(-0.3 + MAX_LEAD_S)


def test_a_part_without_progress_for_give_up_s_is_stopped_not_slow() -> None:
    """A BMS that stops sending must not freeze the simulation: after GIVE_UP_S real seconds the clock runs
    again (so the devices' 1 s BMS_STATE watchdog trips as it would), and waits for it again once it moves."""
    c, real = clock(10.0)
    progress = [c.monotonic()]
    c.watch("BMS_STATE", lambda: progress[0])
    real.t += GIVE_UP_S / 2
    assert c.elapsed() == pytest.approx(MAX_LEAD_S)
    real.t += GIVE_UP_S / 2
    held = c.elapsed()
    assert held == pytest.approx(MAX_LEAD_S) and "BMS_STATE" in c.ignored and c.gave_up == 1
    real.t += 0.1
    assert c.elapsed() == pytest.approx(held + 1.0)  # runs again
    progress[0] = c.monotonic()  # back
    real.t += 1.0
    assert c.elapsed() == pytest.approx(held + 1.0 + MAX_LEAD_S) and not c.ignored


def test_sleep_waits_simulated_seconds() -> None:
    c = SimClock(50.0)
    real_start = c.real_elapsed()
    asyncio.run(c.sleep(2.5))  # 50 ms real
    assert c.elapsed() >= 2.5
    assert 0.04 <= c.real_elapsed() - real_start < 1.0
