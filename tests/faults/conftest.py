"""The fault campaign (issue 7): short in CI, long with SMALLBMS_FAULTS=long (tests/faults/run-long).

Every test records its figures (trials, worst cases, counts) with the `figures` fixture; the session prints
them at the end and, when SMALLBMS_FAULTS_REPORT names a file, writes them there as JSON for the benchmark
report and the README's "Reliability" section.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.faults.campaign import CAMPAIGN

_FIGURES: dict[str, dict[str, Any]] = {}


@pytest.fixture
def campaign():
    return CAMPAIGN


@pytest.fixture
def figures(request) -> Callable[..., None]:
    """`figures(**values)` records this test's figures under its name (later calls update them)."""
    name = request.node.name

    def record(**values: Any) -> None:
        _FIGURES.setdefault(name, {}).update(values)

    return record


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if not _FIGURES:
        return
    terminalreporter.section(f"fault campaign figures ({CAMPAIGN.name})")
    for name, values in _FIGURES.items():
        terminalreporter.write_line(f"{name}: " + ", ".join(f"{k}={v}" for k, v in values.items()))
    target = os.environ.get("SMALLBMS_FAULTS_REPORT")
    if target:
        report = {"campaign": CAMPAIGN.name, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "machine": f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}",
                  "exit_status": int(exitstatus), "tests": _FIGURES}
        Path(target).write_text(json.dumps(report, indent=2) + "\n")
        terminalreporter.write_line(f"figures written to {target}")
