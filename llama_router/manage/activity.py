"""The activity log: one row per finished request for a model, and one per management call (load,
unload, unload all, cancel, download, delete, a config reload: who did what, from where, and how it
ended), kept in SQLite under `state_dir`.

What each request cost (tokens, cached tokens, prefill and decode speed, time to first token,
duration) is what people ask of a router after "which models are loaded"; kept in a file, it survives
a restart. The table is bounded (`max_rows`, the oldest rows go first) and written in batches from one
thread of its own, so the request path only appends a tuple to a list.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import itertools
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

from llama_router.config.state import move_aside
from llama_router.relay.request_rules import RequestRecord

log = logging.getLogger("llama_router.activity")

MAX_ROWS = 10_000  # rows kept; the oldest are dropped past it
FLUSH_DELAY = 0.25  # seconds finished requests wait to be written together
PAGE_LIMIT = 1000  # most rows one query returns
# SQLite's answers for a file that is not a database, or a damaged one.
CORRUPT = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})


class ActivityRow(NamedTuple):
    """One finished request. Token counts and speeds are what the upstream reported (None when it
    reported nothing, e.g. an error); times are in milliseconds, `time` is the arrival (epoch s).
    A tuple, so that SQLite takes it as it is."""

    time: float
    model: str  # the id the client asked for
    served_by: str | None  # the profile that answered (a fallback's, when one did)
    path: str
    status: int
    error: str | None
    prompt_tokens: int | None
    cached_tokens: int | None
    prefill_tps: float | None
    generated_tokens: int | None
    decode_tps: float | None
    ttft_ms: float | None
    duration_ms: float
    waited_ms: float | None  # time spent waiting for the model (a load, a swap, the queue)
    key: str | None  # the label of the key it used (never the key)
    client: str | None
    action: str | None = None  # a management call's name (`load`, `unload`, ...); None: a request
    detail: str | None = None  # what a management call acted on beyond its model (names, a request id)


COLUMNS = ActivityRow._fields
KINDS = ("request", "management")  # the `kind` filter: requests for a model, or management calls
_SQL_TYPES = {"time": "REAL NOT NULL", "duration_ms": "REAL NOT NULL", "status": "INTEGER NOT NULL"}
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS activity (id INTEGER PRIMARY KEY, "
    + ", ".join(f"{name} {_SQL_TYPES.get(name, '')}".strip() for name in COLUMNS)
    + ")"
)
_ROW = f"({', '.join('?' * len(COLUMNS))})"
# Rows are written `_BATCH` to a statement: SQLite's module lets go of the GIL for each statement it
# steps, so one row per statement (`executemany`) hands the GIL to and from the event loop's thread
# once per row, and binding many rows to one statement costs a fifth less besides.
_BATCH = 64
_INTO = f"INSERT INTO activity ({', '.join(COLUMNS)}) VALUES "
_INSERT = _INTO + _ROW
_INSERT_BATCH = _INTO + ", ".join([_ROW] * _BATCH)


def row_for(record: RequestRecord, *, client: str | None, key: str | None) -> ActivityRow:
    """The activity row of a request that has just ended.

    Token counts come from the answer's `usage`, else llama-server's `timings`; speeds from the
    timings. Time to first token is measured for streamed answers (arrival to the first chunk from
    the upstream); for whole answers it is the wait for the model plus the upstream's prompt time."""
    duration = record.duration()
    timings, usage = record.timings, record.usage
    prompt = usage[0] if usage else (timings.cache_n + timings.prompt_n if timings else None)
    generated = usage[1] if usage else (timings.predicted_n if timings else None)
    ttft: float | None = None
    if record.first_byte is not None:
        ttft = record.first_byte - record.started
    elif timings is not None:
        ttft = (record.waited or 0.0) + timings.prompt_ms / 1000
    return ActivityRow(
        time=_rounded(record.arrival_time(), 1000),
        model=record.model or record.profile or "",
        served_by=record.served_by,
        path=record.path,
        status=record.status,
        error=record.error,
        prompt_tokens=prompt,
        cached_tokens=timings.cache_n if timings else None,
        prefill_tps=_rate(timings.prompt_n, timings.prompt_ms) if timings else None,
        generated_tokens=generated,
        decode_tps=_rate(timings.predicted_n, timings.predicted_ms) if timings else None,
        ttft_ms=_rounded(ttft * 1000, 100) if ttft is not None else None,
        duration_ms=_rounded(duration * 1000, 100),
        waited_ms=_rounded(record.waited * 1000, 100) if record.waited is not None else None,
        key=key,
        client=client,
    )


def management_row(
    record: RequestRecord,
    action: str,
    *,
    client: str | None,
    key: str | None,
    detail: str | None = None,
) -> ActivityRow:
    """The activity row of a management call that has just ended: when, what, on which model, the
    outcome (status and error code), the key's label and the client's address."""
    duration = record.duration()
    return ActivityRow(
        time=_rounded(record.arrival_time(), 1000),
        model=record.model or "",
        served_by=None,
        path=record.path,
        status=record.status,
        error=record.error,
        prompt_tokens=None,
        cached_tokens=None,
        prefill_tps=None,
        generated_tokens=None,
        decode_tps=None,
        ttft_ms=None,
        duration_ms=_rounded(duration * 1000, 100),
        waited_ms=None,
        key=key,
        client=client,
        action=action,
        detail=detail,
    )


def _rate(tokens: int, ms: float) -> float | None:
    return _rounded(tokens * 1000 / ms, 10) if ms > 0 and tokens > 0 else None


def _rounded(value: float, per_unit: int) -> float:
    """`value` to the nearest 1/`per_unit` (for the non-negative figures of a row): what
    `round(value, digits)` gives, for a fraction of its cost, which a row paid six times."""
    return int(value * per_unit + 0.5) / per_unit


def status_filter(status: str | None) -> tuple[str, list[Any]]:
    """The SQL condition for a status filter: an exact code (`404`), a class (`5xx`), `ok` (< 400)
    or `error` (>= 400 or ended with an error); ValueError for anything else."""
    if not status:
        return "", []
    status = status.strip().lower()
    if status == "ok":
        return "status < 400 AND error IS NULL", []
    if status == "error":
        return "(status >= 400 OR error IS NOT NULL)", []
    if len(status) == 3 and status[0].isdigit() and status[1:] == "xx":
        low = int(status[0]) * 100
        return "status >= ? AND status < ?", [low, low + 100]
    if status.isdigit():
        return "status = ?", [int(status)]
    raise ValueError(f"status filter {status!r}: use a code (404), a class (5xx), 'ok' or 'error'")


class ActivityStore:
    """Rows in `<state_dir>/activity.sqlite3`: appended as requests end, read with filters, as CSV.

    Every SQLite call runs on the store's own thread (one connection, never shared); `add` only
    queues the row, and a flush `FLUSH_DELAY` later writes what queued up in one transaction.
    `on_written` is called (on the event loop) with the id of the first row each flush wrote and the
    rows (ids follow on): a reader that keeps only the newest few turns only those into dicts.
    """

    def __init__(self, path: Path, *, max_rows: int = MAX_ROWS) -> None:
        self.path = path
        self.max_rows = max_rows
        self.on_written: Callable[[int, Sequence[ActivityRow]], None] | None = None
        self._pending: list[ActivityRow] = []
        self._flush: asyncio.TimerHandle | None = None
        self._writing: asyncio.Future[None] | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="activity")
        self._db: sqlite3.Connection | None = None
        self._broken = False

    async def open(self) -> None:
        await self._run(self._open)

    def _open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._db = self._connect()
            except sqlite3.DatabaseError as exc:
                if getattr(exc, "sqlite_errorcode", None) not in CORRUPT:
                    raise
                # Not a database, or a damaged one: kept for a person to look at, and a new log begun.
                aside = move_aside(self.path, f"damaged ({exc})", "the activity log starts afresh")
                if aside is None:
                    raise
                for suffix in ("-wal", "-shm"):  # its journal goes with it, where SQLite looks for it
                    with contextlib.suppress(FileNotFoundError):
                        self.path.with_name(self.path.name + suffix).replace(
                            aside.with_name(aside.name + suffix)
                        )
                self._db = self._connect()
        except (sqlite3.Error, OSError) as exc:
            # A file that cannot be used must not keep the router from serving; only the log is lost.
            log.warning("activity log %s unusable (%s); requests are not recorded", self.path, exc)
            self._broken = True

    def _connect(self) -> sqlite3.Connection:
        """The log's database, its table created if new; raises if the file is not a sound one."""
        db = sqlite3.connect(self.path)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            [[verdict]] = db.execute("PRAGMA quick_check(1)").fetchall()
            if verdict != "ok":
                error = sqlite3.DatabaseError(f"quick_check: {verdict}")
                error.sqlite_errorcode = sqlite3.SQLITE_CORRUPT
                raise error
            db.execute(_SCHEMA)
            # A log written before a column existed gains it (empty for its old rows).
            present = {row[1] for row in db.execute("PRAGMA table_info(activity)")}
            for name in COLUMNS:
                if name not in present:
                    db.execute(f"ALTER TABLE activity ADD COLUMN {name}")
            # The model filter (`model = ? OR served_by = ?`) scans the table whatever index it has,
            # and the table is small (`max_rows`); an index on `model` cost each row's write a seventh.
            db.execute("DROP INDEX IF EXISTS activity_model")
            db.commit()
        except BaseException:
            db.close()
            raise
        return db

    async def _run(self, work: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, work, *args)

    # ------------------------------------------------------------------------------------------ writing

    def add(self, row: ActivityRow) -> None:
        """Queue a finished request's row; it is written within `FLUSH_DELAY` seconds."""
        if self._broken:
            return
        self._pending.append(row)
        if self._flush is None and self._writing is None:
            self._flush = asyncio.get_running_loop().call_later(FLUSH_DELAY, self._start_flush)

    def _start_flush(self) -> None:
        self._flush = None
        self._writing = asyncio.ensure_future(self._flush_once())

    async def _flush_once(self) -> None:
        """The timer's write: the rows queued until now. Rows queued while it is written wait
        `FLUSH_DELAY` for the next: under load a write then holds a quarter second's rows, not
        just those that came while the last one was written (each write also trims the table)."""
        try:
            await self._write_pending()
        finally:
            self._writing = None
            if self._pending and self._flush is None:
                self._flush = asyncio.get_running_loop().call_later(FLUSH_DELAY, self._start_flush)

    async def flush(self) -> None:
        """Write every queued row now (what `close` does last)."""
        while self._pending:
            await self._write_pending()

    async def _write_pending(self) -> None:
        rows, self._pending = self._pending, []
        first = await self._run(self._write, rows)
        if first is not None and self.on_written is not None:
            self.on_written(first, rows)

    def _write(self, rows: Sequence[ActivityRow]) -> int | None:
        """Write `rows`; the id of the first (None if nothing was written)."""
        if self._db is None:
            return None
        try:
            with self._db:
                whole = len(rows) - len(rows) % _BATCH
                for start in range(0, whole, _BATCH):
                    self._db.execute(
                        _INSERT_BATCH, list(itertools.chain.from_iterable(rows[start : start + _BATCH]))
                    )
                self._db.executemany(_INSERT, rows[whole:])
                last = self._db.execute("SELECT max(id) FROM activity").fetchone()[0]
                self._db.execute("DELETE FROM activity WHERE id <= ?", (last - self.max_rows,))
        except sqlite3.Error as exc:
            log.warning("could not write %d activity row(s) to %s: %s", len(rows), self.path, exc)
            return None
        return int(last) - len(rows) + 1

    async def close(self) -> None:
        """Write what is queued and close the file."""
        if self._writing is not None:
            await self._writing
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        await self.flush()
        await self._run(self._close)
        self._thread.shutdown(wait=True)

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    # ------------------------------------------------------------------------------------------ reading

    async def query(
        self,
        *,
        model: str | None = None,
        status: str | None = None,
        kind: str | None = None,
        limit: int = 100,
        before: int | None = None,
        after: int | None = None,
    ) -> list[dict[str, Any]]:
        """The newest rows first, filtered by model (the id asked for, or the profile that answered),
        status and kind (`request` or `management`); `before`/`after` page by row id. ValueError for
        a bad status or kind filter."""
        where, params = _where(model, status, before, after, kind)
        sql = f"SELECT id, {', '.join(COLUMNS)} FROM activity{where} ORDER BY id DESC LIMIT ?"
        return list(await self._run(self._select, sql, [*params, max(1, min(limit, PAGE_LIMIT))]))

    def _select(self, sql: str, params: list[Any]) -> list[dict[str, Any]]:
        if self._db is None:
            return []
        names = ("id", *COLUMNS)
        return [dict(zip(names, values, strict=True)) for values in self._db.execute(sql, params)]

    async def csv(
        self, *, model: str | None = None, status: str | None = None, kind: str | None = None
    ) -> str:
        """Every kept row that passes the filters, oldest first, as CSV with a header line and the
        arrival time in ISO 8601 (UTC) beside its epoch seconds."""
        where, params = _where(model, status, None, None, kind)
        sql = f"SELECT id, {', '.join(COLUMNS)} FROM activity{where} ORDER BY id"
        rows = await self._run(self._select, sql, params)
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\r\n")  # RFC 4180; a field holding either is quoted
        writer.writerow(["id", "iso_time", *COLUMNS])
        for row in rows:
            iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(row["time"]))
            writer.writerow([row["id"], iso, *(safe_cell(row[name]) for name in COLUMNS)])
        return out.getvalue()


# What a spreadsheet reads as the start of a formula (or of one hidden behind a tab or line break).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(value: Any) -> Any:
    """A CSV cell a spreadsheet shows as text: a string that would start a formula (a model id or
    a path sent by a client: `=HYPERLINK(...)`) gets a leading `'`; numbers are the router's own."""
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def _where(
    model: str | None,
    status: str | None,
    before: int | None,
    after: int | None,
    kind: str | None = None,
) -> tuple[str, list[Any]]:
    """The WHERE clause (with its leading space) and parameters of a query's filters."""
    conditions, params = [], []
    if kind:
        if kind not in KINDS:
            raise ValueError(f"kind filter {kind!r}: use {' or '.join(map(repr, KINDS))}")
        conditions.append("action IS NULL" if kind == "request" else "action IS NOT NULL")
    status_sql, status_params = status_filter(status)
    if status_sql:
        conditions.append(status_sql)
        params += status_params
    if model:
        conditions.append("(model = ? OR served_by = ?)")
        params += [model, model]
    if before is not None:
        conditions.append("id < ?")
        params.append(before)
    if after is not None:
        conditions.append("id > ?")
        params.append(after)
    return (f" WHERE {' AND '.join(conditions)}" if conditions else ""), params
