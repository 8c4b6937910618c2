"""Writes over MQTT: `<prefix>/set/<what>` -> a `Change` through `Service.commit`, like a Modbus write.

A message arrives on paho's network thread; `parse` turns it into the (name, target, value) writes of
`smallbms_bus.modbus.writes` or refuses it, and the change is handed to the event loop with
`asyncio.run_coroutine_threadsafe`: validated there (SET-1), applied, committed to the store and only
then acknowledged (SET-3), with its `setting`/`command` events in the event log naming the writer
`MQTT <client id>`. Every answer, done or refused, is published on `<prefix>/result`. With `[mqtt]
commands = false` every write is refused (Modbus exception 01's kind, `not_allowed`) and logged as a
`refused` event, the same bounded way as refused Modbus writes, and nothing changes.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from typing import Any

from smallbms_bus.bms.settings import SPEC_BY_NAME
from smallbms_bus.commit import Change, Committed
from smallbms_bus.modbus.writes import ILLEGAL_VALUE, WriteRefused, WriteValue

log = logging.getLogger(__name__)

NOT_ALLOWED = 1  # the refusal code of a write nobody may make (Modbus exception 01's meaning)
MAX_PAYLOAD = 64  # bytes: every valid write is a short word or number
BUTTON_COMMANDS = {"synchronise_soc": 1, "reset_history": 2, "reset_settings": 3, "relearn_bank": 4}
ON = {"on", "1", "true"}
OFF = {"off", "0", "false"}

Writes = tuple[tuple[str, str, WriteValue], ...]


def parse(what: str, payload: bytes) -> Writes:
    """The writes of a message on `set/<what>`; WriteRefused(ILLEGAL_VALUE) names what is allowed."""
    if len(payload) > MAX_PAYLOAD:
        raise WriteRefused(ILLEGAL_VALUE, f"set/{what}: a payload of at most {MAX_PAYLOAD} bytes")
    text = payload.decode("utf-8", "replace").strip()
    word = text.lower()
    if what == "mode":
        if word not in ON | OFF:
            raise WriteRefused(ILLEGAL_VALUE, f"set/mode = {text!r}: ON or OFF")
        return (("mode", "mode", 1.0 if word in ON else 0.0),)
    if what.startswith("settings/"):
        name = what.removeprefix("settings/")
        spec = SPEC_BY_NAME.get(name)
        if spec is None:
            raise WriteRefused(ILLEGAL_VALUE, f"set/{what}: no such setting; one of " + ", ".join(SPEC_BY_NAME))
        if spec.choices and word in ON | OFF:
            return ((name, name, 1.0 if word in ON else 0.0),)
        return ((name, name, _number(what, text, spec.allowed())),)
    if what == "soc":
        return (("soc", "set_soc", _number(what, text, "0..100 %", 0.0, 100.0)),)
    if what.startswith("command/"):
        name = what.removeprefix("command/")
        if name == "alarm_reset":
            return (("alarm_reset", "alarm_reset", 1.0),)
        if name in BUTTON_COMMANDS:
            return ((name, "command", float(BUTTON_COMMANDS[name])),)
        raise WriteRefused(ILLEGAL_VALUE, f"set/{what}: one of " + ", ".join(["alarm_reset", *BUTTON_COMMANDS]))
    raise WriteRefused(ILLEGAL_VALUE, f"set/{what}: one of mode, settings/<name>, soc, command/<name>")


def _number(what: str, text: str, allowed: str, lo: float = -math.inf, hi: float = math.inf) -> float:
    try:
        value = float(text)
    except ValueError:
        raise WriteRefused(ILLEGAL_VALUE, f"set/{what} = {text!r}: a number, {allowed}") from None
    if not math.isfinite(value) or not lo <= value <= hi:
        raise WriteRefused(ILLEGAL_VALUE, f"set/{what} = {text!r}: {allowed}")
    return value


class Commands:
    """Runs on paho's network thread; everything that touches the BMS happens on `loop`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, enabled: bool, source: str,
                 commit: Callable[[Change], Awaitable[Committed]], refused: Callable[[str, str, WriteRefused], None],
                 answer: Callable[[dict[str, Any]], None]) -> None:
        self.loop, self.enabled, self.source = loop, enabled, source
        self.commit, self.refused, self.answer = commit, refused, answer

    def on_write(self, what: str, payload: bytes) -> None:
        shown = payload[:MAX_PAYLOAD].decode("utf-8", "replace")
        result: dict[str, Any] = {"topic": f"set/{what}", "payload": shown}
        if not self.enabled:
            refusal = WriteRefused(NOT_ALLOWED, "writes over MQTT are off ([mqtt] commands = false)")
            self._refuse(result, what, refusal, log_event=True)
            return
        try:
            writes = parse(what, payload)
        except WriteRefused as refusal:
            self._refuse(result, what, refusal, log_event=True)
            return
        change = Change(writes, self.source, reason="MQTT write")
        future = asyncio.run_coroutine_threadsafe(self.commit(change), self.loop)
        future.add_done_callback(lambda f: self._done(f, result))

    def _refuse(self, result: dict[str, Any], what: str, refusal: WriteRefused, log_event: bool) -> None:
        log.info("MQTT: refused set/%s from the broker: %s", what, refusal)
        if log_event:  # an event as the write path records its own refusals (bounded per window)
            self.loop.call_soon_threadsafe(self.refused, self.source, f"set/{what}", refusal)
        self.answer({**result, "ok": False, "code": refusal.code, "message": str(refusal)})

    def _done(self, future: Future[Committed], result: dict[str, Any]) -> None:
        try:
            committed = future.result()
        except WriteRefused as refusal:  # the write path logged and recorded it
            self.answer({**result, "ok": False, "code": refusal.code, "message": str(refusal)})
        except Exception as error:  # the service stopped meanwhile, or a bug: the writer hears no "ok"
            self.answer({**result, "ok": False, "code": None, "message": f"not done: {error or type(error).__name__}"})
        else:
            self.answer({**result, "ok": True, "code": 0, "message": "; ".join(committed.steps) + " (committed)"})
