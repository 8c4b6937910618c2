"""MQTT and Home Assistant discovery (docs/mqtt.md): the service's front end for brokers.

`MqttFrontEnd` is what the service holds when `[mqtt] host` is set: on the event loop, `tick` offers the
client (client.py) the latest decision and settings (both immutable) at most once per `publish_period`,
or sooner (at most every MIN_GAP_S) when an output, ATC/ATD, the mode, an alarm or a warning changed.
The client's publisher thread builds the retained messages from them (`messages`: discovery + state,
pure: topics.py, discovery.py) and publishes only what changed. Writes arriving from the broker go
through commands.py to `Service.commit`. Nothing here can stop or slow a decision: the loop's part is a
comparison and an assignment, and a failure to build the messages is logged and retried with the next.
"""

from __future__ import annotations

import asyncio
import functools
import socket
from collections.abc import Awaitable, Callable, Mapping
from types import MappingProxyType
from typing import Any

from smallbms_bus.bms.core import Decision
from smallbms_bus.bms.settings import Settings
from smallbms_bus.commit import Change, Committed
from smallbms_bus.modbus.writes import WriteRefused
from smallbms_bus.mqtt.client import MqttLink
from smallbms_bus.mqtt.commands import Commands
from smallbms_bus.mqtt.discovery import discovery
from smallbms_bus.mqtt.topics import Names, state

MIN_GAP_S = 0.5  # a change of outputs, ATC/ATD, alarms or warnings is published this soon, never faster


class MqttFrontEnd:
    def __init__(self, section: Mapping[str, Any], commit: Callable[[Change], Awaitable[Committed]],
                 refused: Callable[[str, str, WriteRefused], None]) -> None:
        self.section = section
        self.names = Names.of(section, socket.gethostname())
        self.period: float = section["publish_period"]
        self.commands_enabled: bool = section["commands"]
        self._commit, self._refused = commit, refused
        self.link = MqttLink(section, self.names)
        self._next_at = 0.0
        self._last_key: tuple | None = None
        self._last_at = -MIN_GAP_S
        self._discovery_nodes: tuple[int, ...] | None = None
        self._discovery: dict[str, str] = {}

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        commands = Commands(loop, self.commands_enabled, f"MQTT {self.names.client_id}", self._commit,
                            self._refused, self.link.publish_result)
        self.link.on_write = commands.on_write
        self.link.start()

    def tick(self, now: float, decision: Decision | None, settings: Settings) -> None:
        """Loop: offer new messages when the period is up or something that matters changed (never raises)."""
        if decision is None:
            return
        key = (decision.atc, decision.atd, decision.outputs, decision.alarms, decision.warnings, decision.mode_on)
        due = now >= self._next_at or (key != self._last_key and now - self._last_at >= MIN_GAP_S)
        if not due:
            return
        self.link.offer(functools.partial(self.messages, decision, settings))
        self._last_key, self._last_at, self._next_at = key, now, now + self.period

    def messages(self, decision: Decision, settings: Settings) -> Mapping[str, str]:
        """Every retained message of one decision (the publisher thread calls it; the discovery cache is its)."""
        nodes = tuple(b.node for b in decision.bank.batteries)
        if nodes != self._discovery_nodes:  # the discovery messages change only with the bank's batteries
            self._discovery = discovery(self.names, nodes, self.commands_enabled)
            self._discovery_nodes = nodes
        out = dict(self._discovery)  # first: Home Assistant learns of an entity before its state
        out.update(state(decision, settings, self.names))
        return MappingProxyType(out)

    async def stop(self) -> None:
        """`offline` and disconnect, on a worker thread (bounded: client.STOP_WAIT_S)."""
        await asyncio.get_running_loop().run_in_executor(None, self.link.stop)
