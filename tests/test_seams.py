"""Issue 14: one owner per fact and neutral seams, checked on the real modules (not on text)."""

from __future__ import annotations

import subprocess
import sys


def _modules_after_import(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return set(out.split())


def test_the_outputs_do_not_import_the_can_link_for_their_backoff():
    loaded = _modules_after_import("smallbms_bus.outputs.controller")
    assert "smallbms_bus.backoff" in loaded
    assert not {m for m in loaded if m.startswith("smallbms_bus.link")}, "outputs/ pulls in the CAN link"
