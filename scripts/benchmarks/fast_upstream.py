#!/usr/bin/env python3
"""A very fast llama-server stand-in for benchmarks: the router, not the upstream, gets measured.

tests/fake_upstream.py is built for faults (aiohttp, many knobs); this one is built for speed: a raw
`asyncio.Protocol` HTTP/1.1 server with keep-alive under uvloop, answering with prebuilt bytes. It
speaks just enough llama-server for the router's hot paths:

- `GET /health`: 503 `{"error": ...}` while "loading" (`--load-delay S` after it listens), then 200;
- `POST /v1/chat/completions` (and any other POST): a small non-streamed chat completion with a
  Content-Length; with `"stream": true` in the body, `--chunks N` SSE events (each its own HTTP chunk
  and its own write, as llama-server sends tokens) then `data: [DONE]`;
- anything else: 404.

It takes the router's command line (`--alias NAME -lv 4 --host H --port P --model PATH`); unknown
flags are accepted and ignored, and `--help` answers at once, as llama-server's does (the router
asks it when it first starts a binary). Nothing heavier than asyncio is imported, so its own start is quick
and close to what the router can at best add to. SIGTERM ends it at once (the default action).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import cast

JSON_HEADERS = b"Content-Type: application/json; charset=utf-8\r\nServer: fast_upstream\r\n"


def _response(status: bytes, body: bytes) -> bytes:
    return (
        b"HTTP/1.1 "
        + status
        + b"\r\n"
        + JSON_HEADERS
        + b"Content-Length: %d\r\nKeep-Alive: timeout=5\r\n\r\n"
    ) % len(body) + body


def _completion(model: str) -> bytes:
    """A llama-server-shaped non-streamed chat answer (keys sorted, as llama-server writes them)."""
    body = {
        "choices": [
            {"finish_reason": "length", "index": 0, "message": {"role": "assistant", "content": "Hello"}}
        ],
        "created": int(time.time()),
        "id": "chatcmpl-fastupstream0000000000000000",
        "model": model,
        "object": "chat.completion",
        "system_fingerprint": "b0000-fastupstream",
        "usage": {"completion_tokens": 1, "prompt_tokens": 9, "total_tokens": 10},
    }
    return json.dumps(body, separators=(",", ":")).encode()


def _chunk(model: str, index: int) -> bytes:
    """One SSE event of a streamed answer, framed as one HTTP/1.1 chunk."""
    event = {
        "choices": [{"finish_reason": None, "index": 0, "delta": {"content": f" tok{index % 1000}"}}],
        "created": 1764300000,
        "id": "chatcmpl-fastupstream0000000000000000",
        "model": model,
        "system_fingerprint": "b0000-fastupstream",
        "object": "chat.completion.chunk",
    }
    data = b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(data), data)


class Options:
    """The few flags that matter; everything else on the command line is ignored."""

    def __init__(self, argv: list[str]) -> None:
        self.host = "127.0.0.1"
        self.port = 8080
        self.alias = "fast"
        self.load_delay = 0.0
        self.chunks = 2000
        values = {"--host": str, "--port": int, "--alias": str, "--load-delay": float, "--chunks": int}
        index = 0
        while index < len(argv):
            flag, _, inline = argv[index].partition("=")
            if flag in values:
                raw = inline if inline else (argv[index + 1] if index + 1 < len(argv) else "")
                setattr(self, flag[2:].replace("-", "_"), values[flag](raw))
                index += 1 if inline else 2
            else:
                index += 1
        self.alias = self.alias.split(",")[0]


class Answers:
    """Every answer prebuilt once, so a request costs a parse and a write."""

    def __init__(self, options: Options) -> None:
        self.ready_at = time.monotonic() + options.load_delay
        self.health_ok = _response(b"200 OK", b'{"status":"ok"}')
        self.health_loading = _response(
            b"503 Service Unavailable",
            b'{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}',
        )
        self.completion = _response(b"200 OK", _completion(options.alias))
        self.not_found = _response(
            b"404 Not Found", b'{"error":{"code":404,"message":"File Not Found","type":"not_found_error"}}'
        )
        self.stream_head = (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nServer: fast_upstream\r\n"
            b"Transfer-Encoding: chunked\r\nKeep-Alive: timeout=5\r\n\r\n"
        )
        self.stream_chunks = [_chunk(options.alias, index) for index in range(options.chunks)]
        done = b"data: [DONE]\n\n"
        self.stream_tail = b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done)

    @property
    def loading(self) -> bool:
        return time.monotonic() < self.ready_at


class HttpServer(asyncio.Protocol):
    """One keep-alive connection: parse requests as they complete, answer them in order."""

    def __init__(self, answers: Answers) -> None:
        self.answers = answers
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.streaming: asyncio.Task[None] | None = None
        self.can_write: asyncio.Event = asyncio.Event()
        self.can_write.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.can_write.set()

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.streaming is None:
            self.process()

    def process(self) -> None:
        """Answer every complete request in the buffer (a stream pauses this until it ends)."""
        while self.transport is not None and self.streaming is None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end]
            length = 0
            lower = head.lower()
            at = lower.find(b"\r\ncontent-length:")
            if at >= 0:
                stop = lower.find(b"\r\n", at + 2)
                length = int(lower[at + 17 : stop if stop >= 0 else None])
            total = end + 4 + length
            if len(self.buffer) < total:
                return
            body = self.buffer[end + 4 : total]
            self.buffer = self.buffer[total:]
            method, _, rest = head.partition(b" ")
            path = rest.split(b" ", 1)[0]
            self.answer(method, path, body)

    def answer(self, method: bytes, path: bytes, body: bytes) -> None:
        assert self.transport is not None
        answers = self.answers
        if path == b"/health":
            self.transport.write(answers.health_loading if answers.loading else answers.health_ok)
        elif answers.loading:
            self.transport.write(answers.health_loading)
        elif method == b"POST":
            if b'"stream":true' in body.replace(b" ", b""):
                self.streaming = asyncio.ensure_future(self.stream())
            else:
                self.transport.write(answers.completion)
        else:
            self.transport.write(answers.not_found)

    async def stream(self) -> None:
        """Each event is its own write, as llama-server sends each token; waits only when the socket's
        buffer is full."""
        answers = self.answers
        try:
            transport = self.transport
            if transport is None:
                return
            transport.write(answers.stream_head)
            for chunk in answers.stream_chunks:
                if not self.can_write.is_set():
                    await self.can_write.wait()
                if self.transport is None:
                    return
                transport.write(chunk)
            transport.write(answers.stream_tail)
        finally:
            self.streaming = None
        self.process()


async def serve(options: Options) -> None:
    loop = asyncio.get_running_loop()
    answers = Answers(options)
    server = await loop.create_server(
        lambda: HttpServer(answers), options.host, options.port, reuse_address=True, backlog=1024
    )
    print(f"fast_upstream listening on {options.host}:{options.port}", file=sys.stderr, flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    if "--help" in sys.argv[1:]:
        # The router reads a binary's `--help` when it first starts it, to learn what it can do
        # (Unix sockets, load progress): like llama-server, say it and exit, having neither.
        print("fast_upstream: a llama-server stand-in for benchmarks (TCP only, no load progress)")
        return
    options = Options(sys.argv[1:])
    try:
        import uvloop

        uvloop.run(serve(options))
    except ImportError:
        asyncio.run(serve(options))


if __name__ == "__main__":
    main()
