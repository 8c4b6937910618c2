"""A non-editable install carries the DBC and works from any directory (no checkout on the path)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import smallbms_bus

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import smallbms_bus, sys
from smallbms_bus.link.codec import FrameDecoder, default_dbc_path
path = default_dbc_path()
assert str(path).startswith(sys.argv[1]), (smallbms_bus.__file__, path)
assert len(FrameDecoder().db.messages) == 401
print("ok", path)
"""


def test_non_editable_install_ships_the_dbc_and_the_register_maps(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile",
                    "--target", str(target), str(REPO)], check=True, timeout=240,
                   capture_output=True)
    assert (target / "smallbms_bus" / "dbc" / "lithium_ng.dbc").is_file()
    for page in ("index.html", "app.js", "style.css"):  # the commissioning page is package data (no build step)
        assert (target / "smallbms_bus" / "web" / "static" / page).is_file(), page
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run([sys.executable, "-c", PROBE, str(target)], cwd=elsewhere, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")
    cli = subprocess.run([sys.executable, "-m", "smallbms_bus.cli", "--version"], cwd=elsewhere, env=env,
                         capture_output=True, text=True, timeout=60)
    assert cli.stdout.strip() == f"smallbms-bus {smallbms_bus.__version__}"
    regmap = subprocess.run([sys.executable, "-m", "smallbms_bus.cli", "regmap", "--map", "gx"], cwd=elsewhere,
                            env=env, capture_output=True, text=True, timeout=60)
    assert regmap.returncode == 0, regmap.stderr
    assert "gx,modbus.gx_unit,gx_1282,1322,1323,mode,uint16" in regmap.stdout
