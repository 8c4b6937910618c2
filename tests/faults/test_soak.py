"""Soaks: hours of simulated time on an injected clock, and real minutes of the service as a process.

Accelerated: the solar-day scenario (a 2S1P bank, sun 06:00-20:00, a 0.03C load, the SoC set to the
scenario's 40 % once the bank is learned) on a clock the test advances in 0.5 s ticks, through the same parts
the service wires (FrameEncoder -> FrameDecoder -> BmsCore -> RelayController on a memory relay board -> Persister on
a real SQLite store, BMS_STATE back to the virtual charger and load), without sleeping. The service ticks
every 100 ms; 0.5 s keeps a simulated day near two minutes and changes no rule: frames arrive within the tick
they are due in, BMS_STATE comes well inside the devices' 1 s watchdog, and the battery monitor integrates
steps up to 10 s. Nothing may raise; the relays always hold what the decision wants; the SoC stays in
0-100 % and follows the charge; the bank synchronises every sunny day; the event log stays bounded; and the
process's RSS grows by less than 5 MB after the first simulated hour.

Real time: `smallbms-bus run` as a process for `soak_real_s` (30 s in CI, 10 minutes in the long run) with
the simulator, a Modbus client polling block A at 8 Hz and /metrics scraped every second: no task restart,
no link loss, the outputs on throughout, and the service's RSS (/proc/<pid>/status VmRSS) grows by less than
5 MB from the end of the warm-up to the end.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

import pytest

from smallbms_bus.bms.core import BmsCore, bms_state_report
from smallbms_bus.link.codec import FrameDecoder, FrameEncoder, load_dbc
from smallbms_bus.outputs.controller import RelayController
from smallbms_bus.outputs.memory import MemoryBoard
from smallbms_bus.sim.runner import Simulator
from smallbms_bus.store import Persister, Store
from tests.faults.campaign import CAMPAIGN
from tests.faults.rigs import CHARGE, LOAD, ProcessRig, metric, rss_kib, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.timeout(CAMPAIGN.timeout_s)]

TICK_S = 0.5
HOUR = 3600.0
WALL0 = 1_790_000_000.0
RSS_GROWTH_LIMIT_KIB = 5 * 1024
CHANNELS = {"load_disconnect": 1, "charge_disconnect": 2, "pre_alarm": 3, "error_led": 4, "status_led": 5}


def test_hours_of_simulated_time_on_an_injected_clock(tmp_path: Path, campaign, figures):
    hours = campaign.soak_sim_hours
    db = load_dbc()
    encoder, decoder = FrameEncoder(db), FrameDecoder(db)
    sim = Simulator.from_scenario("solar-day", "2s1p-12v100", encoder=encoder)
    core = BmsCore(0.0, WALL0, discovery_window=10.0)
    board = MemoryBoard()
    t = 0.0
    outputs = RelayController(board, CHANNELS, clock=lambda: t)
    outputs.safe()
    store = Store.open(tmp_path / "state.db")
    persister = Persister(store, interval=60.0)
    alive = evaluations = frames = switched = 0
    previous: tuple[bool, bool] | None = None
    rss_warm = soc_min = soc_max = None
    started_wall = time.monotonic()
    try:
        for tick in range(1, int(hours * HOUR / TICK_S) + 1):
            t = round(tick * TICK_S, 6)
            for frame in sim.step(t):
                report = decoder.decode(frame)
                frames += 1
                if report is not None:
                    core.on_report(report, t)
            decision = core.evaluate(t, WALL0 + t)
            evaluations += 1
            if decision.started and not core.monitor.soc_known and core.history.synchronisations == 0:
                core.set_soc(40.0)  # what the scenario starts at: the SoC is known from the start
            o = decision.outputs
            status = outputs.apply({"load_disconnect": o.load_disconnect, "charge_disconnect": o.charge_disconnect,
                                    "pre_alarm": o.pre_alarm, "error_led": decision.error_led.value,
                                    "status_led": decision.status_led.value}, t)
            core.set_relay_fault(status.fault)
            relays = board.relays
            assert (relays[1], relays[2], relays[3]) == (o.load_disconnect, o.charge_disconnect, o.pre_alarm), \
                f"at {t:.1f} s the relays disagree with the decision"
            if previous is not None and previous != (o.load_disconnect, o.charge_disconnect):
                switched += 1
            previous = (o.load_disconnect, o.charge_disconnect)
            alive += 1
            sim.on_frame(encoder.bms_state(bms_state_report(decision, alive)), t)  # the charger and load obey it
            persister.queue(decision.events)
            save = persister.collect(core, t, WALL0 + t)
            if save is not None:
                assert persister.write(save)
            if decision.soc is not None:
                soc_min = decision.soc if soc_min is None else min(soc_min, decision.soc)
                soc_max = decision.soc if soc_max is None else max(soc_max, decision.soc)
                assert 0.0 <= decision.soc <= 100.0
            if tick == int(HOUR / TICK_S):  # warm-up over: every cache and the store's pages are in use
                gc.collect()
                rss_warm = rss_kib()
        gc.collect()
        rss_growth = rss_kib() - rss_warm if rss_warm is not None else 0
        assert decoder.malformed_total == 0 and decoder.decoded == frames
        assert decision.started and not decision.alarms, decision.reasons
        assert soc_max is not None and soc_max > 60.0, f"the SoC did not follow the sun: {soc_min}-{soc_max} %"
        days = int((hours * HOUR + 6 * HOUR - 12.5 * HOUR) // (24 * HOUR)) + 1  # 12:30 of each day simulated
        assert core.history.synchronisations >= days, f"{core.history.synchronisations} synchronisations in {hours} h"
        assert store.event_count() <= 1000
        assert rss_growth < RSS_GROWTH_LIMIT_KIB, f"RSS grew by {rss_growth} KiB after the first simulated hour"
    finally:
        store.close()
    elapsed = time.monotonic() - started_wall
    figures(simulated_h=hours, real_s=round(elapsed, 1), speed_up=round(hours * HOUR / elapsed),
            frames=frames, evaluations=evaluations, output_switches=switched, saves=persister.writes,
            synchronisations=core.history.synchronisations, soc_range_pct=[soc_min, soc_max],
            rss_growth_kib=rss_growth, rss_limit_kib=RSS_GROWTH_LIMIT_KIB)


def test_real_minutes_of_the_service_as_a_process(tmp_path: Path, campaign, figures):
    duration = campaign.soak_real_s
    warm_up = min(20.0, duration / 3)
    with ProcessRig(tmp_path, metrics=True) as rig:
        service = rig.start()
        rig.wait_ready()
        wait_until(lambda: rig.module.relays[LOAD] and rig.module.relays[CHARGE], 20, "load and charge on")
        client = rig.client()
        start = time.monotonic()
        rss_warm = None
        rss_samples: list[int] = []
        reads = scrapes = 0
        next_scrape = start
        while (now := time.monotonic()) < start + duration:
            reply = client.read_holding_registers(0, count=40, device_id=1)
            assert not reply.isError() and reply.registers[1] == 1, f"state {reply} at {now - start:.1f} s"
            reads += 1
            assert rig.module.relays[LOAD] and rig.module.relays[CHARGE], f"an output went off at {now - start:.1f} s"
            if now >= next_scrape:
                values = rig.metrics()
                scrapes += 1
                next_scrape += 1.0
                assert metric(values, "smallbms_task_restarts_total") == 0
                rss_samples.append(rss_kib(service.pid))
                if rss_warm is None and now - start >= warm_up:
                    rss_warm = rss_samples[-1]
            time.sleep(0.125)
        client.close()
        values = rig.metrics()
        assert metric(values, "smallbms_task_restarts_total") == 0
        assert metric(values, "smallbms_bus_link_lost_total") == 0
        assert rss_warm is not None
        growth = rss_kib(service.pid) - rss_warm
        assert growth < RSS_GROWTH_LIMIT_KIB, f"RSS grew by {growth} KiB after the warm-up"
        assert rig.stop() == 0, rig.stderr()
        assert "Traceback" not in rig.stderr()
    figures(real_s=duration, warm_up_s=warm_up, modbus_reads=reads, scrapes=scrapes,
            rss_after_warm_up_kib=rss_warm, rss_growth_kib=growth, rss_peak_kib=max(rss_samples),
            rss_limit_kib=RSS_GROWTH_LIMIT_KIB)
