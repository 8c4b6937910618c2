"""deploy/: the systemd units verify, and the service unit runs what the CLI offers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_units_verify(tmp_path):
    script = Path(sys.executable).with_name("smallbms-bus")
    assert script.exists(), "the package's console script must be installed"
    units = []
    for unit in (DEPLOY / "systemd" / "smallbms-bus.service", DEPLOY / "can" / "can0-up.service"):
        target = tmp_path / unit.name
        target.write_text(unit.read_text().replace("/usr/local/bin/smallbms-bus", str(script)))
        units.append(str(target))
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", *units], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_service_unit_runs_the_cli_with_the_example_config():
    unit = (DEPLOY / "systemd" / "smallbms-bus.service").read_text()
    assert "ExecStart=/usr/local/bin/smallbms-bus run --config /etc/smallbms-bus/smallbms-bus.toml" in unit
    assert "ExecStartPre=/usr/local/bin/smallbms-bus check-config /etc/smallbms-bus/smallbms-bus.toml" in unit
    assert "Type=notify" in unit and "WatchdogSec=" in unit and "StateDirectory=smallbms-bus" in unit
    assert "RestartPreventExitStatus=2" in unit  # a bad config is not retried in a loop
    result = subprocess.run([sys.executable, "-m", "smallbms_bus.cli", "check-config",
                             str(DEPLOY / "smallbms-bus.toml")], capture_output=True, text=True, timeout=60)
    if example_store_is_creatable():
        assert result.returncode == 0, result.stderr
    else:  # systemd creates /var/lib/smallbms-bus (StateDirectory) for the service's user; this user cannot
        assert result.returncode == 2 and "store.path" in result.stderr, result.stderr


def example_store_is_creatable() -> bool:
    """Can this user create the example's store, /var/lib/smallbms-bus/state.db (check-config checks that)?"""
    path = Path("/var/lib/smallbms-bus/state.db")
    existing = next(p for p in (path, *path.parents) if p.exists())
    return os.access(existing if existing != path else path.parent, os.W_OK | os.X_OK)
