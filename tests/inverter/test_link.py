"""The BMS-CAN link on python-can's virtual bus: the frame schedule (timed by the frames' own timestamps), fail-safe
zeros, keep-alive and INVERTER_SILENT, reconnect after a bus error, and the service with the battery bus down."""

from __future__ import annotations

import itertools
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import can
import pytest

from smallbms_bus.bms.alarms import BmsWarning
from smallbms_bus.bms.charge import ChargeLimits, ChargeState
from smallbms_bus.inverter.frames import FrameEncoder, InverterValues
from smallbms_bus.inverter.link import VALUES_STALE_S, InverterLink
from smallbms_bus.link.bus import BusConfig, open_bus
from tests.metrics_rig import RunningBms

LIMITS = ChargeLimits(cvl=55.2, ccl=100.0, dcl=150.0, dvl=44.8, state=ChargeState.ABSORPTION, known=True)
VALUES = InverterValues(limits=LIMITS, soc=80.0, started=True)
MAX_GAP_S = 1.5  # INVERTER_CAN.md: 0x351 never more than 1.5 s apart


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"{what} not reached within {timeout} s")


def limits_of(frame: can.Message) -> tuple[float, float, float, float]:
    cvl, ccl, dcl, dvl = struct.unpack("<HhhH", bytes(frame.data))
    return cvl / 10, ccl / 10, dcl / 10, dvl / 10


class Inverter:
    """The other end of the cable: a python-can bus that records what arrives (with its timestamps)."""

    def __init__(self, channel: str) -> None:
        self.bus = can.Bus(interface="virtual", channel=channel, receive_own_messages=False)
        self.frames: list[can.Message] = []
        self.stop = threading.Event()
        self.keepalive = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        next_keepalive = 0.0
        while not self.stop.is_set():
            frame = self.bus.recv(0.02)
            if frame is not None:
                self.frames.append(frame)
            if self.keepalive.is_set() and time.monotonic() >= next_keepalive:
                self.bus.send(can.Message(arbitration_id=0x305, data=bytes(8), is_extended_id=False))
                next_keepalive = time.monotonic() + 0.2

    def limits(self) -> list[can.Message]:
        return [f for f in list(self.frames) if f.arbitration_id == 0x351]

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        self.bus.shutdown()


@pytest.fixture
def channel() -> str:
    return f"inverter-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def inverter(channel: str) -> Iterator[Inverter]:
    peer = Inverter(channel)
    yield peer
    peer.close()


def running(link: InverterLink) -> tuple[threading.Event, threading.Thread]:
    stop = threading.Event()
    thread = threading.Thread(target=link.serve, args=(stop,), daemon=True)
    thread.start()
    return stop, thread


def stop_link(stop: threading.Event, thread: threading.Thread) -> None:
    stop.set()
    thread.join(5)
    assert not thread.is_alive()


def gaps(frames: list[can.Message]) -> list[float]:
    stamps = [f.timestamp for f in frames]
    return [b - a for a, b in itertools.pairwise(stamps)]


@pytest.mark.parametrize("period", [2.0, 0.2])
def test_0x351_is_never_more_than_1_5_s_apart_and_every_set_arrives(inverter, channel, period):
    link = InverterLink(BusConfig("virtual", channel), FrameEncoder("pylontech"), period=period)
    link.offer(VALUES)
    stop, thread = running(link)
    try:
        wait_for(lambda: len(inverter.limits()) >= 5, 30, "five 0x351 frames")
        wait_for(lambda: link.sets_sent >= 3, 30, "three frame sets")
    finally:
        stop_link(stop, thread)
    limits = inverter.limits()
    assert limits_of(limits[0]) == pytest.approx((55.2, 100.0, 150.0, 44.8))
    assert max(gaps(limits[:-1])) <= MAX_GAP_S  # the last one is the stop's zeros, sent at once
    ids = {f.arbitration_id for f in inverter.frames}
    assert ids == {0x351, 0x355, 0x356, 0x35A, 0x35E, 0x35F, 0x372, 0x373, 0x374, 0x375, 0x376, 0x377, 0x379,
                   0x359, 0x35C}
    # the period is kept: the sets (one 0x35E each) are `period` apart, within generous margins
    set_gaps = gaps([f for f in inverter.frames if f.arbitration_id == 0x35E])[:-1]  # not the stop's set
    assert all(0.5 * period <= g <= period + 0.5 for g in set_gaps), set_gaps
    assert link.max_limits_gap <= MAX_GAP_S and link.frames_sent >= len(inverter.frames) - 1


def test_a_clean_stop_sends_every_limit_zero(inverter, channel):
    link = InverterLink(BusConfig("virtual", channel), FrameEncoder("victron"), period=0.2)
    link.offer(VALUES)
    stop, thread = running(link)
    wait_for(lambda: inverter.limits(), 10, "a 0x351")
    stop_link(stop, thread)
    wait_for(lambda: limits_of(inverter.limits()[-1]) == (0, 0, 0, 0), 5, "the stop's zero limits")


def test_values_the_loop_stops_refreshing_become_zeros(inverter, channel):
    link = InverterLink(BusConfig("virtual", channel), FrameEncoder("victron"), period=0.2)
    link.offer(VALUES)  # once, never again: a hung event loop
    stop, thread = running(link)
    try:
        wait_for(lambda: inverter.limits() and limits_of(inverter.limits()[0])[1] == 100.0, 10, "the limits")
        first = inverter.limits()[0].timestamp
        wait_for(lambda: limits_of(inverter.limits()[-1]) == (0, 0, 0, 0), 10, "zero limits")
        zero_at = next(f.timestamp for f in inverter.limits() if limits_of(f) == (0, 0, 0, 0))
        assert zero_at - first >= VALUES_STALE_S - 0.3  # the values were good until they went stale
        link.offer(VALUES)  # the loop is back
        wait_for(lambda: limits_of(inverter.limits()[-1])[1] == 100.0, 10, "limits again")
    finally:
        stop_link(stop, thread)


def test_keepalive_tracked_and_its_absence_is_inverter_silent(inverter, channel):
    link = InverterLink(BusConfig("virtual", channel), FrameEncoder("victron"), period=0.2, keepalive_timeout=2.0)
    stop, thread = running(link)
    try:
        inverter.keepalive.set()
        wait_for(lambda: link.keepalives >= 3, 10, "keep-alives counted")
        assert link.silent_reason() is None
        inverter.keepalive.clear()
        last = link.last_keepalive_at
        wait_for(lambda: link.silent_reason() is not None, 10, "INVERTER_SILENT")
        assert link.clock() - last >= 2.0
        assert "no inverter keep-alive" in (link.silent_reason() or "")
        inverter.keepalive.set()
        wait_for(lambda: link.silent_reason() is None, 10, "the keep-alive back")
    finally:
        stop_link(stop, thread)
    assert link.counters()["keepalives"] >= 4


def test_no_keepalive_required_means_never_silent():
    link = InverterLink(BusConfig("virtual", "unused"), FrameEncoder("victron"), keepalive_timeout=0.0,
                        clock=lambda: 1e9)
    assert link.silent_reason(2e9) is None


class FlakyBus(can.BusABC):
    """A real virtual bus whose N-th send fails like an unplugged adapter (the peer, not the link, is faulty)."""

    def __init__(self, channel: str, fail_on: int) -> None:
        self.inner = can.Bus(interface="virtual", channel=channel)
        self.sends, self.fail_on = 0, fail_on
        super().__init__(channel=channel)

    def send(self, msg: can.Message, timeout: float | None = None) -> None:
        self.sends += 1
        if self.sends == self.fail_on:
            raise can.CanOperationError("Network is down [Error Code 100]")
        self.inner.send(msg, timeout)

    def _recv_internal(self, timeout: float | None) -> tuple[can.Message | None, bool]:
        return self.inner.recv(timeout), False

    def shutdown(self) -> None:
        self.inner.shutdown()
        super().shutdown()


def test_a_send_error_reopens_the_bus_and_the_limits_keep_coming(inverter, channel):
    opened: list[FlakyBus] = []
    refusals = [2]  # the first re-open fails too (adapter still gone): back-off, then up

    def factory(config: BusConfig) -> can.BusABC:
        if opened and refusals[0]:
            refusals[0] -= 1
            raise can.CanOperationError("No such device")
        bus = FlakyBus(config.channel, fail_on=4 if not opened else 0)
        opened.append(bus)
        return bus

    link = InverterLink(BusConfig("virtual", channel), FrameEncoder("victron"), period=0.2, bus_factory=factory)
    link.offer(VALUES)
    stop, thread = running(link)
    try:
        wait_for(lambda: link.opens >= 2 and len(inverter.limits()) >= 8, 20, "re-opened and sending")
    finally:
        stop_link(stop, thread)
    assert link.send_errors == 1 and link.downs == 1 and link.opens == 2
    assert max(gaps(inverter.limits())) <= MAX_GAP_S  # 0.1 + 0.2 s back-off: well inside


def test_a_missing_socketcan_interface_is_retried_not_raised(channel):
    link = InverterLink(BusConfig("socketcan", "nosuchcan9"), FrameEncoder("victron"), period=0.2,
                        bus_factory=open_bus)
    stop, thread = running(link)
    try:
        wait_for(lambda: "cannot be opened" in link.reason, 5, "the open failure")
        assert not link.up and link.frames_sent == 0
    finally:
        stop_link(stop, thread)


def test_service_sends_zero_limits_while_the_battery_bus_is_down_and_warns_of_a_silent_inverter(tmp_path, channel):
    """CHG-6 on the wire: no battery data, so every limit is 0, and the frames keep coming; no keep-alive from
    the inverter within keepalive_timeout raises INVERTER_SILENT (and ATC/ATD do not change for it)."""
    extra = (f'[inverter]\ninterface = "virtual"\nchannel = "{channel}"\nperiod = 0.5\nkeepalive_timeout = 2\n')
    peer = Inverter(channel)
    rig = RunningBms(tmp_path, metrics_extra=extra)
    rig.sim_stop.set()  # no battery ever speaks: the BMS cannot prove anything
    try:
        with rig:
            wait_for(lambda: len(peer.limits()) >= 4, 20, "0x351 from the service")
            assert all(limits_of(f)[1:3] == (0, 0) for f in peer.limits())  # CCL = DCL = 0
            wait_for(lambda: rig.service.decision is not None
                     and BmsWarning.INVERTER_SILENT in rig.service.decision.warnings, 20, "INVERTER_SILENT")
            assert "no inverter keep-alive" in rig.service.decision.reasons["INVERTER_SILENT"]
            scrape = rig.scrape()
            assert scrape.value("smallbms_warning", warning="inverter_silent") == 1
            assert scrape.value("smallbms_inverter_enabled") == 1 and scrape.value("smallbms_inverter_bus_up") == 1
            assert scrape.value("smallbms_inverter_frames_sent_total") >= 4
            assert 0 < scrape.value("smallbms_inverter_limits_gap_max_seconds") <= MAX_GAP_S
            peer.keepalive.set()
            wait_for(lambda: BmsWarning.INVERTER_SILENT not in rig.service.decision.warnings, 20, "silent cleared")
            assert rig.scrape().value("smallbms_inverter_frames_received_total", kind="keepalive") >= 1
            assert rig.shutdown() == 0
        assert limits_of(peer.limits()[-1]) == (0, 0, 0, 0)
        assert max(gaps(peer.limits())) <= MAX_GAP_S
    finally:
        peer.close()
