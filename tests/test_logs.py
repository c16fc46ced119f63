"""Logs: one access line per request (method, path, model, status, duration, bytes), lifecycle lines,
and `--log-format json` giving one parseable object per line."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from llama_router.manage.logging_setup import TEXT_FORMAT, JsonFormatter, TextFormatter, setup_logging
from tests.conftest import RouterFactory, fake_profile
from tests.router_process import RouterProcess, write_config


def access_records(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [r.fields for r in caplog.records if r.name == "llama_router.access"]  # type: ignore[attr-defined]


async def test_one_access_line_per_request(
    start_router: RouterFactory, dummy_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="llama_router.access")
    router = await start_router({"a": fake_profile(dummy_model, aliases=["alias-a"])}, max_resident=1)
    session = router.session
    body = {"model": "alias-a", "messages": [{"role": "user", "content": "hi"}]}
    async with session.post("/v1/chat/completions", json=body) as response:
        whole = await response.read()
        assert response.status == 200
    async with session.post("/v1/chat/completions", json={**body, "stream": True}) as response:
        streamed = await response.read()
        assert response.status == 200
    async with session.post("/v1/chat/completions", json={**body, "model": "nope"}) as response:
        assert response.status == 404
    async with session.get("/v1/models") as response:
        assert response.status == 200
    async with session.get("/health") as response:
        assert response.status == 200

    assert access_records(caplog) == [], "the lines come just after the requests, together"
    router.recorded()
    records = access_records(caplog)
    assert [(r["method"], r["path"], r["model"], r["status"]) for r in records] == [
        ("POST", "/v1/chat/completions", "alias-a", 200),
        ("POST", "/v1/chat/completions", "alias-a", 200),
        ("POST", "/v1/chat/completions", "nope", 404),
        ("GET", "/v1/models", None, 200),
        ("GET", "/health", None, 200),
    ]
    # Bytes on the wire: the body plus headers (and chunk framing for the stream).
    assert records[0]["bytes"] > len(whole) > 0
    assert records[1]["bytes"] > len(streamed) > 0
    assert all(r["duration_ms"] > 0 for r in records)
    levels = [r.levelno for r in caplog.records if r.name == "llama_router.access"]
    assert levels[-1] == logging.DEBUG  # health probes stay out of the INFO log
    assert set(levels[:-1]) == {logging.INFO}


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    """The root logger, with its handlers and level put back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)


def test_text_access_line_format(root_logger: logging.Logger) -> None:
    stream = io.StringIO()
    setup_logging("INFO", "text", stream=stream)
    logging.getLogger("llama_router.access").info(
        "POST /v1/chat/completions model=a status=200 duration_ms=1.5 bytes=10",
        extra={"fields": {"model": "a"}},
    )
    assert logging.getLogger("httpx2").level == logging.WARNING  # huggingface_hub's request chatter
    line = stream.getvalue().strip()
    assert re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO llama_router.access: POST ", line), line


class CountingStream(io.StringIO):
    """Counts the writes that reach it: each is a system call on a real stderr."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


async def test_lines_logged_in_one_event_loop_turn_share_one_write(root_logger: logging.Logger) -> None:
    stream = CountingStream()
    setup_logging("INFO", "text", stream=stream)
    access = logging.getLogger("llama_router.access")
    for index in range(3):
        access.info("POST /v1/chat/completions model=a status=200 n=%d", index)
    assert stream.getvalue() == "", "written once this turn of the loop is over"
    await asyncio.sleep(0)
    lines = stream.getvalue().splitlines()
    assert [line.rsplit(" ", 1)[1] for line in lines] == ["n=0", "n=1", "n=2"]
    assert stream.writes == 1


def test_lines_logged_outside_an_event_loop_are_written_at_once(root_logger: logging.Logger) -> None:
    stream = CountingStream()
    setup_logging("INFO", "text", stream=stream)
    logging.getLogger("llama_router").warning("starting up")
    assert stream.getvalue().endswith("starting up\n")


def test_json_formatter_fields_and_exceptions() -> None:
    formatter = JsonFormatter()
    record = logging.LogRecord("llama_router", logging.WARNING, __file__, 1, "x=%s", ("y",), None)
    record.fields = {"model": "m", "status": 200}
    entry = json.loads(formatter.format(record))
    assert entry["message"] == "x=y" and entry["level"] == "warning" and entry["logger"] == "llama_router"
    assert entry["model"] == "m" and entry["status"] == 200
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$", entry["time"])
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    entry = json.loads(formatter.format(record))
    assert "ValueError: boom" in entry["exception"]


async def test_json_log_format_end_to_end(
    tmp_path: Path, dummy_model: Path, router_processes: list[RouterProcess]
) -> None:
    config = write_config(tmp_path / "p.yaml", {"a": fake_profile(dummy_model)}, max_resident=1)
    router = await RouterProcess(config).start()  # runs with --log-format json
    router_processes.append(router)
    async with aiohttp.ClientSession() as session:
        body = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        async with session.post(f"{router.url}/v1/chat/completions", json=body) as response:
            assert response.status == 200
            await response.read()
    router.signal(signal.SIGTERM)
    assert await router.wait_exit() == 0
    bad = [line for line, entry in zip(router.raw, router.lines, strict=True) if entry.get("not_json")]
    assert bad == []
    for entry in router.lines:
        assert {"time", "level", "logger", "message"} <= set(entry)
    access = [e for e in router.lines if e.get("logger") == "llama_router.access" and e["path"] != "/health"]
    assert len(access) == 1
    assert access[0]["model"] == "a" and access[0]["status"] == 200 and access[0]["method"] == "POST"
    assert access[0]["bytes"] > 0 and access[0]["duration_ms"] > 0
    messages = " | ".join(router.messages())
    for lifecycle in ("listening on", "spawned a", "a ready in", "stopping a", "a stopped", "stopped in"):
        assert lifecycle in messages, lifecycle


def test_the_text_lines_time_made_once_a_second_reads_as_the_standard_formatters() -> None:
    """Lines within one second, across a second's end and back in time (a clock set back) read as
    logging's own formatter writes them."""
    ours, standard = TextFormatter(), logging.Formatter(TEXT_FORMAT)
    for created in (1700000000.001, 1700000000.999, 1700000001.0, 1700000001.5, 1699999999.25):
        record = logging.LogRecord("llama_router.access", logging.INFO, "", 0, "GET %s", ("/health",), None)
        record.created, record.msecs = created, int((created - int(created)) * 1000)
        assert ours.format(record) == standard.format(record)


def test_a_line_with_a_traceback_or_a_percent_sign_reads_as_the_standard_formatters() -> None:
    """The text format written out reads as logging's own, for a message with arguments, one with
    a `%` and none (a client's path, as the access line has it), and one carrying a traceback."""
    ours, standard = TextFormatter(), logging.Formatter(TEXT_FORMAT)
    try:
        raise ValueError("boom")
    except ValueError:
        failure = sys.exc_info()
    records = [
        logging.LogRecord("llama_router", logging.WARNING, "", 0, "model %s: %d%%", ("a", 5), None),
        logging.LogRecord("llama_router.access", logging.INFO, "", 0, "GET /100%25 model=-", (), None),
        logging.LogRecord("llama_router", logging.ERROR, "", 0, "unhandled error on %s", ("GET /",), failure),
    ]
    for record in records:
        assert ours.format(record) == standard.format(record)
    assert "Traceback" in ours.format(records[2]) and "ValueError: boom" in ours.format(records[2])


def test_an_access_record_reads_as_any_record_to_any_formatter(caplog: pytest.LogCaptureFixture) -> None:
    """The access line's record, made without `Logger.log`, has what a record made by it has: a
    formatter naming the caller's file and line (pytest's own) and the JSON one both read it, and
    the JSON object carries its fields and nothing of how they are kept."""
    from llama_router.front.access_log import AccessRecord
    from llama_router.relay.request_rules import RequestRecord

    request = RequestRecord("GET", "/", 0.0, status=200, sent=12, ended=0.0015)
    ours = AccessRecord(logging.INFO, request, None, "10.0.0.1")
    message = "GET / model=- status=200 duration_ms=1.5 bytes=12"
    standard = logging.LogRecord("llama_router.access", logging.INFO, "", 0, message, (), None)
    assert set(vars(standard)) == set(vars(ours))
    pytest_style = logging.Formatter("%(levelname)-8s %(name)s:%(filename)s:%(lineno)d %(message)s")
    assert pytest_style.format(ours) == pytest_style.format(standard)
    entry = json.loads(JsonFormatter().format(ours))
    fields = {"method": "GET", "path": "/", "model": None, "status": 200, "duration_ms": 1.5, "bytes": 12}
    assert entry == {
        "time": entry["time"],
        "level": "info",
        "logger": "llama_router.access",
        "message": message,
        **fields,
        "client": "10.0.0.1",
    }
    with caplog.at_level(logging.INFO, logger="llama_router.access"):
        logging.getLogger("llama_router.access").handle(ours)
    assert [(r.getMessage(), r.fields["client"]) for r in caplog.records] == [(message, "10.0.0.1")]  # type: ignore[attr-defined]


def test_an_access_line_is_stamped_with_its_request_s_end_not_with_its_writing() -> None:
    """Lines are written a few milliseconds after their requests end, together: each still carries
    the time its request ended."""
    from llama_router.front.access_log import AccessRecord
    from llama_router.relay.request_rules import RequestRecord

    now = time.perf_counter()
    request = RequestRecord("GET", "/", now - 2.0, status=200, sent=12, ended=now - 1.5)
    line = AccessRecord(logging.INFO, request, None, None)
    assert time.time() - 1.6 < line.created < time.time() - 1.4
    assert "duration_ms=500.0" in line.getMessage()


async def test_requests_that_end_close_together_are_recorded_together_just_after(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Metrics, activity row and access line of the requests that ended within a few milliseconds
    of each other are done in one pass after them, in the order they ended; one failing bookkeeping
    costs neither the other kinds nor the other requests theirs, and says so in the log."""
    from aiohttp.test_utils import make_mocked_request

    from llama_router.manage.request_ends import RequestEnds
    from llama_router.relay.request_rules import RequestRecord

    seen: list[tuple[str, str]] = []

    def metrics(request: Any, record: RequestRecord) -> None:
        seen.append(("metrics", record.path))

    def activity(request: Any, record: RequestRecord) -> None:
        if record.path == "/b":
            raise RuntimeError("disk full")
        seen.append(("activity", record.path))

    def access(request: Any, record: RequestRecord) -> None:
        seen.append(("access", record.path))

    ends = RequestEnds((metrics, activity, access))
    records = [RequestRecord("POST", path, time.perf_counter()) for path in ("/a", "/b", "/c")]
    done = asyncio.get_running_loop().create_future()

    def last(request: Any, record: RequestRecord) -> None:
        if record.path == "/c":
            done.set_result(None)

    ends.handlers += (last,)
    for record in records[:2]:
        ends.add(make_mocked_request("POST", record.path), record)
    await asyncio.sleep(0)
    assert seen == [], "nothing is done in the turn after they ended: others may end meanwhile"
    ends.add(make_mocked_request("POST", "/c"), records[2])
    await done
    assert seen == [
        ("metrics", "/a"), ("activity", "/a"), ("access", "/a"),
        ("metrics", "/b"), ("access", "/b"),
        ("metrics", "/c"), ("activity", "/c"), ("access", "/c"),
    ]  # fmt: skip
    assert all(record.ended is not None and record.duration() >= 0 for record in records)
    assert "could not record the end of POST /b" in caplog.text and "disk full" in caplog.text
