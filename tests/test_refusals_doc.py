"""docs/refusals.md is checked against the tests: every row names a test that exists and that asserts on the
quoted part of the message."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\| (?P<mistake>.+?) \| `(?P<says>.+)` \| `(?P<test>tests/[\w/]+\.py::\w+)` \|$")


def _rows() -> list[dict[str, str]]:
    lines = (ROOT / "docs" / "refusals.md").read_text().splitlines()
    table = [line for line in lines if line.startswith("| ") and not line.startswith("| mistake")]
    rows = [m.groupdict() for line in table if (m := ROW.match(line))]
    assert len(rows) == len(table), "a row of docs/refusals.md does not read `| mistake | `says` | `test` |`"
    return rows


def _source_of(test: str) -> str:
    path, name = test.split("::")
    tree = ast.parse((ROOT / path).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return ast.get_source_segment((ROOT / path).read_text(), node) or ""
    raise AssertionError(f"{test}: no such test")


def test_every_row_is_a_test_that_checks_its_message():
    rows = _rows()
    assert len(rows) >= 20
    for row in rows:
        source = _source_of(row["test"])
        says = row["says"].replace("``", "`")
        assert says in source or says.replace("'", '"') in source, f"{row['test']} does not check {says!r}"
