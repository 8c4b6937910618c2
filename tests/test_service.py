"""The service in-process: virtual batteries on a virtual bus, a memory relay board, a real SQLite store."""

from __future__ import annotations

import asyncio
import itertools
import socket
import threading
import time
import uuid

import can
import pytest
from pymodbus.client import ModbusTcpClient

from smallbms_bus.bms.alarms import BmsAlarm
from smallbms_bus.config import parse_config
from smallbms_bus.outputs.memory import MemoryBoard
from smallbms_bus.service import TICK_S, Service
from smallbms_bus.sim.runner import Simulator
from smallbms_bus.store import Store
from tests.faults.rigs import DecisionLog, RecordingBoard
from tests.ports import free_port

LOAD, CHARGE, PRE = 1, 2, 3
DISCOVERY_S = 1.0
REACT_S = 3.0  # the machine's scheduling on top of a rule's bound: a loaded 2-core machine runs the loop late


def config_text(store: str, channel: str, extra: str = "", bms: str = "") -> str:
    return (f'[bus]\ninterface = "virtual"\nchannel = "{channel}"\n[bms]\ndiscovery_window = {DISCOVERY_S}\n{bms}'
            f'[store]\npath = "{store}"\n[outputs]\nbackend = "memory"\n{extra}'
            + ("" if "[modbus]" in extra else "[modbus]\nport = 0\n")  # no Modbus or metrics endpoint
            + ("" if "[metrics]" in extra else "[metrics]\nport = 0\n")  # unless a test asks for it
            + ("" if "[web]" in extra else "[web]\nport = 0\n"))  # nor the web page (its default port is 8080)


def event(run: Running, name: str, value: str, after: float, timeout: float = 30.0) -> dict:
    """The first event `name` -> `value` the core decided at or after `after` (its monotonic `now`), as the
    service committed it to its event log (with the state, within a few seconds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [e for e in run.service.store.events(limit=None) if e["name"] == name and e["value"] == value
                 and e["now"] >= after]
        if found:
            return min(found, key=lambda e: e["id"])
        time.sleep(0.05)
    raise AssertionError(f"no event {name} -> {value} within {timeout} s")


class Running:
    """A service on its own event loop thread, and a simulator on the same virtual bus."""

    def __init__(self, tmp_path, scenario: str = "steady", speed: float = 1.0, board: MemoryBoard | None = None,
                 extra: str = "", bms: str = ""):
        self.channel = f"svc-{uuid.uuid4().hex[:8]}"
        self.config = parse_config(config_text(str(tmp_path / "state.db"), self.channel, extra, bms))
        self.board = board or MemoryBoard()
        self.service = Service(self.config, board=self.board)
        self.sim = Simulator.from_scenario(scenario, "2s1p-12v100", speed=speed)
        self.sim_bus = can.Bus(interface="virtual", channel=self.channel)
        self.sim_stop = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.stop = asyncio.Event()
        self.result: list[int] = []

    def __enter__(self) -> Running:
        threading.Thread(target=self.sim.run, args=(self.sim_bus,), kwargs={"stop_event": self.sim_stop},
                         daemon=True).start()

        def serve() -> None:
            asyncio.set_event_loop(self.loop)
            self.result.append(self.loop.run_until_complete(self.service.run(self.stop)))

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()
        return self

    def wait_for(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.02)
        d = self.service.decision
        raise AssertionError(f"{what} not reached in {timeout} s; relays {self.board.relays}; "
                             f"reasons {d.reasons if d else None}")

    def shutdown(self) -> int:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(timeout=15)
        return self.result[0]

    def __exit__(self, *exc: object) -> None:
        if self.thread.is_alive():
            self.shutdown()
        self.sim_stop.set()
        self.sim_bus.shutdown()


def test_starts_safe_runs_the_bank_and_stops_safe_with_state_saved(tmp_path):
    board = RecordingBoard()
    with Running(tmp_path, board=board) as run:
        run.wait_for(lambda: run.board.relays[LOAD] and run.board.relays[CHARGE], 8, "load and charge on")
        assert not run.board.relays[PRE]
        # OUT-4: nothing on before the bank is learned: no relay switched on within the discovery window after
        # the first frame the service heard (its own clock; the board stamps each write on the same clock)
        first_on = min(at for at, _, on in board.log if on)
        assert first_on >= run.service.core.bank.first_frame_at + DISCOVERY_S
        run.wait_for(lambda: run.sim.stats.bms_states > 5, 3, "BMS_STATE received by the batteries' side")
        assert run.sim.last_bms_state.allowed_to_charge and run.sim.last_bms_state.battery_count == 2
        run.service.core.set_mode(False)  # REM-2 through the running service
        run.wait_for(lambda: not run.board.relays[LOAD] and not run.board.relays[CHARGE], 2, "mode off")
        assert run.shutdown() == 0
        assert not any(run.board.relays.values())  # OUT-4: off before exit
    with Store.open(tmp_path / "state.db") as store:
        saved = store.load_state()
        assert saved["mode_on"] is False and len(saved["learned_bank"]["batteries"]) == 2
        assert any(e["name"] == "MODE" and e["value"] == "off" for e in store.events())


def test_a_cell_high_voltage_frame_reaches_the_charge_relay(tmp_path):
    with Running(tmp_path) as run:
        run.wait_for(lambda: run.board.relays[CHARGE], 8, "charge on")
        battery = run.sim.bank.battery(2)
        battery.set_cell_voltage(3, 3.80)  # the battery's firmware raises CellHighVoltage
        run.wait_for(lambda: not run.board.relays[CHARGE], 2, "charge relay off")
        assert run.board.relays[LOAD]
        assert BmsAlarm.CELL_HIGH_VOLTAGE in run.service.decision.alarms


def test_a_relay_that_does_not_follow_is_relay_fault(tmp_path):
    board = MemoryBoard(stuck=[PRE])
    with Running(tmp_path, scenario="discharge", speed=20, board=board) as run:
        run.wait_for(lambda: run.board.relays[LOAD], 8, "load on")
        run.wait_for(lambda: run.service.decision.pre_alarm, 30, "pre-alarm wanted")
        run.wait_for(lambda: BmsAlarm.RELAY_FAULT in run.service.decision.alarms, 2, "RELAY_FAULT")
        assert "pre_alarm (channel 3)" in run.service.decision.reasons["RELAY_FAULT"]


def test_a_restart_restores_mode_settings_and_soc(tmp_path):
    with Running(tmp_path) as run:
        run.wait_for(lambda: run.board.relays[LOAD], 8, "load on")
        run.service.core.set_settings(discharge_floor_pct=20, low_soc_warning_pct=30)
        run.service.core.set_soc(77.0)
        run.service.core.set_mode(False)
        time.sleep(0.3)
        assert run.shutdown() == 0
    with Running(tmp_path) as again:
        core = again.service.core
        assert core.mode_on is False and core.settings.discharge_floor_pct == 20
        assert core.monitor.soc_known and core.bank.learned is not None
        again.wait_for(lambda: again.service.decision is not None and again.service.decision.started, 8, "start")
        assert again.service.decision.soc == pytest.approx(77.0, abs=0.5)
        assert not again.board.relays[LOAD]  # mode off survived the restart


def test_remote_input_from_the_board_switches_load_and_charge(tmp_path):
    board = MemoryBoard()
    board.set_input(2, True)  # the wire loop closed: remote on
    with Running(tmp_path, board=board, extra='[remote]\nsource = "board"\nchannel = 2\n') as run:
        run.wait_for(lambda: run.board.relays[LOAD] and run.board.relays[CHARGE], 8, "load and charge on")
        board.set_input(2, False)  # REM-1/REM-2: remote off -> both free-floating
        run.wait_for(lambda: not run.board.relays[LOAD] and not run.board.relays[CHARGE], 2, "remote off")
        assert run.service.decision.atd and not run.service.decision.remote_on
        board.set_input(2, True)
        run.wait_for(lambda: run.board.relays[LOAD], 2, "remote on again")


def test_a_failing_decision_switches_the_outputs_off_and_recovers(tmp_path, caplog):
    """Whichever path evaluates (a frame batch or the tick), a failure means every output off; once
    decisions succeed again the outputs follow them. (The failure lasts until the test has seen the outputs
    off, so a test thread that runs late on a loaded machine cannot miss it.)"""
    with Running(tmp_path) as run:
        run.wait_for(lambda: run.board.relays[LOAD], 8, "load on")
        core = run.service.core
        original = core.evaluate
        broken = {"on": True}

        def failing(now: float, wall: float):
            if broken["on"]:
                raise RuntimeError("injected fault")
            return original(now, wall)

        core.evaluate = failing  # type: ignore[method-assign]
        run.wait_for(lambda: not any(run.board.relays.values()), 5, "every output off while decisions fail")
        broken["on"] = False
        run.wait_for(lambda: run.board.relays[LOAD] and run.board.relays[CHARGE], 5, "outputs back")
        assert run.service.stats.task_restarts >= 1
        assert any("crashed: outputs off" in r.getMessage() for r in caplog.records)


def test_an_output_controller_error_fails_safe_and_does_not_freeze_the_outputs(tmp_path):
    with Running(tmp_path) as run:
        run.wait_for(lambda: run.board.relays[LOAD], 8, "load on")
        outputs = run.service.outputs
        real_apply = outputs.apply
        broken = {"on": True}

        def apply(wanted, now=None):
            if broken["on"]:
                raise RuntimeError("injected controller bug")
            return real_apply(wanted, now)

        outputs.apply = apply  # type: ignore[method-assign]
        run.wait_for(lambda: not any(run.board.relays.values()), 2, "every output off")
        run.wait_for(lambda: BmsAlarm.RELAY_FAULT in run.service.decision.alarms, 2, "RELAY_FAULT")
        broken["on"] = False
        run.wait_for(lambda: run.board.relays[LOAD] and run.board.relays[CHARGE], 6, "outputs follow again")


def test_comms_loss_switches_both_off_after_the_timeout_and_recovers(tmp_path):
    """COM-1/COM-2 in the running service: battery 2 of 2 falls silent (the test silences it, once the outputs
    are on). Timed on the service's own clock (time.monotonic, in-process), from its core's event log: comms
    lost once comm_timeout has passed since the last BAT_STATUS it heard from battery 2, not before; back only
    after 2 s of fresh data from every battery."""
    comm_timeout = 1.0
    with Running(tmp_path, bms=f"comm_timeout = {comm_timeout}\n") as run:
        run.wait_for(lambda: run.board.relays[LOAD] and run.board.relays[CHARGE], 8, "load and charge on")
        decisions = DecisionLog(run.service.core)
        silent_from = time.monotonic()
        run.sim.bank.battery(2).silent = True
        run.wait_for(lambda: not run.board.relays[LOAD] and not run.board.relays[CHARGE], 10, "both off")
        assert run.board.relays[PRE]  # COM-2: the pre-alarm with it
        lost = event(run, "BATTERY_COMMS_LOST", "raised", silent_from)
        last_heard = run.service.core.bank.batteries[2].status_at  # still silent: its last BAT_STATUS
        before = max(d.at for d in decisions.entries if d.at < lost["now"])
        # At the first evaluation comm_timeout or more after the last frame, not one earlier or later.
        assert before - last_heard < comm_timeout <= lost["now"] - last_heard, (before, lost, last_heard)
        assert lost["now"] - before <= TICK_S + REACT_S  # the tick ran (late only by the machine's scheduling)
        assert last_heard <= silent_from + REACT_S  # a frame in flight when it fell silent, at most
        assert event(run, "ATC", "no", silent_from)["now"] == event(run, "ATD", "no", silent_from)["now"] == \
            lost["now"]  # both at once
        back = time.monotonic()
        run.sim.bank.battery(2).silent = False
        run.wait_for(lambda: run.board.relays[LOAD] and run.board.relays[CHARGE], 10, "both on again")
        cleared = event(run, "BATTERY_COMMS_LOST", "cleared", back)
        assert 2.0 <= cleared["now"] - back <= 2.0 + 1.0 + REACT_S  # fresh (its temperatures come every 1 s) for 2 s


def test_cold_charge_scenario_stops_charging_and_keeps_the_loads(tmp_path):
    """cold-charge: batteries at 7 degC in 0 degC air cool below 5 degC after ~550-750 s (11-15 s at speed 50)."""
    with Running(tmp_path, scenario="cold-charge", speed=50) as run:
        run.wait_for(lambda: run.board.relays[CHARGE], 8, "charge on")
        run.wait_for(lambda: not run.board.relays[CHARGE], 25, "charge off in the cold")
        decision = run.service.decision
        assert BmsAlarm.LOW_TEMPERATURE_CHARGE in decision.alarms and run.board.relays[LOAD]  # ATC-2 only
        assert "lowest cell temperature" in decision.reasons["LOW_TEMPERATURE_CHARGE"]


def test_modbus_is_served_by_the_running_service_and_mode_off_reaches_the_relays(tmp_path):
    port = free_port()
    with Running(tmp_path, extra=f'[modbus]\nhost = "127.0.0.1"\nport = {port}\n') as run:
        run.wait_for(lambda: run.board.relays[LOAD] and run.board.relays[CHARGE], 10, "load and charge on")
        client = ModbusTcpClient("127.0.0.1", port=port, timeout=3)
        assert client.connect()
        block_a = client.read_holding_registers(0, count=40, device_id=1).registers
        assert block_a[0] == 1 and block_a[1] == 1 and block_a[26] == 2  # map 1, on, 2 batteries
        assert not client.write_register(105, 0, device_id=1).isError()
        run.wait_for(lambda: not run.board.relays[LOAD] and not run.board.relays[CHARGE], 1.0, "both off")
        assert run.service.modbus is not None and run.service.modbus.stats.connections_open == 1
        client.close()
        assert run.shutdown() == 0
    with Store.open(tmp_path / "state.db") as store:
        assert store.load_state()["mode_on"] is False


def test_a_busy_modbus_port_is_logged_and_the_bms_keeps_protecting(tmp_path, caplog):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with Running(tmp_path, extra=f'[modbus]\nhost = "127.0.0.1"\nport = {port}\n') as run:
            run.wait_for(lambda: run.board.relays[LOAD] and run.board.relays[CHARGE], 10, "load and charge on")
            assert any("Modbus: cannot serve on 127.0.0.1" in r.getMessage() for r in caplog.records)
            assert run.shutdown() == 0



def test_a_gpio_remote_input_that_cannot_be_read_keeps_loads_and_chargers_off(tmp_path):
    """REM-1 and fail-safe: here there is no GPIO chip (nor, usually, the gpiod module), so the remote input
    on its own GPIO line cannot be read: it reads as off, the relay board (memory) is fine, both disconnects
    stay open and RELAY_FAULT names the remote input."""
    remote = '[remote]\nsource = "gpio"\nchip = "/dev/gpiochip-none"\nline = 17\n'
    with Running(tmp_path, extra=remote) as run:
        run.wait_for(lambda: run.service.decision is not None and run.service.decision.started, 10, "bank learned")
        run.wait_for(lambda: bool(run.service.decision.alarms & BmsAlarm.RELAY_FAULT), 3, "RELAY_FAULT")
        d = run.service.decision
        assert not d.remote_on
        assert "remote input gpiod /dev/gpiochip-none" in d.reasons["RELAY_FAULT"]
        time.sleep(0.5)
        assert not run.board.relays[LOAD] and not run.board.relays[CHARGE]
        assert run.shutdown() == 0


def test_frames_that_change_nothing_protective_wait_for_the_tick(tmp_path):
    """~30 frames/s from two batteries, nearly all "still fine": the core decides at the tick (every 100 ms),
    not once per frame; a frame that crosses a threshold is decided at once (the charge relay tests). Judged on
    the core's own clock: no two decisions closer than the tick while the frames flow."""
    with Running(tmp_path) as run:
        run.wait_for(lambda: run.board.relays[LOAD] and run.board.relays[CHARGE], 10, "load and charge on")
        time.sleep(1.0)
        decisions = DecisionLog(run.service.core)
        frames = run.service.link.counters()["frames_received"]
        run.wait_for(lambda: len(decisions.entries) >= 31, 60, "30 ticks")
        frames = run.service.link.counters()["frames_received"] - frames
        times = [d.at for d in decisions.entries]
        span = times[-1] - times[0]
        assert frames > 20 * span, (frames, span)  # two batteries: about 30 frames/s
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert min(gaps) >= TICK_S - 1e-3, min(gaps)
