"""llama-server's router-child protocol, read from the child's side: how far its load has come.

llama.cpp's own router (`tools/server/server-models.cpp`) starts each model's llama-server with the
environment variable `LLAMA_SERVER_ROUTER_PORT` set. Such a child keeps its real stdout for one-line
state reports and sends its log to stderr; the router here reads both from one pipe, so the reports
arrive among the log lines, each whole:

    cmd_child_to_router:state:{"state":"loading","payload":{"stages":["text_model"],
                                "current":"text_model","value":0.42}}
    cmd_child_to_router:state:{"state":"ready","payload":{<its /v1/models entry>}}

`loading` comes at 0, at most every 200 ms while tensors are read, and at 1 for each stage (the text
model, then a speculative and a multimodal one where there are). Once loaded, the child reads its
stdin: it exits at once (code 1) when that closes, so the router keeps it open for the child's life,
and shuts down on `cmd_router_to_child:exit`, which a stop sends with its SIGTERM.

A binary has the protocol where its `--help` shows router mode (`--models-max`). A report this
module does not understand (a newer protocol, a damaged line) turns the reports off for that process:
its load goes on as for a binary without them, and the line stays in its log like any other.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

ROUTER_PORT_ENV = "LLAMA_SERVER_ROUTER_PORT"
STATE_PREFIX = "cmd_child_to_router:state:"
# What the router writes on a child's stdin to have it shut down (as a SIGTERM would); a child that
# is sent only a signal waits for its stdin to close after shutting down, and then exits with code 1.
EXIT_COMMAND = b"cmd_router_to_child:exit\n"
# What `--help` shows in builds that have router mode, and with it the child protocol.
HELP_MARK = b"--models-max"


class NotUnderstood(ValueError):
    """A state report in a shape this router does not know."""


@dataclass(frozen=True)
class ChildState:
    """One state report: `state` (loading, ready, sleeping, downloading) and its payload."""

    state: str
    payload: dict[str, Any]


@dataclass(frozen=True)
class LoadProgress:
    """How far a load has come, as the child reported it (`payload`, passed on unchanged)."""

    payload: dict[str, Any]
    fraction: float  # 0..1 over all its stages

    @property
    def percent(self) -> int:
        return math.floor(self.fraction * 100)


def has_child_protocol(help_output: bytes) -> bool:
    return HELP_MARK in help_output


def parse_state(line: str) -> ChildState | None:
    """The report a line carries (None: an ordinary log line); NotUnderstood if it is one in an
    unknown shape."""
    if not line.startswith(STATE_PREFIX):
        return None
    try:
        data = json.loads(line[len(STATE_PREFIX) :])
    except ValueError as exc:
        raise NotUnderstood(f"not JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("state"), str):
        raise NotUnderstood("no 'state'")
    payload = data.get("payload", {})
    if payload is None:
        payload = {}
    if not isinstance(payload, dict):
        raise NotUnderstood("'payload' is not an object")
    return ChildState(data["state"], payload)


def load_progress(payload: dict[str, Any]) -> LoadProgress | None:
    """The progress a `loading` report carries: None for one without a fraction (the start of the
    multimodal stage says only its name); NotUnderstood for a fraction in an unknown shape."""
    if "value" not in payload:
        return None
    value, stages, current = payload["value"], payload.get("stages"), payload.get("current")
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise NotUnderstood(f"'value' {value!r} is not a fraction")
    if not isinstance(stages, list) or not stages or current not in stages:
        raise NotUnderstood("'current' is not one of 'stages'")
    fraction = (stages.index(current) + float(value)) / len(stages)
    return LoadProgress(payload, fraction)
