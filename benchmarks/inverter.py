"""BMS-CAN benchmark: the longest gap between two 0x351 (CVL/CCL/DCL) frames under Modbus and scrape load.

    .venv/bin/python benchmarks/inverter.py [--seconds 600] [--json out.json]

The real `Service` (python-can virtual bus, memory relay board, store in a temporary directory, Modbus and
/metrics served, `[inverter]` on a second virtual channel, period 1 s) watches 50 virtual 12.8 V batteries
(2s25p-12v100) sent by the simulator in real time, while a second process polls block A with 32 Modbus clients,
each 10 times a second, and scrapes /metrics once a second (the reaction benchmark's load, benchmarks/service.py).
An inverter's socket on the inverter channel records every 0x351 with its timestamp (python-can's, taken when
the frame is put on the virtual bus); the figure is the largest difference between two consecutive ones, and the
link's own `smallbms_inverter_limits_gap_max_seconds` beside it. Receivers stop after 3 s; the contract (issue 15)
is 1.5 s at most. A benchmark, not a test: nothing here fails on a slow machine.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
import subprocess
import tempfile
import threading
import time

import can
from common import free_port, write_json
from service import CHARGE, LOAD, TimedBoard, admit_pollers, start_load

from smallbms_bus.config import parse_config
from smallbms_bus.demo import demo_config
from smallbms_bus.service import Service
from smallbms_bus.sim.runner import Simulator

CONTRACT_GAP_S = 1.5


def limits_gap(seconds: float) -> dict:
    channel, inverter_channel = f"bench-inv-{os.getpid()}", f"bench-inv-bms-can-{os.getpid()}"
    modbus_port, metrics_port = free_port(), free_port()
    with tempfile.TemporaryDirectory() as tmp:
        text = admit_pollers(demo_config(channel, f"{tmp}/state.db", metrics_port, modbus_port)
                             + f'[bms]\ndiscovery_window = 2.0\n[inverter]\ninterface = "virtual"\n'
                             f'channel = "{inverter_channel}"\n')
        board = TimedBoard()
        service = Service(parse_config(text), board=board)
        simulator = Simulator.from_scenario("steady", "2s25p-12v100")
        bus = can.Bus(interface="virtual", channel=channel)
        inverter = can.Bus(interface="virtual", channel=inverter_channel)
        stop_sim = threading.Event()
        threading.Thread(target=simulator.run, args=(bus,), kwargs={"stop_event": stop_sim}, daemon=True).start()
        loop = asyncio.new_event_loop()
        stop = asyncio.Event()
        server = threading.Thread(target=lambda: loop.run_until_complete(service.run(stop)), daemon=True)
        server.start()
        load: subprocess.Popen | None = None
        stamps: list[float] = []
        try:
            if not (board.on[CHARGE].wait(60) and board.on[LOAD].wait(1)):
                raise RuntimeError("the service did not switch the load and charge relays on")
            load = start_load(modbus_port, metrics_port, 32, 0.1, 1.0, seconds + 10)
            time.sleep(2)  # the clients connected and polling
            while inverter.recv(0) is not None:  # what queued before the measurement
                pass
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                frame = inverter.recv(0.1)
                if frame is not None and frame.arbitration_id == 0x351:
                    stamps.append(frame.timestamp)
            if load.poll() is not None:  # a measurement without its load is not this benchmark's figure
                raise RuntimeError(f"the load process ended early (exit status {load.returncode})")
            link = service.inverter
            assert link is not None
            link_gap = link.max_limits_gap
        finally:
            if load is not None:
                load.send_signal(signal.SIGTERM)
                load.wait(timeout=10)
            loop.call_soon_threadsafe(stop.set)
            server.join(timeout=15)
            stop_sim.set()
            inverter.shutdown()
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return {"workload": "the service with 50 x 12.8 V (2s25p) on python-can's virtual bus, [inverter] period 1 s on "
                        "a second virtual channel, 32 Modbus clients polling block A at 10 Hz each and /metrics "
                        "scraped every 1 s from another process", "seconds": seconds, "frames_0x351": len(stamps),
            "max_gap_s": round(max(gaps), 3) if gaps else None,
            "mean_gap_s": round(sum(gaps) / len(gaps), 3) if gaps else None,
            "link_max_gap_s": round(link_gap, 3), "contract_s": CONTRACT_GAP_S}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600.0, help="length of the measurement")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    r = limits_gap(args.seconds)
    print(f"0x351 gaps over {r['seconds']:g} s under load: max {r['max_gap_s']} s, mean {r['mean_gap_s']} s, "
          f"{r['frames_0x351']} frames (the link's own max {r['link_max_gap_s']} s; contract <= {CONTRACT_GAP_S} s)")
    write_json(args.json, r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
