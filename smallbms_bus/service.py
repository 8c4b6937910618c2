"""The running service: link -> bank -> core -> outputs, BMS_STATE, store; supervised (asyncio shell).

Theory of operation
-------------------
The BMS core is pure; this shell gives it time and I/O and never decides anything itself.

- Bus: the link is a device owned by ONE thread, "bus" (`Link.serve`): it alone opens, reads, writes and
  closes the python-can bus, and hands decoded reports to the event loop, which feeds the core. A report
  that may move a battery across a protective threshold (a flag, a cell voltage, a temperature limit, its
  identity) is evaluated at once, so CellHighVoltage reaches the charge output without waiting for a tick;
  the others (~750 frames/s from 50 batteries, nearly all "still fine") arrive within 20 ms and wait for
  the tick. BMS_STATE goes the other way through `Link.offer`, a latest-wins slot of one frame: the loop
  never waits on the port. Every tick the loop asks `Link.status`, which also finds a stall (BMS_STATE
  unsent for 1 s, COM-5) even when the bus thread is stuck in a system call; any state but up is a comms
  loss (COM-4), decided at once.
- Tick: every 100 ms the core is evaluated even without frames (timers, staleness) and BMS_STATE is
  handed to the link; it is also handed over at once when ATC, ATD, pre-alarm, alarms or warnings change.
- Outputs: every decision's wanted outputs go to the relay board through one worker thread (blocking
  serial/TCP I/O never stalls the loop, and commands stay in order). The board's fault and remote
  input are fed back to the core (OUT-5, REM-1).
- Store: held by this process alone (`StoreLock`, SET-4, taken before any device is opened), loaded
  at start (settings, mode, SoC, history, learned bank, latches, timers). The Persister decides on the
  loop thread and takes the snapshot there (the core is not thread-safe); only the fsync'd write runs
  on the store thread, one save in flight at a time from the tick (a slow card never queues saves).
  Events travel with the state in the same transaction: the core's (ATC, ATD, alarms, ...), the write
  path's (settings, commands, refusals: commit.py) and the service's own: STARTED (version, configuration,
  store), STOPPED (how; saved with the final save, or appended on its own when that save failed), and at a
  start after a run that left no STOPPED (killed, power cut), PREVIOUS_RUN saying so.
- Writes (settings, mode, commands, SoC) from any front end go through `commit` (smallbms_bus/commit.py,
  SET-3): applied and decided on the loop, committed on the store thread, answered once on disk;
  refused (04) and undone when the store cannot commit them, except "mode off".
- Supervision: every task runs under `_supervise`: a crash is logged, the outputs are switched off
  and the task restarts after a pause. SIGTERM/SIGINT stop cleanly: outputs off, state saved, exit 0;
  when the final save fails the last log line says so and the exit status is 1. SIGHUP is logged
  (no reload: restart to apply a new configuration), SIGUSR1 logs a one-line state summary, SIGUSR2
  saves the state now; none of them stops the service.
- systemd: READY=1 once the loop runs and the Modbus and metrics listeners are bound (or their first bind
  failed and is retried in the background), WATCHDOG=1 from the tick while it keeps ticking.

Who owns what, thread by thread, and how data crosses between them: docs/architecture.md.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import shlex
import signal
import ssl
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from smallbms_bus import __version__
from smallbms_bus.bms.alarms import BusState
from smallbms_bus.bms.core import BmsCore, Decision, Event, bms_state_report
from smallbms_bus.commit import Change, Committed, WritePath
from smallbms_bus.config import Config
from smallbms_bus.inverter import link as inverter_link
from smallbms_bus.inverter.frames import values_of
from smallbms_bus.link.bus import BusConfig, Link
from smallbms_bus.link.codec import FrameDecoder, FrameEncoder, load_dbc
from smallbms_bus.metrics import MetricsServer, limits_of
from smallbms_bus.modbus.server import BmsAccess, ModbusOptions, ModbusServer
from smallbms_bus.outputs import make_board
from smallbms_bus.outputs.base import RelayBoard
from smallbms_bus.outputs.controller import RelayController
from smallbms_bus.outputs.gpiod import GpiodBoard
from smallbms_bus.outputs.remote import RemoteInput
from smallbms_bus.protocol import frame_period
from smallbms_bus.reports import Report
from smallbms_bus.signals import loop_signal_handlers
from smallbms_bus.store import PendingSave, Persister, Store, StoreError, StoreLock, lock_holder_description
from smallbms_bus.systemd import sd_notify, unfinished_run
from smallbms_bus.view import ServiceStats, ServiceView, summary_line
from smallbms_bus.vocabulary import LED_ROLES, RELAY_ROLES

if TYPE_CHECKING:
    from smallbms_bus.mqtt import MqttFrontEnd

log = logging.getLogger(__name__)

TICK_S = frame_period("BMS_STATE")  # evaluation tick and BMS_STATE period (the DBC's GenMsgCycleTime)
RESTART_PAUSE_S = 1.0
MODBUS_RETRY_S = 5.0
STORE_STALL_S = 10.0  # a save waiting longer for the disk is a stalled store: ERROR, smallbms_store_up 0
OFF = {**dict.fromkeys(RELAY_ROLES, False), **dict.fromkeys(LED_ROLES, "off")}


class Service:
    def __init__(self, config: Config, *, board: RelayBoard | None = None, bus: BusConfig | None = None,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep, rate: float = 1.0) -> None:
        self.config = config
        # `sleep` waits seconds of `clock`: the demo runs the service on the simulation's clock (sim/clock.py),
        # so the 100 ms tick is 100 ms of simulated time like every other delay.
        self.clock, self.wall, self.sleep = clock, wall, sleep
        self.rate = rate  # seconds of `clock` per real second (the demo's speed): the inverter thread's waits
        self._threads: list[threading.Thread] = []  # owner threads joined at shutdown (the bus thread apart)
        self.stats = ServiceStats()
        # SET-4: before anything is opened, so a second instance never touches the first one's devices
        self.lock = StoreLock.acquire(config["store"]["path"],
                                      lock_holder_description(shlex.join(["smallbms-bus", *sys.argv[1:]])))
        try:
            self._open(config, board, bus)
        except BaseException:
            self.lock.release()
            raise

    def _open(self, config: Config, board: RelayBoard | None, bus: BusConfig | None) -> None:
        clock, wall = self.clock, self.wall
        self.store = Store.open(config["store"]["path"])
        self.persister = Persister(self.store, interval=config["store"]["persist_interval"])
        now = clock()
        options = {"comm_timeout": config["bms"]["comm_timeout"], "discovery_window": config["bms"]["discovery_window"]}
        snapshot = self.store.load_state()
        self.core = (BmsCore.from_snapshot(snapshot, now, wall(), **options) if snapshot is not None
                     else BmsCore(now, wall(), **options))
        self._previous_run = unfinished_run(self.store)  # why the last run recorded no STOPPED, or None
        self._stop_cause = "stop requested"
        self._open_devices(config, board, bus)
        self.decision: Decision | None = None
        self._alive = 0
        self._last_sent_state: tuple | None = None
        self._next_state_at = 0.0
        self._stopping = threading.Event()
        self._pending_lock = threading.Lock()
        self._pending: tuple[dict[str, Any], float] | None = None
        self._apply_scheduled = False
        self._inbox_lock = threading.Lock()  # reports from the bus thread not yet taken by the loop
        self._inbox: list[Report] = []
        self._inbox_scheduled = False
        self._io = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="outputs")
        self._db = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="store")
        # When each save handed to the store thread was (loop thread only), in real seconds: the disk is real even
        # when `clock` is a simulation's (the demo), so a slow fsync at --speed 20 is not a 20 x longer stall.
        self._saves_in_flight: list[float] = []
        self.store_stalled_since: float | None = None  # set when the oldest save in flight waited STORE_STALL_S
        self._background: set[asyncio.Future] = set()
        self.writes = WritePath(self.core, self.persister, self._save, self._decide_now, clock, wall, self.record)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = False  # READY=1 sent
        self._front_ends(config, now)
        self.view: Callable[[], ServiceView] = self._view  # what watchers read (smallbms_bus/view.py)

    def _open_devices(self, config: Config, board: RelayBoard | None, bus: BusConfig | None) -> None:
        """The bus link, the inverter link and the relay board: objects only, no I/O (their threads open them)."""
        clock = self.clock
        db = load_dbc(config["bus"]["dbc"])
        self.encoder = FrameEncoder(db)
        b = config["bus"]
        bus_config = bus or BusConfig.of(b["interface"], b["channel"], b["bitrate"], slcan_wait=b["slcan_wait"])
        self.link = Link(bus_config, FrameDecoder(db), clock=clock, on_state=self._link_changed)
        # BMS-CAN to an inverter ([inverter], docs/inverter.md): its own bus and owner thread, None while off
        self.inverter = inverter_link.from_config(config["inverter"], clock=clock, rate=self.rate)
        out = config["outputs"]
        # make_board does no I/O: a relay board not yet enumerated at boot is a RELAY_FAULT that clears when
        # the controller's back-off re-open succeeds, not an exit (bad options still raise ValueError).
        self.board = board or make_board(out["backend"], **out["options"])
        remote = config["remote"]
        remote_input = None
        if remote["source"] == "gpio":  # its own device: the outputs may be on any board
            remote_input = RemoteInput(GpiodBoard(remote["chip"], inputs=[remote["line"]], input_bias=remote["bias"],
                                                  consumer="smallbms-bus remote"), inverted=remote["inverted"])
        self.outputs = RelayController(self.board, config.output_channels(), reassert_every=out["reassert_every"],
                               blink_leds=out["blink_leds"], clock=clock,
                               remote_channel=remote["channel"] if remote["source"] == "board" else None,
                               remote_inverted=remote["inverted"], remote_input=remote_input)

    def _front_ends(self, config: Config, now: float) -> None:
        """Modbus and MQTT built here; metrics and the web page by run() (they need the running loop)."""
        modbus = ModbusOptions.from_config(config["modbus"])
        self.modbus: ModbusServer | None = None  # the Modbus TCP server; None when [modbus] serves no port
        if modbus.port is not None or modbus.tls:
            self.modbus = ModbusServer(modbus, BmsAccess(core=self.core, decision=lambda: self.decision,
                                                         commit=self.commit, clock=self.clock, started=now,
                                                         refused=self.writes.note_refusal))
        self.metrics: MetricsServer | None = None  # the Prometheus endpoint (run() starts it when configured)
        self.web: Any = None  # the commissioning page and JSON API (web/server.py; likewise)
        self.mqtt: MqttFrontEnd | None = None  # MQTT and Home Assistant discovery (docs/mqtt.md): [mqtt] host set
        if config["mqtt"]["host"] is not None:
            from smallbms_bus.mqtt import MqttFrontEnd  # paho is imported only where MQTT is used

            self.mqtt = MqttFrontEnd(config["mqtt"], self.commit, self.writes.note_refusal)

    # -- the decision path ------------------------------------------------------------------------
    def _on_reports(self, reports: list[Report]) -> None:
        if self._stopping.is_set():  # a batch the receiver queued just before shutdown
            return
        try:
            now, urgent = self.clock(), False
            for report in reports:
                urgent |= self.core.on_report(report, now)
            if urgent:  # a threshold crossed: decide now; other frames wait for the tick (<= 100 ms)
                self._decide()
        except Exception:  # an event-loop callback is not a supervised task: fail safe here
            self._failed("frame handler")

    def _failed(self, what: str) -> None:
        """A decision could not be made: every output off until one can (the next frame or tick retries)."""
        self.stats.task_restarts += 1
        log.exception("%s crashed: outputs off, retrying", what)
        self._want_outputs(dict(OFF), self.clock())

    def _decide_now(self) -> None:
        """Decide at once (after a write); a failure fails safe like a frame handler's."""
        try:
            self._decide()
        except Exception:
            self._failed("decision after a write")

    def _decide(self) -> Decision:
        now, wall = self.clock(), self.wall()
        decision = self.core.evaluate(now, wall)
        self.stats.evaluations += 1
        self.publish(decision, now)
        # the core's Outputs fields and its LED fields are named after the roles
        wanted: dict[str, Any] = {**{role: getattr(decision.outputs, role) for role in RELAY_ROLES},
                                  **{role: getattr(decision, role).value for role in LED_ROLES}}
        self._want_outputs(wanted, now)
        state = (decision.atc, decision.atd, decision.pre_alarm, decision.alarms, decision.warnings)
        if now >= self._next_state_at or state != self._last_sent_state:
            self._alive += 1
            if self.link.offer(self.encoder.bms_state(bms_state_report(decision, self._alive))):
                self.stats.bms_state_sent += 1  # handed to the bus thread (the link counts what it wrote)
            self._last_sent_state, self._next_state_at = state, now + TICK_S
        if self.inverter is not None:  # latest wins: the inverter thread sends it on its own schedule
            self.inverter.offer(values_of(decision))
        if decision.events:
            self.record(decision.events)
        return decision

    def publish(self, decision: Decision, now: float) -> None:
        """Loop: `decision` is the latest (what `view()` and Modbus read from now on)."""
        self.decision = decision

    def _view(self) -> ServiceView:
        """Loop: the latest decision with copies of the counters around it, now (smallbms_bus/view.py)."""
        now = self.clock()
        view = ServiceView.build(self.decision, now, self.link, self.outputs, self.persister,
                                 self.store_stalled_since is None, self.writes.refused, self.stats)
        return view if self.inverter is None else dataclasses.replace(view, inverter=self.inverter.view(now))

    def record(self, events: Sequence[Event]) -> None:
        """Events of the core, the write path and the service: logged, counted, saved with the state (one save)."""
        self.stats.events += len(events)
        for event in events:
            log.info("event %s %s -> %s: %s", event.kind, event.name, event.value, event.reason)
        self.persister.queue(events)

    def _service_event(self, name: str, value: str, reason: str) -> Event:
        return Event(self.wall(), self.clock(), name, "service", value, reason)

    def _record_start(self) -> None:
        events = [] if self._previous_run is None else [
            self._service_event("PREVIOUS_RUN", "no stop record", self._previous_run)]
        events.append(self._service_event("STARTED", __version__, f"smallbms-bus {__version__} started: configuration "
                                          f"{self.config.source}, store {self.config['store']['path']}"))
        self.record(events)

    def _want_outputs(self, wanted: dict[str, Any], now: float) -> None:
        """Latest wins: a slow board (Modbus RTU at 9600 baud) gets the newest state, never a backlog."""
        with self._pending_lock:
            if self._stopping.is_set():  # shutdown owns the outputs now: everything goes off
                return
            self._pending = (wanted, now)
            if self._apply_scheduled:
                return
            self._apply_scheduled = True
        self._io.submit(self._apply_outputs)

    def _apply_outputs(self) -> None:
        """Worker thread: drive the board, then report its fault and remote input back to the core."""
        while True:
            with self._pending_lock:
                pending, self._pending = self._pending, None
                if pending is None or self._stopping.is_set():
                    self._apply_scheduled = False
                    return
            wanted, now = pending
            try:
                status = self.outputs.apply(wanted, now)
                fault, remote = status.fault, self.outputs.remote(now)
            except Exception as error:  # a bug here must not freeze the outputs: fail safe and keep serving
                log.exception("applying outputs failed: switching everything off")
                self.outputs.safe()
                fault, remote = f"output controller error: {error}", False
            loop = self._loop
            if loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(self._feedback, fault, remote)

    def _feedback(self, fault: str | None, remote: bool | None) -> None:
        self.core.set_relay_fault(fault)
        on = True if remote is None else remote  # REM-1: no input configured = the wire loop = always on
        if on != self.core.remote_on:
            self.core.set_remote(on)

    # -- writes and the store ------------------------------------------------------------------------------
    async def commit(self, change: Change) -> Committed:
        """SET-3, for every front end: the change is applied now and answered once it is on disk; raises
        WriteRefused (03 bad value, 06 not yet, 04 the store could not commit it). See smallbms_bus/commit.py."""
        return await self.writes.commit(change)

    @property
    def writes_closed(self) -> bool:
        """True once the service stops taking writes (shutdown has begun)."""
        return self._stopping.is_set() or self.writes.closed

    async def read_events(self, limit: int, since: float | None = None) -> list[dict[str, Any]]:
        """The event log as saved, newest first (on the store thread, which owns the connection)."""
        return await asyncio.get_running_loop().run_in_executor(self._db, self.store.events, limit, since)

    def _submit_save(self, save: PendingSave) -> asyncio.Future[bool]:
        """The hand-off to the store thread (loop thread only); the future says whether it committed."""
        loop = asyncio.get_running_loop()
        self._saves_in_flight.append(time.monotonic())
        future = loop.run_in_executor(self._db, self.persister.write, save)

        def done(_: asyncio.Future[bool]) -> None:
            started = self._saves_in_flight.pop(0)  # one store thread: saves finish in the order handed over
            if self.store_stalled_since is not None:
                log.error("store: the disk answered again; a save had waited %.0f s", time.monotonic() - started)
                self.store_stalled_since = None

        future.add_done_callback(done)
        return future

    def _check_store_stall(self, now: float) -> None:
        """A disk that stops answering (a hung card, a frozen file system) holds the store thread: say so once."""
        oldest = self._saves_in_flight[0] if self._saves_in_flight else now
        if self.store_stalled_since is None and now - oldest > STORE_STALL_S:
            self.store_stalled_since = oldest
            log.error("store: a save has waited %.0f s for the disk; the BMS keeps protecting the bank, writes "
                      "(settings, mode, commands) wait for their answer until the disk answers",
                      now - self.store_stalled_since)

    async def _save(self, save: PendingSave) -> bool:
        return await self._submit_save(save)

    async def save_now(self) -> bool:
        """A save outside the policy (SIGUSR2, shutdown): everything the core holds, with pending events."""
        save = self.persister.collect(self.core, self.clock(), self.wall(), force=True)
        assert save is not None
        return await self._save(save)

    # -- tasks ----------------------------------------------------------------------------------------
    def _deliver(self, reports: list[Report]) -> None:
        """Bus thread: a batch of reports to the event loop. Batches the loop has not taken yet are merged into
        one callback (the same order, never later), so a busy loop is not woken once per batch."""
        with self._inbox_lock:
            self._inbox.extend(reports)
            if self._inbox_scheduled:
                return
            self._inbox_scheduled = True
        self._to_loop(self._take_inbox)

    def _take_inbox(self) -> None:
        with self._inbox_lock:
            reports, self._inbox = self._inbox, []
            self._inbox_scheduled = False
        self._on_reports(reports)

    def _link_changed(self, up: bool, reason: str) -> None:
        """Any thread: the link's state changed; the core hears it on the loop."""
        self._to_loop(self._sync_link)

    def _to_loop(self, callback: Callable[..., object], *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: the service has stopped
                loop.call_soon_threadsafe(callback, *args)

    def _sync_link(self) -> None:
        """Loop: give the core the link's state (COM-4, COM-5); a link that went down is decided on at once."""
        state, reason = self.link.status(self.clock())
        core = self.core
        if state is BusState.NOT_OPEN or (state, reason) == (core.bus_state, core.link_reason):
            return  # NOT_OPEN: before the first open attempt, or stopped; the outputs are off then anyway
        was_up = core.link_up
        core.set_link(state is BusState.UP, reason, state)
        if was_up and state is not BusState.UP and not self._stopping.is_set():
            try:
                self._decide()
            except Exception:
                self._failed("link state handler")

    async def _tick(self) -> None:
        # systemd asks for a keep-alive at least every WatchdogSec/2; once a second is plenty and cheap.
        watchdog = "WATCHDOG_USEC" in os.environ
        next_watchdog = 0.0
        while True:
            self._sync_link()  # also the watchdog of the bus thread: a stall is found here (COM-5)
            if self.inverter is not None:
                self.core.set_inverter_silent(self.inverter.silent_reason(self.clock()))
            self._decide()
            now = self.clock()
            if self.mqtt is not None:  # a latest-wins hand-over to the MQTT thread: never waits for the broker
                self.mqtt.tick(now, self.decision, self.core.settings)
            # The snapshot is taken here, on the core's thread; only the fsync'd write goes to the store thread,
            # and only when the previous one is done: a stalled card holds one save, never a growing queue.
            self.writes.flush_refusals(now)  # the summary of a refusal window that has ended
            if not self._saves_in_flight:
                save = self.persister.collect(self.core, now, self.wall())
                if save is not None:
                    self._submit_save(save)
            else:
                self._check_store_stall(time.monotonic())
            if watchdog and self._ready and now >= next_watchdog:  # systemd hears READY=1 first
                sd_notify("WATCHDOG=1")
                next_watchdog = now + 1.0
            await self.sleep(TICK_S)

    async def _serve_modbus(self, tried: asyncio.Event) -> None:
        """Modbus is how PLCs watch the bank, but the BMS protects it without: a port that cannot be bound
        is logged and retried, never a reason to stop protecting the batteries (and never outputs off).
        `tried` is set after the first attempt, so READY=1 is not sent before a client could connect."""
        assert self.modbus is not None
        while True:
            try:
                await self.modbus.start()
                return
            except (OSError, RuntimeError, ssl.SSLError) as error:
                await self.modbus.stop()
                log.error("Modbus: cannot serve on %s:%s (%s); retrying in %.0f s", self.modbus.options.host,
                          self.modbus.options.port, error, MODBUS_RETRY_S)
                tried.set()
                await asyncio.sleep(MODBUS_RETRY_S)
            finally:
                tried.set()  # also when start() raised something unexpected: READY=1 must not wait forever

    async def _supervise(self, name: str, factory: Callable[[], Awaitable[None]]) -> None:
        while True:
            try:
                await factory()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                self._failed(f"task {name}")
                await asyncio.sleep(RESTART_PAUSE_S)

    # -- lifecycle --------------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event | None = None) -> int:
        """Serve until `stop` (or SIGTERM/SIGINT); 0 after a clean stop, 1 when the final save failed."""
        stop = stop or asyncio.Event()
        self._loop = asyncio.get_running_loop()
        saved = False
        with loop_signal_handlers(self._loop, self._signal_handlers(stop)):
            await self._loop.run_in_executor(self._io, self.outputs.safe)  # OUT-4: start from a known safe state
            self._record_start()
            receiver = self._start_device_threads()
            tick = asyncio.create_task(self._supervise("tick", self._tick))
            modbus_tried = asyncio.Event()
            modbus = asyncio.create_task(self._serve_modbus(modbus_tried)) if self.modbus is not None else None
            await self._start_front_ends()
            if modbus is not None:  # READY=1 means a PLC can connect now (unless the port is taken: then retried)
                await modbus_tried.wait()
            sd_notify("READY=1")
            self._ready = True
            log.info("running: bus %s, outputs %s, store %s", self.link.config.describe(),
                     self.config["outputs"]["backend"], self.config["store"]["path"])
            try:
                await stop.wait()
            finally:
                sd_notify("STOPPING=1")
                tick.cancel()
                if modbus is not None:
                    modbus.cancel()
                await asyncio.gather(tick, *([modbus] if modbus else []), return_exceptions=True)
                saved = await self.shutdown(receiver)
        return 0 if saved else 1

    def _signal_handlers(self, stop: asyncio.Event) -> dict[int, Callable[[], object]]:
        """Every signal whose default action would kill the service with the outputs on."""
        def stop_by(cause: str) -> Callable[[], None]:
            def handler() -> None:
                self._stop_cause = cause
                stop.set()
            return handler

        return {signal.SIGTERM: stop_by("SIGTERM"), signal.SIGINT: stop_by("SIGINT"), signal.SIGHUP: self._on_sighup,
                signal.SIGUSR1: self._on_sigusr1, signal.SIGUSR2: self._on_sigusr2}

    def _start_device_threads(self) -> threading.Thread:
        """The bus link's owner thread (returned: shutdown joins it last) and the inverter link's."""
        receiver = threading.Thread(target=self.link.serve, args=(self._stopping, self._deliver), name="bus",
                                    kwargs={"pre_alarm_level": lambda: self.core.settings.pre_alarm_level_per_cell},
                                    daemon=True)
        receiver.start()
        if self.inverter is not None:
            self._threads.append(threading.Thread(target=self.inverter.serve, args=(self._stopping,), name="inverter",
                                                  daemon=True))
            self._threads[-1].start()
        return receiver

    async def _start_front_ends(self) -> None:
        """/metrics, the web page and MQTT (Modbus has its own task); none of them can stop the BMS starting."""
        if (m := self.config["metrics"])["port"]:  # [metrics] port 0 = no endpoint; a busy port is retried
            self.metrics = MetricsServer(self, m["host"], m["port"], limits=limits_of(m))
            await self.metrics.start()
        if self.config["web"]["port"]:  # [web] port 0 = no page; a busy port is retried, never a stop
            from smallbms_bus.web.server import WebOptions, WebServer  # aiohttp only when the page is served

            self.web = WebServer(self, WebOptions.from_config(self.config["web"]))
            await self.web.start()
        if self.mqtt is not None:  # its own threads; a broker down or slow never delays the start
            assert self._loop is not None
            self.mqtt.start(self._loop)

    # -- signals (documented in README "Operations" and docs/store.md) ---------------------------------------
    def _on_sighup(self) -> None:
        log.warning("SIGHUP: configuration reload is not supported; still running with %s as it was at start "
                    "(restart the service to apply a changed configuration)", self.config.source)

    def _on_sigusr1(self) -> None:
        log.info("SIGUSR1: %s", self.summary())

    def _on_sigusr2(self) -> None:
        if self._stopping.is_set():
            log.info("SIGUSR2: stopping already; the final save follows")
            return

        async def save() -> None:
            try:
                saved = await self.save_now()
            except RuntimeError:  # the store thread shut down meanwhile: the final save has it
                return
            if saved:
                log.info("SIGUSR2: state saved")
            else:
                log.error("SIGUSR2: state NOT saved: %s", self.persister.last_error)

        task = asyncio.ensure_future(save())
        self._background.add(task)  # a reference, so the task is not collected before it ran
        task.add_done_callback(self._background.discard)

    def summary(self) -> str:
        """One line of state for the log (SIGUSR1)."""
        return summary_line(self.decision, self.link, self.outputs, self.persister, self.store_stalled_since)

    async def shutdown(self, receiver: threading.Thread | None = None) -> bool:
        """OUT-4: every output off before exit; then the state is saved and everything closed. True when
        the final save committed; the last log line says which."""
        loop = asyncio.get_running_loop()
        if self.modbus is not None:  # first: no new write may change anything while the state is being saved
            await self.modbus.stop()
        if self.web is not None:  # the same for the page's writes; its streams end
            await self.web.close()
        with self._pending_lock:
            self._stopping.set()  # from here no decision reaches the board
        if receiver is not None:  # the bus thread closes the link when it ends
            self.link.wake()
            await loop.run_in_executor(None, receiver.join, 2.0)
            if receiver.is_alive():
                log.warning("bus %s: the bus thread did not stop within 2 s (stuck in a call); not waiting for it",
                            self.link.config.describe())
        else:
            self.link.close()
        await loop.run_in_executor(self._io, self.outputs.safe)  # queued after any in-flight apply
        for thread in self._threads:  # the inverter thread sends its last set (every limit 0) and closes its bus
            await loop.run_in_executor(None, thread.join, 2.0)
        self._io.shutdown(wait=True)
        if self.mqtt is not None:  # after the outputs are off: "offline" on the availability topic (bounded wait)
            await self.mqtt.stop()
        # The outputs are off before anything waits on the store (a stalled card must not keep them on).
        await self.writes.close()  # a write in flight is committed and answered; later ones are refused
        stopped = "outputs off"
        self.record([self._service_event("STOPPED", "clean", f"stopped ({self._stop_cause}): {stopped}")])
        saved = await self.save_now()  # queued after any save in flight
        if not saved:  # the clean STOPPED went down with that save: say what happened, if the disk lets us
            failed = self._service_event("STOPPED", "final save failed",
                                         f"stopped ({self._stop_cause}): {stopped}, but the final save failed "
                                         f"({self.persister.last_error}): what changed since the last save is lost")
            with contextlib.suppress(StoreError):  # the log line below says it anyway
                await loop.run_in_executor(self._db, self.store.append_events, [failed])
        try:
            await loop.run_in_executor(self._db, self.store.close)
        except Exception:  # the outputs are off and the save is decided: report, never a traceback
            log.exception("closing the store failed")
        self._db.shutdown(wait=True)
        self.lock.release()
        self.board.close()
        if self.outputs.remote_input is not None:
            self.outputs.remote_input.close()
        if self.metrics is not None:  # metrics: served until the end, so a scrape during shutdown still answers
            await self.metrics.close()
        if saved:
            log.info("stopped: outputs off, state saved")
        else:
            last = self.persister.last_saved_wall
            log.error("stopped: outputs off, but the final save failed (%s): what changed since %s is lost",
                      self.persister.last_error, "the start" if last is None else
                      f"the last save at {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(last))}")
        return saved
