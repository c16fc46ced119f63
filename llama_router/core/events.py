"""Lifecycle events: what the controller tells `/events` readers, the metrics and the tests.

One frozen dataclass per kind, so readers match on types and fields rather than parse strings back;
`json()` gives the shape `/events` has always sent: `{"event": kind, "time": ..., <fields>}`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from llama_router.core.scheduler import StopCause

log = logging.getLogger("llama_router")

EventListener = Callable[["Event"], None]


@dataclass(frozen=True)
class Event:
    """A lifecycle event; `kind` is its name on `/events`, `time` the wall clock when it happened."""

    kind: ClassVar[str]
    time: float = field(default_factory=time.time, kw_only=True)

    def json(self) -> dict[str, Any]:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "time"}
        return {"event": self.kind, "time": self.time, **fields}


# ---------------------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class Loading(Event):
    """A model's process was spawned."""

    kind: ClassVar[str] = "loading"
    model: str
    placement: dict[str, object] | None = None  # where the router placed it and why

    def json(self) -> dict[str, Any]:
        """Sent with `placement` only where the router placed the model."""
        data = super().json()
        if self.placement is None:
            del data["placement"]
        return data


@dataclass(frozen=True)
class LoadingProgress(Event):
    """How far a model's load has come, as its llama-server reported it (router child protocol):
    `progress` is its report (`stages`, `current`, `value`), `percent` over all stages."""

    kind: ClassVar[str] = "loading_progress"
    model: str
    progress: dict[str, Any]
    percent: int


@dataclass(frozen=True)
class Ready(Event):
    """A model answers `/health` and takes requests."""

    kind: ClassVar[str] = "ready"
    model: str
    load_seconds: float
    port: int | None


@dataclass(frozen=True)
class Stopping(Event):
    """A model is being stopped; `reason` is for people, `cause` for counting."""

    kind: ClassVar[str] = "stopping"
    model: str
    reason: str
    cause: StopCause


@dataclass(frozen=True)
class Stopped(Event):
    """A model's process exited after it was asked to stop."""

    kind: ClassVar[str] = "stopped"
    model: str


@dataclass(frozen=True)
class Failed(Event):
    """A model's process could not start, or exited without being asked to (during load or after)."""

    kind: ClassVar[str] = "failed"
    model: str
    reason: str


@dataclass(frozen=True)
class Unhealthy(Event):
    """A live model stalled or failed its health probes and is restarted."""

    kind: ClassVar[str] = "unhealthy"
    model: str
    reason: str


@dataclass(frozen=True)
class FallbackServed(Event):
    """A request for a failed `model` was answered by its fallback profile `served_by`."""

    kind: ClassVar[str] = "fallback"
    model: str
    served_by: str


@dataclass(frozen=True)
class FootprintLearned(Event):
    """A loaded model's measured use replaced its estimate (bytes per device)."""

    kind: ClassVar[str] = "footprint"
    model: str
    bytes: dict[str, int]


# ---------------------------------------------------------------------------------------------- peers


@dataclass(frozen=True)
class PeerChanged(Event):
    """A peer (another server whose models this router forwards to) answered again (`up`) or failed
    (`down`, with the reason); `latency`: seconds its last answer took to begin."""

    kind: ClassVar[str] = "peer"
    peer: str
    state: str
    reason: str
    latency: float | None


# ---------------------------------------------------------------------------------------------- prompt caches


@dataclass(frozen=True)
class ContextEvent(Event):
    """A save (before a stop) or restore (after a start) of a model's prompt caches (`keep_context`)."""

    action: ClassVar[str]  # "save" or "restore"
    ok: ClassVar[bool]
    model: str
    slots: int
    tokens: int
    bytes: int
    ms: float


@dataclass(frozen=True)
class ContextSaved(ContextEvent):
    kind: ClassVar[str] = "context_saved"
    action: ClassVar[str] = "save"
    ok: ClassVar[bool] = True


@dataclass(frozen=True)
class ContextRestored(ContextEvent):
    kind: ClassVar[str] = "context_restored"
    action: ClassVar[str] = "restore"
    ok: ClassVar[bool] = True


@dataclass(frozen=True)
class ContextSaveFailed(ContextEvent):
    kind: ClassVar[str] = "context_save_failed"
    action: ClassVar[str] = "save"
    ok: ClassVar[bool] = False
    error: str
    failed_slots: int


@dataclass(frozen=True)
class ContextRestoreFailed(ContextEvent):
    kind: ClassVar[str] = "context_restore_failed"
    action: ClassVar[str] = "restore"
    ok: ClassVar[bool] = False
    error: str
    failed_slots: int


def context_event(model: str, action: str, result: dict[str, Any]) -> ContextEvent:
    """The event for a prompt-cache `result` (see `ContextKeeper.save`): a failure if it has an `error`."""
    figures = {key: result[key] for key in ("slots", "tokens", "bytes", "ms")}
    if "error" in result:
        failed = ContextSaveFailed if action == "save" else ContextRestoreFailed
        return failed(model, **figures, error=result["error"], failed_slots=result["failed_slots"])
    done = ContextSaved if action == "save" else ContextRestored
    return done(model, **figures)


# ---------------------------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class RequestsChanged(Event):
    """The requests waiting or being answered now, and the activity rows written since the last one.

    Not a lifecycle event: the dashboard sends it at most a few times a second while requests come
    and go, and `/events` passes it only to readers that ask (`?requests=1`)."""

    kind: ClassVar[str] = "requests"
    requests: list[dict[str, Any]]
    activity: list[dict[str, Any]]  # the newest rows written, newest last (at most a page of them)
    activity_dropped: int  # rows written but left out of `activity`


# ---------------------------------------------------------------------------------------------- model manager


@dataclass(frozen=True)
class DownloadProgress(Event):
    """Bytes of one file of a model that POST /models downloads (`total`: None when not known)."""

    kind: ClassVar[str] = "download_progress"
    model: str
    file: str
    done: int
    total: int | None


@dataclass(frozen=True)
class DownloadFinished(Event):
    """A POST /models download is in the cache and its profile in `profiles.d/`."""

    kind: ClassVar[str] = "download_finished"
    model: str
    files: list[str]
    profile_file: str


@dataclass(frozen=True)
class DownloadFailed(Event):
    """A POST /models download failed or was cancelled; no profile was written."""

    kind: ClassVar[str] = "download_failed"
    model: str
    reason: str


@dataclass(frozen=True)
class ModelRemoved(Event):
    """DELETE /models removed a profile the router had created (and, if asked, its cached files)."""

    kind: ClassVar[str] = "model_removed"
    model: str
    deleted_files: list[str]


# ---------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class Reloaded(Event):
    """A new config was adopted; the profiles it kept running, restarted, added and removed."""

    kind: ClassVar[str] = "reloaded"
    kept: list[str]
    restarted: list[str]
    added: list[str]
    removed: list[str]


@dataclass(frozen=True)
class ReloadFailed(Event):
    """A reload failed (the file is invalid); the running config stays."""

    kind: ClassVar[str] = "config_error"
    trigger: str
    message: str


class EventBus:
    """Who hears the lifecycle events: `/events` streams, metrics, the dashboard, tests. The
    controller, the model manager, the reloader and the dashboard tell it what happened."""

    def __init__(self) -> None:
        self._listeners: list[EventListener] = []

    def subscribe(self, listener: EventListener) -> Callable[[], None]:
        """Receive lifecycle events; returns the function that unsubscribes."""
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    def emit(self, event: Event) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:  # a broken listener must not break scheduling
                log.exception("event listener failed")
