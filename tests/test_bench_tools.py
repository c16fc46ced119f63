"""The benchmarks' own stand-ins behave as the router expects of a llama-server where it matters to
the figures (scripts/benchmarks/)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

FAST_UPSTREAM = Path(__file__).resolve().parents[1] / "scripts" / "benchmarks" / "fast_upstream.py"


def test_the_fast_stand_in_answers_help_at_once_as_llama_server_does() -> None:
    """The router runs `<binary> [args] --help` the first time it starts a binary; a stand-in that
    started serving instead would hold every first start for the router's 10 s limit, and every
    cold-start and thrash figure with it."""
    done = subprocess.run(
        [sys.executable, str(FAST_UPSTREAM), "--load-delay", "0.5", "--chunks", "4", "--help"],
        capture_output=True,
        text=True,
        timeout=5,
        check=False,
    )
    assert done.returncode == 0 and "stand-in" in done.stdout
    assert ".sock" not in done.stdout, "it listens on TCP only: it must not claim Unix sockets"
