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
