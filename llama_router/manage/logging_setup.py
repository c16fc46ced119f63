"""Log output for people (`text`) or machines (`json`, one object per line).

Structured fields travel as `extra={"fields": {...}}` on a log call: the text format already has them
in its message, the JSON format adds each as a top-level key so a log shipper needs no parsing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from datetime import UTC, datetime
from typing import Any, TextIO

FORMATS = ("text", "json")
QUIET_LOGGERS = ("httpx", "httpx2", "httpcore", "filelock")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Keys a record always has; anything else set through `extra=` is reported by the JSON formatter.
_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, then the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        for key, value in vars(record).items():
            if key not in _RESERVED and key != "fields" and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`TEXT_FORMAT`, with the time's date and clock part made once per second rather than per
    line: `formatTime` (a `localtime` and a `strftime`) is the dearest part of an access line, and
    under load a second has thousands of them. The text is the standard formatter's."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)
        self._second = -1
        self._clock = ""

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info:
            return super().format(record)
        # `TEXT_FORMAT` written out: the standard `format` looks up each field by name in the record.
        return f"{self.formatTime(record)} {record.levelname} {record.name}: {record.getMessage()}"

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            self._clock = time.strftime(self.default_time_format, self.converter(record.created))
            self._second = second
        if self.default_msec_format:
            return self.default_msec_format % (self._clock, record.msecs)
        return self._clock


def make_formatter(fmt: str) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter()
    if fmt == "text":
        return TextFormatter()
    raise ValueError(f"unknown log format {fmt!r}; use one of {', '.join(FORMATS)}")


class BatchingStreamHandler(logging.StreamHandler[TextIO]):
    """A stream handler that writes once per event-loop turn what that turn logged.

    Under load the access log has a line per request: written one by one they cost a system call
    each (stderr is line-buffered), as much as relaying the request. Lines logged outside an event
    loop, and whatever is pending at exit (`logging.shutdown` flushes), are written at once."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._scheduled = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._pending.append(self.format(record) + self.terminator)
        except Exception:
            self.handleError(record)
            return
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._write_pending(record)
            return
        self._scheduled = True
        loop.call_soon(self._write_pending, record)

    def _write_pending(self, record: logging.LogRecord) -> None:
        """Write what is pending; a failure is reported as logging reports one (`record`: the latest)."""
        try:
            self.flush()
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        with self.lock or contextlib.nullcontext():
            self._scheduled = False
            if self._pending:
                data = "".join(self._pending)
                self._pending.clear()
                self.stream.write(data)
            if hasattr(self.stream, "flush"):
                self.stream.flush()


def _skip_unused_record_fields() -> None:
    """Per-record work no format here reads (the caller's file and line, thread and process names):
    the optimisations the logging HOWTO lists, worth a few microseconds per access-log line."""
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def setup_logging(level: str = "INFO", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Configure the root logger once, replacing any handler a previous call installed."""
    _skip_unused_record_fields()
    handler = BatchingStreamHandler(stream or sys.stderr)
    handler.setFormatter(make_formatter(fmt))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # huggingface_hub's HTTP client logs every request at INFO; `pull` shows progress bars instead.
    for noisy in QUIET_LOGGERS:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
