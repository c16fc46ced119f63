"""What one client may hold, tried with real sockets on loopback: an oversized body is refused before
it is read, a stalled body and an idle or trickling connection are closed, past the connection cap a
client is told so (and `/health` still answers), and the open-file limit is raised at start."""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from llama_router.app import BODY_BUDGET
from llama_router.front.client_limits import MIB
from llama_router.relay.request_rules import SMALL_VALUE, top_level_fields
from tests.conftest import RouterFactory, RunningRouter, assert_openai_error, fake_profile, wait_until
from tests.router_process import RouterProcess, write_config

TIMEOUT = 5.0


@contextlib.asynccontextmanager
async def connected(
    router: RunningRouter,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", router.port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def head(method: str, path: str, *lines: str) -> bytes:
    return "\r\n".join([f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *lines, "", ""]).encode()


async def answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], Any]:
    """One HTTP answer with a length: status, headers (lowercased names) and the JSON body."""
    raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    lines = raw.decode("latin-1").split("\r\n")
    headers = {
        name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:] if line)
    }
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), TIMEOUT)
    return int(lines[0].split()[1]), headers, json.loads(body)


async def closed(reader: asyncio.StreamReader) -> bool:
    """Whether the router closed the connection (all that is left to read is the end)."""
    try:
        return await asyncio.wait_for(reader.read(), TIMEOUT) == b""
    except ConnectionResetError:
        return True


async def test_a_body_over_the_limit_is_refused_before_it_is_read(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router({"m": fake_profile(dummy_model)}, max_body_mb=1)
    async with connected(router) as (reader, writer):
        writer.write(head("POST", "/v1/chat/completions", f"Content-Length: {200 * 1024 * 1024}"))
        status, _, body = await answer(reader)  # no byte of the 200 MB was sent
        assert status == 413, body
        assert_openai_error(body, "request_too_large", status=status)
        assert "server.max_body_mb" in body["error"]["message"]
        assert await closed(reader)
    assert router.controller.upstreams == {}


async def test_a_body_without_a_length_is_cut_off_at_the_limit(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router({"m": fake_profile(dummy_model)}, max_body_mb=1)
    chunk = b"x" * 65536
    async with connected(router) as (reader, writer):
        writer.write(head("POST", "/v1/chat/completions", "Transfer-Encoding: chunked"))
        with contextlib.suppress(ConnectionError):
            for _ in range(20):  # 1.25 MiB
                writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                await writer.drain()
        status, _, body = await answer(reader)
        assert status == 413, body
        assert_openai_error(body, "request_too_large", status=status)


async def test_a_body_under_the_limit_is_served(start_router: RouterFactory, dummy_model: Path) -> None:
    router = await start_router({"m": fake_profile(dummy_model)}, max_body_mb=1)
    text = "word " * 150_000  # 750 KB
    status, body = await router.chat("m", messages=[{"role": "user", "content": text}])
    assert status == 200, body
    assert body["usage"]["prompt_tokens"] == 150_000


async def test_a_stalled_body_gets_408_and_its_connection_closed(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router({"m": fake_profile(dummy_model)}, body_timeout=0.3)
    async with connected(router) as (reader, writer):
        writer.write(head("POST", "/v1/chat/completions", "Content-Length: 1000") + b'{"model": "m"')
        started = time.monotonic()
        status, _, body = await answer(reader)
        assert status == 408, body
        assert_openai_error(body, "request_timeout", status=status)
        assert 0.3 <= time.monotonic() - started < 3
        assert await closed(reader)


async def test_a_trickled_body_is_bounded_by_a_total_time_not_a_timer_per_byte(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router({"m": fake_profile(dummy_model)}, body_timeout=0.5)
    async with connected(router) as (reader, writer):
        writer.write(head("POST", "/v1/chat/completions", "Content-Length: 100000"))

        async def trickle() -> None:  # a byte every 50 ms: a per-byte timer of 0.5 s never fires
            with contextlib.suppress(OSError):
                while True:
                    writer.write(b" ")
                    await writer.drain()
                    await asyncio.sleep(0.05)

        trickling = asyncio.create_task(trickle())
        try:
            status, _, body = await answer(reader)
        finally:
            trickling.cancel()
        assert status == 408, body
        assert_openai_error(body, "request_timeout", status=status)
        assert "did not arrive within 0.5s (server.body_timeout)" in body["error"]["message"]


async def held_body(router: RunningRouter, size: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection that sends a chat's head and all of its `size`-byte body but the last byte."""
    reader, writer = await asyncio.open_connection("127.0.0.1", router.port)
    writer.write(head("POST", "/v1/chat/completions", f"Content-Length: {size}") + b" " * (size - 1))
    await writer.drain()
    return reader, writer


async def test_past_the_total_for_bodies_a_new_body_gets_503_before_it_is_read(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    """Two connections hold 1 MiB bodies each, the router's total: a third body is refused at its
    head, while /health and a request without a body are served; once a holder leaves, bodies fit."""
    router = await start_router({"m": fake_profile(dummy_model)}, max_body_mb=1, max_body_total_mb=2)
    budget = router.server.app[BODY_BUDGET]
    holders = [await held_body(router, MIB), await held_body(router, MIB)]
    await wait_until(lambda: budget.held == 2 * MIB, what="both bodies to be held")
    async with connected(router) as (reader, writer):
        payload = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
        writer.write(head("POST", "/v1/chat/completions", f"Content-Length: {len(payload)}"))  # no body
        status, headers, body = await answer(reader)
        assert status == 503 and headers["retry-after"] == "1"
        assert_openai_error(body, "bodies_over_capacity")
        assert "server.max_body_total_mb" in body["error"]["message"]
        assert await closed(reader)
    async with router.session.get("/health") as response:
        assert response.status == 200
    async with router.session.get("/v1/models") as response:
        assert response.status == 200

    _, leaving = holders.pop()
    leaving.close()
    await wait_until(lambda: budget.held == MIB, what="the leaving holder's body to be given back")
    status, _ = await router.chat("m")
    assert status == 200
    for _, writer in holders:
        writer.close()
    await wait_until(lambda: budget.held == 0, what="every body to be given back")


async def test_a_body_without_a_length_gets_503_when_it_grows_past_the_total(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router({"m": fake_profile(dummy_model)}, max_body_mb=1, max_body_total_mb=1)
    budget = router.server.app[BODY_BUDGET]
    _, holder = await held_body(router, MIB - 1000)
    await wait_until(lambda: budget.held == MIB - 1000, what="the first body to be held")
    async with connected(router) as (reader, writer):
        writer.write(head("POST", "/v1/chat/completions", "Transfer-Encoding: chunked"))
        chunk = b"x" * 4096  # fits the per-request limit, not what is left of the total
        writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        status, headers, body = await answer(reader)
        assert status == 503 and headers["retry-after"] == "1"
        assert_openai_error(body, "bodies_over_capacity")
    assert budget.held == MIB - 1000  # the refused body gave back what it took
    holder.close()
    await wait_until(lambda: budget.held == 0, what="the held body to be given back")


async def test_idle_and_trickling_connections_are_closed(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router({"m": fake_profile(dummy_model)}, idle_timeout=0.5)
    async with connected(router) as (idle, _):
        started = time.monotonic()
        assert await closed(idle)  # it never sent a request
        assert time.monotonic() - started < 3
    async with connected(router) as (reader, writer):
        started = time.monotonic()
        with contextlib.suppress(ConnectionError):
            for byte in head("GET", "/health"):
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.1)  # a byte every 0.1 s: the whole head would take 4 s
                if reader.at_eof() or time.monotonic() - started > 3:
                    break
        assert await closed(reader)
        assert time.monotonic() - started < 3
    async with connected(router) as (reader, writer):  # a kept-alive connection idles out after its answer
        writer.write(head("GET", "/health"))
        assert (await answer(reader))[0] == 200
        assert await closed(reader)


async def test_past_the_connection_cap_a_client_is_told_and_health_still_answers(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router({"m": fake_profile(dummy_model)}, max_connections=5)
    async with contextlib.AsyncExitStack() as held:
        for _ in range(5):
            await held.enter_async_context(connected(router))
        await asyncio.sleep(0.05)  # the router has accepted them
        async with connected(router) as (reader, writer):
            writer.write(head("GET", "/health"))
            status, _, body = await answer(reader)
            assert status == 200 and body == {"status": "ok"}
            assert await closed(reader)
        async with connected(router) as (reader, writer):
            writer.write(head("POST", "/v1/chat/completions", "Content-Length: 2") + b"{}")
            status, headers, body = await answer(reader)
            assert status == 503, body
            assert_openai_error(body, "too_many_connections", status=status)
            assert headers["retry-after"] == "1"
            assert await closed(reader)
    await asyncio.sleep(0.05)  # the router has seen them go
    status, body = await router.chat("m")
    assert status == 200, body


async def test_a_body_the_json_parser_cannot_take_is_a_400(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router({"m": fake_profile(dummy_model)})
    for raw in (
        '{"model": "m", "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
        '{"model": "m", "n": ' + "1" * 5000 + "}",
    ):
        async with router.session.post("/v1/chat/completions", data=raw) as response:
            assert response.status == 400
            assert_openai_error(await response.json(), "invalid_json", status=response.status)
    assert router.controller.upstreams == {}


async def test_the_open_file_limit_is_raised_to_the_hard_one(
    tmp_path: Path, dummy_model: Path, router_processes: list[RouterProcess]
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    config = write_config(tmp_path / "profiles.yaml", {"m": fake_profile(dummy_model)})
    router = RouterProcess(config)
    router_processes.append(router)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 256), hard))  # what the router inherits
    try:
        await router.start(wait_listening=False)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    await router.wait_log(lambda e: e.get("event") == "listening", what="listening")
    raised = psutil.Process(router.pid).rlimit(psutil.RLIMIT_NOFILE)[0]
    assert raised == hard or (hard == resource.RLIM_INFINITY and raised > 256)


async def test_a_large_body_is_read_for_its_model_without_parsing_it_whole(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router({"m": fake_profile(dummy_model)}, max_body_mb=8)
    text = "word " * 600_000  # 3 MB: scanned, not parsed, by the router; parsed by the upstream
    status, body = await router.chat("m", messages=[{"role": "user", "content": text}], max_tokens=3)
    assert status == 200, body
    assert body["usage"]["prompt_tokens"] == 600_000 and body["model"] == "m"
    broken = '{"model": "m", "messages": [{"role": "user", "content": "' + text + '"}]'  # no closing brace
    async with router.session.post("/v1/chat/completions", data=broken) as response:
        assert response.status == 400
        assert_openai_error(await response.json(), "invalid_json", status=response.status)


@pytest.mark.parametrize(
    "payload",
    [
        {
            "model": "m",
            "stream": True,
            "n": -1.5e-3,
            "x": None,
            "s": 'q"\\\n é 😀',
            "tools": [{"a": [1, {}]}],
        },
        {"model": "m", "input": [[1, 2.5], [True, False, None]], "long": "x" * (SMALL_VALUE + 1)},
        {},
    ],
)
def test_the_scanned_top_level_fields_are_what_a_parser_reads(payload: dict[str, Any]) -> None:
    small = {k: v for k, v in payload.items() if not isinstance(v, (list, dict)) and k != "long"}
    for raw in (json.dumps(payload), json.dumps(payload, indent=2, ensure_ascii=False)):
        assert top_level_fields(raw.encode()) == small


@pytest.mark.parametrize(
    "raw",
    [
        b"[1]",
        b'{"m": 1',
        b'{"m": 1,}',
        b'{"m": 1} x',
        b'{"a": [1}',
        b'{"a": "\x01"}',
        b'{"a": [@]}',
        b'{"a" 1}',
    ],
)
def test_a_scanned_body_that_is_not_a_json_object_is_refused(raw: bytes) -> None:
    with pytest.raises(ValueError):
        top_level_fields(raw)
