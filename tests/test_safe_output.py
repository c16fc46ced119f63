"""Logs and errors are safe to read: a client's words (a model name, a path) cannot forge a log line
and are capped where they are echoed; `/health` tells a client without a key only that the router is
up; `/upstream/` routes and forwards on one path."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from llama_router.core.errors import ECHO_LIMIT, printable
from llama_router.manage.logging_setup import setup_logging
from tests.conftest import RouterFactory, fake_profile


@pytest.fixture
def text_log() -> Iterator[io.StringIO]:
    """The router's text log, as `serve --log-format text` writes it."""
    stream = io.StringIO()
    setup_logging("INFO", "text", stream)
    yield stream
    logging.getLogger().handlers.clear()


def test_printable_escapes_control_characters_and_caps_length() -> None:
    assert printable("qwen3-8b") == "qwen3-8b"
    assert printable("a\nb\r\x1b[2J\u202e") == "a\\nb\\r\\x1b[2J\\u202e"
    long = printable("x" * 1_000_000)
    assert len(long) < ECHO_LIMIT + 30 and long.endswith("… (1000000 characters)")


async def test_a_model_name_cannot_forge_a_log_line_or_flood_an_error(
    start_router: RouterFactory, dummy_model: Path, text_log: io.StringIO
) -> None:
    router = await start_router({"m": fake_profile(dummy_model)})
    forged = "nope\n2026-01-01 00:00:00,000 INFO llama_router: admin logged in"
    status, body = await router.chat(forged)
    assert status == 404
    assert "nope\\n2026-01-01" in body["error"]["message"]
    status, body = await router.chat("y" * 1_000_000)
    assert status == 404 and len(body["error"]["message"]) < 1000
    async with router.session.get("/v1/%0aINFO%20forged") as response:
        assert response.status == 404
        assert "\\nINFO forged" in (await response.json())["error"]["message"]
    await router.close()
    lines = text_log.getvalue().splitlines()
    assert not [line for line in lines if "admin logged in" in line and not line.startswith("20")]
    assert not [line for line in lines if line.startswith(("INFO forged", "2026-01-01"))]
    assert max(len(line) for line in lines) < 2000


async def test_health_without_a_key_says_only_that_the_router_is_up(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router({"m": fake_profile(dummy_model)}, api_keys=["k"])
    router.config.path.write_text("profiles: [broken")
    assert not await router.server.reloader.reload("test")
    async with router.session.get("/health") as response:
        assert await response.json() == {"status": "ok"}
    async with router.session.get("/health", headers={"Authorization": "Bearer k"}) as response:
        details = await response.json()
    assert str(router.config.path) in str(details["reload"])


async def test_health_under_a_foreign_name_says_only_that_the_router_is_up(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router({"m": fake_profile(dummy_model)})
    async with router.session.get("/health", headers={"Host": "evil.example"}) as response:
        assert await response.json() == {"status": "ok"}
    async with router.session.get("/health") as response:
        assert "reload" in await response.json()


async def test_upstream_routes_and_forwards_on_one_path(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router({"m": fake_profile(dummy_model), "am": fake_profile(dummy_model)})
    async with router.session.get("/%75pstream/m/fake/last") as response:  # %75 is "u"
        assert response.status == 200
        assert (await response.json())["name"] == "fake-model"
    assert "m" in router.controller.upstreams and "am" not in router.controller.upstreams
    async with router.session.get("/upstream%2Fm/fake/last") as response:
        assert response.status == 404
