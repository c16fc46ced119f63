"""Lifecycle events keep the JSON shape `/events` readers (the dashboard, scripts) have always parsed."""

from __future__ import annotations

import json
from typing import Any

import pytest

from llama_router.core.events import (
    Event,
    Failed,
    FallbackServed,
    FootprintLearned,
    Loading,
    Ready,
    Reloaded,
    ReloadFailed,
    Stopped,
    Stopping,
    Unhealthy,
    context_event,
)
from llama_router.core.scheduler import StopCause


@pytest.mark.parametrize(
    ("event", "wire"),
    [
        (Loading("m"), {"event": "loading", "model": "m"}),
        (Ready("m", 0.25, 8080), {"event": "ready", "model": "m", "load_seconds": 0.25, "port": 8080}),
        (
            Stopping("m", "making room for 'b'", StopCause.SWAP),
            {"event": "stopping", "model": "m", "reason": "making room for 'b'", "cause": "swap"},
        ),
        (Stopped("m"), {"event": "stopped", "model": "m"}),
        (Failed("m", "exit 1"), {"event": "failed", "model": "m", "reason": "exit 1"}),
        (Unhealthy("m", "stalled"), {"event": "unhealthy", "model": "m", "reason": "stalled"}),
        (FallbackServed("m", "small"), {"event": "fallback", "model": "m", "served_by": "small"}),
        (FootprintLearned("m", {"gpu0": 5}), {"event": "footprint", "model": "m", "bytes": {"gpu0": 5}}),
        (
            Reloaded(["a"], [], ["b"], ["c"]),
            {"event": "reloaded", "kept": ["a"], "restarted": [], "added": ["b"], "removed": ["c"]},
        ),
        (
            ReloadFailed("SIGHUP", "invalid YAML"),
            {"event": "config_error", "trigger": "SIGHUP", "message": "invalid YAML"},
        ),
    ],
)
def test_each_event_reaches_the_wire_with_its_kind_time_and_fields(
    event: Event, wire: dict[str, Any]
) -> None:
    sent = json.loads(json.dumps(event.json()))
    assert isinstance(sent.pop("time"), float)
    assert sent == wire


def test_prompt_cache_results_become_their_event_by_action_and_outcome() -> None:
    figures = {"slots": 2, "tokens": 300, "bytes": 4096, "ms": 12.5}
    saved = context_event("m", "save", figures)
    failed = context_event("m", "restore", {**figures, "error": "slot 1: 500", "failed_slots": 1})
    assert (saved.kind, saved.action, saved.ok) == ("context_saved", "save", True)
    assert (failed.kind, failed.action, failed.ok) == ("context_restore_failed", "restore", False)
    assert {key: value for key, value in failed.json().items() if key != "time"} == {
        "event": "context_restore_failed",
        "model": "m",
        **figures,
        "error": "slot 1: 500",
        "failed_slots": 1,
    }
