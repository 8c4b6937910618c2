"""`kill -9` of `smallbms-bus run` at random moments, the batteries discharging at 0.5C meanwhile.

Each cycle starts the service on the same store, makes Modbus writes at random moments (discharge floor and
low-SoC warning together, mode on/off), reads block A every 100 ms (SoC, current, consumed Ah), and SIGKILLs
it at a random moment: one cycle in five during start-up, the others 0-6 s after READY=1. After each kill:

- the store opens and `PRAGMA integrity_check` is ok;
- settings and mode are the last acknowledged write, however soon before the kill it was acknowledged
  (SET-3: a write is answered once it is committed; tests/faults/test_kill9_writes.py kills 0-50 ms after);
- the last save is at most one persist interval (+ the tick and the fsync) old, and the stored consumed Ah
  is within what the current can move in that time of the last value read: history loses at most one
  interval;
- the next start resumes from it: its SoC is within 1 % of the SoC read just before the kill.
"""

from __future__ import annotations

import os
import random
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from pymodbus.client import ModbusTcpClient

from smallbms_bus.bms.settings import DEFAULT_SETTINGS
from smallbms_bus.store import Store
from tests.faults.campaign import CAMPAIGN
from tests.faults.rigs import LOAD, ProcessRig, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.timeout(CAMPAIGN.timeout_s)]

PERSIST_INTERVAL_S = 5.0  # the smallest the config allows: the most counter saves to kill in the middle of
SAVE_SLACK_S = 0.5  # the 100 ms tick, the hand-over to the store thread and the fsync
START_SOC_PCT = 80.0


@dataclass
class Live:
    at: float  # time.time() of the read
    soc: float | None
    current: float
    consumed_ah: float


@dataclass
class Written:
    at: float  # time.monotonic() of the acknowledgement
    floor: float
    warning: float
    mode: bool


def stored(snapshot: dict) -> Written:
    """Settings and mode as stored (a register's 0.1 % steps can be stored as 22.200000000000003)."""
    settings = snapshot["settings"]
    return Written(0.0, round(settings["discharge_floor_pct"], 1), round(settings["low_soc_warning_pct"], 1),
                   snapshot["mode_on"])


def read_live(client: ModbusTcpClient) -> Live | None:
    reply = client.read_holding_registers(0, count=12, device_id=1)
    if reply.isError():
        return None
    r = reply.registers
    current, consumed = struct.unpack(">iI", struct.pack(">4H", r[4], r[5], r[8], r[9]))
    if current == -0x80000000 or consumed == 0xFFFFFFFF:  # not available (the bank not known yet)
        return None
    return Live(time.time(), None if r[3] == 0xFFFF else r[3] / 10, current / 100, consumed / 10)


def test_kill_9_at_random_moments_keeps_the_store_settings_mode_history_and_soc(tmp_path: Path, campaign, figures):
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    store_cfg = f"persist_interval = {PERSIST_INTERVAL_S}"
    with ProcessRig(tmp_path, scenario="discharge", bms="comm_timeout = 2.0", store=store_cfg) as rig:
        durable = Written(0.0, DEFAULT_SETTINGS.discharge_floor_pct, DEFAULT_SETTINGS.low_soc_warning_pct, True)
        last_soc: float | None = None
        worst_soc_diff = worst_save_age = worst_ah_diff = 0.0
        lost_writes: list[float] = []
        acknowledged = soc_checks = 0
        amps_seen = 0.0
        during_start = 0
        for cycle in range(1, campaign.kills + 1):
            what = f"seed {seed}, kill {cycle}"
            spawned_wall = time.time()
            rig.drain_notify()
            service = rig.start()
            early = cycle > 1 and rng.random() < 0.2
            writes: list[Written] = [durable]
            lives: list[Live] = []
            ready_wall = None
            if early:  # during start-up: the interpreter loading, the store opening, the first saves
                time.sleep(rng.uniform(0.05, 0.8))
                during_start += 1
            else:
                rig.wait_ready()
                ready_wall = time.time()
                client = rig.client()
                if cycle == 1:
                    wait_until(lambda: rig.module.relays[LOAD], 20, f"{what}: load on")
                    assert not client.write_register(121, int(START_SOC_PCT * 10), device_id=1).isError()
                kill_at = time.monotonic() + rng.uniform(0.0, 6.0)
                # Two cycles in five write nothing: only the counters are saved then, every persist interval.
                next_write = time.monotonic() + rng.uniform(0.1, 1.0) if rng.random() < 0.6 else float("inf")
                while time.monotonic() < kill_at:
                    live = read_live(client)
                    if live is not None:
                        if not lives and live.soc is not None and last_soc is not None:
                            # this start resumed from the store: its SoC within 1 % of the last one before a kill
                            soc_diff = abs(live.soc - last_soc)
                            assert soc_diff <= 1.0, f"{what}: SoC {live.soc} after the restart, {last_soc} before"
                            worst_soc_diff, soc_checks = max(worst_soc_diff, soc_diff), soc_checks + 1
                        lives.append(live)
                    if time.monotonic() >= next_write:
                        floor = rng.randrange(0, 300) / 10
                        warning = rng.randrange(int(floor * 10), 600) / 10
                        mode = rng.random() < 0.7
                        ok = not client.write_registers(103, [int(warning * 10), int(floor * 10)],
                                                        device_id=1).isError()
                        ok = ok and not client.write_register(105, int(mode), device_id=1).isError()
                        assert ok, f"{what}: a valid write was refused"
                        writes.append(Written(time.monotonic(), floor, warning, mode))
                        acknowledged += 1
                        next_write = time.monotonic() + rng.uniform(0.1, 1.0)
                        if rng.random() < 0.1:  # right after an answer: inside the window before the next tick
                            kill_at = min(kill_at, time.monotonic() + rng.uniform(0.0, 0.15))
                    time.sleep(min(0.1, max(0.0, kill_at - time.monotonic())))
                client.close()
            killed, killed_wall = time.monotonic(), time.time()
            rig.kill()
            assert service.returncode == -9, f"{what}: the service had exited: {rig.stderr()}"

            with Store.open(rig.store) as store:
                assert store.pragma("integrity_check") == "ok", what
                saved = store.load_state()
                saved_wall = store.saved_wall()
            if saved is None:  # killed before the very first save: nothing to hold yet
                assert cycle == 1 or early, what
                continue
            held = stored(saved)
            last, previous = writes[-1], writes[-2] if len(writes) > 1 else writes[-1]
            same = (held.floor, held.warning, held.mode)
            if same != (last.floor, last.warning, last.mode):
                lost_writes.append(killed - last.at)
                pytest.fail(f"{what}: the store holds {same}, the write acknowledged {killed - last.at:.3f} s before "
                            f"the kill was {(last.floor, last.warning, last.mode)} (the one before: "
                            f"{(previous.floor, previous.warning, previous.mode)})")
            durable = Written(0.0, held.floor, held.warning, held.mode)

            # History and SoC: at most one persist interval of counters lost.
            if ready_wall is not None and lives:
                age = killed_wall - max(saved_wall or 0.0, spawned_wall)
                assert age <= PERSIST_INTERVAL_S + SAVE_SLACK_S, f"{what}: the last save was {age:.2f} s old"
                worst_save_age = max(worst_save_age, age)
                amps = max(abs(v.current) for v in lives)
                amps_seen = max(amps_seen, amps)
                ah_diff = abs(saved["monitor"]["consumed_ah"] - lives[-1].consumed_ah)
                bound = amps * (PERSIST_INTERVAL_S + SAVE_SLACK_S + killed_wall - lives[-1].at) / 3600 + 0.1
                assert ah_diff <= bound, f"{what}: consumed Ah {saved['monitor']['consumed_ah']:.3f} stored, " \
                    f"{lives[-1].consumed_ah:.1f} read last (bound {bound:.3f})"
                worst_ah_diff = max(worst_ah_diff, ah_diff)
                if lives[-1].soc is not None:
                    last_soc = lives[-1].soc
    figures(seed=seed, kills=campaign.kills, during_start_up=during_start, acknowledged_writes=acknowledged,
            writes_lost_to_the_kill=len(lost_writes),
            lost_writes_acknowledged_before_kill_ms=[round(x * 1000) for x in sorted(lost_writes)],
            persist_interval_s=PERSIST_INTERVAL_S, worst_last_save_age_s=round(worst_save_age, 2),
            worst_consumed_ah_diff=round(worst_ah_diff, 3), max_current_a=amps_seen, restarts_soc_checked=soc_checks,
            worst_soc_diff_pct=round(worst_soc_diff, 2))
