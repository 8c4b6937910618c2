"""SET-3 under `kill -9`: a write the service acknowledged is never lost, however soon after the answer the
process dies. Every kind of write: settings, mode on and off, set SoC, and the commands of register 120
(synchronise, reset history, reset settings, re-learn, firmware update begin / completed / abort).

Each cycle starts `smallbms-bus run` on the same store (the ProcessRig: an SLCAN wire to the simulator, relays
on a Modbus TCP module), reads back over Modbus what the previous cycles left (settings and mode must be what
was last acknowledged), makes 1-4 random writes on a raw socket and SIGKILLs the service:

- 70 % of cycles 0-50 ms after the last acknowledgement (where 17 of 20 writes were lost before SET-3);
- 15 % with a write in flight: sent, and the kill 0-20 ms later without waiting. An answer that reached our
  socket before the kill is an acknowledgement too (it must be on disk); one that did not may go either way;
- 15 % at a random moment 0-1 s after the last acknowledgement.

After each kill the store (opened with SQLite, `integrity_check` ok) must hold every acknowledged write: settings,
mode, the firmware update command, the SoC of a set SoC / synchronise (within what the bank current moves it
since), a reset history (the energy counters within what they can gather since). Short in CI, 100 kills with
SMALLBMS_FAULTS=long.
"""

from __future__ import annotations

import dataclasses
import os
import random
import socket
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from smallbms_bus.bms.settings import DEFAULT_SETTINGS
from smallbms_bus.store import Store
from tests.faults.campaign import CAMPAIGN
from tests.faults.rigs import LOAD, ProcessRig, wait_until
from tests.ports import recv_exact

pytestmark = [pytest.mark.faults, pytest.mark.timeout(CAMPAIGN.timeout_s)]

CAPACITY_AH = 100.0  # 2s1p of 12.8 V 100 Ah
MAX_AMPS = 20.0  # steady scenario: 0.05C load, 0.06C charger; generous
MAX_WATTS = 2000.0
SETTING_REGISTERS = ("tail_current_pct", "charged_detection_time_min", "low_soc_warning_pct", "discharge_floor_pct")


@dataclass
class Expected:
    settings: dict[str, float] = field(default_factory=DEFAULT_SETTINGS.to_dict)
    mode_on: bool = True
    firmware: bool = False
    consumed_ah: float | None = None  # set by a set SoC / synchronise acknowledged at `soc_at`
    soc_at: float = 0.0
    history_reset_at: float | None = None


@dataclass(frozen=True)
class Write:
    kind: str
    pdu: bytes
    apply: object  # Callable[[Expected, float], None]: the acknowledged write's effect at time.monotonic()


def settings_write(rng: random.Random, now: Expected) -> Write:
    if rng.random() < 0.5:  # 101-104 together
        tail, minutes = rng.randrange(5, 101), rng.randrange(1, 51)
        floor = rng.randrange(0, 300)
        warning = rng.randrange(floor, 600)
        values = [tail, minutes, warning, floor]
        new = dict(zip(SETTING_REGISTERS, (tail / 10, minutes, warning / 10, floor / 10), strict=True))
        return Write("settings", struct.pack(">BHHB4H", 16, 101, 4, 8, *values),
                     lambda e, t: e.settings.update(new))
    minutes = rng.randrange(1, 51)
    return Write("settings", struct.pack(">BHH", 6, 102, minutes),
                 lambda e, t: e.settings.update(charged_detection_time_min=minutes))


def random_write(rng: random.Random, now: Expected) -> Write:
    kind = rng.choices(["settings", "mode", "set_soc", "sync", "reset_history", "reset_settings", "relearn",
                        "firmware"], weights=[4, 4, 2, 1, 1, 1, 1, 2])[0]
    if kind == "settings":
        return settings_write(rng, now)
    if kind == "mode":
        on = rng.random() < 0.5
        return Write("mode on" if on else "mode off", struct.pack(">BHH", 6, 105, int(on)),
                     lambda e, t: setattr(e, "mode_on", on))
    if kind == "set_soc":
        soc = rng.randrange(100, 1001)

        def set_soc(e: Expected, t: float) -> None:
            e.consumed_ah, e.soc_at = (1 - soc / 1000) * CAPACITY_AH, t
        return Write("set SoC", struct.pack(">BHH", 6, 121, soc), set_soc)
    if kind == "sync":
        def sync(e: Expected, t: float) -> None:
            e.consumed_ah, e.soc_at = 0.0, t
        return Write("command synchronise", struct.pack(">BHH", 6, 120, 1), sync)
    if kind == "reset_history":
        return Write("command reset history", struct.pack(">BHH", 6, 120, 2),
                     lambda e, t: setattr(e, "history_reset_at", t))
    if kind == "reset_settings":
        return Write("command reset settings", struct.pack(">BHH", 6, 120, 3),
                     lambda e, t: setattr(e, "settings", DEFAULT_SETTINGS.to_dict()))
    if kind == "relearn":
        return Write("command re-learn", struct.pack(">BHH", 6, 120, 4), lambda e, t: None)
    code = rng.choice([5, 5, 6, 7])  # begin, completed, abort
    return Write({5: "command firmware begin", 6: "command firmware done", 7: "command firmware abort"}[code],
                 struct.pack(">BHH", 6, 120, code), lambda e, t: setattr(e, "firmware", code == 5))


def send(sock: socket.socket, tid: int, pdu: bytes) -> None:
    sock.sendall(struct.pack(">HHHB", tid, 0, len(pdu) + 1, 1) + pdu)


def receive(sock: socket.socket, tid: int) -> bytes:
    rtid, _, length = struct.unpack(">HHH", recv_exact(sock, 6))
    body = recv_exact(sock, length)[1:]
    assert rtid == tid, f"answer {rtid} to request {tid}"
    return body


def answered_before_the_kill(sock: socket.socket, tid: int) -> bytes | None:
    """The answer, if the service sent it before it died (it is in our receive buffer), else None."""
    sock.settimeout(0.5)
    try:
        return receive(sock, tid)
    except (ConnectionError, TimeoutError, OSError):
        return None


def _rounded(settings: dict) -> dict:
    """Numbers to 3 decimals (as they travel over Modbus); the custom name as it is."""
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in settings.items()}


def check(store: Path, expected: Expected, killed: float, what: str) -> dict:
    with Store.open(store) as s:
        assert s.pragma("integrity_check") == "ok", what
        saved = s.load_state()
    assert saved is not None, what
    assert _rounded(saved["settings"]) == _rounded(expected.settings), f"{what}: settings lost"
    assert saved["mode_on"] is expected.mode_on, f"{what}: mode {'on' if expected.mode_on else 'off'} lost"
    assert saved["timers"]["firmware_update_command"] is expected.firmware, f"{what}: firmware command lost"
    if expected.consumed_ah is not None:
        moved = MAX_AMPS * (killed - expected.soc_at) / 3600 + 0.01
        assert saved["monitor"]["soc_known"], f"{what}: SoC set lost"
        assert abs(saved["monitor"]["consumed_ah"] - expected.consumed_ah) <= moved, \
            f"{what}: consumed Ah {saved['monitor']['consumed_ah']:.3f} stored, {expected.consumed_ah:.3f} set"
    if expected.history_reset_at is not None:
        h = saved["history"]
        gathered = MAX_WATTS * (killed - expected.history_reset_at) / 3.6e6 + 1e-6
        assert h["charged_energy_kwh"] + h["discharged_energy_kwh"] <= gathered and h["charge_cycles"] == 0, \
            f"{what}: history reset lost ({h['charged_energy_kwh']} / {h['discharged_energy_kwh']} kWh)"
    return saved


# set SoC needs the bank's capacity; re-learn refuses to learn an empty bank (BANK-4)
WAIT_FOR_A_BATTERY = {"set SoC", "command re-learn"}


def read_back(sock: socket.socket, tid: int) -> tuple[dict[str, float], bool]:
    """Block B's settings and mode as the restarted service reports them."""
    send(sock, tid, struct.pack(">BHH", 3, 101, 5))
    body = receive(sock, tid)
    assert body[0] == 3, f"read refused: {body.hex()}"
    tail, minutes, warning, floor, mode = struct.unpack(">5H", body[2:12])
    return dict(zip(SETTING_REGISTERS, (tail / 10, minutes, warning / 10, floor / 10), strict=True)), bool(mode)


def test_kill_9_right_after_acknowledged_writes_loses_none(tmp_path: Path, campaign, figures):
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    expected = Expected()
    acknowledged: Counter[str] = Counter()
    refused_not_yet = 0
    ack_to_kill_ms: list[float] = []
    in_flight = Counter()
    with ProcessRig(tmp_path) as rig:
        for cycle in range(1, campaign.write_kills + 1):
            what = f"seed {seed}, kill {cycle}"
            rig.drain_notify()
            rig.start()
            rig.wait_ready()
            if cycle == 1:
                wait_until(lambda: rig.module.relays[LOAD], 20, f"{what}: load on")
            sock = socket.create_connection(("127.0.0.1", rig.modbus_port), timeout=10)
            tid = 1
            settings, mode_on = read_back(sock, tid)
            assert (settings, mode_on) == ({k: expected.settings[k] for k in SETTING_REGISTERS}, expected.mode_on), \
                f"{what}: the restarted service reports {settings}, mode {mode_on}"
            style = rng.choices(["right after", "in flight", "later"], weights=[70, 15, 15])[0]
            last_ack: float | None = None
            pending: Write | None = None  # the write in flight at the kill
            count = rng.randint(1, 4)
            for n in range(count):
                write = random_write(rng, expected)
                tid += 1
                send(sock, tid, write.pdu)
                if style == "in flight" and n == count - 1:
                    pending = write
                    break
                answer = receive(sock, tid)
                for _ in range(50):  # both need a battery heard, ~1 s after a restart: 06 (busy) until then
                    if not answer[0] & 0x80:
                        break
                    assert answer[1] == 6 and write.kind in WAIT_FOR_A_BATTERY, \
                        f"{what}: {write.kind} refused with {answer[1]}"
                    refused_not_yet += 1  # refused: nothing changed
                    time.sleep(0.1)
                    tid += 1
                    send(sock, tid, write.pdu)
                    answer = receive(sock, tid)
                assert not answer[0] & 0x80, f"{what}: {write.kind} still refused with {answer[1]} after 5 s"
                last_ack = time.monotonic()
                write.apply(expected, last_ack)  # type: ignore[operator]
                acknowledged[write.kind] += 1
                if n < count - 1:
                    time.sleep(rng.uniform(0.0, 0.2))
            if style == "in flight":
                time.sleep(rng.uniform(0.0, 0.02))
            elif style == "right after":
                time.sleep(rng.uniform(0.0, 0.05))
            else:
                time.sleep(rng.uniform(0.0, 1.0))
            killed = time.monotonic()
            rig.kill()
            if last_ack is not None:
                ack_to_kill_ms.append((killed - last_ack) * 1000)
            if pending is not None:
                before = dataclasses.replace(expected, settings=dict(expected.settings))
                answer = answered_before_the_kill(sock, tid)
                if answer is not None and not answer[0] & 0x80:
                    pending.apply(expected, killed)  # type: ignore[operator]
                    acknowledged[pending.kind] += 1
                    in_flight["answered before the kill"] += 1
                    check(rig.store, expected, killed, f"{what} ({pending.kind} answered just before the kill)")
                else:
                    in_flight["not answered"] += 1
                    after = dataclasses.replace(before, settings=dict(before.settings))
                    pending.apply(after, killed)  # type: ignore[operator]
                    try:  # not acknowledged: the store may hold it or not, but nothing else may differ
                        check(rig.store, after, killed, what)
                        expected = after
                    except AssertionError:
                        check(rig.store, before, killed, what)
            else:
                check(rig.store, expected, killed, what)
            sock.close()
    ack_to_kill_ms.sort()
    figures(seed=seed, kills=campaign.write_kills, acknowledged_writes=sum(acknowledged.values()),
            kills_within_50_ms_of_an_acknowledgement=sum(ms <= 50 for ms in ack_to_kill_ms),
            by_kind=dict(sorted(acknowledged.items())), lost=0, busy_06_before_a_battery_was_heard=refused_not_yet,
            in_flight_at_the_kill=dict(in_flight),
            ack_to_kill_ms_min_median_max=[round(ack_to_kill_ms[0], 1),
                                           round(ack_to_kill_ms[len(ack_to_kill_ms) // 2], 1),
                                           round(ack_to_kill_ms[-1], 1)] if ack_to_kill_ms else None)
