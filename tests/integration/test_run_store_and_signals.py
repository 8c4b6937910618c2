"""`smallbms-bus run` as a process against its store and the signals an operator or init system sends:
SET-4's store lock, store failures on a full and on a read-only file system (SET-3, SET-4), a stop whose final
save fails, and SIGHUP/SIGUSR1/SIGUSR2. Real processes, real signals, real file systems (tmpfs, a loop-mounted
ext4 image: as root; skipped with the reason elsewhere)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

from smallbms_bus.store import Store
from tests.faults.rigs import CMD, LOAD, ProcessRig, metric, wait_until
from tests.filesystems import ext4, fill, frozen, immutable, tmpfs

DEVICE_FAILURE = 4


def saved_wall(store: Path) -> float:
    db = sqlite3.connect(store)
    try:
        return db.execute("SELECT max(saved_wall) FROM state").fetchone()[0]
    finally:
        db.close()


def log_lines(rig: ProcessRig) -> list[str]:
    return [line for line in rig.stderr().splitlines() if line.strip()]


def wait_log(rig: ProcessRig, text: str, timeout: float = 10.0) -> str:
    wait_until(lambda: any(text in line for line in log_lines(rig)), timeout, f"log line {text!r}")
    return next(line for line in log_lines(rig) if text in line)


def test_a_second_run_on_the_same_store_exits_2_naming_the_holder_until_the_holder_is_killed(tmp_path):
    with ProcessRig(tmp_path) as rig:
        first = rig.start()
        rig.wait_ready()
        wait_until(lambda: rig.module.relays[LOAD], 20, "load on")
        second = subprocess.run([*CMD, "run", "--config", str(rig.config)], capture_output=True, text=True,
                                timeout=30)
        assert second.returncode == 2, second.stderr
        assert f"pid {first.pid}" in second.stderr and "smallbms-bus run --config" in second.stderr, second.stderr
        assert str(rig.store) in second.stderr and "Traceback" not in second.stderr
        assert first.poll() is None and rig.module.relays[LOAD]  # the second one touched nothing
        client = rig.client()
        assert not client.read_holding_registers(0, count=2, device_id=1).isError()
        client.close()
        rig.kill()  # SIGKILL: the kernel releases the lock with the process
        rig.start()
        rig.wait_ready()
        wait_until(lambda: rig.module.relays[LOAD], 20, "load on again under the second service")
        assert rig.stop() == 0


def test_sighup_sigusr1_sigusr2_are_logged_and_never_stop_the_service(tmp_path):
    with ProcessRig(tmp_path) as rig:
        service = rig.start()
        rig.wait_ready()
        wait_until(lambda: rig.module.relays[LOAD], 20, "load on")
        service.send_signal(signal.SIGHUP)
        assert "reload is not supported" in wait_log(rig, "SIGHUP")
        service.send_signal(signal.SIGUSR1)
        summary = wait_log(rig, "SIGUSR1")
        assert "mode on" in summary and "load on" in summary and "store ok" in summary, summary
        before = saved_wall(rig.store)
        service.send_signal(signal.SIGUSR2)
        assert "state saved" in wait_log(rig, "SIGUSR2")
        assert saved_wall(rig.store) > before  # a save now, not at the next persist interval (60 s)
        for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):  # again: a handler, not a one-shot
            service.send_signal(sig)
        time.sleep(1.0)
        assert service.poll() is None and rig.module.relays[LOAD]
        assert rig.stop() == 0
        assert not rig.module.relays[LOAD]
        assert log_lines(rig)[-1].endswith("stopped: outputs off, state saved")


def test_a_full_file_system_refuses_writes_with_04_logs_once_and_recovers(tmp_path):
    with tmpfs(tmp_path / "fs") as fs, ProcessRig(tmp_path, store_path=fs / "state.db", metrics=True) as rig:
        rig.start()
        rig.wait_ready()
        wait_until(lambda: rig.module.relays[LOAD], 20, "load on")
        client = rig.client(timeout=10)
        assert not client.write_register(104, 150, device_id=1).isError()  # discharge floor 15.0 %
        filler = fill(fs)
        refused = client.write_register(104, 170, device_id=1)
        assert refused.isError() and refused.exception_code == DEVICE_FAILURE
        assert client.read_holding_registers(104, count=1, device_id=1).registers == [150]  # undone
        refused = client.write_register(105, 0, device_id=1)  # mode off: refused but in effect at once
        assert refused.isError() and refused.exception_code == DEVICE_FAILURE
        wait_until(lambda: not rig.module.relays[LOAD], 2, "mode off reached the load relay")
        assert "will not survive a restart" in wait_log(rig, "mode off is in effect")
        for _ in range(3):
            assert client.write_register(103, 250, device_id=1).exception_code == DEVICE_FAILURE
        scrape = rig.metrics()
        assert metric(scrape, "smallbms_store_up") == 0 and metric(scrape, "smallbms_store_write_failures_total") >= 5
        assert metric(scrape, "smallbms_store_writes_refused_total") == 5
        starts = [line for line in log_lines(rig) if "store: cannot save" in line]
        assert len(starts) == 1 and starts[0].startswith("ERROR"), starts
        filler.unlink()
        assert not client.write_register(103, 250, device_id=1).isError()  # durable again: acknowledged
        assert wait_log(rig, "store: saving works again").startswith("ERROR")
        assert metric(rig.metrics(), "smallbms_store_up") == 1
        client.close()
        assert rig.stop() == 0
        with Store.open(rig.store) as store:
            saved = store.load_state()
        assert saved["mode_on"] is False and saved["settings"]["low_soc_warning_pct"] == 25.0
        assert saved["settings"]["discharge_floor_pct"] == 15.0


def test_a_read_only_store_refuses_writes_with_04_and_recovers(tmp_path):
    with ext4(tmp_path / "fs.img", tmp_path / "fs") as fs, ProcessRig(tmp_path, store_path=fs / "state.db") as rig:
        rig.start()
        rig.wait_ready()
        wait_until(lambda: rig.module.relays[LOAD], 20, "load on")
        client = rig.client(timeout=10)
        wal = Path(f"{rig.store}-wal")
        immutable(wal, True)  # as a card that went read-only: every write to the store fails
        try:
            refused = client.write_register(104, 170, device_id=1)
            assert refused.isError() and refused.exception_code == DEVICE_FAILURE
            assert client.read_holding_registers(104, count=1, device_id=1).registers == [100]
            assert wait_log(rig, "store: cannot save").startswith("ERROR")
        finally:
            immutable(wal, False)
        assert not client.write_register(104, 170, device_id=1).isError()
        wait_log(rig, "store: saving works again")
        client.close()
        assert rig.stop() == 0
        with Store.open(rig.store) as store:
            assert store.load_state()["settings"]["discharge_floor_pct"] == 17.0


def test_a_stop_whose_final_save_fails_switches_off_says_so_and_exits_non_zero(tmp_path):
    with tmpfs(tmp_path / "fs") as fs, ProcessRig(tmp_path, store_path=fs / "state.db") as rig:
        service = rig.start()
        rig.wait_ready()
        wait_until(lambda: rig.module.relays[LOAD], 20, "load on")
        fill(fs)
        service.send_signal(signal.SIGTERM)
        code = service.wait(timeout=30)
        assert code == 1, rig.stderr()
        assert not rig.module.relays[LOAD]  # outputs off first, whatever the store does
        last = log_lines(rig)[-1]
        assert last.startswith("ERROR") and "outputs off" in last and "final save failed" in last, last
        assert "state saved" not in last
        os.unlink(fs / "filler")
        rig.start()  # the event log tells the next start what happened: no clean stop is on record
        rig.wait_ready()
        assert rig.stop() == 0
        with Store.open(fs / "state.db") as store:
            stops = [(e["name"], e["value"]) for e in reversed(store.events(None))
                     if e["kind"] == "service" and e["name"] != "STARTED"]
        assert stops[-1] == ("STOPPED", "clean")
        assert stops[0] in (("STOPPED", "final save failed"), ("PREVIOUS_RUN", "no stop record")), stops
        assert ("STOPPED", "clean") not in stops[:-1]  # the failed stop is never logged as a clean one


def test_a_frozen_store_holds_the_write_but_never_the_bms(tmp_path):
    """A disk that stops answering: the write waits for its answer (it is applied, not yet durable), every other
    client is served, the relays keep following the BMS, and after 10 s the log says the store is stalled."""
    with ext4(tmp_path / "fs.img", tmp_path / "fs") as fs, \
            ProcessRig(tmp_path, store_path=fs / "state.db", metrics=True) as rig:
        rig.start()
        rig.wait_ready()
        wait_until(lambda: rig.module.relays[LOAD], 20, "load on")
        writer, reader = rig.client(timeout=60), rig.client(timeout=2)
        answers: list = []
        with frozen(fs):
            thread = threading.Thread(target=lambda: answers.append(writer.write_register(105, 0, device_id=1)))
            thread.start()
            wait_until(lambda: not rig.module.relays[LOAD], 2, "mode off in effect before it is durable")
            worst = 0.0
            deadline = time.monotonic() + 12.0
            while time.monotonic() < deadline:
                started = time.monotonic()
                assert reader.read_holding_registers(105, count=1, device_id=1).registers == [0]
                worst = max(worst, time.monotonic() - started)
                time.sleep(0.1)
            assert worst < 1.0, f"a read waited {worst:.2f} s while the store was frozen"
            assert not answers  # not durable yet: not answered
            assert wait_log(rig, "store: a save has waited").startswith("ERROR")
            assert metric(rig.metrics(), "smallbms_store_up") == 0
        thread.join(20)
        assert answers and not answers[0].isError()  # committed once the disk answered, then acknowledged
        assert wait_log(rig, "store: the disk answered again").startswith("ERROR")
        assert metric(rig.metrics(), "smallbms_store_up") == 1
        writer.close()
        reader.close()
        assert rig.stop() == 0
        with Store.open(rig.store) as store:
            assert store.load_state()["mode_on"] is False


def test_signals_during_start_up_never_leave_a_traceback_or_an_output_on(tmp_path):
    """From the moment `run` starts on its configuration (its store lock names it: the store, the DBC and the
    devices are being opened) until the service's own handlers take over: SIGHUP, SIGUSR1 and SIGUSR2 are
    ignored, SIGTERM ends it quietly with status 0 and nothing switched on. (Earlier, while the interpreter
    imports the package, nothing is open or on: a signal's default action is all there is.)"""
    lock = Path(f"{tmp_path / 'state.db'}.lock")
    with ProcessRig(tmp_path) as rig:
        for delay in (0.0, 0.1, 0.3):
            service = rig.start()
            holder = f"pid {service.pid},"
            wait_until(lambda: lock.exists() and holder in lock.read_text(), 30, "run holds the store")  # noqa: B023
            time.sleep(delay)
            for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
                service.send_signal(sig)
            time.sleep(0.05)
            service.send_signal(signal.SIGTERM)
            assert service.wait(timeout=30) == 0, rig.stderr()
            assert "Traceback" not in rig.stderr() and not rig.module.relays[LOAD]
            assert log_lines(rig)[-1].endswith(("stopped: outputs off, state saved", "no output was switched on"))
        service = rig.start()
        wait_until(lambda: f"pid {service.pid}," in lock.read_text(), 30, "run holds the store")
        for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
            service.send_signal(sig)
        rig.wait_ready()  # the stray signals did not stop the start
        wait_until(lambda: rig.module.relays[LOAD], 20, "load on")
        assert rig.stop() == 0
