"""The requests board: the requests for a model that wait or run now, and the activity rows just
written, told as one `requests` event at most every REQUESTS_INTERVAL.

The outermost middleware tells it each request's arrival and end; the dashboard lists and cancels
from it; it writes each finished request's row to the activity log, labelled with the key's name, and
one row per management call (manage/audit.py) and per config reload.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from llama_router.core.events import DownloadProgress, Event, EventBus, RequestsChanged
from llama_router.front.auth import KeyRing, Keys, presented_key
from llama_router.manage.activity import ActivityRow, ActivityStore, management_row, row_for
from llama_router.manage.audit import DETAIL, action_of
from llama_router.relay.proxy import RECORD
from llama_router.relay.request_rules import RequestRecord

REQUESTS_INTERVAL = 0.5  # seconds between two `requests` events while requests come and go
EVENT_ROWS = 50  # activity rows carried by one `requests` event; a page fetches more if it wants them
LISTED_REQUESTS = 200  # requests listed at most (the counts are always whole)


def key_labels(keys: Keys) -> dict[bytes, str]:
    """A label for each accepted key (`api-1`, `admin-2`: its kind and place in the config), for
    the activity log: which client it was, never the key itself."""
    labels = {key: f"admin-{index}" for index, key in enumerate(keys.admin, 1)}
    labels.update({key: f"api-{index}" for index, key in enumerate(keys.api, 1)})
    return labels


class RequestBoard:
    """The live requests by id, and the activity rows written since the last `requests` event."""

    def __init__(self, activity: ActivityStore, keys: KeyRing, events: EventBus) -> None:
        self.activity = activity
        self.keys = keys
        self.events = events
        self._live: dict[int, web.Request] = {}
        self._ids = itertools.count(1)
        self._labels: dict[bytes, str] = {}
        self._written: list[dict[str, Any]] = []
        self._dropped = 0
        self._last_requests: list[dict[str, Any]] | None = None
        self._timer: asyncio.TimerHandle | None = None
        activity.on_written = self._rows_written
        keys.subscribe(self._keys_changed)
        events.subscribe(self._on_event)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def find(self, live_id: int) -> web.Request | None:
        """The live request with this id, if any (one that has ended is no longer live, though its
        bookkeeping, which takes it off the board, may follow a moment later)."""
        request = self._live.get(live_id)
        return request if request is not None and request[RECORD].ended is None else None

    def _on_event(self, event: Event) -> None:
        if self._live and not isinstance(event, (RequestsChanged, DownloadProgress)):
            self._changed()  # waiting requests may have been dispatched

    def request_started(self, request: web.Request, record: RequestRecord) -> None:
        """Called for every request as it arrives (by the outermost middleware)."""
        live_id = record.live_id = next(self._ids)
        self._live[live_id] = request
        self._changed()

    def request_ended(self, request: web.Request, record: RequestRecord) -> None:
        """Called for every request once its last byte is out (or its client left)."""
        self._live.pop(record.live_id, None)
        if record.for_model:
            self.activity.add(row_for(record, client=request.remote, key=self._key_label(request)))
            self._changed()
        elif (action := action_of(request.method, request.path)) is not None:
            self.activity.add(
                management_row(
                    record,
                    action,
                    client=request.remote,
                    key=self._key_label(request),
                    detail=request.get(DETAIL),
                )
            )

    def _key_label(self, request: web.Request) -> str | None:
        """The label of the key a request presented (`admin-1`), `unknown key` for one not accepted,
        None where no keys are configured or it sent none."""
        if not self.keys.enabled:
            return None
        presented = presented_key(request)
        if presented is None:
            return None
        return self._labels.get(presented, "unknown key")

    def config_reloaded(self, trigger: str, error: str | None, summary: str, seconds: float) -> None:
        """A config reload's audit row (no HTTP call makes one: SIGHUP, the file watch, a download)."""
        record = RequestRecord("", "", time.perf_counter() - seconds)
        record.status, record.error = (200, None) if error is None else (400, "config_error")
        detail = f"{trigger}: {summary if error is None else error.splitlines()[0]}"
        self.activity.add(management_row(record, "reload", client=None, key=None, detail=detail))

    def _keys_changed(self, keys: Keys) -> None:
        self._labels = key_labels(keys)

    def _changed(self) -> None:
        """Something the `requests` event shows may have changed: send one within REQUESTS_INTERVAL."""
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(REQUESTS_INTERVAL, self._send_requests)

    def _rows_written(self, first: int, rows: Sequence[ActivityRow]) -> None:
        # Only the newest EVENT_ROWS are carried: only those become dicts.
        kept = rows[-EVENT_ROWS:]
        start = first + len(rows) - len(kept)
        self._dropped += len(rows) - len(kept)
        self._written.extend({"id": start + index, **row._asdict()} for index, row in enumerate(kept))
        if len(self._written) > EVENT_ROWS:
            self._dropped += len(self._written) - EVENT_ROWS
            del self._written[:-EVENT_ROWS]
        self._changed()

    def _send_requests(self) -> None:
        self._timer = None
        listed = self.requests_now()
        if listed == self._last_requests and not self._written:
            return
        self._last_requests = listed
        rows, dropped = self._written, self._dropped
        self._written, self._dropped = [], 0
        self.events.emit(RequestsChanged(listed, rows, dropped))
        if any(entry["state"] == "waiting" for entry in listed):
            self._changed()  # a waiting request starts running without arriving or ending: look again

    def requests_now(self) -> list[dict[str, Any]]:
        """The requests for a model that wait or run now, oldest first (at most LISTED_REQUESTS)."""
        now_wall, now = time.time(), time.perf_counter()
        listed = []
        for live_id, request in self._live.items():
            record = request[RECORD]
            if not record.for_model or record.profile is None or record.ended is not None:
                continue
            entry: dict[str, Any] = {
                "id": live_id,
                "model": record.model,
                "profile": record.profile,
                "path": record.path,
                "client": request.remote,
                "arrived": round(now_wall - (now - record.started), 3),
                "state": "waiting" if record.waited is None else "running",
            }
            if record.waited is not None:
                entry["waited"] = round(record.waited, 3)
            listed.append(entry)
            if len(listed) >= LISTED_REQUESTS:
                break
        return listed
