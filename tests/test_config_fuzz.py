"""Fuzz: malformed configurations through `smallbms-bus check-config` and `smallbms-bus run`, real processes.

For every case (tests/config_cases.py: a wrong value for every key of SCHEMA, every option of every
relay backend, broken files, binary garbage, and what only the machine can tell: store paths, DBC
and TLS files, bus interface names, channels the board does not have), both commands must exit 2
with one line naming the key, never a traceback, with the same words (one validation, run before
anything is opened), and `run` must have created nothing: the store is the first thing it opens.
Configurations that are good must pass check-config, and run must start on them (then SIGTERM).
Every case goes through that one validation in-process too; the wrong value for every schema key (~280 cases)
and every relay-board option (~90) run as processes for one case in twelve plus the first of each section, every
other case of this file as processes.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from importlib.util import find_spec
from pathlib import Path

import pytest

from smallbms_bus.config import ConfigError
from smallbms_bus.preflight import load
from tests.config_cases import Case, base, option_cases, render, schema_cases, structure_cases, with_

CMD = [sys.executable, "-m", "smallbms_bus.cli"]
WORKERS = 4  # processes at a time: they mostly wait for the interpreter to start; the machine has 2 cores
DBC = Path(__file__).resolve().parents[1] / "dbc" / "lithium_ng.dbc"
EXAMPLE = Path(__file__).resolve().parents[1] / "deploy" / "smallbms-bus.toml"


def _listing(d: Path) -> set[str]:
    """Everything under d but the case files (written there while other cases run)."""
    return {str(p.relative_to(d)) for p in d.rglob("*") if p.parent.name != "cases"}


def _refusal(case: Case, d: Path, n: int) -> str | None:
    """Run both commands on the case; None when both refused it as they must, else what went wrong."""
    path = d / "cases" / f"{n}.toml"
    path.write_bytes(case.content)
    before = _listing(d)
    lines = []
    for command in (["check-config"], ["run", "--config"]):
        try:
            result = subprocess.run([*CMD, *command, str(path)], capture_output=True, text=True, timeout=120,
                                    errors="replace")
        except subprocess.TimeoutExpired:
            return f"{case.name}: {command[0]} did not exit within 120 s (accepted the config?)"
        stderr = result.stderr.strip()
        if "Traceback" in stderr or result.returncode != 2 or len(stderr.splitlines()) != 1:
            return f"{case.name}: {command[0]} exit {result.returncode}: {stderr[-600:]}"
        if case.key not in stderr:
            return f"{case.name}: {command[0]} does not name {case.key}: {stderr}"
        lines.append(stderr.removeprefix(f"{command[0]}: "))
    if lines[0] != lines[1]:
        return f"{case.name}: check-config and run disagree:\n  {lines[0]}\n  {lines[1]}"
    created = _listing(d) - before
    if created:
        return f"{case.name}: run created {sorted(created)} before refusing"
    return None


def _refused_in_process(case: Case, d: Path, n: int) -> str | None:
    """The validation both commands run first (preflight.load), called here: it must raise ConfigError with one
    line naming the key, having created nothing; None when it did."""
    path = d / "cases" / f"{n}.toml"
    path.write_bytes(case.content)
    before = _listing(d)
    try:
        load(path)
    except ConfigError as error:
        text = str(error)
        if "\n" in text or case.key not in text:
            return f"{case.name}: does not name {case.key} in one line: {text!r}"
    except Exception as error:  # what would be a traceback from the command
        return f"{case.name}: {type(error).__name__}: {error}"
    else:
        return f"{case.name}: accepted"
    created = _listing(d) - before
    return f"{case.name}: the validation created {sorted(created)}" if created else None


def _all_refused(cases: list[Case], d: Path, *, every: int = 1) -> None:
    """Every case through the validation in-process, and every `every`th case plus the first naming each section
    through both commands as processes (all of them when `every` is 1)."""
    (d / "cases").mkdir(mode=0o755, exist_ok=True)
    for case in cases:
        if case.setup is not None:
            case.setup(d)
    failures = [f for n, case in enumerate(cases) if (f := _refused_in_process(case, d, n)) is not None]
    assert not failures, f"{len(failures)} of {len(cases)} cases (in-process):\n" + "\n".join(failures)
    first_of_section: dict[str, int] = {}
    for n, case in enumerate(cases):
        first_of_section.setdefault(case.key.split(".")[0], n)
    chosen = [n for n in range(len(cases)) if n % every == 0 or n in first_of_section.values()]
    with ThreadPoolExecutor(WORKERS) as pool:
        failures = [f for f in pool.map(lambda n: _refusal(cases[n], d, n), chosen) if f is not None]
    assert not failures, f"{len(failures)} of {len(chosen)} cases (processes):\n" + "\n".join(failures)


# The schema's and the relay options' cases (~280 and ~90) go through the validation in-process (a few ms each) and
# a sample through both commands: as processes, all of them took ~100 s of the suite on a loaded machine. The rest
# (broken files, what only the machine can tell, the store) run every case as processes.
SAMPLE_EVERY = 12


def test_a_wrong_value_for_any_key_is_refused_alike_naming_the_key(tmp_path):
    cases = schema_cases(tmp_path)
    assert len(cases) > 150
    _all_refused(cases, tmp_path, every=SAMPLE_EVERY)


def test_broken_files_and_garbage_are_refused_alike_naming_the_file_or_key(tmp_path):
    _all_refused(structure_cases(tmp_path), tmp_path)


def test_relay_board_options_of_every_backend_are_checked_alike_naming_the_option(tmp_path):
    cases = option_cases(tmp_path)
    assert {c.key for c in cases} >= {"outputs.options.port", "outputs.options.stuck", "outputs.options.lines",
                                      "outputs.options.timeout", "outputs.options.transport"}
    _all_refused(cases, tmp_path, every=SAMPLE_EVERY)


def _openssl(d: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)


def machine_cases(d: Path) -> list[Case]:
    """What only the file system and the installed libraries can tell: run used to refuse some of these with
    a traceback and check-config to accept them."""
    (d / "dir").mkdir()
    (d / "file").write_text("x")
    (d / "loop").symlink_to(d / "loop")
    os.mkfifo(d / "fifo")
    (d / "garbage.dbc").write_bytes(b"\x00\xffnot a dbc\n" * 10)
    (d / "empty.dbc").write_bytes(b"")
    (d / "latin1.dbc").write_bytes(DBC.read_bytes().replace(b"BATTERY_01", "BATTERÏ_01".encode("latin-1")))
    (d / "no-bms-state.dbc").write_bytes(DBC.read_bytes().replace(b"BMS_STATE", b"BMS_STATX"))

    def store(path: Path | str) -> bytes:
        return with_(d, store={"path": str(path)})

    def dbc(path: Path) -> bytes:
        return with_(d, bus={"dbc": str(path)})

    def outputs(backend: str, options: dict, **more: dict) -> bytes:
        sections = base(d)
        sections["outputs"] = {"backend": backend}
        sections["outputs.options"] = options
        for name, table in more.items():
            sections.setdefault(name, {}).update(table)
        return render(sections)

    cases = [
        Case("store path is a directory", store(d / "dir"), "store.path"),
        Case("store path's parent is a file", store(d / "file" / "state.db"), "store.path"),
        Case("store path deep under a file", store(d / "file" / "a" / "b" / "state.db"), "store.path"),
        Case("store path is a device", store("/dev/null"), "store.path"),
        Case("store path is a FIFO", store(d / "fifo"), "store.path"),
        Case("store path through a symlink loop", store(d / "loop" / "state.db"), "store.path"),
        Case("store path is the root", store("/"), "store.path"),
        Case("dbc missing", dbc(d / "missing.dbc"), "bus.dbc"),
        Case("dbc is a directory", dbc(d / "dir"), "bus.dbc"),
        Case("dbc is a device", dbc(Path("/dev/null")), "bus.dbc"),
        Case("dbc garbage", dbc(d / "garbage.dbc"), "bus.dbc"),
        Case("dbc empty", dbc(d / "empty.dbc"), "bus.dbc"),
        Case("dbc not UTF-8", dbc(d / "latin1.dbc"), "bus.dbc"),
        Case("dbc without BMS_STATE", dbc(d / "no-bms-state.dbc"), "bus.dbc"),
        Case("bus interface python-can lacks", with_(d, bus={"interface": "socketcn"}), "bus.interface"),
        Case("slcan bit rate no adapter sets", with_(d, bus={"interface": "slcan", "channel": "/dev/ttyACM0",
                                                             "bitrate": 400_000}), "bus.bitrate"),
        Case("socketcan channel is a serial port", with_(d, bus={"interface": "socketcan",
                                                                 "channel": "/dev/ttyACM0"}), "bus.channel"),
        Case("socketcan channel of 16 characters", with_(d, bus={"interface": "socketcan",
                                                                 "channel": "can0123456789abc"}), "bus.channel"),
        Case("socketcan channel with a space", with_(d, bus={"interface": "socketcan", "channel": "can 0"}),
             "bus.channel"),
        Case("charge channel beyond an LCUS-1", outputs("lcus", {"port": "/dev/ttyUSB0"}), "outputs.charge_disconnect"),
        Case("pre-alarm beyond a 2-channel board", outputs("memory", {"channels": 2}), "outputs.pre_alarm"),
        Case("status LED beyond the board", outputs("memory", {}, outputs={"status_led": 9}), "outputs.status_led"),
        Case("remote on a board without inputs", outputs("modbus", {"transport": "tcp", "host": "127.0.0.1",
                                                                    "inputs": 0},
                                                         remote={"source": "board", "channel": 1}), "remote.source"),
        Case("remote input beyond the board's", outputs("memory", {"inputs": 4},
                                                        remote={"source": "board", "channel": 5}), "remote.channel"),
        Case("remote on an LCUS board", outputs("lcus", {"port": "/dev/ttyUSB0", "channels": 4},
                                                remote={"source": "board", "channel": 1}), "remote.source"),
        Case("remote gpio line the outputs use", outputs("gpiod", {"lines": [17, 27, 22]},
                                                         remote={"source": "gpio", "line": 27}), "remote.line"),
        Case("TLS certificate missing", with_(d, modbus={"tls_cert": str(d / "no.pem"), "tls_key": str(d / "no.key")}),
             "modbus.tls_cert"),
        Case("TLS certificate is a directory", with_(d, modbus={"tls_cert": str(d / "dir"),
                                                                "tls_key": str(d / "dir")}), "modbus.tls_cert"),
    ]
    if find_spec("gpiod") is None:
        cases += [
            Case("gpiod backend without the gpiod module", outputs("gpiod", {"lines": [17, 27, 22]}),
                 "outputs.backend"),
            Case("gpio remote without the gpiod module", with_(d, remote={"source": "gpio", "line": 17}),
                 "remote.source"),
        ]
    if shutil.which("openssl"):
        _openssl(d, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "a.key", "-out", "a.pem", "-days",
                 "2", "-subj", "/CN=a")
        _openssl(d, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "b.key", "-out", "b.pem", "-days",
                 "2", "-subj", "/CN=b")
        _openssl(d, "genrsa", "-aes128", "-passout", "pass:secret", "-out", "encrypted.key", "2048")

        def tls(cert: str, key: str, ca: str | None = None) -> bytes:
            modbus = {"tls_cert": str(d / cert), "tls_key": str(d / key), "tls_port": 1}
            return with_(d, modbus=modbus | ({"tls_client_ca": str(d / ca)} if ca else {}))

        cases += [
            Case("TLS key missing", tls("a.pem", "missing.key"), "modbus.tls_key"),
            Case("TLS certificate is a key", tls("a.key", "a.key"), "modbus.tls_cert"),
            Case("TLS certificate is garbage", tls("garbage.dbc", "a.key"), "modbus.tls_cert"),
            Case("TLS key of another certificate", tls("a.pem", "b.key"), "modbus.tls_key"),
            Case("TLS key is a certificate", tls("a.pem", "b.pem"), "modbus.tls_key"),
            Case("TLS key encrypted", tls("a.pem", "encrypted.key"), "modbus.tls_key"),
            Case("TLS client CA is a key", tls("a.pem", "a.key", "b.key"), "modbus.tls_client_ca"),
            Case("TLS client CA missing", tls("a.pem", "a.key", "missing.pem"), "modbus.tls_client_ca"),
        ]
    return cases


def test_what_only_the_machine_can_tell_is_refused_alike_before_anything_is_opened(tmp_path):
    cases = machine_cases(tmp_path)
    assert len(cases) >= 28
    _all_refused(cases, tmp_path)


@pytest.fixture
def unwritable(tmp_path: Path) -> Iterator[Path]:
    """A directory holding `state.db` and `dir/` that this user cannot write: a read-only tmpfs as root (root
    writes through any permission bits, not through a read-only mount), permission bits otherwise."""
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() != 0:
        (d / "state.db").write_bytes(b"")
        (d / "dir").mkdir()
        (d / "state.db").chmod(0o444)
        for directory in (d / "dir", d):
            directory.chmod(0o555)
        yield d
        for directory in (d, d / "dir"):
            directory.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        (d / "state.db").write_bytes(b"")
        (d / "dir").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(d)], check=True, capture_output=True)
        yield d
    finally:
        subprocess.run(["umount", str(d)], capture_output=True)


def test_a_store_this_user_cannot_write_is_refused_alike(tmp_path, unwritable):
    cases = [Case("store file not writable", with_(tmp_path, store={"path": str(unwritable / "state.db")}),
                  "store.path"),
             Case("store directory not writable", with_(tmp_path, store={"path": str(unwritable / "new.db")}),
                  "store.path"),
             Case("store parent to be created where nothing can be",
                  with_(tmp_path, store={"path": str(unwritable / "dir" / "sub" / "state.db")}), "store.path")]
    _all_refused(cases, tmp_path)


# -- and what is good passes both -------------------------------------------------------------------------------

def _accepted(content: bytes, d: Path) -> str | None:
    """None when check-config says ok and run starts (logs "running:") and stops cleanly on SIGTERM."""
    d.mkdir()
    path = d / "good.toml"
    path.write_bytes(content)
    check = subprocess.run([*CMD, "check-config", str(path)], capture_output=True, text=True, timeout=120)
    if check.returncode != 0 or not check.stdout.strip().endswith(": ok"):
        return f"check-config refused it: exit {check.returncode}: {check.stderr.strip()}"
    process = subprocess.Popen([*CMD, "run", "--config", str(path)], stderr=subprocess.PIPE, text=True)
    log: list[str] = []
    running = threading.Event()

    def read() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            log.append(line)
            if "running:" in line:
                running.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        started = running.wait(90)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    reader.join(10)
    text = "".join(log)
    if not started or process.returncode != 0 or "Traceback" in text:
        return f"run did not start and stop cleanly: exit {process.returncode}: {text[-1500:]}"
    return None


def good_cases(d: Path) -> dict[str, bytes]:
    example = EXAMPLE.read_text()
    for old, new in (('interface = "socketcan"', 'interface = "virtual"'), ('channel = "can0"', 'channel = "ex"'),
                     ("port = 502 ", "port = 0 "), ("port = 9108 ", "port = 0 "),
                     ('path = "/var/lib/smallbms-bus/state.db"', f'path = "{d}/example/state.db"')):
        assert old in example, old
        example = example.replace(old, new)
    return {
        "the base": with_(d, store={"path": str(d / "a.db")}),
        "with a UTF-8 byte-order mark": b"\xef\xbb\xbf" + with_(d, store={"path": str(d / "b.db")}),
        "the annotated example (every key)": example.encode(),
        "a store in a directory run creates": with_(d, store={"path": str(d / "new" / "sub" / "c.db")}),
        "the shipped DBC named": with_(d, store={"path": str(d / "d.db")}, bus={"dbc": str(DBC)}),
        # devices that are not there: faults run reports and retries, not configuration errors
        "an LCUS board not plugged in": with_(d, store={"path": str(d / "e.db")}, outputs={"backend": "lcus"})
        .replace(b'"backend" = "lcus"', b'"backend" = "lcus"\n[outputs.options]\nport = "/nonexistent/ttyUSB9"\n'
                                        b"channels = 4"),
        "an SLCAN adapter not plugged in": with_(d, store={"path": str(d / "f.db")},
                                                 bus={"interface": "slcan", "channel": "/nonexistent/ttyACM9"}),
        "a CAN interface not up": with_(d, store={"path": str(d / "g.db")},
                                        bus={"interface": "socketcan", "channel": "can9"}),
    }


def test_good_configs_pass_check_config_and_run_starts_on_them(tmp_path):
    cases = good_cases(tmp_path)
    with ThreadPoolExecutor(WORKERS) as pool:
        results = dict(zip(cases, pool.map(lambda n, c: _accepted(c, tmp_path / f"run-{n}"),
                                           range(len(cases)), cases.values()), strict=True))
    failures = [f"{name}: {why}" for name, why in results.items() if why is not None]
    assert not failures, "\n".join(failures)
