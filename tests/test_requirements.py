"""docs/requirements.md traces every rule id of docs/behaviour.md to tests that exist; docs/behaviour.md has every id
of the team's specification when that is beside the checkout (a user's clone has only docs/)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "docs" / "behaviour.md"
SPEC = REPO.parent / "shared" / "spec" / "BEHAVIOUR.md"  # the team's specification, outside the repository
TABLE = REPO / "docs" / "requirements.md"
ID = re.compile(r"\b(?:OUT|ATC|ATD|PRE|REM|COM|BANK|MON|SET|BAL|FW|LED|CHG)-\d+\b")
TEST_REF = re.compile(r"`([\w/]+\.py)::(test_\w+)`")


def rows() -> dict[str, str]:
    out = {}
    for line in TABLE.read_text().splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) > 3 and cells[1] and not cells[1].startswith(("id", "---")):
            out[cells[1]] = cells[3]
    return out


def test_every_behaviour_id_has_a_row_with_tests():
    ids = sorted(set(ID.findall(RULES.read_text())))
    assert len(ids) >= 40
    table = rows()
    missing = [i for i in ids if i not in table]
    assert not missing, f"ids without a row in docs/requirements.md: {missing}"
    empty = [i for i in ids if not TEST_REF.search(table[i])]
    assert not empty, f"ids without a test: {empty}"


def test_every_named_test_exists():
    defined: dict[str, set[str]] = {}
    refs = [m for cell in rows().values() for m in TEST_REF.findall(cell)]
    assert len(refs) > 80
    for path, name in refs:
        if path not in defined:
            tree = ast.parse((REPO / "tests" / path).read_text())
            defined[path] = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        assert name in defined[path], f"docs/requirements.md names {path}::{name}, which does not exist"


@pytest.mark.skipif(not SPEC.exists(), reason=f"{SPEC} is not beside this checkout (a clone has only docs/)")
def test_docs_behaviour_md_has_every_rule_of_the_specification():
    assert set(ID.findall(SPEC.read_text())) <= set(ID.findall(RULES.read_text()))
