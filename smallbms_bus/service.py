"""The running service: link -> bank -> core -> outputs, BMS_STATE, store; supervised (asyncio shell).

Theory of operation
-------------------
The BMS core is pure; this shell gives it time and I/O and never decides anything itself.

- Bus: the link is a device owned by ONE thread, "bus" (`Link.serve`): it alone opens, reads, writes and
  closes the python-can bus, and hands decoded reports to the event loop, which feeds the core (a report
  that may cross a threshold at once, the others within 20 ms). BMS_STATE goes the other way through
  `Link.offer`, a latest-wins slot of one frame: the loop never waits on the port. Every tick the loop
  asks `Link.status`, which also finds a stall (BMS_STATE unsent for 1 s, COM-5) even when the bus thread
  is stuck inside a system call; any state but up is a comms loss (COM-4), decided at once. A frame that
  moves a battery across a protective threshold (a flag, a cell voltage, a temperature limit, its
  identity) is evaluated at once: CellHighVoltage reaches the charge output without waiting for a tick.
  The others (50 batteries send ~750 frames/s, nearly all of them "still fine") only update the readings
  that the next tick evaluates.
- Tick: every 100 ms the core is evaluated even without frames (timers, staleness) and BMS_STATE is
  handed to the link; it is also handed over at once when ATC, ATD, pre-alarm, alarms or warnings change.
- Outputs: every decision's wanted outputs go to the relay board through one worker thread (blocking
  serial/TCP I/O never stalls the loop, and commands stay in order). The board's fault and remote
  input are fed back to the core (OUT-5, REM-1).
- Store: loaded at start (settings, mode, SoC, history, learned bank, latches, timers). The Persister
  decides on the loop thread and takes the snapshot there (the core is not thread-safe); only the
  fsync'd write runs on the store thread. Events travel with the state in the same transaction.
- Supervision: every task runs under `_supervise`: a crash is logged, the outputs are switched off
  and the task restarts after a pause. SIGTERM/SIGINT stop cleanly: outputs off, state saved, exit 0.
- systemd: READY=1 once the loop runs and the Modbus and metrics listeners are bound (or their first bind
  failed and is retried in the background), WATCHDOG=1 from the tick while it keeps ticking.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import signal
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from smallbms_bus.bms.alarms import BusState
from smallbms_bus.bms.core import BmsCore, Decision, bms_state_report
from smallbms_bus.config import Config
from smallbms_bus.link.bus import BusConfig, Link
from smallbms_bus.link.codec import FrameDecoder, FrameEncoder, load_dbc
from smallbms_bus.metrics import MetricsServer
from smallbms_bus.modbus.server import BmsAccess, ModbusOptions, ModbusServer
from smallbms_bus.outputs import make_board
from smallbms_bus.outputs.base import RelayBoard
from smallbms_bus.outputs.controller import Outputs
from smallbms_bus.outputs.gpiod import GpiodBoard
from smallbms_bus.outputs.remote import RemoteInput
from smallbms_bus.reports import Report
from smallbms_bus.store import Persister, Store

log = logging.getLogger(__name__)

TICK_S = 0.1  # evaluation tick and BMS_STATE period (PROTOCOL.md)
RESTART_PAUSE_S = 1.0
MODBUS_RETRY_S = 5.0
OFF = {"load_disconnect": False, "charge_disconnect": False, "pre_alarm": False, "error_led": "off",
       "status_led": "off"}


def sd_notify(message: str) -> None:
    """systemd's notify protocol (Type=notify): a datagram to $NOTIFY_SOCKET; a no-op elsewhere."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), address)
    except OSError:
        log.debug("sd_notify failed", exc_info=True)


@dataclass
class ServiceStats:
    evaluations: int = 0
    bms_state_sent: int = 0
    task_restarts: int = 0
    events: int = 0


class Service:
    def __init__(self, config: Config, *, board: RelayBoard | None = None, bus: BusConfig | None = None,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock, self.wall = clock, wall
        self.stats = ServiceStats()
        self.store = Store.open(config["store"]["path"])
        self.persister = Persister(self.store, interval=config["store"]["persist_interval"])
        now = clock()
        options = {"comm_timeout": config["bms"]["comm_timeout"], "discovery_window": config["bms"]["discovery_window"]}
        snapshot = self.store.load_state()
        self.core = (BmsCore.from_snapshot(snapshot, now, wall(), **options) if snapshot is not None
                     else BmsCore(now, wall(), **options))
        db = load_dbc(config["bus"]["dbc"])
        self.encoder = FrameEncoder(db)
        b = config["bus"]
        bus_config = bus or BusConfig.of(b["interface"], b["channel"], b["bitrate"], slcan_wait=b["slcan_wait"])
        self.link = Link(bus_config, FrameDecoder(db), clock=clock, on_state=self._link_changed)
        out = config["outputs"]
        # make_board does no I/O: a relay board not yet enumerated at boot is a RELAY_FAULT that clears when
        # the controller's back-off re-open succeeds, not an exit (bad options still raise ValueError).
        self.board = board or make_board(out["backend"], **out["options"])
        remote = config["remote"]
        remote_input = None
        if remote["source"] == "gpio":  # its own device: the outputs may be on any board
            remote_input = RemoteInput(GpiodBoard(remote["chip"], inputs=[remote["line"]], input_bias=remote["bias"],
                                                  consumer="smallbms-bus remote"), inverted=remote["inverted"])
        self.outputs = Outputs(self.board, config.output_channels(), reassert_every=out["reassert_every"],
                               blink_leds=out["blink_leds"], clock=clock,
                               remote_channel=remote["channel"] if remote["source"] == "board" else None,
                               remote_inverted=remote["inverted"], remote_input=remote_input)
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
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = False  # READY=1 sent
        modbus = ModbusOptions.from_config(config["modbus"])
        self.modbus: ModbusServer | None = None  # the Modbus TCP server; None when [modbus] serves no port
        if modbus.port is not None or modbus.tls:
            self.modbus = ModbusServer(modbus, BmsAccess(core=self.core, decision=lambda: self.decision,
                                                         decide=self._decide, clock=clock, started=now))
        self.metrics: MetricsServer | None = None  # the Prometheus endpoint, started by run() when configured

    # -- the decision path ------------------------------------------------------------------------
    def _on_reports(self, reports: list[Report]) -> None:
        if self._stopping.is_set():  # a batch the receiver queued just before shutdown
            return
        try:
            now = self.clock()
            urgent = False
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

    def _decide(self) -> Decision:
        now, wall = self.clock(), self.wall()
        decision = self.core.evaluate(now, wall)
        self.decision = decision
        self.stats.evaluations += 1
        wanted: dict[str, Any] = {
            "load_disconnect": decision.outputs.load_disconnect,
            "charge_disconnect": decision.outputs.charge_disconnect,
            "pre_alarm": decision.outputs.pre_alarm,
            "error_led": decision.error_led.value,
            "status_led": decision.status_led.value,
        }
        self._want_outputs(wanted, now)
        state = (decision.atc, decision.atd, decision.pre_alarm, decision.alarms, decision.warnings)
        if now >= self._next_state_at or state != self._last_sent_state:
            self._alive += 1
            if self.link.offer(self.encoder.bms_state(bms_state_report(decision, self._alive))):
                self.stats.bms_state_sent += 1  # handed to the bus thread (the link counts what it wrote)
            self._last_sent_state, self._next_state_at = state, now + TICK_S
        if decision.events:
            self.stats.events += len(decision.events)
            for event in decision.events:
                log.info("event %s %s -> %s: %s", event.kind, event.name, event.value, event.reason)
            self.persister.queue(decision.events)  # written with the state, in one transaction
        return decision

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
            self._decide()
            now = self.clock()
            # The snapshot is taken here, on the core's thread; only the fsync'd write goes to the store thread.
            save = self.persister.collect(self.core, now, self.wall())
            if save is not None:
                self._db.submit(self.persister.write, save)
            if watchdog and self._ready and now >= next_watchdog:  # systemd hears READY=1 first
                sd_notify("WATCHDOG=1")
                next_watchdog = now + 1.0
            await asyncio.sleep(TICK_S)

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
        stop = stop or asyncio.Event()
        self._loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread (tests)
                self._loop.add_signal_handler(sig, stop.set)
        await self._loop.run_in_executor(self._io, self.outputs.safe)  # OUT-4: start from a known safe state
        receiver = threading.Thread(target=self.link.serve, args=(self._stopping, self._deliver), name="bus",
                                    daemon=True)  # the link's owner thread
        receiver.start()
        tick = asyncio.create_task(self._supervise("tick", self._tick))
        modbus_tried = asyncio.Event()
        modbus = asyncio.create_task(self._serve_modbus(modbus_tried)) if self.modbus is not None else None
        if self.config["metrics"]["port"]:  # metrics: [metrics] port 0 = no endpoint; a busy port never stops the BMS
            self.metrics = MetricsServer(self, self.config["metrics"]["host"], self.config["metrics"]["port"])
            await self.metrics.start()
        if modbus is not None:  # READY=1 means a PLC can connect now (unless the port is taken: then it is retried)
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
            await self.shutdown(receiver)
        return 0

    async def shutdown(self, receiver: threading.Thread | None = None) -> None:
        """OUT-4: every output off before exit; then the state is saved and everything closed."""
        loop = asyncio.get_running_loop()
        if self.modbus is not None:  # first: no write may change anything while the state is being saved
            await self.modbus.stop()
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
        self._io.shutdown(wait=True)
        save = self.persister.collect(self.core, self.clock(), self.wall(), force=True)
        if save is not None:
            await loop.run_in_executor(self._db, self.persister.write, save)
        await loop.run_in_executor(self._db, self.store.close)
        self._db.shutdown(wait=True)
        self.board.close()
        if self.outputs.remote_input is not None:
            self.outputs.remote_input.close()
        if self.metrics is not None:  # metrics: served until the end, so a scrape during shutdown still answers
            await self.metrics.close()
        log.info("stopped: outputs off, state saved")
