"""The configuration reference is generated from the schema; a stale one fails here."""

from __future__ import annotations

import subprocess
import sys

from .conftest import ROOT


def test_configuration_reference_matches_the_schema() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/config_reference.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_readme_tables_match_the_code() -> None:
    """The access table and the flags a model added over HTTP may carry are written from the code."""
    result = subprocess.run(
        [sys.executable, "scripts/readme_tables.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
