"""The proxy's own HTTP/1.1 client (llama_router/upstream/upstream_http.py): framing, reuse and the ways it
fails.

The parser is fed answers cut at every possible place, because TCP delivers them cut anywhere; the
pool is run against tiny loopback servers that misbehave on purpose."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from llama_router.upstream.upstream_http import (
    Answer,
    BodyFailed,
    ConnectFailed,
    ConnectionDropped,
    UpstreamPool,
    UpstreamTimeout,
    _Connection,
    decode_chunked,
)
from tests.conftest import RouterFactory, fake_profile


def frame_chunk(data: bytes) -> bytes:
    """`data` as one HTTP/1.1 chunk."""
    return b"%x\r\n%s\r\n" % (len(data), data)


EVENTS = [b'data: {"n": %d}\n\n' % n for n in range(5)] + [b"data: [DONE]\n\n"]
CHUNKED_BODY = b"".join(frame_chunk(event) for event in EVENTS) + b"0\r\n\r\n"
CHUNKED = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n" + CHUNKED_BODY
)
PLAIN_BODY = b'{"ok": true}'
PLAIN = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
    len(PLAIN_BODY),
    PLAIN_BODY,
)


class _Transport:
    """Just enough of a transport for feeding a connection by hand."""

    def __init__(self) -> None:
        self.written = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _fed(parts: list[bytes], *, keep_streams: bool = False) -> tuple[Answer, list[bytes], _Connection]:
    """An answer after feeding `parts` to a fresh connection; the pieces it handed over."""
    loop = asyncio.get_running_loop()
    pool = UpstreamPool(keep_streams=keep_streams)
    conn = _Connection(loop, pool)
    conn.connection_made(_Transport())  # type: ignore[arg-type]
    answer = Answer(conn, pool)
    conn.start(answer, b"GET / HTTP/1.1\r\n\r\n", None, no_body=False)
    for part in parts:
        conn.data_received(part)
    pieces = list(answer._pieces)
    return answer, pieces, conn


def _cuts(data: bytes) -> list[list[bytes]]:
    """`data` whole, cut once at every place, and byte by byte."""
    ways = [[data], [bytes([b]) for b in data]]
    ways += [[data[:at], data[at:]] for at in range(1, len(data))]
    return ways


async def test_chunked_answers_cut_anywhere_come_out_as_runs_of_whole_chunks() -> None:
    for parts in _cuts(CHUNKED):
        answer, pieces, conn = _fed(parts)
        assert answer.status == 200 and answer.chunked and answer.content_type == "text/event-stream"
        assert answer._done, parts
        assert b"".join(pieces) == CHUNKED_BODY, "framed pieces are the body's bytes as sent"
        for piece in pieces:  # each piece starts and ends on a chunk boundary
            assert decode_chunked(piece) == b"".join(
                event for event in EVENTS if frame_chunk(event) in piece
            ), piece
        assert decode_chunked(b"".join(pieces)) == b"".join(EVENTS)
        assert not conn.reusable, "llama-server closes a connection after a stream: never reused"
    assert _fed([CHUNKED], keep_streams=True)[2].reusable


async def test_length_answers_cut_anywhere_are_read_whole() -> None:
    for parts in _cuts(PLAIN):
        answer, pieces, conn = _fed(parts)
        assert (answer.status, answer.content_length, answer.chunked) == (200, len(PLAIN_BODY), False)
        assert answer._done and b"".join(pieces) == PLAIN_BODY and conn.reusable


async def test_interim_answers_are_skipped_and_extra_bytes_spoil_the_connection() -> None:
    answer, pieces, conn = _fed([b"HTTP/1.1 100 Continue\r\n\r\n" + PLAIN + b"junk"])
    assert answer.status == 200 and b"".join(pieces) == PLAIN_BODY
    assert not conn.reusable, "bytes beyond the announced length: never reuse the connection"


async def test_chunk_extensions_trailers_and_connection_close() -> None:
    body = b"5;name=value\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n"
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    answer, pieces, conn = _fed([head + body])
    assert answer._done and b"".join(pieces) == body and decode_chunked(body) == b"hello"
    assert not conn.reusable


async def test_malformed_chunk_sizes_fail_the_answer() -> None:
    answer, _, conn = _fed([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n"])
    with pytest.raises(BodyFailed):
        await answer.next_piece()
    assert conn.closed


# ---------------------------------------------------------------------------------------------- sockets

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[tuple[int, dict[str, int]]]:
    """A loopback server running `handler` per connection; yields its port and a connection count."""
    stats = {"connections": 0}
    handlers: set[asyncio.Task[Any]] = set()

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stats["connections"] += 1
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        # Cancelled at the end of the test: a handler that ends quietly leaves no noise behind.
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            await handler(reader, writer)
        writer.close()

    server = await asyncio.start_server(on_connection, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield port, stats
    finally:
        server.close()
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            await reader.readexactly(int(line.split(b":")[1]))
    return head


async def _keep_answering(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        try:
            await _read_request(reader)
        except asyncio.IncompleteReadError:
            return
        writer.write(CHUNKED)
        await writer.drain()


async def _request(pool: UpstreamPool, port: int, **options: Any) -> Answer:
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n"
    return await pool.request(("127.0.0.1", port), head, b"{}", **options)


async def test_the_pool_reuses_a_connection_and_drops_idle_ones() -> None:
    async with serving(_keep_answering) as (port, stats):
        pool = UpstreamPool(idle_timeout=0.2, keep_streams=True)
        for _ in range(3):
            async with await _request(pool, port) as answer:
                assert await answer.read() == b"".join(EVENTS)
        assert stats["connections"] == 1
        await asyncio.sleep(0.3)
        async with await _request(pool, port) as answer:
            pieces = [piece async for piece in answer.pieces()]
        assert b"".join(pieces) == b"".join(EVENTS)
        assert stats["connections"] == 2, "an idle connection older than the idle timeout is not reused"
        await pool.close()


async def _answer_slowly(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        try:
            await _read_request(reader)
        except asyncio.IncompleteReadError:
            return
        writer.write(CHUNKED[:80])
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(CHUNKED[80:])
        await writer.drain()


async def test_streams_and_answers_not_read_to_their_end_close_their_connection() -> None:
    async with serving(_keep_answering) as (port, stats):
        pool = UpstreamPool()
        for _ in range(2):
            async with await _request(pool, port) as answer:
                await answer.read()
        assert stats["connections"] == 2, "a connection that carried a stream is not reused"
    async with serving(_answer_slowly) as (port, stats):
        pool = UpstreamPool(keep_streams=True)
        answer = await _request(pool, port)
        answer.release()
        async with await _request(pool, port) as answer:
            await answer.read()
        assert stats["connections"] == 2
        await pool.close()


async def test_failures_say_where_the_exchange_broke() -> None:
    pool = UpstreamPool()

    async def close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        await asyncio.sleep(5)

    async def die_mid_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(CHUNKED[:-30])
        await writer.drain()

    async with serving(close_at_once) as (port, _):
        with pytest.raises(ConnectionDropped) as dropped:
            await _request(pool, port)
        assert not dropped.value.reset
    async with serving(never_answer) as (port, _):
        with pytest.raises(UpstreamTimeout):
            await _request(pool, port, timeout=0.1)
    async with serving(die_mid_answer) as (port, _):
        answer = await _request(pool, port)
        with pytest.raises(BodyFailed):
            await answer.read()
        answer.release()
    with pytest.raises(ConnectFailed):
        await _request(pool, port)  # that server is gone: refused
    await pool.close()


async def test_a_kept_alive_connection_closed_by_the_server_says_it_was_reused() -> None:
    """What the proxy needs to send a request once more when a server closed its idle connection as
    the request arrived (it never does so for a request on a new connection)."""

    async def answer_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(PLAIN)
        await writer.drain()
        await _read_request(reader)  # the next request on this connection: closed unanswered

    async with serving(answer_once) as (port, stats):
        pool = UpstreamPool()
        async with await _request(pool, port) as answer:
            assert await answer.read() == PLAIN_BODY
        with pytest.raises(ConnectionDropped) as dropped:
            await _request(pool, port)
        assert dropped.value.reused and not dropped.value.reset
        async with await _request(pool, port, fresh=True) as answer:
            assert await answer.read() == PLAIN_BODY
        assert stats["connections"] == 2
        await pool.close()


# ---------------------------------------------------------------------------------------------- proxy


async def test_streams_pass_through_the_router_whole_on_a_kept_alive_connection_and_to_http_1_0(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router({"m": fake_profile(dummy_model, "--chunks", "40")})
    port = int(router.url.rsplit(":", 1)[1])
    body = json.dumps(
        {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    ).encode()
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    head += b"Content-Length: %d\r\n\r\n" % len(body)
    pool = UpstreamPool(keep_streams=True)
    streams = []
    for _ in range(2):  # one keep-alive connection: each stream must end where it should
        async with await pool.request(("127.0.0.1", port), head, body) as answer:
            assert answer.status == 200 and answer.chunked
            streams.append(await answer.read())
    assert len(pool._address) == 1, "both streams went over one connection"
    await pool.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head.replace(b"HTTP/1.1", b"HTTP/1.0", 1) + body)
    raw = await reader.read()  # an HTTP/1.0 answer without a length ends with the connection
    writer.close()
    response_head, _, plain = raw.partition(b"\r\n\r\n")
    assert b"chunked" not in response_head.lower()
    streams.append(plain)
    for stream in streams:
        events = [line for line in stream.split(b"\n\n") if line.startswith(b"data: ")]
        assert len(events) > 40 and events[-1] == b"data: [DONE]", stream[-200:]
        assert json.loads(events[0][6:])["model"] == "m"
