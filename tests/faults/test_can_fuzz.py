"""CAN fuzz through the running service (COM-3): random frames on the bus next to a healthy bank.

The frames go through the real path: python-can virtual bus -> Link -> FrameDecoder -> bank -> core ->
outputs on a memory relay board, with the simulator's batteries on the same bus. Each fuzz frame is built
to be one malformed kind, known from the DBC alone (not from the decoder under test):

- unknown_id: a standard id the DBC does not define, or any extended id (half of them with our numbers);
- wrong_dlc: one of our ids with DLC 0-7;
- not_data_frame: remote frames (any id, DLC 0-8), error frames, CAN FD frames;
- out_of_range: one of our ids, DLC 8, random bytes with one signal forced outside its DBC range and not
  one of its named values;
- hostile (second phase only): first plausible reports of the bank's own batteries with random flags, cells
  and temperatures across the thresholds (these switch the outputs back and forth), then one of our ids
  with DLC 8 and random bytes (decoded or out_of_range, the decoder's call: real reports from nodes 1-50,
  after which the bank has unknown batteries and stays off until re-learned, BANK-3).

Phase 1 (harmless kinds only) must change nothing: every fuzz frame counted under its kind, every battery
frame decoded, no event, the load and charge relays on throughout. Phase 2 (with hostile frames) must obey
the counters (received = decoded + malformed; the three structural kinds exact), keep the service alive,
and every relay change must follow a decision of the core (tests/faults/rigs.check_outputs_follow_decisions).

The fuzzer is paced at 20,000 frames/s: more than a 500 kbit/s bus can carry (about 8,000 frames/s at
DLC 0 and 4,000 at DLC 8), so the bank's own frames are never starved by an unrealistic flood.
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from collections.abc import Iterator

import can
import pytest

from smallbms_bus.link.codec import MALFORMED_KINDS, FrameEncoder, load_dbc
from smallbms_bus.reports import BatteryStatus, BatteryTemps, CellVoltages, Report
from tests.faults.campaign import CAMPAIGN
from tests.faults.rigs import (
    CHARGE,
    LOAD,
    Decided,
    RecordingBoard,
    ServiceRig,
    check_outputs_follow_decisions,
    wait_until,
)

pytestmark = [pytest.mark.faults, pytest.mark.timeout(CAMPAIGN.timeout_s)]

RATE = 20_000  # frames/s
HOSTILE = "hostile"
BANK_NODES = (1, 2)  # the simulator's 2s1p bank


def _field(signed: bool, length: int) -> tuple[int, int]:
    return (-(1 << (length - 1)), (1 << (length - 1)) - 1) if signed else (0, (1 << length) - 1)


class FrameFactory:
    """Random frames of a known malformed kind, from the DBC's layouts and ranges."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        db = load_dbc()
        encoder = FrameEncoder(db)
        # Encoded once (the encoder is slow next to the pace): 4,000 distinct reports to pick from.
        self.plausible = [encoder.encode(self._plausible(rng.choice(BANK_NODES))) for _ in range(4000)]
        self.random_hostile = False  # False: plausible reports of the bank; True: random bytes on any of our ids
        self.ours = sorted(m.frame_id for m in db.messages if not m.is_extended_frame)
        ours = set(self.ours)
        self.unknown = [i for i in range(0x800) if i not in ours]
        # (frame id, start bit, length, out-of-range raw spans, named raw values) per signal that has any.
        self.victims: list[tuple[int, int, int, list[tuple[int, int]], set[int]]] = []
        for m in db.messages:
            for sig in m.signals:
                if sig.minimum is None and sig.maximum is None:
                    continue
                lo, hi = _field(sig.is_signed, sig.length)
                rmin = lo if sig.minimum is None else round(sig.minimum / sig.scale)
                rmax = hi if sig.maximum is None else round(sig.maximum / sig.scale)
                named = {int(k) for k in (sig.choices or {})}
                spans = [(a, b) for a, b in ((lo, min(rmin, hi + 1) - 1), (max(rmax + 1, lo), hi)) if a <= b]
                if any(v not in named for a, b in spans for v in range(a, min(b, a + len(named)) + 1)):
                    self.victims.append((m.frame_id, sig.start, sig.length, spans, named))

    def _data(self, n: int) -> bytes:
        return self.rng.randbytes(n)

    def make(self, kind: str) -> can.Message:
        rng = self.rng
        if kind == "unknown_id":
            if rng.random() < 0.25:
                ident = rng.choice(self.ours) if rng.random() < 0.5 else rng.randrange(1 << 29)
                return can.Message(arbitration_id=ident, data=self._data(rng.randrange(9)), is_extended_id=True)
            return can.Message(arbitration_id=rng.choice(self.unknown), data=self._data(rng.randrange(9)),
                               is_extended_id=False)
        if kind == "wrong_dlc":
            return can.Message(arbitration_id=rng.choice(self.ours), data=self._data(rng.randrange(8)),
                               is_extended_id=False)
        if kind == "not_data_frame":
            pick = rng.random()
            ident = rng.choice(self.ours) if rng.random() < 0.5 else rng.randrange(0x800)
            if pick < 0.5:
                return can.Message(arbitration_id=ident, is_remote_frame=True, dlc=rng.randrange(9),
                                   is_extended_id=False)
            if pick < 0.75:
                return can.Message(arbitration_id=ident, is_error_frame=True, data=self._data(rng.randrange(9)),
                                   is_extended_id=False)
            return can.Message(arbitration_id=ident, is_fd=True, data=self._data(rng.choice([8, 12, 16, 64])),
                               is_extended_id=False)
        if kind == "out_of_range":
            frame_id, start, length, spans, named = rng.choice(self.victims)
            raw = next(v for v in iter(lambda: rng.randint(*rng.choice(spans)), None) if v not in named)
            raw &= (1 << length) - 1  # two's complement for signed fields
            value = int.from_bytes(self._data(8), "little")
            mask = ((1 << length) - 1) << start
            value = (value & ~mask) | (raw << start)
            return can.Message(arbitration_id=frame_id, data=value.to_bytes(8, "little"), is_extended_id=False)
        assert kind == HOSTILE
        if self.random_hostile:
            return can.Message(arbitration_id=rng.choice(self.ours), data=self._data(8), is_extended_id=False)
        return rng.choice(self.plausible)

    def _plausible(self, node: int) -> Report:
        """A report a battery of the bank could send, with values anywhere in range: flags, cells near the
        thresholds, temperatures across the charge limits. These decode, and switch the outputs."""
        rng = self.rng
        pick = rng.random()
        if pick < 0.5:
            flags = [rng.random() < 0.08 for _ in range(7)]
            return BatteryStatus(node, round(rng.uniform(11.0, 15.0), 3), round(rng.uniform(-100, 100), 1),
                                 round(rng.uniform(-10, 60), 1), *flags, rng.randrange(256))
        if pick < 0.8:
            return CellVoltages(node, 1, tuple(round(rng.uniform(2.7, 3.85), 3) for _ in range(4)))
        low = round(rng.uniform(-10, 60), 1)
        return BatteryTemps(node, low, round(low + rng.uniform(0, 3), 1))


HARMLESS_MIX = {"unknown_id": 40, "wrong_dlc": 20, "not_data_frame": 15, "out_of_range": 25}
HOSTILE_MIX = {"unknown_id": 25, "wrong_dlc": 15, "not_data_frame": 10, "out_of_range": 20, HOSTILE: 30}


def kinds(rng: random.Random, mix: dict[str, int], n: int) -> Iterator[str]:
    names, weights = list(mix), list(mix.values())
    for _ in range(n):
        yield rng.choices(names, weights)[0]


def fuzz(bus: can.BusABC, factory: FrameFactory, mix: dict[str, int], n: int) -> tuple[Counter[str], float]:
    """Send `n` frames paced at RATE; return the count per kind and the seconds it took."""
    sent: Counter[str] = Counter()
    start = time.monotonic()
    for i, kind in enumerate(kinds(factory.rng, mix, n)):
        bus.send(factory.make(kind))
        sent[kind] += 1
        if i % 500 == 499:
            ahead = start + (i + 1) / RATE - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
    return sent, time.monotonic() - start


def counters(rig: ServiceRig) -> dict[str, int]:
    decoder = rig.service.link.decoder
    return {"received": decoder.received, "decoded": decoder.decoded, **decoder.malformed}


def settle(rig: ServiceRig, base: dict[str, int], sim_base: int, fuzzed: int) -> tuple[dict[str, int], int]:
    """Wait until the service has received every frame sent so far (fuzz + the simulator's, which keeps
    sending); return the counter deltas and the simulator's frames in the same interval."""
    seen: dict[str, int] = {}

    def caught_up() -> bool:
        nonlocal seen
        sim_sent = rig.sim.stats.frames_sent - sim_base
        now = counters(rig)
        seen = {k: now[k] - base[k] for k in now} | {"sim": sim_sent}
        return seen["received"] == fuzzed + sim_sent

    wait_until(caught_up, 10, "the service received every frame sent")
    return seen, seen.pop("sim")


def test_random_frames_never_crash_are_counted_by_kind_and_outputs_follow_the_rules(tmp_path, campaign, figures):
    seed = int.from_bytes(os.urandom(4), "big")
    factory = FrameFactory(random.Random(seed))
    total = campaign.can_frames
    harmless_n, hostile_n = total * 4 // 5, total - total * 4 // 5
    board = RecordingBoard()
    with ServiceRig(tmp_path, board=board) as rig:
        wait_until(lambda: rig.on(LOAD, CHARGE), 10, "load and charge on after start")
        time.sleep(0.5)
        fuzzer = can.Bus(interface="virtual", channel=rig.channel)
        try:
            # Phase 1: only frames the protocol says to drop. Nothing may change.
            base, sim_base, events = counters(rig), rig.sim.stats.frames_sent, rig.service.stats.events
            decided_from, revision = len(rig.decisions.entries), rig.service.core.bank.learned_revision
            phase1_start = time.monotonic()
            sent, took1 = fuzz(fuzzer, factory, HARMLESS_MIX, harmless_n)
            seen, sim_frames = settle(rig, base, sim_base, harmless_n)
            for kind in MALFORMED_KINDS:
                assert seen[kind] == sent[kind], f"seed {seed}: {kind}: {seen[kind]} counted, {sent[kind]} sent"
            assert seen["decoded"] == sim_frames, f"seed {seed}: a fuzz frame was decoded or a battery frame lost"
            assert seen["received"] == seen["decoded"] + sum(seen[k] for k in MALFORMED_KINDS)
            assert rig.service.stats.events == events, f"seed {seed}: dropped frames caused events"
            assert rig.service.core.bank.learned_revision == revision
            assert all(d.load and d.charge and not d.pre for d in rig.decisions.entries[decided_from:]), \
                f"seed {seed}: a decision switched an output during harmless fuzz"
            assert not [w for w in board.log if w[0] >= phase1_start and w[1] in (LOAD, CHARGE) and not w[2]], \
                f"seed {seed}: a relay was switched off during harmless fuzz"
            assert rig.on(LOAD, CHARGE)

            # Phase 2: with real reports of random content from nodes 1-50. The outputs may switch, by the rules.
            base, sim_base = counters(rig), rig.sim.stats.frames_sent
            phase2_start = time.monotonic()
            sent2, took2 = fuzz(fuzzer, factory, HOSTILE_MIX, hostile_n // 2)
            factory.random_hostile = True
            sent2b, took2b = fuzz(fuzzer, factory, HOSTILE_MIX, hostile_n - hostile_n // 2)
            sent2, took2 = sent2 + sent2b, took2 + took2b
            seen2, sim_frames2 = settle(rig, base, sim_base, hostile_n)
            for kind in ("unknown_id", "wrong_dlc", "not_data_frame"):
                assert seen2[kind] == sent2[kind], f"seed {seed}: {kind}: {seen2[kind]} counted, {sent2[kind]} sent"
            assert seen2["out_of_range"] >= sent2["out_of_range"]
            assert seen2["decoded"] + seen2["out_of_range"] == sim_frames2 + sent2["out_of_range"] + sent2[HOSTILE]
            assert seen2["received"] == seen2["decoded"] + sum(seen2[k] for k in MALFORMED_KINDS)
            time.sleep(0.5)  # the last decisions reach the board
            worst = check_outputs_follow_decisions(rig.decisions.entries, board.log, phase2_start,
                                                   time.monotonic(), lag=0.5)
            sent_states = rig.service.stats.bms_state_sent
            wait_until(lambda: rig.service.stats.bms_state_sent > sent_states + 5, 2, "BMS_STATE still sent")
            assert rig.service.link.up and rig.service.stats.task_restarts == 0
            switched = sum(1 for t, c, _ in board.log if t >= phase2_start and c in (LOAD, CHARGE))
        finally:
            fuzzer.shutdown()
        assert rig.shutdown() == 0
    figures(seed=seed, frames=total, harmless=harmless_n, hostile_phase=hostile_n,
            rate_frames_per_s=round(total / (took1 + took2)), counted_phase1={k: seen[k] for k in MALFORMED_KINDS},
            counted_phase2={k: seen2[k] for k in (*MALFORMED_KINDS, "decoded")},
            hostile_frames=sent2[HOSTILE], relay_writes_phase2=switched, worst_disagreement_s=worst)


def test_the_output_check_catches_a_relay_without_a_decision_and_a_late_switch_off():
    """The invariant checker of phase 2 fails where it must (synthetic timelines, no service)."""
    decided = [Decided(t / 10, load=t < 20, charge=True, pre=False) for t in range(40)]
    good = [(0.01, LOAD, True), (0.01, CHARGE, True), (0.01, 3, False), (2.02, LOAD, False)]
    assert check_outputs_follow_decisions(decided, good, 0.0, 3.9, lag=0.5)["load"] == pytest.approx(0.02)
    with pytest.raises(AssertionError, match="no decision wanting it"):
        check_outputs_follow_decisions(decided, [*good, (3.0, LOAD, True)], 0.0, 3.9, lag=0.5)
    late = [w if w[0] != 2.02 else (2.8, LOAD, False) for w in good]
    with pytest.raises(AssertionError, match="disagreed with the decisions"):
        check_outputs_follow_decisions(decided, late, 0.0, 3.9, lag=0.5)
