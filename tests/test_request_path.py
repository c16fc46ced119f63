"""The one request path, end to end, where the bytes on the wire matter.

Raw sockets send requests byte for byte and read answers strictly enough to catch framing mistakes:
pipelining, `Connection: close`, chunked uploads, `Expect`, `HEAD`, requests refused before their body
came, hostile heads. The router is the in-process one `serve` runs (tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from prometheus_client.parser import text_string_to_metric_families

from .conftest import RouterFactory, RunningRouter, assert_openai_error, fake_profile, wait_until

CHAT = "/v1/chat/completions"
TIMEOUT = 20.0  # seconds any one answer may take before a test fails


# ---------------------------------------------------------------------------------------------- helpers


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
        assert version in ("HTTP/1.1", "HTTP/1.0"), lines[0]
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


async def fake_report(router: RunningRouter, model: str) -> dict[str, Any]:
    """The fake upstream's `/fake/last` for `model`, asked directly on its port (not through the router)."""
    url = router.controller.upstreams[model].base_url + "/fake/last"
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as response:
        assert response.status == 200
        report: dict[str, Any] = await response.json()
        return report


async def metric(router: RunningRouter, name: str, **labels: str) -> float:
    async with router.session.get("/metrics") as response:
        text = await response.text()
    wanted = tuple(sorted(labels.items()))
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and tuple(sorted(sample.labels.items())) == wanted:
                return float(sample.value)
    return 0.0


async def load(router: RunningRouter, model: str) -> None:
    async with router.session.post("/models/load", params={"wait": "1"}, json={"model": model}) as response:
        assert response.status == 200, await response.text()


async def all_client_connections_closed(router: RunningRouter) -> None:
    """Wait until the router holds no established connection on its listening port."""
    process = psutil.Process()

    def none_open() -> bool:
        return not [
            c
            for c in process.net_connections("tcp")
            if c.laddr and c.laddr.port == router.port and c.status == psutil.CONN_ESTABLISHED
        ]

    await router.session.close()  # the tests' own keep-alive connections
    await wait_until(none_open, what="the router to close every client connection")


# ---------------------------------------------------------------------------------------------- framing


async def test_pipelined_requests_are_answered_in_order(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router({"m": fake_profile(dummy_model, aliases=["alias-m"])})
    await load(router, "m")
    tokenize = http_post({"model": "m", "content": "hello world"}, path="/tokenize")
    async with connection(router.port) as conn:
        # Three requests in one write, an unknown model among them: answered in order, each whole.
        conn.send(http_post(chat_body("m")) + http_post(chat_body("nope")) + http_post(chat_body("alias-m")))
        replies = [await conn.reply() for _ in range(3)]
        assert [reply.status for reply in replies] == [200, 404, 200], [reply.body for reply in replies]
        assert replies[0].json()["model"] == "m"
        assert_openai_error(replies[1].json(), "model_not_found")
        assert replies[2].json()["model"] == "alias-m", "the answer names the alias the client used"
        # Kept alive: the next request on the same connection is served too.
        conn.send(tokenize)
        reply = await conn.reply()
        assert reply.status == 200 and reply.json()["tokens"], reply.body


async def test_connection_close_ends_the_connection_after_the_answer(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router({"m": fake_profile(dummy_model)})
    await load(router, "m")
    async with connection(router.port) as conn:
        conn.send(http_post(chat_body("m"), headers=[("Connection", "close")]))
        reply = await conn.reply()
        assert reply.status == 200, reply.body
        assert reply.json()["model"] == "m"
        assert await conn.closed_by_router(), "the connection stayed open after `Connection: close`"


async def test_chunked_uploads_and_expect_continue_are_served(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router({"m": fake_profile(dummy_model)})
    await load(router, "m")
    data = json.dumps(chat_body("m")).encode()
    chunked = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
        b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (10, data[:10], len(data) - 10, data[10:])
    )
    async with connection(router.port) as conn:
        conn.send(chunked)
        reply = await conn.reply()
        assert reply.status == 200, reply.body
        assert reply.json()["model"] == "m"
        # Expect: 100-continue: the go-ahead comes before the body is sent, and is not passed upstream.
        conn.send(http_post(data, headers=[("Expect", "100-continue")])[: -len(data)])
        status, _ = await conn.head()
        assert status == 100
        conn.send(data)
        reply = await conn.reply()
        assert reply.status == 200, reply.body
        assert reply.json()["model"] == "m"
    seen = {name.lower() for name in (await fake_report(router, "m"))["headers"]}
    assert "expect" not in seen and "transfer-encoding" not in seen


async def test_a_request_refused_before_its_body_came_leaves_the_connection_usable(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    """The key check answers a request on its head alone: the body that follows is not taken for a
    next request, and the next request on the connection is served."""
    router = await start_router({"m": fake_profile(dummy_model)}, api_keys=["user-key"])
    body = json.dumps(chat_body("m")).encode()
    async with connection(router.port) as conn:
        conn.send(http_post(body)[: -len(body)])
        refused = await conn.reply()
        assert refused.status == 401, refused.body
        assert_openai_error(refused.json(), "invalid_api_key")
        conn.send(body)  # the body of the refused request, late
        conn.send(http_post(chat_body("m"), headers=[("Authorization", "Bearer user-key")]))
        reply = await conn.reply()
        assert reply.status == 200, reply.body
        assert reply.json()["model"] == "m"


async def test_a_head_request_is_answered_without_a_body(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router({"m": fake_profile(dummy_model)})
    async with connection(router.port) as conn:
        conn.send(b"HEAD /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        status, headers = await conn.head()
        assert status == 200 and int(headers["content-length"]) > 0, headers  # and no body follows
        conn.send(http_post(chat_body("m")))
        reply = await conn.reply()
        assert reply.status == 200, reply.body
        assert reply.json()["model"] == "m"


# ---------------------------------------------------------------------------------------------- upstreams


async def test_an_answer_that_never_begins_is_a_502_after_stall_timeout_prompt(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    stall = 0.5
    router = await start_router(
        {"slow": fake_profile(dummy_model)}, stall_timeout_prompt=stall, stall_timeout=30
    )
    await load(router, "slow")
    pid = router.controller.upstreams["slow"].pid
    started = time.monotonic()
    async with connection(router.port) as conn:
        conn.send(http_post(chat_body("slow", fake_delay=10)))
        reply = await conn.reply(timeout=stall + 3)
        elapsed = time.monotonic() - started
        assert reply.status == 502, reply.body
        assert reply.headers["content-type"].startswith("application/json")
        assert_openai_error(reply.json(), "upstream_stalled")
        assert elapsed >= stall, elapsed
        # The connection stays usable; the next request is served by the restarted model.
        conn.send(http_post(chat_body("slow")))
        reply = await conn.reply()
        assert reply.status == 200, reply.body
    assert router.controller.upstreams["slow"].pid != pid
    assert await metric(router, "llama_router_errors_total", model="slow", code="upstream_stalled") == 1


async def test_a_kept_alive_upstream_connection_closed_unanswered_is_sent_again(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router({"m": fake_profile(dummy_model, "--drop-kept-alive")})
    await load(router, "m")
    pid = router.controller.upstreams["m"].pid
    tokenize = http_post({"model": "m", "content": "ab"}, path="/tokenize")
    # A first request leaves its upstream connection in the pool; the next one is sent on it.
    assert (await exchange(router.port, tokenize)).status == 200
    before = (await fake_report(router, "m"))["count"]
    reply = await exchange(router.port, http_post(chat_body("m")))
    assert reply.status == 200, reply.body
    assert reply.json()["choices"][0]["message"]["content"].startswith("Hello from")
    report = await fake_report(router, "m")
    assert report["count"] - before >= 2, "the dropped chat, then the chat again on a new connection"
    assert router.controller.upstreams["m"].pid == pid, "no restart for a closed connection"


async def test_a_request_that_kills_its_upstream_on_a_kept_alive_connection_is_not_sent_again(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    """The fake reads a non-streamed chat and dies (--crash-mid-stream): a request that may have
    killed its upstream must not be sent to a fresh one."""
    router = await start_router({"crashy": fake_profile(dummy_model, "--crash-mid-stream", "1")})
    await load(router, "crashy")
    tokenize = http_post({"model": "crashy", "content": "ab"}, path="/tokenize")
    assert (await exchange(router.port, tokenize)).status == 200  # leaves a kept-alive connection
    reply = await exchange(router.port, http_post(chat_body("crashy")))
    assert reply.status == 502, reply.body
    assert_openai_error(reply.json())
    loads = await metric(router, "llama_router_loads_total", model="crashy")
    assert loads == 1, f"the request that killed its upstream was sent again to a fresh one ({loads} loads)"


# ---------------------------------------------------------------------------------------------- mixed load


async def test_mixed_traffic_across_swaps_leaves_nothing_behind(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    """Many clients at once, each doing what clients do (plain chats, streams, streams abandoned half
    way, aliases, pipelined pairs) on two models that must take turns: every answer is right, and
    afterwards no request is held, no upstream works, and no client connection stays open."""
    profiles = {
        "a": fake_profile(dummy_model, aliases=["alias-a"]),
        "b": fake_profile(dummy_model, aliases=["alias-b"]),
    }
    router = await start_router(profiles, max_resident=1, swap_delay=0.2)
    await load(router, "a")
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
    swaps = await metric(router, "llama_router_swaps_total", model="a")
    swaps += await metric(router, "llama_router_swaps_total", model="b")
    assert swaps > 0, "the two models took turns"

    async def all_idle() -> bool:
        views = router.controller.views()
        if any(view.in_flight or view.waiting for view in views):
            return False
        reports = [await fake_report(router, name) for name in list(router.controller.upstreams)]
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
        extra(b"Host: 127.0.0.2", b"Host: "),  # a second Host
        lambda head: [line for line in head if not line.startswith(b"Host:")],  # no Host
        # A length holding a vertical tab or a form feed.
        lambda head: [line + rng.choice((b"\x0b", b"\x0c")) if b"Length" in line else line for line in head],
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


HOSTILE = {
    "bare LF line ends": http_post(chat_body("m")).replace(b"\r\n", b"\n"),
    "no Host": http_post(chat_body("m")).replace(b"Host: 127.0.0.1\r\n", b""),
    "two Hosts": http_post(chat_body("m"), headers=[("Host", "127.0.0.2")]),
    "a vertical tab in Content-Length": http_post(chat_body("m")).replace(
        b"\r\nContent-Type", b"\x0b\r\nContent-Type"
    ),
    "data after Connection: close": http_post(chat_body("m"), headers=[("Connection", "close")])
    + http_post(chat_body("m")),
}


async def test_mangled_requests_get_an_answer_or_a_close_and_leave_nothing_open(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    """Whatever the head, a whole request gets an HTTP answer or its connection closed, promptly,
    never a server error for the client's mistake; the router stays healthy and keeps nothing open."""
    router = await start_router({"m": fake_profile(dummy_model)})
    await load(router, "m")
    outcomes: collections.Counter[str] = collections.Counter()
    requests = [*HOSTILE.values(), *mangled_requests(random.Random(11), 150)]
    for raw in requests:
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


async def test_heads_two_parsers_could_read_differently_are_refused_and_never_relayed(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    """A length holding a vertical tab, no Host or two, bare line feeds, bytes after `Connection:
    close`: each is a 400 and a closed connection, and nothing of it reaches the upstream."""
    router = await start_router({"m": fake_profile(dummy_model)})
    await load(router, "m")
    before = (await fake_report(router, "m"))["count"]
    for why, raw in HOSTILE.items():
        async with connection(router.port) as conn:
            conn.send(raw)
            reply = await conn.reply(timeout=5)
            assert reply.status == 400, (why, reply.status, reply.body)
            assert await conn.closed_by_router(), why
    assert (await fake_report(router, "m"))["count"] == before, "a hostile request reached the upstream"
