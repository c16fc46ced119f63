"""The fast lane (router/fastlane.py) end to end, against real router processes.

The lane serves the listening socket only in `serve()`, so every test here runs `python -m router
serve`. `llama_router_fast_lane_requests_total{outcome}` on `/metrics` says which lane took a request:
requests meant for the lane go out on fresh connections (a connection handed to aiohttp stays with
it), and the router's own GETs (`/metrics`, `/running`, loads) are handed over too, so `Router.lane()`
leaves those out. Raw sockets are used wherever the bytes on the wire matter: pipelining,
`Connection: close`, chunked bodies, `Expect`, disconnects.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import random
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from router.fastlane import _read_head

from .conftest import fake_profile, wait_until
from .router_process import RouterProcess, accepts_connections, write_config

CHAT = "/v1/chat/completions"
LANE = "llama_router_fast_lane_requests_total"
TIMEOUT = 20.0  # seconds any one answer may take before a test fails
REAL_ARGS = ["--ctx-size", "256", "--parallel", "2", "--threads", "1"]


# ---------------------------------------------------------------------------------------------- helpers


def real_profile(model: Path, binary: Path, **extra: Any) -> dict[str, Any]:
    return {"model": str(model), "binary": str(binary), "args": REAL_ARGS, **extra}


def chat_body(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}


def http_post(body: Any, path: str = CHAT, headers: Sequence[tuple[str, str]] = ()) -> bytes:
    """A POST as bytes on the wire, with one Content-Length (`body`: JSON-able, or raw bytes)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    lines = [
        f"POST {path} HTTP/1.1",
        "Host: 127.0.0.1",
        "Content-Type: application/json",
        f"Content-Length: {len(data)}",
        *(f"{name}: {value}" for name, value in headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


def sse_data(raw: bytes) -> list[str]:
    """The `data:` payloads of an SSE body, in order."""
    return [line[len("data: ") :] for line in raw.decode().splitlines() if line.startswith("data: ")]


def stream_contents(events: list[str]) -> list[str]:
    """The non-empty content deltas of streamed chat chunks (error events and `[DONE]` left out)."""
    contents = []
    for event in events:
        if event == "[DONE]":
            continue
        chunk = json.loads(event)
        for choice in chunk.get("choices") or []:
            if choice.get("delta", {}).get("content"):
                contents.append(choice["delta"]["content"])
    return contents


def assert_openai_error(body: Any, code: str | None = None) -> dict[str, Any]:
    """`body` is `{"error": {"message", "type", "code"}}`; returns the inner error."""
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert {"message", "type", "code"} <= set(error), error
    assert isinstance(error["message"], str) and error["message"], error
    if code is not None:
        assert error["code"] == code, error
    return dict(error)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # lowercased names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Conn:
    """One raw client connection: requests go out byte for byte; answers are parsed strictly enough
    to catch framing mistakes (one length, no length together with chunking, CRLF after chunks)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def head(self, timeout: float = TIMEOUT) -> tuple[int, dict[str, str]]:
        raw = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)
        lines = raw[:-4].decode("latin-1").split("\r\n")
        version, status, _ = (lines[0] + " ").split(" ", 2)
        assert version == "HTTP/1.1", lines[0]
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            assert colon and name == name.strip(), f"malformed header line {line!r}"
            key = name.lower()
            assert not (key in headers and key in ("content-length", "transfer-encoding")), lines
            headers[key] = value.strip()
        assert not ("content-length" in headers and "transfer-encoding" in headers), lines
        return int(status), headers

    async def chunk(self, timeout: float = TIMEOUT) -> bytes | None:
        """The next chunk's data of a chunked body; None at the last chunk (trailers read too)."""
        line = await asyncio.wait_for(self.reader.readuntil(b"\r\n"), timeout)
        size = int(line[:-2].split(b";")[0], 16)
        if size == 0:
            while await asyncio.wait_for(self.reader.readuntil(b"\r\n"), timeout) != b"\r\n":
                pass
            return None
        data = await asyncio.wait_for(self.reader.readexactly(size + 2), timeout)
        assert data[-2:] == b"\r\n", "a chunk not followed by CRLF"
        return data[:-2]

    async def reply(self, timeout: float = TIMEOUT) -> Reply:
        """The next whole answer, all of it within `timeout`."""
        return await asyncio.wait_for(self._reply(), timeout)

    async def _reply(self) -> Reply:
        status, headers = await self.head()
        if status < 200:
            return Reply(status, headers, b"")
        if headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while (data := await self.chunk()) is not None:
                parts.append(data)
            body = b"".join(parts)
        elif "content-length" in headers:
            body = await self.reader.readexactly(int(headers["content-length"]))
        else:
            body = await self.reader.read()  # delimited by the close
        return Reply(status, headers, body)

    async def closed_by_router(self, timeout: float = 5.0) -> bool:
        """Whether the router closes the connection (EOF, nothing more) within `timeout`."""
        return await asyncio.wait_for(self.reader.read(1), timeout) == b""

    def close(self) -> None:
        self.writer.close()


@contextlib.asynccontextmanager
async def connection(port: int) -> AsyncIterator[Conn]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    conn = Conn(reader, writer)
    try:
        yield conn
    finally:
        conn.close()


async def exchange(port: int, request: bytes, timeout: float = TIMEOUT) -> Reply:
    """One request on a fresh connection, and its answer."""
    async with connection(port) as conn:
        conn.send(request)
        return await conn.reply(timeout)


async def fake_report(port: int) -> dict[str, Any]:
    """The fake upstream's `/fake/last`, asked directly on its port (not through the router)."""
    timeout = aiohttp.ClientTimeout(total=5)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(f"http://127.0.0.1:{port}/fake/last") as response,
    ):
        assert response.status == 200
        report: dict[str, Any] = await response.json()
        return report


class Router:
    """A `llama-router serve` process and what tests ask it."""

    def __init__(self, process: RouterProcess, key: str | None) -> None:
        self.process = process
        self.port = process.port
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        # A fresh connection per request: each is handed over once, and counted in `own`.
        self.admin = aiohttp.ClientSession(
            base_url=process.url,
            headers=headers,
            connector=aiohttp.TCPConnector(force_close=True),
            timeout=aiohttp.ClientTimeout(total=TIMEOUT),
        )
        self.own = 0  # requests of the tests' own that the lane handed over

    async def _get(self, path: str) -> bytes:
        self.own += 1
        async with self.admin.get(path) as response:
            assert response.status == 200, path
            return await response.read()

    async def load(self, model: str) -> None:
        self.own += 1
        async with self.admin.post("/models/load", params={"wait": "1"}, json={"model": model}) as response:
            assert response.status == 200, await response.text()

    async def samples(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = (await self._get("/metrics")).decode()
        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples

    async def lane(self) -> tuple[int, int]:
        """(relayed, handed over), less the tests' own requests (this scrape included)."""
        samples = await self.samples()
        relayed = samples.get((LANE, (("outcome", "relayed"),)), 0.0)
        handed_over = samples.get((LANE, (("outcome", "handed_over"),)), 0.0)
        return int(relayed), int(handed_over) - self.own

    async def metric(self, name: str, **labels: str) -> float:
        return (await self.samples()).get((name, tuple(sorted(labels.items()))), 0.0)

    async def running(self) -> dict[str, dict[str, Any]]:
        rows = json.loads(await self._get("/running"))["running"]
        return {row["model"]: row for row in rows}

    async def upstream_port(self, model: str) -> int:
        return int((await self.running())[model]["port"])

    async def close(self) -> None:
        await self.admin.close()


async def lane_since(router: Router, before: tuple[int, int]) -> tuple[int, int]:
    """(relayed, handed over) since `before` (a `Router.lane()`)."""
    relayed, handed_over = await router.lane()
    return relayed - before[0], handed_over - before[1]


async def all_client_connections_closed(router: Router) -> None:
    """Wait until the router holds no established connection on its listening port."""
    process = psutil.Process(router.process.pid)

    def none_open() -> bool:
        return not [
            c
            for c in process.net_connections("tcp")
            if c.laddr and c.laddr.port == router.port and c.status == psutil.CONN_ESTABLISHED
        ]

    await wait_until(none_open, what="the router to close every client connection")


StartRouter = Callable[..., Awaitable[Router]]


@pytest.fixture
async def serve(tmp_path: Path, router_processes: list[RouterProcess]) -> AsyncIterator[StartRouter]:
    """Start `llama-router serve` on profiles and server settings; `key`: the key the tests' own
    requests (metrics, loads) carry."""
    routers: list[Router] = []

    async def start(profiles: dict[str, Any], *, key: str | None = None, **server: Any) -> Router:
        config = write_config(tmp_path / f"profiles-{len(routers)}.yaml", profiles, **server)
        process = await RouterProcess(config).start()
        router_processes.append(process)
        router = Router(process, key)
        routers.append(router)
        return router

    yield start
    for router in routers:
        await router.close()


# ------------------------------------------------------------------------------------------- the head check


GOOD_HEAD = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 17"
)


def test_the_head_check_relays_plain_requests_lends_others_and_leaves_the_rest_to_aiohttp() -> None:
    plain = _read_head(GOOD_HEAD)
    assert plain is not None
    method, target, length, headers, close, relayable = plain
    assert (method, target, length, close, relayable) == (b"POST", b"/v1/chat/completions", 17, False, True)
    # Content-Length is left out: the lane writes its own.
    assert headers == [(b"host", b"Host: x"), (b"content-type", b"Content-Type: application/json")]
    closing = _read_head(GOOD_HEAD + b"\r\nConnection: close")
    assert closing is not None and closing[4] is True
    for path in (b"/completion", b"/v1/embeddings", b"/tokenize"):
        other = _read_head(GOOD_HEAD.replace(b"/v1/chat/completions", path))
        assert other is not None and other[5], path

    # Delimited, but more than a relay: lent to aiohttp for one request.
    lent = {
        "GET": GOOD_HEAD.replace(b"POST", b"GET", 1),
        "a query string": GOOD_HEAD.replace(b"completions ", b"completions?x=1 "),
        "a path the lane does not relay": GOOD_HEAD.replace(b"/v1/chat/completions", b"/models/load"),
        "no Content-Length": GOOD_HEAD.replace(b"\r\nContent-Length: 17", b""),
        "Expect": GOOD_HEAD + b"\r\nExpect: 100-continue",
        "TE": GOOD_HEAD + b"\r\nTE: trailers",
    }
    for why, raw in lent.items():
        read = _read_head(raw)
        assert read is not None and read[5] is False, why
    # Not delimited, or not plainly formed: the connection is aiohttp's from then on.
    not_ours = {
        "lowercase method": GOOD_HEAD.replace(b"POST", b"post", 1),
        "HTTP/1.0": GOOD_HEAD.replace(b"HTTP/1.1", b"HTTP/1.0"),
        "two Content-Length": GOOD_HEAD + b"\r\nContent-Length: 17",
        "a signed Content-Length": GOOD_HEAD.replace(b"Length: 17", b"Length: +17"),
        "Transfer-Encoding": GOOD_HEAD + b"\r\nTransfer-Encoding: chunked",
        "Upgrade": GOOD_HEAD + b"\r\nUpgrade: websocket",
        "Connection: upgrade": GOOD_HEAD + b"\r\nConnection: keep-alive, Upgrade",
        "a space before a colon": GOOD_HEAD.replace(b"Host:", b"Host :"),
        "a tab before a colon": GOOD_HEAD.replace(b"Host:", b"Host\t:"),
        "an obs-fold line": GOOD_HEAD.replace(b"Host: x", b"Host: x\r\n  y"),
        "an obs-fold line with a colon": GOOD_HEAD.replace(b"Host: x", b"Host: x\r\n\tX-Y: z"),
        "a bare LF": GOOD_HEAD.replace(b"Host: x\r\n", b"Host: x\n"),
        "two spaces in the request line": GOOD_HEAD.replace(b"POST ", b"POST  ", 1),
        "a line without a colon": GOOD_HEAD + b"\r\nnonsense",
    }
    for why, raw in not_ours.items():
        assert _read_head(raw) is None, why


# ---------------------------------------------------------------------------------------------- relayed


async def test_plain_chat_to_a_loaded_real_model_is_relayed(
    serve: StartRouter, tiny_models: tuple[Path, Path], llama_server: Path
) -> None:
    router = await serve({"tiny-a": real_profile(tiny_models[0], llama_server)})
    await router.load("tiny-a")
    client = aiohttp.ClientSession(
        base_url=router.process.url,
        connector=aiohttp.TCPConnector(force_close=True),  # a fresh connection per request
        timeout=aiohttp.ClientTimeout(total=TIMEOUT),
    )
    async with client:
        before = await router.lane()
        async with client.post(CHAT, json=chat_body("tiny-a")) as response:
            assert response.status == 200, await response.text()
            body = await response.json()
        assert await lane_since(router, before) == (1, 0)
        assert body["object"] == "chat.completion"
        assert body["model"] == "tiny-a"
        assert body["choices"][0]["message"]["role"] == "assistant"
        assert body["usage"]["completion_tokens"] > 0
        await router.process.wait_log(
            lambda e: e.get("path") == CHAT and e.get("status") == 200 and e.get("model") == "tiny-a",
            what="the relayed request's access log line",
        )

        prompt_before = await router.metric("llama_router_tokens_total", model="tiny-a", kind="prompt")
        completion_before = await router.metric(
            "llama_router_tokens_total", model="tiny-a", kind="completion"
        )
        before = await router.lane()
        payload = chat_body("tiny-a", stream=True, stream_options={"include_usage": True})
        async with client.post(CHAT, json=payload) as response:
            assert response.status == 200, await response.text()
            assert response.headers["Content-Type"].startswith("text/event-stream")
            events = sse_data(await response.read())
        assert await lane_since(router, before) == (1, 0)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert chunks and all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert all(chunk["model"] == "tiny-a" for chunk in chunks)
    usage = next(chunk["usage"] for chunk in chunks if chunk.get("usage"))
    prompt = await router.metric("llama_router_tokens_total", model="tiny-a", kind="prompt")
    completion = await router.metric("llama_router_tokens_total", model="tiny-a", kind="completion")
    assert (prompt - prompt_before, completion - completion_before) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
    ), "the stream's usage was counted"


async def test_pipelined_requests_are_answered_in_order(
    serve: StartRouter, tiny_models: tuple[Path, Path], llama_server: Path
) -> None:
    router = await serve({"tiny-a": real_profile(tiny_models[0], llama_server, aliases=["alpha"])})
    await router.load("tiny-a")
    tokenize = http_post({"model": "tiny-a", "content": "hello world"}, path="/tokenize")

    before = await router.lane()
    async with connection(router.port) as conn:
        conn.send(http_post(chat_body("tiny-a")) + tokenize)  # both in one write
        first, second = await conn.reply(), await conn.reply()
        assert first.status == 200, first.body
        assert first.json()["object"] == "chat.completion"
        assert second.status == 200, second.body
        assert second.json()["tokens"], "the second answer is the tokenize one"
        # Kept alive: a third request on the same connection is relayed too.
        conn.send(tokenize)
        third = await conn.reply()
        assert third.status == 200 and third.json()["tokens"] == second.json()["tokens"]
    assert await lane_since(router, before) == (3, 0)

    # A request in the middle that the lane lends to aiohttp: the connection comes back for the next.
    before = await router.lane()
    async with connection(router.port) as conn:
        conn.send(http_post(chat_body("tiny-a")) + http_post(chat_body("alpha")) + tokenize)
        replies = [await conn.reply() for _ in range(3)]
    assert [reply.status for reply in replies] == [200, 200, 200], [reply.body for reply in replies]
    assert replies[0].json()["model"] == "tiny-a"
    assert replies[1].json()["model"] == "alpha"
    assert replies[2].json()["tokens"]
    assert await lane_since(router, before) == (2, 1)


async def test_connection_close_ends_the_connection_after_the_answer(
    serve: StartRouter, tiny_models: tuple[Path, Path], llama_server: Path
) -> None:
    router = await serve({"tiny-a": real_profile(tiny_models[0], llama_server)})
    await router.load("tiny-a")

    before = await router.lane()
    async with connection(router.port) as conn:
        conn.send(http_post(chat_body("tiny-a"), headers=[("Connection", "close")]))
        reply = await conn.reply()
        assert reply.status == 200, reply.body
        assert reply.json()["model"] == "tiny-a"
        assert await conn.closed_by_router(), "the connection stayed open after `Connection: close`"
    assert await lane_since(router, before) == (1, 0)


# ---------------------------------------------------------------------------------------------- handed over


async def test_requests_the_lane_hands_over_are_served_as_before(
    serve: StartRouter, tiny_models: tuple[Path, Path], llama_server: Path
) -> None:
    router = await serve(
        {
            "tiny-a": real_profile(tiny_models[0], llama_server, aliases=["alpha"]),
            "tiny-b": real_profile(tiny_models[1], llama_server),
        }
    )
    await router.load("tiny-a")

    async def handed_over(request: bytes) -> Reply:
        before = await router.lane()
        reply = await exchange(router.port, request)
        assert await lane_since(router, before) == (0, 1), request
        return reply

    reply = await handed_over(http_post(chat_body("alpha")))
    assert reply.status == 200, reply.body
    assert reply.json()["model"] == "alpha", "the answer names the alias the client used"

    reply = await handed_over(http_post(chat_body("gpt-4o")))
    assert reply.status == 404, reply.body
    assert "tiny-a" in assert_openai_error(reply.json(), "model_not_found")["message"]

    reply = await handed_over(http_post(b'{"model": "tiny-a",'))
    assert reply.status == 400, reply.body
    assert_openai_error(reply.json(), "invalid_json")

    reply = await handed_over(http_post({"messages": [{"role": "user", "content": "hi"}]}))
    assert reply.status == 400, reply.body
    assert_openai_error(reply.json(), "missing_model")

    data = json.dumps(chat_body("tiny-a")).encode()
    chunked = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
        b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (10, data[:10], len(data) - 10, data[10:])
    )
    reply = await handed_over(chunked)
    assert reply.status == 200, reply.body
    assert reply.json()["model"] == "tiny-a"

    # A model that is not loaded: the full path loads it.
    reply = await handed_over(http_post(chat_body("tiny-b")))
    assert reply.status == 200, reply.body
    assert reply.json()["model"] == "tiny-b"

    # Expect: 100-continue: the go-ahead comes before the body is sent.
    before = await router.lane()
    async with connection(router.port) as conn:
        head = http_post(data, headers=[("Expect", "100-continue")])[: -len(data)]
        conn.send(head)
        status, _ = await conn.head()
        assert status == 100
        conn.send(data)
        reply = await conn.reply()
        assert reply.status == 200, reply.body
        assert reply.json()["model"] == "tiny-a"
    assert await lane_since(router, before) == (0, 1)

    # A request lent to aiohttp gives the connection back: the next one on it is relayed.
    before = await router.lane()
    async with connection(router.port) as conn:
        conn.send(http_post(chat_body("gpt-4o")))
        assert (await conn.reply()).status == 404
        conn.send(http_post(chat_body("tiny-a")))
        reply = await conn.reply()
        assert reply.status == 200, reply.body
        assert reply.json()["model"] == "tiny-a"
    assert await lane_since(router, before) == (1, 1)

    # A connection whose request the lane cannot delimit stays with aiohttp, and serves the next one,
    # even after requests lent to aiohttp before it.
    before = await router.lane()
    async with connection(router.port) as conn:
        conn.send(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert (await conn.reply()).status == 200
        conn.send(chunked)
        assert (await conn.reply()).status == 200
        conn.send(http_post(chat_body("tiny-a")))
        reply = await conn.reply()
        assert reply.status == 200, reply.body
        assert reply.json()["model"] == "tiny-a"
    assert await lane_since(router, before) == (0, 2)


async def test_keys_are_checked_and_kept_from_the_upstream(serve: StartRouter, dummy_model: Path) -> None:
    router = await serve({"m": fake_profile(dummy_model)}, key="user-key", api_keys=["user-key"])
    await router.load("m")
    upstream = await router.upstream_port("m")

    for headers in ([], [("Authorization", "Bearer wrong")]):
        before = await router.lane()
        reply = await exchange(router.port, http_post(chat_body("m"), headers=headers))
        assert reply.status == 401, reply.body
        assert_openai_error(reply.json(), "invalid_api_key")
        assert await lane_since(router, before) == (0, 1), headers
    assert (await fake_report(upstream))["count"] == 0

    for name, value in (("Authorization", "Bearer user-key"), ("x-api-key", "user-key")):
        before = await router.lane()
        reply = await exchange(router.port, http_post(chat_body("m"), headers=[(name, value)]))
        assert reply.status == 200, reply.body
        assert reply.json()["model"] == "m"
        assert await lane_since(router, before) == (1, 0), name
        seen = {header.lower() for header in (await fake_report(upstream))["headers"]}
        assert name.lower() not in seen, "the router's key was passed on to the upstream"


async def test_a_lent_request_answered_before_its_body_came_leaves_the_connection_usable(
    serve: StartRouter, dummy_model: Path
) -> None:
    """aiohttp refuses a request on its head alone (no key): the body that follows is not taken for
    a next request, and the next request on the connection is relayed."""
    router = await serve({"m": fake_profile(dummy_model)}, key="user-key", api_keys=["user-key"])
    await router.load("m")
    body = json.dumps({"model": "m"}).encode()
    head = http_post(body, "/models/load")[: -len(body)]
    before = await router.lane()
    async with connection(router.port) as conn:
        conn.send(head)
        refused = await conn.reply()
        assert refused.status == 401, refused.body
        conn.send(body)  # the body of the refused request, late
        conn.send(http_post(chat_body("m"), headers=[("Authorization", "Bearer user-key")]))
        reply = await conn.reply()
        assert reply.status == 200, reply.body
        assert reply.json()["model"] == "m"
    assert await lane_since(router, before) == (1, 1)


async def test_a_lent_head_request_gives_the_connection_back(serve: StartRouter, dummy_model: Path) -> None:
    router = await serve({"m": fake_profile(dummy_model)})
    await router.load("m")
    before = await router.lane()
    async with connection(router.port) as conn:
        conn.send(b"HEAD /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        status, headers = await conn.head()
        assert status == 200 and int(headers["content-length"]) > 0, headers  # and no body follows
        conn.send(http_post(chat_body("m")))
        reply = await conn.reply()
        assert reply.status == 200, reply.body
        assert reply.json()["model"] == "m"
    assert await lane_since(router, before) == (1, 1)


# ---------------------------------------------------------------------------------------------- models


async def test_a_swap_waits_for_the_relayed_request(serve: StartRouter, dummy_model: Path) -> None:
    router = await serve(
        {"a": fake_profile(dummy_model), "b": fake_profile(dummy_model)}, max_resident=1, swap_delay=0
    )
    await router.load("a")
    upstream_a = await router.upstream_port("a")
    finished: dict[str, float] = {}

    async def timed(model: str, **extra: Any) -> Reply:
        reply = await exchange(router.port, http_post(chat_body(model, **extra)))
        finished[model] = time.monotonic()
        return reply

    before = await router.lane()
    slow = asyncio.create_task(timed("a", fake_delay=1.0))

    async def a_busy() -> bool:
        return (await fake_report(upstream_a))["in_flight"] == 1

    await wait_until(a_busy, what="A's request to reach its upstream")
    reply_b = await timed("b")
    reply_a = await slow
    assert reply_a.status == 200, reply_a.body
    assert reply_a.json()["choices"][0]["message"]["content"].startswith("Hello from")
    assert reply_b.status == 200, reply_b.body
    assert reply_b.json()["model"] == "b"
    assert finished["a"] <= finished["b"]
    assert await lane_since(router, before) == (1, 1)
    assert list(await router.running()) == ["b"]


async def test_a_stream_that_stalls_ends_with_an_error_event_after_stall_timeout(
    serve: StartRouter, dummy_model: Path
) -> None:
    stall = 0.5
    router = await serve(
        {"stally": fake_profile(dummy_model, "--stall-mid-stream", "2")},
        stall_timeout=stall,
        stall_timeout_prompt=30,  # longer, as usual: prompt processing takes longer than a token
    )
    await router.load("stally")
    pid = (await router.running())["stally"]["pid"]
    before = await router.lane()
    started = time.monotonic()
    async with connection(router.port) as conn:
        conn.send(http_post(chat_body("stally", stream=True)))
        try:
            reply = await conn.reply(timeout=stall + 3)
        except TimeoutError:
            message = f"the stalled stream did not end within {stall + 3}s (stall_timeout is {stall}s)"
            raise AssertionError(message) from None
    elapsed = time.monotonic() - started
    assert reply.status == 200
    events = sse_data(reply.body)
    assert stream_contents(events[:-1]) == ["Hello from fake-model.", " (1)"]
    assert_openai_error(json.loads(events[-1]), "upstream_stalled")
    assert stall <= elapsed < stall + 1.5, elapsed
    assert await lane_since(router, before) == (1, 0)
    assert await router.metric("llama_router_errors_total", model="stally", code="upstream_stalled") == 1

    # The stalled model is restarted, and serves the next request.
    reply = await exchange(router.port, http_post(chat_body("stally")))
    assert reply.status == 200, reply.body
    assert (await router.running())["stally"]["pid"] != pid


async def test_an_answer_that_never_begins_is_a_502_after_stall_timeout_prompt(
    serve: StartRouter, dummy_model: Path
) -> None:
    stall = 0.5
    router = await serve({"slow": fake_profile(dummy_model)}, stall_timeout_prompt=stall, stall_timeout=30)
    await router.load("slow")
    pid = (await router.running())["slow"]["pid"]
    before = await router.lane()
    started = time.monotonic()
    async with connection(router.port) as conn:
        conn.send(http_post(chat_body("slow", fake_delay=10)))
        reply = await conn.reply(timeout=stall + 3)
        elapsed = time.monotonic() - started
        assert reply.status == 502, reply.body
        assert reply.headers["content-type"].startswith("application/json")
        assert_openai_error(reply.json(), "upstream_stalled")
        assert stall <= elapsed < stall + 1.5, elapsed
        assert await lane_since(router, before) == (1, 0)
        # The connection stays usable; the next request is served by the restarted model.
        conn.send(http_post(chat_body("slow")))
        reply = await conn.reply()
        assert reply.status == 200, reply.body
    assert (await router.running())["slow"]["pid"] != pid


async def test_a_crash_mid_stream_ends_the_relayed_stream_with_an_error_event(
    serve: StartRouter, dummy_model: Path
) -> None:
    router = await serve({"crashy": fake_profile(dummy_model, "--crash-mid-stream", "2")})
    await router.load("crashy")
    tokenize = http_post({"model": "crashy", "content": "ab"}, path="/tokenize")
    for _ in range(3):  # right after the error event the next request comes: a race, tried a few times
        before = await router.lane()
        reply = await exchange(router.port, http_post(chat_body("crashy", stream=True)))
        assert reply.status == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        events = sse_data(reply.body)
        assert stream_contents(events[:-1]) == ["Hello from fake-model.", " (1)"]
        assert_openai_error(json.loads(events[-1]), "upstream_failed")
        assert await lane_since(router, before) == (1, 0)
        # A request the fake does not crash on, at once: served by a restarted model.
        reply = await exchange(router.port, tokenize)
        assert reply.status == 200, reply.body
        assert reply.json()["tokens"] == [97, 98]


async def test_a_kept_alive_upstream_connection_closed_unanswered_is_taken_back_and_retried(
    serve: StartRouter, dummy_model: Path
) -> None:
    router = await serve({"m": fake_profile(dummy_model, "--drop-kept-alive")})
    await router.load("m")
    upstream = await router.upstream_port("m")
    pid = (await router.running())["m"]["pid"]
    tokenize = http_post({"model": "m", "content": "ab"}, path="/tokenize")
    # A first request leaves its upstream connection in the pool; the next one is sent on it.
    assert (await exchange(router.port, tokenize)).status == 200
    before = await router.lane()
    reply = await exchange(router.port, http_post(chat_body("m")))
    assert reply.status == 200, reply.body
    assert reply.json()["choices"][0]["message"]["content"].startswith("Hello from")
    assert await lane_since(router, before) == (1, 1), "relayed, then taken back to the full path"
    report = await fake_report(upstream)
    assert report["count"] == 3, "tokenize, the dropped chat, the chat again on a new connection"
    assert report["path"] == CHAT
    assert (await router.running())["m"]["pid"] == pid, "no restart for a closed connection"


async def test_a_request_that_kills_its_upstream_on_a_kept_alive_connection_is_not_sent_again(
    serve: StartRouter, dummy_model: Path
) -> None:
    """The fake reads a non-streamed chat and dies (--crash-mid-stream): a request that may have
    killed its upstream must not be sent to a fresh one (the full path's rule; see proxy._send)."""
    router = await serve({"crashy": fake_profile(dummy_model, "--crash-mid-stream", "1")})
    await router.load("crashy")
    tokenize = http_post({"model": "crashy", "content": "ab"}, path="/tokenize")
    assert (await exchange(router.port, tokenize)).status == 200  # leaves a kept-alive connection
    before = await router.lane()
    reply = await exchange(router.port, http_post(chat_body("crashy")))
    assert (await lane_since(router, before))[0] == 1
    assert reply.status == 502, reply.body
    assert_openai_error(reply.json())
    loads = await router.metric("llama_router_loads_total", model="crashy")
    assert loads == 1, f"the request that killed its upstream was sent again to a fresh one ({loads} loads)"


# ---------------------------------------------------------------------------------------------- clients


async def test_a_client_leaving_a_relayed_stream_stops_the_upstream_work(
    serve: StartRouter, dummy_model: Path
) -> None:
    router = await serve({"long": fake_profile(dummy_model, "--chunk-delay", "0.05", "--chunks", "2000")})
    await router.load("long")
    upstream = await router.upstream_port("long")
    before = await router.lane()
    async with connection(router.port) as conn:
        conn.send(http_post(chat_body("long", stream=True)))
        status, _ = await conn.head()
        assert status == 200
        first = await conn.chunk()
        assert first is not None and first.startswith(b"data: ")
        assert (await fake_report(upstream))["in_flight"] == 1
    # (The connection is closed now.)

    async def upstream_idle() -> bool:
        return (await fake_report(upstream))["in_flight"] == 0

    async def lease_released() -> bool:
        return (await router.running())["long"]["in_flight"] == 0

    await wait_until(upstream_idle, what="the upstream's request to end")
    await wait_until(lease_released, what="the router to release the model")
    await router.process.wait_log(lambda e: e.get("path") == CHAT and e.get("status") == 499, what="a 499")
    assert (await fake_report(upstream))["count"] == 1, "the stream was not sent again"
    assert await lane_since(router, before) == (1, 0)
    reply = await exchange(router.port, http_post(chat_body("long", fake_chunks=2)))
    assert reply.status == 200, reply.body


def _upstream_connections(pid: int, port: int) -> int:
    """Established connections the upstream `pid` holds on its listening `port`."""
    return sum(
        1
        for conn in psutil.Process(pid).net_connections(kind="tcp")
        if conn.status == psutil.CONN_ESTABLISHED and conn.laddr and conn.laddr.port == port
    )


async def test_a_client_leaving_before_a_plain_answer_stops_the_upstream_work(
    serve: StartRouter, dummy_model: Path
) -> None:
    """As test_faults' test for the full path: a client that closes its connection while the answer
    is being computed (an SDK's timeout) frees the upstream at once, not when the answer is done."""
    router = await serve({"slow": fake_profile(dummy_model)})
    await router.load("slow")
    row = (await router.running())["slow"]
    pid, upstream = int(row["pid"]), int(row["port"])
    before = await router.lane()
    async with connection(router.port) as conn:
        conn.send(http_post(chat_body("slow", fake_delay=30)))

        async def upstream_busy() -> bool:
            return (await fake_report(upstream))["in_flight"] == 1

        await wait_until(upstream_busy, what="the request to reach the upstream")
        assert _upstream_connections(pid, upstream) == 1
    # (The client closed its connection.)
    assert await lane_since(router, before) == (1, 0)
    # The fake cannot notice a closed connection while it sleeps in `fake_delay`; llama-server would
    # notice what the router does: close its connection to the upstream.
    await wait_until(
        lambda: _upstream_connections(pid, upstream) == 0,
        what="the router to close its connection to the upstream",
    )

    async def lease_released() -> bool:
        return (await router.running())["slow"]["in_flight"] == 0

    await wait_until(lease_released, what="the router to release the model")


async def test_sigterm_drains_a_relayed_request(serve: StartRouter, dummy_model: Path) -> None:
    router = await serve({"slow": fake_profile(dummy_model)}, shutdown_timeout=20)
    await router.load("slow")
    before = await router.lane()
    async with connection(router.port) as conn:
        conn.send(http_post(chat_body("slow", stream=True, fake_chunks=5, fake_chunk_delay=0.3)))
        status, _ = await conn.head()
        assert status == 200
        assert await lane_since(router, before) == (1, 0)
        router.process.signal(signal.SIGTERM)
        await router.process.wait_log(
            lambda e: "draining 1 request" in str(e.get("message")), what="draining"
        )

        async def refused() -> bool:
            return not await accepts_connections(router.port)

        await wait_until(refused, what="the listening socket to close")
        parts = []
        while (data := await conn.chunk()) is not None:
            parts.append(data)
        events = sse_data(b"".join(parts))
        assert events[-1] == "[DONE]"
        assert len(stream_contents(events)) == 5
        assert await conn.closed_by_router()
    assert await router.process.wait_exit() == 0


# ---------------------------------------------------------------------------------------------- turned off


async def test_with_the_lane_turned_off_requests_are_served_and_none_relayed(
    serve: StartRouter, tiny_models: tuple[Path, Path], llama_server: Path
) -> None:
    router = await serve({"tiny-a": real_profile(tiny_models[0], llama_server)}, fast_lane=False)
    await router.load("tiny-a")
    reply = await exchange(router.port, http_post(chat_body("tiny-a")))
    assert reply.status == 200, reply.body
    assert reply.json()["model"] == "tiny-a"
    reply = await exchange(router.port, http_post(chat_body("tiny-a", stream=True)))
    assert reply.status == 200, reply.body
    assert sse_data(reply.body)[-1] == "[DONE]"
    samples = await router.samples()
    assert samples[(LANE, (("outcome", "relayed"),))] == 0
    assert samples[(LANE, (("outcome", "handed_over"),))] == 0


# ---------------------------------------------------------------------------------------------- mixed load


async def test_mixed_traffic_across_swaps_leaves_nothing_behind(
    serve: StartRouter, dummy_model: Path
) -> None:
    """Many clients at once, each doing what clients do (plain chats, streams, streams abandoned half
    way, aliases, pipelined pairs) on two models that must take turns: every answer is right, and
    afterwards no request is held, no upstream works, and no client connection stays open."""
    profiles = {
        "a": fake_profile(dummy_model, aliases=["alias-a"]),
        "b": fake_profile(dummy_model, aliases=["alias-b"]),
    }
    router = await serve(profiles, max_resident=1, swap_delay=0.2)
    await router.load("a")
    before = await router.lane()
    rng = random.Random(7)
    outcomes: collections.Counter[str] = collections.Counter()
    stream = {"stream": True, "fake_chunks": 5, "fake_chunk_delay": 0.01}

    async def plain(model: str) -> None:
        reply = await exchange(router.port, http_post(chat_body(model)))
        assert reply.status == 200, reply.body
        assert reply.json()["model"] == model

    async def streamed(model: str) -> None:
        reply = await exchange(router.port, http_post(chat_body(model, **stream)))
        assert reply.status == 200, reply.body
        events = sse_data(reply.body)
        assert events[-1] == "[DONE]" and len(stream_contents(events)) == 5, events

    async def abandoned(model: str) -> None:
        async with connection(router.port) as conn:
            # Long enough that only stopping it on the client's leave frees the model in time.
            conn.send(http_post(chat_body(model, **{**stream, "fake_chunks": 300, "fake_chunk_delay": 0.1})))
            status, _ = await conn.head()
            assert status == 200
            await conn.chunk()

    async def pipelined(model: str) -> None:
        async with connection(router.port) as conn:
            conn.send(http_post(chat_body(model)) + http_post({"model": model, "content": "ab"}, "/tokenize"))
            first, second = await conn.reply(), await conn.reply()
        assert first.status == 200 and first.json()["model"] == model, first.body
        assert second.status == 200 and "tokens" in second.json(), second.body

    actions: dict[str, Callable[[str], Awaitable[None]]] = {
        "plain": plain,
        "streamed": streamed,
        "abandoned": abandoned,
        "pipelined": pipelined,
        "alias": lambda model: plain(f"alias-{model}"),
    }
    until = time.monotonic() + 3.0

    async def client(seed: int) -> None:
        picks = random.Random(seed)
        while time.monotonic() < until:
            name = picks.choice(list(actions))
            await actions[name](picks.choice("ab"))
            outcomes[name] += 1

    await asyncio.wait_for(asyncio.gather(*(client(rng.randrange(1 << 30)) for _ in range(12))), 60)
    assert set(outcomes) == set(actions), outcomes
    relayed, handed_over = await lane_since(router, before)
    assert relayed > 0 and handed_over > 0, (relayed, handed_over)
    assert (
        await router.metric("llama_router_swaps_total", model="a")
        + await router.metric("llama_router_swaps_total", model="b")
        > 0
    ), "the two models took turns"

    async def all_idle() -> bool:
        rows = await router.running()
        if any(row["in_flight"] or row["waiting"] for row in rows.values()):
            return False
        reports = [await fake_report(int(row["port"])) for row in rows.values()]
        return all(report["in_flight"] == 0 for report in reports)

    await wait_until(all_idle, what="no request held by the router or its upstreams")
    await all_client_connections_closed(router)


# ---------------------------------------------------------------------------------------------- bad input


def mangled_requests(rng: random.Random, count: int) -> list[bytes]:
    """Whole requests (a head ended by a blank line, then as many body bytes as its one plain
    Content-Length says, or a chunked body) whose heads are damaged in the ways that trip parsers."""
    body = json.dumps(chat_body("m")).encode()
    lines = [
        b"POST /v1/chat/completions HTTP/1.1",
        b"Host: 127.0.0.1",
        b"Content-Type: application/json",
        b"Content-Length: %d" % len(body),
    ]

    def first_line(old: bytes, *new: bytes) -> Callable[[list[bytes]], list[bytes]]:
        return lambda head: [head[0].replace(old, rng.choice(new)), *head[1:]]

    def extra(*new: bytes) -> Callable[[list[bytes]], list[bytes]]:
        return lambda head: [*head, rng.choice(new)]

    damage = [
        first_line(b"POST", b"GET", b"PUT", b"post", b"P0ST", b""),
        first_line(b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b"HTTP/1.1 x", b""),
        first_line(b"/v1/chat/completions", b"/v1/models", b"*", b"x", b"//", b"/v1/chat/completions?x=1"),
        extra(b"Content-Length: 3", b"Content-Length: -1", b"Content-Length: 1e3", b"Content-Length: "),
        extra(b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip"),
        extra(b"Expect: 100-continue", b"Connection: close", b"Upgrade: h2c", b"TE: trailers"),
        extra(b" folded", b"\tfolded: x", b"No-Colon", b": empty-name", b"X :y"),
        lambda head: [line.replace(b"\r", b"") if rng.random() < 0.3 else line for line in head],
        lambda head: [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 12))), *head[1:]],
    ]
    requests = []
    for _ in range(count):
        head = list(lines)
        for _ in range(rng.randrange(1, 4)):
            head = rng.choice(damage)(head)
        head = [line.replace(b"\n", b"") for line in head]
        raw = b"\r\n".join(head) + b"\r\n\r\n"
        lengths = [
            line.split(b":", 1)[1].strip() for line in head if line.lower().startswith(b"content-length:")
        ]
        if any(line.lower().startswith(b"transfer-encoding:") for line in head):
            raw += b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        elif lengths and all(value.isdigit() for value in lengths) and len(set(lengths)) == 1:
            raw += (body + b" " * int(lengths[0]))[: int(lengths[0])]
        requests.append(raw)
    return requests


async def test_mangled_requests_get_an_answer_or_a_close_and_leave_nothing_open(
    serve: StartRouter, dummy_model: Path
) -> None:
    """Whatever the head, a whole request gets an HTTP answer or its connection closed, promptly,
    never a server error for the client's mistake; the router stays healthy and keeps nothing open."""
    router = await serve({"m": fake_profile(dummy_model)})
    await router.load("m")
    outcomes: collections.Counter[str] = collections.Counter()
    for raw in mangled_requests(random.Random(11), 150):
        async with connection(router.port) as conn:
            conn.send(raw)
            try:
                head = await asyncio.wait_for(conn.reader.readuntil(b"\r\n\r\n"), 5)
            except asyncio.IncompleteReadError:
                outcomes["closed"] += 1
                continue
            except TimeoutError:
                raise AssertionError(f"no answer and no close within 5 s for {raw[:200]!r}") from None
            assert head.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")), head
            status = int(head[9:12])
            outcomes[f"{status // 100}xx"] += 1
            assert status < 500 or status == 503, f"a server error for a client's mistake: {head!r}, {raw!r}"
    assert outcomes["2xx"] and outcomes["4xx"], outcomes
    reply = await exchange(router.port, http_post(chat_body("m")))
    assert reply.status == 200, reply.body
    await all_client_connections_closed(router)
