"""The link (COM-3, COM-4): garbled input is counted, a vanished bus goes down and comes back with back-off."""

from __future__ import annotations

import itertools
import os
import threading
import time

import can
import can.interfaces.virtual
import pytest

from smallbms_bus.bms.alarms import BusState
from smallbms_bus.link.bus import (
    HOLD_S,
    MAX_FRAMES_PER_POLL,
    STABLE_S,
    Backoff,
    BusConfig,
    Link,
    open_bus,
    socketcan_is_up,
)
from smallbms_bus.reports import BatteryStatus
from smallbms_bus.sim.slcan_hub import SlcanHub

STATUS_07 = bytes.fromhex("D430F6FF0901012A")


def slcan(path: str) -> BusConfig:
    return BusConfig("slcan", path, options={"sleep_after_open": 0})


def poll_until(link: Link, predicate, timeout: float = 5.0) -> list:
    got: list = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got += link.poll(0.05)
        if predicate(got):
            return got
    raise AssertionError(f"condition not met in {timeout} s; got {got}, link {link.reason}")


def test_slcan_unplug_and_replug_is_link_down_then_up():
    events: list[tuple[bool, str]] = []
    with SlcanHub() as hub:
        battery = can.Bus(interface="slcan", channel=hub.path("slcan0"), sleep_after_open=0)
        link = Link(slcan(hub.path("slcan1")), on_state=lambda up, why: events.append((up, why)))
        try:
            assert link.open()
            battery.send(can.Message(arbitration_id=0x107, data=STATUS_07, is_extended_id=False))
            got = poll_until(link, lambda r: r)
            assert isinstance(got[0], BatteryStatus) and got[0].node == 7

            hub.unplug("slcan1")
            poll_until(link, lambda _: not link.up)
            assert events[-1][0] is False and "receive failed" in events[-1][1]
            assert not link.offer(can.Message(arbitration_id=0xF0, data=bytes(8), is_extended_id=False))

            hub.replug("slcan1")
            poll_until(link, lambda _: link.up)
            battery.send(can.Message(arbitration_id=0x107, data=STATUS_07[:7] + b"\x2b", is_extended_id=False))
            got = poll_until(link, lambda r: r)
            assert got[0].alive_counter == 0x2B
            assert [up for up, _ in events] == [True, False, True]
            assert link.opens == 2 and link.downs == 1
        finally:
            battery.shutdown()
            link.close()


def test_garbled_and_truncated_slcan_lines_are_counted_and_the_link_stays_up():
    master, slave = os.openpty()
    link = Link(slcan(os.ttyname(slave)))
    try:
        assert link.open()
        os.write(master, b"tZZZ8zz\r" + b"t1\r" + b"t1078D430F6FF0901012A\r" + b"t1073D430F6\r")
        got = poll_until(link, lambda r: r and link.decoder.malformed["wrong_dlc"] == 1)
        assert [r.node for r in got] == [7]
        assert link.garbled == 2 and link.up
        assert link.counters()["malformed_slcan_bad_length"] == 2
    finally:
        link.close()
        os.close(master)
        os.close(slave)


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_reopen_back_off_doubles_to_five_seconds_and_restarts_once_the_link_stayed_up():
    clock = FakeClock()
    attempts: list[float] = []
    fail = {"n": 8}

    def factory(config: BusConfig) -> can.BusABC:
        attempts.append(clock.t)
        if fail["n"] > 0:
            fail["n"] -= 1
            raise can.CanInterfaceNotImplementedError("adapter not plugged in")
        return can.Bus(interface="virtual", channel="backoff-test")

    link = Link(BusConfig("virtual", "backoff-test"), clock=clock, bus_factory=factory)
    while not link.up:
        link.poll(0)
        clock.t += 0.01
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert gaps == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0], abs=0.011)  # one clock step
    assert "adapter not plugged in" not in link.reason
    while clock.t - attempts[-1] < STABLE_S:  # a link that flaps right after opening keeps backing off ...
        assert link.backoff.current == 5.0
        link.poll(0)
        clock.t += 0.5
    link.poll(0)
    assert link.backoff.current == 0  # ... one that stayed up starts again from 0.1 s
    link.close()


def test_backoff_sequence():
    b = Backoff(initial=0.1, maximum=1.0)
    assert [b.next_delay() for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    b.reset()
    assert b.next_delay() == 0.1


def test_one_poll_is_bounded_under_a_flood():
    sender = can.Bus(interface="virtual", channel="flood")
    link = Link(BusConfig("virtual", "flood"))
    try:
        link.open()
        for _ in range(MAX_FRAMES_PER_POLL + 50):
            sender.send(can.Message(arbitration_id=0x107, data=STATUS_07, is_extended_id=False))
        assert len(link.poll(0.5)) == MAX_FRAMES_PER_POLL
        assert len(link.poll(0.5)) == 50
    finally:
        sender.shutdown()
        link.close()


def test_socketcan_state_is_read_from_sysfs(tmp_path):
    (tmp_path / "vcan0").mkdir()
    (tmp_path / "vcan0" / "flags").write_text("0x40c1\n")  # IFF_UP | IFF_NOARP | IFF_RUNNING
    (tmp_path / "can1").mkdir()
    (tmp_path / "can1" / "flags").write_text("0x80\n")  # down
    assert socketcan_is_up("vcan0", tmp_path)
    assert not socketcan_is_up("can1", tmp_path)
    assert not socketcan_is_up("can9", tmp_path)


def test_opening_a_missing_socketcan_interface_fails_clearly():
    with pytest.raises(can.CanError, match="no-such-can0 is missing or down"):
        open_bus(BusConfig("socketcan", "no-such-can0"))


def test_open_failure_keeps_the_reason():
    link = Link(slcan("/nonexistent/ttyACM9"))
    assert not link.open()
    assert not link.up and link.reason.startswith("cannot be opened: ") and "ttyACM9" in link.reason
    assert link.backoff.current == 0.1


def test_buffered_slcan_reads_every_frame_of_a_burst_and_waits_for_a_partial_line():
    """Several frame lines arriving in one chunk, and a line split across two writes, on a real pseudo-terminal."""
    import os

    from smallbms_bus.link.slcan import SlcanBus

    adapter, port = os.openpty()
    bus = SlcanBus(channel=os.ttyname(port), bitrate=500000, sleep_after_open=0)
    try:
        os.read(adapter, 64)  # the bus's own set-up commands (C, S6, O)
        os.write(adapter, b"t10180102030405060708\rt1022AABB\rt103")
        first, second = bus.recv(1.0), bus.recv(1.0)
        assert (first.arbitration_id, bytes(first.data)) == (0x101, bytes(range(1, 9)))
        assert (second.arbitration_id, bytes(second.data)) == (0x102, b"\xaa\xbb")
        assert bus.recv(0.05) is None  # "t103" is not a line yet
        os.write(adapter, b"1CC\r")
        third = bus.recv(1.0)
        assert (third.arbitration_id, bytes(third.data)) == (0x103, b"\xcc")
    finally:
        bus.shutdown()
        os.close(adapter)


class GatedBus(can.interfaces.virtual.VirtualBus):
    """python-can's virtual bus whose send() does not return while `gate` is closed (a call stuck in a driver)."""

    def __init__(self, gate: threading.Event, **kwargs) -> None:
        super().__init__(**kwargs)
        self.gate = gate

    def send(self, msg: can.Message, timeout: float | None = None) -> None:
        self.gate.wait()
        super().send(msg, timeout)


def test_a_stall_is_found_while_the_link_thread_is_stuck_and_the_link_reopens():
    clock = FakeClock()
    clock.t = 100.0
    gate = threading.Event()
    states: list[tuple[bool, str]] = []
    link = Link(BusConfig("virtual", "stall-test"), clock=clock, on_state=lambda up, why: states.append((up, why)),
                bus_factory=lambda config: GatedBus(gate, channel=config.channel))
    stop = threading.Event()
    owner = threading.Thread(target=link.serve, args=(stop, lambda reports: None), daemon=True)
    owner.start()
    try:
        poll_until_state(link, BusState.UP)
        frame = can.Message(arbitration_id=0xF0, data=bytes(8), is_extended_id=False)
        started = time.monotonic()
        assert link.offer(frame)  # the owner thread takes it and blocks in send()
        for _ in range(50):
            assert link.offer(frame)  # latest wins: the caller never waits
        assert time.monotonic() - started < 0.5
        assert link.status(100.0 + 0.99)[0] is BusState.UP  # the oldest unsent BMS_STATE is 0.99 s old
        state, reason = link.status(100.0 + 1.0)
        assert state is BusState.STALLED and "not taking frames" in reason
        assert "inside one call for 1.0 s" in reason  # the owner entered send() at t = 100
        assert states[-1] == (False, reason)
        assert not link.offer(frame)  # down: refused at once, counted as unsent
        counters = link.counters()
        assert (counters["stalls"], counters["downs"], counters["sent"]) == (1, 1, 0)
        assert counters["unsent"] == 50 + 1 + 1  # 50 replaced, the stalled one dropped, one refused
        gate.set()  # the call returns: the owner closes the bus and re-opens it after the back-off
        poll_until_state(link, BusState.UP, clock)
        assert link.opens == 2 and states[-1] == (True, "")
    finally:
        gate.set()
        stop.set()
        owner.join(timeout=5)
    assert link.state is BusState.NOT_OPEN


def poll_until_state(link: Link, state: BusState, clock: FakeClock | None = None, timeout: float = 5.0) -> None:
    """Wait for the owner thread to bring `link` to `state`, moving the fake clock on (back-off) if given."""
    deadline = time.monotonic() + timeout
    while link.state is not state:
        assert time.monotonic() < deadline, f"link {link.state} ({link.reason}), not {state}"
        time.sleep(0.005)
        if clock is not None:
            clock.t += 0.01


def test_reports_that_cross_no_threshold_are_held_briefly_and_a_threshold_crossing_goes_at_once():
    """The bus thread wakes the event loop at once for a report that may switch an output (the core's own
    protective signature changed), and otherwise hands reports over at most HOLD_S later (a fake clock here)."""
    clock = FakeClock()
    clock.t = 10.0
    channel = f"hold-{time.monotonic_ns()}"
    link = Link(BusConfig("virtual", channel), clock=clock)
    sender = can.Bus(interface="virtual", channel=channel)
    deliveries: list[list[int]] = []
    stop = threading.Event()
    owner = threading.Thread(target=link.serve, args=(stop, lambda reports: deliveries.append(
        [r.alive_counter for r in reports])), daemon=True)
    owner.start()

    def send(alive: int, flags: int = 0x00) -> None:
        data = bytearray(STATUS_07)
        data[6], data[7] = flags, alive
        sender.send(can.Message(arbitration_id=0x107, data=bytes(data), is_extended_id=False))

    def wait_received(n: int) -> None:
        deadline = time.monotonic() + 5
        while link.decoder.received < n:
            assert time.monotonic() < deadline, f"{link.decoder.received} of {n} frames received"
            time.sleep(0.005)
        time.sleep(0.1)  # the owner thread has been round its loop since

    try:
        poll_until_state(link, BusState.UP)
        send(1)  # the first status of node 7: new to the signatures, so at once
        wait_received(1)
        assert deliveries == [[1]]
        for alive in range(2, 12):  # "still fine": held while the (fake) clock stands still
            send(alive)
        wait_received(11)
        assert deliveries == [[1]]
        send(12, flags=0x01)  # CellHighVoltage: at once, after the ones held before it
        wait_received(12)
        assert deliveries == [[1], list(range(2, 13))]
        send(13, flags=0x01)
        wait_received(13)
        assert len(deliveries) == 2
        clock.t += 2 * HOLD_S  # the hold has passed: handed over on the owner's next pass
        deadline = time.monotonic() + 5
        while len(deliveries) < 3:
            assert time.monotonic() < deadline, deliveries
            time.sleep(0.005)
        assert deliveries[2] == [13]
    finally:
        stop.set()
        owner.join(timeout=5)
        sender.shutdown()
