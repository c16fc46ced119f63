#!/usr/bin/env python3
"""A cheap HTTP/1.1 load generator for bench.py, run in a process of its own.

Python load generators easily become the bottleneck they are meant to measure; this one keeps the
client's cost per request small (raw `asyncio.Protocol` connections with keep-alive, prebuilt request
bytes, a minimal response parser, uvloop when present) and uses the identical client for every
target, so a direct-versus-router ratio compares like with like. Targets are measured in alternation,
round after round, so a noisy neighbour on the machine hits both alike.

Modes (one JSON object on stdout):
- `load`: closed loop, `--concurrency` connections each sending the next request when the last one
  is answered, for `--seconds` after `--warmup`: requests/s, median and p99 latency per target;
- `stream`: `--count` streamed requests one after another on one connection: SSE events per second
  (request sent to last byte) and time to first body byte, per target.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from typing import Any, cast

_CRLF2 = b"\r\n\r\n"


class Reply:
    """What one response looked like to the client."""

    __slots__ = ("close", "events", "first_byte", "size", "status")

    def __init__(self) -> None:
        self.status = 0
        self.close = False  # the server said `Connection: close`: it closes after this answer
        self.first_byte = 0.0
        self.events = 0
        self.size = 0


class Connection(asyncio.Protocol):
    """One keep-alive connection; `send` writes a request and resolves with its Reply."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.waiter: asyncio.Future[Reply] | None = None
        self.reply = Reply()
        self.state = 0  # 0 head, 1 body with a length, 2 chunked
        self.remaining = 0
        self.last_newline = False  # the previous body byte was "\n" (an event may end across reads)
        self.tail = b""  # the last bytes of a chunked body, to see its end
        self.count_events = False
        self.lost: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.lost = exc or ConnectionResetError("connection closed")
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(self.lost)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def send(self, request: bytes, *, count_events: bool = False) -> asyncio.Future[Reply]:
        if self.transport is None:
            raise self.lost or ConnectionError("not connected")
        self.waiter = asyncio.get_running_loop().create_future()
        self.reply = Reply()
        self.state = 0
        self.last_newline = False
        self.tail = b""
        self.count_events = count_events
        self.transport.write(request)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        self.buffer = self.buffer + data if self.buffer else data
        while self.buffer and self.waiter is not None:
            if self.state == 0 and not self._head():
                return
            if self.state == 1:
                take = min(self.remaining, len(self.buffer))
                self._body(self.buffer[:take])
                self.remaining -= take
                self.buffer = self.buffer[take:]
                if self.remaining:
                    return
                self._done()
            elif self.state == 2 and not self._chunks():
                return

    def _head(self) -> bool:
        end = self.buffer.find(_CRLF2)
        if end < 0:
            return False
        head = self.buffer[:end].lower()
        self.buffer = self.buffer[end + 4 :]
        self.reply.status = int(head[9:12])
        self.reply.close = b"\r\nconnection: close" in head
        if b"transfer-encoding: chunked" in head:
            self.state = 2
            return True
        at = head.find(b"\r\ncontent-length:")
        if at < 0:
            raise ValueError("loadgen needs Content-Length or chunked answers")
        stop = head.find(b"\r\n", at + 2)
        self.remaining = int(head[at + 17 : stop if stop >= 0 else None])
        self.state = 1
        if self.remaining == 0:
            self._done()
        return True

    def _chunks(self) -> bool:
        """Scan a chunked body without decoding it; True once its last chunk came.

        Decoding chunk by chunk in Python would make the client pay per HTTP chunk, and the direct
        path (one chunk per event) would then look slower than the router (which merges events into
        fewer chunks). Counting raw bytes is exact for SSE: a chunk boundary inside an event's blank
        line ("\n" + "\r\n<hex>\r\n" + "\n") still shows one "\n\n", and nothing else does."""
        data, self.buffer = self.buffer, b""
        self._body(data)
        self.tail = (self.tail + data)[-7:]
        if self.tail.endswith(b"\r\n0\r\n\r\n") or self.tail == b"0\r\n\r\n":
            self._done()
            return True
        return False

    def _body(self, data: bytes) -> None:
        if not data:
            return
        reply = self.reply
        if reply.size == 0:
            reply.first_byte = time.perf_counter()
        reply.size += len(data)
        if self.count_events:
            reply.events += data.count(b"\n\n") + (self.last_newline and data[0] == 10)
            self.last_newline = data[-1] == 10

    def _done(self) -> None:
        self.state = 0
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(self.reply)


def build_request(host: str, port: int, path: str, body: bytes) -> bytes:
    """The bytes of a POST much like an SDK's (a few ordinary headers)."""
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: llama-router-bench\r\n"
        f"Accept: */*\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def connect(host: str, port: int) -> Connection:
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(Connection, host, port)
    return protocol


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


async def closed_loop(
    host: str, port: int, request: bytes, concurrency: int, seconds: float, warmup: float
) -> dict[str, Any]:
    """`concurrency` clients, each with one connection, sending back to back."""
    connections = [await connect(host, port) for _ in range(concurrency)]
    latencies: list[float] = []
    errors = 0
    now = time.perf_counter
    begin = now() + warmup
    end = begin + seconds

    async def worker(index: int) -> None:
        nonlocal errors
        record = latencies.append
        connection = connections[index]
        while True:
            started = now()
            if started >= end:
                return
            reply = await connection.send(request)
            if reply.status != 200:
                errors += 1
            if started >= begin:
                record(now() - started)
            if reply.close:  # llama-server ends a kept-alive connection after 100 requests
                connection.close()
                connection = connections[index] = await connect(host, port)

    try:
        await asyncio.gather(*(worker(index) for index in range(concurrency)))
    finally:
        for connection in connections:
            connection.close()
    return {
        "requests": len(latencies),
        "requests_per_s": round(len(latencies) / seconds, 1),
        "median_ms": round(statistics.median(latencies) * 1000, 3),
        "p99_ms": round(percentile(latencies, 99) * 1000, 3),
        "errors": errors,
    }


async def streams(host: str, port: int, request: bytes, count: int) -> dict[str, Any]:
    """`count` streamed requests in a row on one connection (the first one warms it and is dropped)."""
    connection = await connect(host, port)
    rates, first_bytes, events = [], [], []
    try:
        for index in range(count + 1):
            started = time.perf_counter()
            reply = await connection.send(request, count_events=True)
            finished = time.perf_counter()
            if reply.close:
                connection.close()
                connection = await connect(host, port)
            if reply.status != 200:
                raise RuntimeError(f"stream answered {reply.status}")
            if index == 0:
                continue
            rates.append(reply.events / (finished - started))
            first_bytes.append(reply.first_byte - started)
            events.append(reply.events)
    finally:
        connection.close()
    return {
        "streams": count,
        "events_per_stream": int(statistics.median(events)),
        "chunks_per_s": round(statistics.median(rates), 1),
        "ttfb_ms": round(statistics.median(first_bytes) * 1000, 3),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    targets = [
        (name, host, int(port)) for name, host, port in (t.replace("=", ":").split(":") for t in args.target)
    ]
    body = args.body.encode()
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in targets}
    for _ in range(args.rounds):
        for name, host, port in targets:
            request = build_request(host, port, args.path, body)
            if args.mode == "load":
                result = await closed_loop(host, port, request, args.concurrency, args.seconds, args.warmup)
            else:
                result = await streams(host, port, request, args.count)
            rounds[name].append(result)
    summary: dict[str, Any] = {}
    for name, results in rounds.items():
        keys = [key for key, value in results[0].items() if isinstance(value, float)]
        summary[name] = {key: round(statistics.median(r[key] for r in results), 3) for key in keys}
        summary[name]["rounds"] = results
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("mode", choices=("load", "stream"))
    parser.add_argument("--target", action="append", required=True, help="NAME=HOST:PORT (repeatable)")
    parser.add_argument("--path", default="/v1/chat/completions")
    parser.add_argument("--body", required=True, help="JSON request body")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per target")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=2.0, help="measured seconds per round (load)")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds per round (load)")
    parser.add_argument("--count", type=int, default=20, help="streams per round (stream)")
    parser.add_argument("--cpu", type=int, help="run on this CPU only")
    args = parser.parse_args()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    try:
        import uvloop

        result = uvloop.run(run(args))
    except ImportError:
        result = asyncio.run(run(args))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
