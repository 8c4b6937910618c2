"""The command line never answers with a traceback: bad arguments exit 2 naming them (issue 12, item 9)."""

from __future__ import annotations

import subprocess
import sys

import pytest

CMD = [sys.executable, "-m", "smallbms_bus.cli"]


def test_regmap_into_a_reader_that_hangs_up_is_quiet():
    """`smallbms-bus regmap | head -c 0`: the reader is gone before the map is written (was a BrokenPipeError)."""
    process = subprocess.Popen([*CMD, "regmap", "--format", "md"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # what `head` does once it has enough
    err = process.stderr.read().decode()
    assert process.wait(timeout=60) in (0, 1)
    assert "Traceback" not in err and "Error" not in err, err


@pytest.mark.parametrize(("args", "named"), [
    (["regmap", "--batteries", "0"], "--batteries"),
    (["regmap", "--batteries", "51"], "--batteries"),
    (["regmap", "--format", "md", "--batteries", "0"], "--batteries"),
    (["regmap", "--batteries", "x"], "--batteries"),
    (["regmap", "--map", "modbus"], "--map"),
    (["regmap", "--format", "xml"], "--format"),
    (["bogus"], "bogus"),
    (["check-config"], "file"),
    (["run"], "--config"),
    (["--log-level", "loud", "regmap"], "--log-level"),
])
def test_bad_arguments_exit_2_naming_them(args, named):
    result = subprocess.run([*CMD, *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert named in result.stderr.strip().splitlines()[-1], result.stderr


def test_help_lists_every_command_and_each_command_has_its_own_help():
    listing = subprocess.run([*CMD, "--help"], capture_output=True, text=True, timeout=60, check=True).stdout
    commands = ("demo", "simulate", "regmap", "status", "check-config", "run", "settings", "set", "mode", "command",
                "set-soc", "history", "events", "completion")
    assert all(command in listing for command in commands)
    for command in commands:
        own = subprocess.run([*CMD, command, "--help"], capture_output=True, text=True, timeout=60, check=True)
        assert own.stdout.startswith(f"usage: smallbms-bus {command}"), own.stdout
