"""Strict SLCAN framing (COM-3) on a real pseudo-terminal: every line is one frame or one counted malformed line.

The test plays the adapter: it writes lines into the pty's master side; the link under test reads the slave
side through pyserial and `smallbms_bus.link.slcan`. Only the port failing is COM-4; any byte sequence
the adapter sends is framing, counted and dropped, and the link stays up.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator

import can
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smallbms_bus.link.bus import BusConfig, Link
from smallbms_bus.link.slcan import LINE_KINDS, MAX_LINE, LineParser, SlcanBus, encode_line
from smallbms_bus.reports import BatteryStatus

STATUS_07 = b"t1078D430F6FF0901012A"  # node 7's BAT_STATUS, AliveCounter 0x2A


def status(alive: int) -> bytes:
    return b"t1078D430F6FF090101" + f"{alive:02X}".encode()


class Adapter:
    """The master side of a pseudo-terminal: what a USB SLCAN adapter would send to the host."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        self.link = Link(BusConfig("slcan", os.ttyname(self.slave), options={"sleep_after_open": 0}))
        assert self.link.open()
        os.set_blocking(self.master, False)
        time.sleep(0.05)
        commands = self.drain()  # the link's set-up commands (C, S6, O, ...): answered OK as an adapter does
        self.write(b"\r" * commands.count(b"\r"))

    def drain(self) -> bytes:
        try:
            return os.read(self.master, 65536)
        except BlockingIOError:
            return b""

    def write(self, data: bytes) -> None:
        os.write(self.master, data)

    def reports_until(self, alive: int, timeout: float = 5.0) -> list:
        """Poll the link until node 7's status with AliveCounter `alive` was decoded; all reports seen."""
        got: list = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got += self.link.poll(0.05)
            if any(isinstance(r, BatteryStatus) and r.alive_counter == alive for r in got):
                return got
        raise AssertionError(f"status {alive} not decoded in {timeout} s; got {got}; link {self.link.reason}")

    def close(self) -> None:
        self.link.close()
        os.close(self.master)
        os.close(self.slave)


@pytest.fixture
def adapter() -> Iterator[Adapter]:
    a = Adapter()
    yield a
    a.close()


def malformed(link: Link) -> dict[str, int]:
    c = link.counters()
    return {k: c[f"malformed_{k}"] for k in LINE_KINDS if c[f"malformed_{k}"]}


def test_a_non_ascii_line_is_counted_and_never_takes_the_link_down(adapter):
    adapter.write(b"t10\x80\xff8\r" + status(1) + b"\r")
    got = adapter.reports_until(1)
    assert adapter.link.up and adapter.link.downs == 0, adapter.link.reason
    assert [r.alive_counter for r in got] == [1]
    assert malformed(adapter.link) == {"slcan_non_ascii": 1}


@pytest.mark.parametrize("tail", [b"00", b"ZZ", b"0", b"12345"])
def test_a_frame_line_with_trailing_characters_is_malformed_not_a_frame(adapter, tail):
    adapter.write(status(1) + tail + b"\r" + status(2) + b"\r")
    got = adapter.reports_until(2)
    assert [r.alive_counter for r in got] == [2], "the line with trailing characters was decoded"
    kind = "slcan_bad_length"
    assert malformed(adapter.link) == {kind: 1}
    assert adapter.link.up and adapter.link.downs == 0


def test_an_over_long_line_is_one_malformed_line_and_the_buffer_stays_bounded(adapter):
    long_line = STATUS_07 + b"0" * (20_000 - len(STATUS_07))
    adapter.write(long_line[:10_000])
    adapter.link.poll(0.1)
    bus = adapter.link.bus
    assert isinstance(bus, SlcanBus) and bus.parser.buffered <= MAX_LINE
    adapter.write(long_line[10_000:])
    adapter.link.poll(0.1)
    assert bus.parser.buffered <= MAX_LINE
    adapter.write(b"\r" + status(3) + b"\r")
    got = adapter.reports_until(3)
    assert [r.alive_counter for r in got] == [3], "the over-long line was decoded"
    assert malformed(adapter.link) == {"slcan_too_long": 1}
    assert adapter.link.up and adapter.link.downs == 0


def test_every_kind_of_bad_line_is_counted_once_and_the_next_frame_is_decoded(adapter):
    lines = {
        b"tZZZ8D430F6FF0901012A": "slcan_bad_field",  # id not hex
        b"t1079D430F6FF0901012A00": "slcan_bad_field",  # DLC 9
        b"t8008D430F6FF0901012A": "slcan_bad_field",  # an 11-bit id above 0x7FF
        b"t1078D430F6FF09010 2A": "slcan_bad_field",  # a space is not a hex digit (bytes.fromhex would skip it)
        b"t1078D430F6FF0901_12A": "slcan_bad_field",  # nor an underscore (int(..., 16) would accept it)
        b"t1": "slcan_bad_length",
        b"t1078D430F6": "slcan_bad_length",  # truncated
        b"T000001078D430F6FF0901012A0": "slcan_bad_length",
        b"Q123": "slcan_unknown",
        b"\x00\x00": "slcan_non_ascii",
        b"t107\n8D430F6FF0901012A": "slcan_non_ascii",
    }
    for n, line in enumerate(lines, start=1):
        adapter.write(line + b"\r" + status(n) + b"\r")
        got = adapter.reports_until(n)
        assert [r.alive_counter for r in got] == [n], f"{line!r} was decoded"
    expected: dict[str, int] = {}
    for kind in lines.values():
        expected[kind] = expected.get(kind, 0) + 1
    assert malformed(adapter.link) == expected
    assert adapter.link.up and adapter.link.downs == 0


def test_valid_variants_are_frames_and_adapter_answers_are_not_malformed(adapter):
    adapter.write(b"\r" + b"z\r" + b"Z\r" + b"\x07")  # OK, transmit OK (Lawicel), BELL (an error answer)
    adapter.write(b"t1078d430f6ff0901012b\r")  # lower-case hex
    adapter.write(status(0x2C) + b"1A2F\r")  # a 4-digit timestamp (Lawicel Z1)
    adapter.write(b"T000001078D430F6FF0901012D\r")  # an extended id: the DBC does not know it
    adapter.write(b"r1078\r" + b"t1070\r")  # a remote frame, a frame of DLC 0
    adapter.write(status(0x2E) + b"\r")
    got = adapter.reports_until(0x2E)
    assert [r.alive_counter for r in got] == [0x2B, 0x2C, 0x2E]
    assert malformed(adapter.link) == {}
    c = adapter.link.counters()
    assert (c["malformed_unknown_id"], c["malformed_not_data_frame"], c["malformed_wrong_dlc"]) == (1, 1, 1)
    assert c["adapter_errors"] == 1


def test_the_link_transmits_lines_the_adapter_reads(adapter):
    frame = can.Message(arbitration_id=0x0F0, data=bytes.fromhex("0102030405060708"), is_extended_id=False)
    assert adapter.link.offer(frame)
    adapter.link.poll(0.05)
    deadline = time.monotonic() + 2
    seen = b""
    while b"\r" not in seen and time.monotonic() < deadline:
        seen += adapter.drain()
        time.sleep(0.01)
    assert seen == b"t0F080102030405060708\r"
    assert adapter.link.counters()["sent"] == 1


def test_random_bytes_from_the_adapter_never_take_the_link_down(adapter):
    """A few thousand random chunks (any byte, terminators included) through the real port."""
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    alphabet = b"tTrRdDbBxzZ0123456789ABCDEFabcdef\r\x07\x00\x80\xff\n "
    for i in range(3000):
        if rng.random() < 0.5:
            chunk = rng.randbytes(rng.randrange(1, 64))
        else:
            chunk = bytes(rng.choice(alphabet) for _ in range(rng.randrange(1, 64)))
        adapter.write(chunk)
        if i % 100 == 0:
            adapter.link.poll(0)
    adapter.write(b"\r" + status(0x33) + b"\r")
    adapter.reports_until(0x33)
    assert adapter.link.up and adapter.link.downs == 0, f"seed {seed}: {adapter.link.reason}"
    assert adapter.link.bus.parser.buffered <= MAX_LINE


# -- the parser alone (pure: bytes in, frames and counts out) -------------------------------------------------
def count_lines(parser: LineParser) -> int:
    return sum(parser.counts.values()) + parser.frames + parser.answers


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=300) | st.sampled_from([b"\r", b"\x07", STATUS_07, b"t1", b"z", b"\x80"]),
                max_size=40))
def test_the_parser_never_raises_and_accounts_for_every_line(chunks):
    parser = LineParser()
    for chunk in chunks:
        parser.feed(chunk, 0.0)
        assert parser.buffered <= MAX_LINE
    data = b"".join(chunks)
    terminators = data.count(b"\r") + data.count(b"\x07")
    # Every terminated line is one frame, one answer or one malformed line; an over-long line still open counts once.
    assert count_lines(parser) == terminators + (1 if parser.discarding else 0)


frames = st.builds(
    lambda ext, ident, remote, data: can.Message(arbitration_id=ident & (0x1FFFFFFF if ext else 0x7FF),
                                                 is_extended_id=ext, is_remote_frame=remote,
                                                 dlc=len(data), data=None if remote else data),
    st.booleans(), st.integers(0, 0x1FFFFFFF), st.booleans(), st.binary(max_size=8))


@settings(max_examples=300, deadline=None)
@given(st.lists(frames, min_size=1, max_size=20), st.data())
def test_every_frame_encoded_is_parsed_back_exactly_between_garbage(messages, data):
    parser = LineParser()
    stream = b""
    for m in messages:
        stream += data.draw(st.sampled_from([b"", b"\x80garbage\r", b"t12\r", b"\x07"]))
        line = encode_line(m)
        if data.draw(st.booleans()):  # a timestamp, and lower case: both valid
            line = line[:-1] + b"00FF\r"
        stream += line.lower() if data.draw(st.booleans()) and line[:1] in b"tr" else line
    cut = data.draw(st.integers(0, len(stream)))
    got = parser.feed(stream[:cut], 1.0) + parser.feed(stream[cut:], 1.0)
    assert [(f.arbitration_id, f.is_extended_id, f.is_remote_frame, f.dlc, bytes(f.data)) for f in got] == \
        [(m.arbitration_id, m.is_extended_id, m.is_remote_frame, m.dlc, b"" if m.is_remote_frame else bytes(m.data))
         for m in messages]


def test_waiting_for_frames_after_a_slow_write_does_not_spin():
    """A line the port took only partly makes the reader watch for writability; once the line is out the
    reader must stop watching, or every wait for frames becomes a busy loop (seen while measuring CPU)."""
    master, slave = os.openpty()
    bus = SlcanBus(channel=os.ttyname(slave), bitrate=500000, sleep_after_open=0)
    try:
        os.set_blocking(master, False)
        filler = os.open(os.ttyname(slave), os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY)
        for _ in range(3):  # fill the adapter's side: the port takes nothing more
            for chunk in (b"\0" * 4096, b"\0"):
                try:
                    while True:
                        os.write(filler, chunk)
                except BlockingIOError:
                    pass
            time.sleep(0.02)
        os.close(filler)
        frame = can.Message(arbitration_id=0x0F0, data=bytes(8), is_extended_id=False)
        bus.send(frame, timeout=0)  # taken, not written: it waits in the bus
        os.write(master, status(1) + b"\r")
        assert [f.data[7] for f in bus.recv_batch(2.0)] == [1]  # returned with the line still waiting
        while True:  # the adapter reads again
            try:
                if not os.read(master, 65536):
                    break
            except BlockingIOError:
                break
        bus.send(frame, timeout=1.0)  # the waiting line goes out first, then this one
        cpu = time.thread_time()
        assert bus.recv_batch(0.5) == []
        assert time.thread_time() - cpu < 0.03, "the wait for frames spun"  # one poll() call: microseconds
    finally:
        bus.shutdown()
        os.close(master)
        os.close(slave)
