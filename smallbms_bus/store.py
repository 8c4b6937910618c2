"""Persistence: the BMS core's state and the bounded event log in one SQLite file.

Theory of operation
-------------------
The core is pure; the service hands its `snapshot()` (settings, mode, SoC state, history, learned
bank, latches, timers) to `Store.save_state` and feeds `BmsCore.from_snapshot` with `load_state()`
at start. What must survive a `kill -9` or a power cut is decided by SQLite, not by us:

- `journal_mode=WAL` + `synchronous=FULL`: a commit is durable once `COMMIT` returns (the WAL is
  fsynced), and a crash at any byte leaves either the old or the new transaction, never a mix
  (WAL frames carry checksums; a torn tail is ignored on the next open).
- Every save is ONE transaction: all snapshot parts, the time of the save and any pending events.
  So settings, mode, SoC and history on disk are always one consistent snapshot.

Layout (schema 1; `PRAGMA user_version` holds the schema number, `PRAGMA application_id` marks the
file as ours): `state` holds one row per top-level snapshot key as JSON (inspectable with the
`sqlite3` shell and `json_extract`); a save rewrites only the rows whose JSON changed, so the
rarely changing parts (learned bank, settings) cost no flash writes when only counters moved.
`events` is the event log, trimmed to the newest `EVENT_LOG_SIZE` rows in the transaction that
appends. `meta` says which smallbms-bus created and last opened the file.

Schema 0 is the earlier single-table layout (`kv`: the whole snapshot in one JSON value, the events
as one ever-growing JSON list); `Store.open` migrates it in one transaction. A store from a newer
schema, a file that is not SQLite, not ours, or fails `PRAGMA quick_check` raises `StoreError` with
the path and what to do: a user's store is never replaced silently.

When to write is the `Persister`'s job (flash wear on SD cards): at once when `core.state_revision`
moved (settings, mode, SoC set, synchronisation, history reset, learned bank), when events are
pending (at most every `event_gap` seconds), otherwise at most every `interval` seconds for the
counters, and always on `force` (a write that must be durable before it is answered, shutdown).
Time is passed in; nothing here reads a clock. A failing store is logged once at ERROR when the
failures start and once when saving works again (SET-4), never once per retry.

One service per store (SET-4): `StoreLock` holds an flock on `<store>.lock` for the life of the
process; the kernel drops it when the process dies (even by kill -9), so a stale file never blocks.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from smallbms_bus import __version__

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
APPLICATION_ID = int.from_bytes(b"SBMS", "big")  # PRAGMA application_id: this file is a smallbms-bus store
EVENT_LOG_SIZE = 1000  # BEHAVIOUR.md "Events": the last 1000
EVENT_FIELDS = ("wall", "now", "name", "kind", "value", "reason")
DEFAULT_PATH = Path("/var/lib/smallbms-bus/state.db")  # systemd StateDirectory=smallbms-bus

_SCHEMA_1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE state (part TEXT PRIMARY KEY, value TEXT NOT NULL, saved_wall REAL NOT NULL);
CREATE TABLE events (
    id INTEGER PRIMARY KEY,
    wall REAL NOT NULL,
    now REAL NOT NULL,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    value TEXT NOT NULL,
    reason TEXT NOT NULL
);
"""

# Schema 0, kept so tests can build one and the migration has a definition to follow:
# kv('snapshot') = whole snapshot JSON, kv('saved_wall') = float, kv('events') = JSON list, oldest first.
SCHEMA_0 = "CREATE TABLE kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
_SCHEMA_0_KEYS = {"snapshot", "saved_wall", "events"}


class StoreError(Exception):
    """The store cannot be used; the message names the file, the reason and what to do."""


class StoreLock:
    """SET-4: one service per store, by an exclusive flock on `<store>.lock` that names its holder.

    `acquire` raises StoreError naming the holder (its pid, command and start time, as it wrote them)
    when another process holds the lock. The lock lives as long as the open file: `release` at a clean
    stop, the kernel at any death. The file itself stays (deleting it could let two processes lock two
    different files of the same name); its content is only a description, never trusted for locking.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, store: str | Path, holder: str) -> StoreLock:
        path = Path(f"{store}.lock")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StoreError(f"{store}: cannot create the lock file {path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                os.close(fd)
                raise StoreError(f"{store}: cannot lock {path}: {exc.strerror}") from exc
            who = _holder(fd)
            os.close(fd)
            raise StoreError(f"{store}: in use by another smallbms-bus ({who}); one service per store: stop that "
                             f"one first, or give this one another [store] path") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{holder}\n".encode(), 0)
        except OSError:  # a full disk: the lock holds all the same, only its description is missing
            pass
        return cls(path, fd)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None


def _holder(fd: int) -> str:
    """What the holder wrote into the lock file; it writes right after locking, so wait a moment for it."""
    deadline = time.monotonic() + 1.0
    while True:
        text = os.pread(fd, 1024, 0).decode(errors="replace").strip()
        if text or time.monotonic() > deadline:
            return text or "holder unknown"
        time.sleep(0.02)


def lock_holder_description(command: str) -> str:
    """The lock file's content: who holds the store (pid, command, start time)."""
    return f"pid {os.getpid()}, `{command}`, started {time.strftime('%Y-%m-%d %H:%M:%S %z')}"


class _Event(Protocol):
    wall: float
    now: float
    name: str
    kind: str
    value: str
    reason: str


def _dumps(value: Any) -> str:
    # sort_keys: equal snapshots give equal text, so unchanged parts are recognised and skipped
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _event_row(event: _Event | Mapping[str, Any]) -> tuple[Any, ...]:
    data = event if isinstance(event, Mapping) else dataclasses.asdict(event)  # type: ignore[call-overload]
    return (float(data["wall"]), float(data["now"]), str(data["name"]), str(data["kind"]), str(data["value"]),
            str(data["reason"]))


class Store:
    """One open store. Use `Store.open(path)`; a context manager; safe to call from several threads."""

    def __init__(self, path: Path, connection: sqlite3.Connection, *, event_limit: int = EVENT_LOG_SIZE) -> None:
        self.path = path
        self.event_limit = event_limit
        self._db = connection
        self._lock = threading.Lock()
        # JSON text of each state row as on disk: a save skips rows that did not change (flash wear)
        self._written: dict[str, str] = dict(connection.execute("SELECT part, value FROM state").fetchall())

    # -- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, *, create: bool = True, event_limit: int = EVENT_LOG_SIZE) -> Store:
        """Open (and create if missing and `create`) the store at `path`; migrate an older schema.

        Raises StoreError for a newer schema, a file that is not a healthy smallbms-bus store, or a
        missing file when `create` is false. Nothing is written to a file that is refused.
        """
        path = Path(path)
        if not path.exists():
            if not create:
                raise StoreError(f"{path}: no store there (the service creates it on its first start)")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"{path}: cannot create its directory: {exc}") from exc
        try:
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"{path}: cannot open: {exc}") from exc
        try:
            _prepare(db, path)
        except BaseException:
            db.close()
            raise
        return cls(path, db, event_limit=event_limit)

    def close(self) -> None:
        with self._lock:
            self._db.close()  # the last connection checkpoints the WAL into the main file

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- state ---------------------------------------------------------------------------------
    def save_state(self, snapshot: Mapping[str, Any], wall: float,
                   events: Iterable[_Event | Mapping[str, Any]] = ()) -> None:
        """Write a core snapshot (and optionally events) in one durable transaction."""
        parts = {str(k): _dumps(v) for k, v in snapshot.items()}
        rows = [_event_row(e) for e in events]
        with self._lock, self._transaction("save the state"):
            changed = [(k, v, wall) for k, v in parts.items() if self._written.get(k) != v]
            self._db.executemany("INSERT INTO state (part, value, saved_wall) VALUES (?, ?, ?) "
                                 "ON CONFLICT (part) DO UPDATE SET value = excluded.value, "
                                 "saved_wall = excluded.saved_wall", changed)
            # a key the snapshot no longer has (asked of the file: the cache is empty after a failure)
            gone = [r for r in self._db.execute("SELECT part FROM state") if r[0] not in parts]
            self._db.executemany("DELETE FROM state WHERE part = ?", gone)
            if not changed and not gone and parts:
                # nothing moved: still record the time of the save, on one row only
                first = next(iter(parts))
                self._db.execute("UPDATE state SET saved_wall = ? WHERE part = ?", (wall, first))
            self._insert_events(rows)
            self._written = parts

    def load_state(self) -> dict[str, Any] | None:
        """The last saved snapshot, or None when nothing was saved yet."""
        with self._lock:
            rows = self._db.execute("SELECT part, value FROM state").fetchall()
        if not rows:
            return None
        try:
            return {part: json.loads(value) for part, value in rows}
        except ValueError as exc:
            raise StoreError(f"{self.path}: a state row is not valid JSON ({exc}); move the file aside "
                             "to start with defaults") from exc

    def saved_wall(self) -> float | None:
        """Epoch seconds of the last save, or None."""
        with self._lock:
            (wall,) = self._db.execute("SELECT max(saved_wall) FROM state").fetchone()
        return wall

    # -- events --------------------------------------------------------------------------------
    def append_events(self, events: Iterable[_Event | Mapping[str, Any]]) -> None:
        """Append events (core `Event`s or dicts with their fields) in their own transaction."""
        rows = [_event_row(e) for e in events]
        if not rows:
            return
        with self._lock, self._transaction("append events"):
            self._insert_events(rows)

    def events(self, limit: int | None = 100, since: float | None = None) -> list[dict[str, Any]]:
        """The newest events first (those at or after the wall-clock time `since`, when given), as dicts with `id`
        and the Event fields."""
        where = "" if since is None else "WHERE wall >= ? "
        args: tuple[Any, ...] = (-1 if limit is None else limit,) if since is None else (since, limit or -1)
        with self._lock:
            rows = self._db.execute(f"SELECT id, {', '.join(EVENT_FIELDS)} FROM events {where}ORDER BY id DESC LIMIT ?",
                                    args).fetchall()
        return [dict(zip(("id", *EVENT_FIELDS), row, strict=True)) for row in rows]

    def event_count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM events").fetchone()[0])

    def _insert_events(self, rows: list[tuple[Any, ...]]) -> None:
        if not rows:
            return
        self._db.executemany(f"INSERT INTO events ({', '.join(EVENT_FIELDS)}) VALUES (?, ?, ?, ?, ?, ?)", rows)
        # ids only grow (max + 1), so "older than the limit-th newest id" is the bounded log
        self._db.execute("DELETE FROM events WHERE id < (SELECT id FROM events ORDER BY id DESC LIMIT 1 OFFSET ?)",
                         (self.event_limit - 1,))

    # -- helpers -------------------------------------------------------------------------------
    def pragma(self, name: str) -> Any:
        """One PRAGMA's value (for tests and `status`)."""
        with self._lock:
            return self._db.execute(f"PRAGMA {name}").fetchone()[0]

    def _transaction(self, what: str) -> _Transaction:
        return _Transaction(self, what)


class _Transaction:
    """BEGIN IMMEDIATE .. COMMIT; on any error ROLLBACK and raise StoreError naming the file."""

    def __init__(self, store: Store, what: str) -> None:
        self.store, self.what = store, what

    def __enter__(self) -> None:
        try:
            self.store._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreError(f"{self.store.path}: cannot {self.what}: {exc}") from exc

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        db = self.store._db
        if exc_type is None:
            try:
                db.execute("COMMIT")
                return
            except sqlite3.Error as commit_exc:
                exc = commit_exc
        if db.in_transaction:
            db.execute("ROLLBACK")
        # the cache may now describe rows that were rolled back: forget it, the next save writes all
        store = self.store
        store._written = {}
        if isinstance(exc, sqlite3.Error):
            raise StoreError(f"{store.path}: cannot {self.what}: {exc}") from exc


def _prepare(db: sqlite3.Connection, path: Path) -> None:
    """Check the file, refuse what is not ours or too new, set the pragmas, create or migrate."""
    move_aside = f"move {path} aside (the service then starts with defaults) or restore it from a backup"
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]  # reads the header: garbage fails here
        app_id = db.execute("PRAGMA application_id").fetchone()[0]
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        check = [r[0] for r in db.execute("PRAGMA quick_check").fetchall()]
        kv_keys = {r[0] for r in db.execute("SELECT key FROM kv")} if tables == {"kv"} else set()
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{path}: not a usable SQLite database ({exc}); {move_aside}") from exc
    if check != ["ok"]:
        raise StoreError(f"{path}: the store is corrupt (quick_check: {'; '.join(check[:3])}); {move_aside}")
    # someone else's database (or key-value table) next to ours is never migrated, dropped or rewritten
    if app_id not in (0, APPLICATION_ID) or (app_id == 0 and tables and tables != {"kv"}) \
            or not kv_keys <= _SCHEMA_0_KEYS:
        raise StoreError(f"{path}: this SQLite database is not a smallbms-bus store (tables: "
                         f"{', '.join(sorted(tables)) or 'none'}); point [store] path at another file")
    if version > SCHEMA_VERSION:
        raise StoreError(f"{path}: the store was written by a newer smallbms-bus (schema {version}, this build "
                         f"reads {SCHEMA_VERSION}); upgrade smallbms-bus, or {move_aside}")
    try:
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise StoreError(f"{path}: SQLite refused WAL mode (journal_mode is {mode}); put the store on a "
                             "local file system")
        db.execute("PRAGMA synchronous = FULL")  # a returned COMMIT is on the medium, not just in the WAL
        db.execute("PRAGMA busy_timeout = 5000")  # a `sqlite3` shell reading the file must not fail a save
        db.execute("PRAGMA journal_size_limit = 1048576")  # the WAL file shrinks back after a burst
        db.execute("BEGIN IMMEDIATE")
        try:
            # re-read under the write lock: another process may have created or migrated it meanwhile
            version = db.execute("PRAGMA user_version").fetchone()[0]
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            _create_or_migrate(db, path, version, tables)
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            if meta.get("last_opened_by") != __version__:
                db.execute("INSERT OR REPLACE INTO meta VALUES ('last_opened_by', ?)", (__version__,))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
    except sqlite3.Error as exc:
        raise StoreError(f"{path}: cannot prepare the store: {exc} (the service user must be able to write "
                         f"{path.parent}, the disk must not be full, one service per store)") from exc


def _create_or_migrate(db: sqlite3.Connection, path: Path, version: int, tables: set[str]) -> None:
    """Inside the caller's transaction: bring the file to SCHEMA_VERSION."""
    if version == SCHEMA_VERSION:
        return
    if version == 0 and not tables:  # a new file
        _create(db, created_by=__version__)
        return
    if version == 0 and tables == {"kv"}:
        _migrate_0_to_1(db, path)
        return
    raise StoreError(f"{path}: schema {version} has no migration to {SCHEMA_VERSION}")


def _create(db: sqlite3.Connection, *, created_by: str) -> None:
    for statement in filter(str.strip, _SCHEMA_1.split(";")):
        db.execute(statement)  # not executescript(): it would COMMIT the caller's transaction
    db.execute("INSERT INTO meta VALUES ('created_by', ?)", (created_by,))
    db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")  # the header is written with the transaction


def _migrate_0_to_1(db: sqlite3.Connection, path: Path) -> None:
    kv = dict(db.execute("SELECT key, value FROM kv").fetchall())
    try:
        snapshot = json.loads(kv["snapshot"]) if "snapshot" in kv else None
        saved_wall = float(kv.get("saved_wall", 0.0))
        events = json.loads(kv.get("events", "[]"))
        event_rows = [_event_row(e) for e in events][-EVENT_LOG_SIZE:]
    except (ValueError, KeyError, TypeError) as exc:
        raise StoreError(f"{path}: cannot migrate the schema 0 store: {exc!r}; move it aside to start "
                         "with defaults") from exc
    _create(db, created_by="schema 0")
    db.execute("INSERT INTO meta VALUES ('migrated_from', '0')")
    if snapshot:
        db.executemany("INSERT INTO state VALUES (?, ?, ?)",
                       [(str(k), _dumps(v), saved_wall) for k, v in snapshot.items()])
    db.executemany(f"INSERT INTO events ({', '.join(EVENT_FIELDS)}) VALUES (?, ?, ?, ?, ?, ?)", event_rows)
    db.execute("DROP TABLE kv")


class _Core(Protocol):
    state_revision: int

    def snapshot(self, now: float) -> dict[str, Any]: ...


@dataclasses.dataclass(frozen=True, slots=True)
class PendingSave:
    """A save `Persister.collect` decided on: the snapshot is already taken, only the write is left."""

    snapshot: dict[str, Any]
    wall: float
    events: tuple[Any, ...]
    revision: int
    now: float


class Persister:
    """When to write (flash wear vs. what a crash may lose). The service calls `collect` after each
    evaluation with that decision's events, and with `force=True` on shutdown, then `write`s what it got.

    A write happens when: `force`; nothing was written yet; `core.state_revision` moved since the last
    write (written on change); events are pending and the last write is `event_gap` s old; or the last
    write is `interval` s old (counters). A failed write (disk full, I/O error) does not raise: the BMS
    keeps protecting the bank; `failures` and `last_error` say why, and it is retried after `retry` s.
    The first failure of a run of failures is logged at ERROR, and so is the first success after it
    (SET-4); `ok` is False in between.

    Threads: `collect` reads the core, so it belongs on the thread that runs the core (cheap: decides and
    takes the snapshot); `write` runs on the store's thread (one writer thread at a time), keeping the
    fsync off the core's thread.
    """

    def __init__(self, store: Store, interval: float = 60.0, *, event_gap: float = 5.0, retry: float = 10.0) -> None:
        self.store = store
        self.interval = interval
        self.event_gap = event_gap
        self.retry = retry
        self.writes = 0
        self.failures = 0
        self.last_error: str | None = None
        self.failing_since: float | None = None  # wall time of the first failure of the current run of failures
        self.last_saved_wall: float | None = None  # wall time of the last committed save
        self._failures_before = 0
        self._revision: int | None = None
        self._last_write: float | None = None
        self._last_failure: float | None = None
        self._pending: list[Any] = []
        self._pending_lock = threading.Lock()  # collect/queue on the core's thread, a failed write on the store's

    @property
    def pending_events(self) -> int:
        return len(self._pending)

    def collect(self, core: _Core, now: float, wall: float, force: bool = False,
                events: Iterable[_Event | Mapping[str, Any]] = ()) -> PendingSave | None:
        """Queue `events`; if a write is due, take the snapshot and return it for `write`, else None."""
        self.queue(events)
        if not force and not self.due(core, now):
            return None
        # the revision is read before the snapshot: a change racing with it only causes one more save
        revision = core.state_revision
        with self._pending_lock:
            save = PendingSave(core.snapshot(now), wall, tuple(self._pending), revision, now)
            del self._pending[:len(save.events)]
        # counted as written from here on, so no second save is collected while this one is in flight
        self._revision, self._last_write = revision, now
        return save

    def write(self, save: PendingSave) -> bool:
        """Commit a collected save; on failure its events go back to the queue and the state stays due."""
        try:
            self.store.save_state(save.snapshot, save.wall, save.events)
        except StoreError as exc:
            self.failures += 1
            self.last_error = str(exc)
            self._last_failure = save.now
            self._revision = None  # due again once `retry` has passed
            with self._pending_lock:
                self._pending[:0] = save.events
                del self._pending[:-EVENT_LOG_SIZE]  # a store that keeps failing must not grow memory
            if self.failing_since is None:
                self.failing_since, self._failures_before = save.wall, self.failures - 1
                log.error("store: cannot save the state: %s; settings, mode and commands are refused until "
                          "saving works again (retried every %.0f s)", exc, self.retry)
            else:
                log.debug("store: save failed again: %s", exc)
            return False
        self._last_failure = None
        self.writes += 1
        self.last_saved_wall = save.wall
        if self.failing_since is not None:
            log.error("store: saving works again, after %d failed saves over %.0f s", self.failures -
                      self._failures_before, max(0.0, save.wall - self.failing_since))
            self.failing_since = None
        return True

    @property
    def ok(self) -> bool:
        """False from a failed save until the next save that commits."""
        return self.failing_since is None

    def queue(self, events: Iterable[_Event | Mapping[str, Any]]) -> None:
        """Hold events for the next write (`collect(events=...)` does this too)."""
        with self._pending_lock:
            self._pending.extend(events)
            del self._pending[:-EVENT_LOG_SIZE]  # a store that keeps failing must not grow memory

    def discard(self, events: Iterable[Any]) -> None:
        """Take queued events back (these very objects): a write the store could not commit must not be logged
        as done when the next save commits."""
        gone = {id(e) for e in events}
        with self._pending_lock:
            self._pending[:] = [e for e in self._pending if id(e) not in gone]

    def due(self, core: _Core, now: float) -> bool:
        """Whether `collect` would take a save now (without `force`)."""
        if self._last_failure is not None and now - self._last_failure < self.retry:
            return False
        if self._last_write is None or core.state_revision != self._revision:
            return True
        since = now - self._last_write
        return since >= self.interval or (bool(self._pending) and since >= self.event_gap)
