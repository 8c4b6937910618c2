"""How big each part of the fault campaign is: CI's short run, or the long run (SMALLBMS_FAULTS=long)."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Campaign:
    name: str
    comms_trials: int  # per kind (one battery, all, AliveCounter freeze) at comm_timeout 1 s
    comms_trials_default_timeout: int  # per kind at the default comm_timeout (5 s)
    can_frames: int  # random frames through the running service
    kills: int  # kill -9 of `smallbms-bus run`
    write_kills: int  # kill -9 of `smallbms-bus run` right after (or during) acknowledged writes (SET-3)
    modbus_fuzz_requests: int
    modbus_connections: int
    unplug_trials: int  # per device (RTU board, TCP module, SLCAN adapter)
    soak_sim_hours: float  # accelerated clock
    soak_real_s: float  # real time, the service as a process
    timeout_s: int  # per test


SHORT = Campaign("short (CI)", comms_trials=3, comms_trials_default_timeout=0, can_frames=100_000, kills=10,
                 write_kills=10, modbus_fuzz_requests=2_000, modbus_connections=500, unplug_trials=1,
                 soak_sim_hours=6.0, soak_real_s=30.0, timeout_s=240)
LONG = Campaign("long", comms_trials=25, comms_trials_default_timeout=5, can_frames=1_000_000, kills=30,
                write_kills=100, modbus_fuzz_requests=30_000, modbus_connections=500, unplug_trials=5,
                soak_sim_hours=72.0, soak_real_s=600.0, timeout_s=3600)

CAMPAIGN = LONG if os.environ.get("SMALLBMS_FAULTS", "").lower() == "long" else SHORT
