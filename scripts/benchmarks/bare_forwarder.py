#!/usr/bin/env python3
"""The cheapest HTTP/1.1 forwarder Python can be: a floor for what any Python router costs.

bench.py runs it beside the router, in front of the same upstream, so the router's figures can be
read against what merely relaying bytes costs in Python on the same machine. It does nothing a router
must do: no routing table, no keys, no log, no metrics, no error answers, no stall watchdog. Each
client connection gets its own kept-alive upstream connection; a request is read whole (its
`Content-Length`), its JSON body parsed for `model` (a router's least work), and its bytes written on
as they came; the answer (with a `Content-Length`: fast_upstream.py's non-streamed answers) is passed
back as it arrives. Raw `asyncio.Protocol`s under uvloop, as in fast_upstream.py and loadgen.py.

Usage: bare_forwarder.py LISTEN_PORT UPSTREAM_PORT
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import cast

_END_OF_HEAD = b"\r\n\r\n"
_LENGTH = b"\r\ncontent-length:"


def _content_length(head: bytes) -> int:
    lower = head.lower()
    at = lower.find(_LENGTH)
    if at < 0:
        return 0
    stop = lower.find(b"\r\n", at + 2)
    return int(lower[at + len(_LENGTH) : stop if stop >= 0 else None])


class Upstream(asyncio.Protocol):
    """The upstream side of one client connection: answers go straight back to the client."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.remaining = -1  # body bytes still to come; -1 while reading a head

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.close()

    def data_received(self, data: bytes) -> None:
        client = self.client.transport
        if client is None:
            return
        if self.remaining < 0:
            data = self.buffer + data if self.buffer else data
            end = data.find(_END_OF_HEAD)
            if end < 0:
                self.buffer = data
                return
            self.buffer = b""
            self.remaining = _content_length(data[:end]) - (len(data) - end - 4)
        else:
            self.remaining -= len(data)
        client.write(data)
        if self.remaining <= 0:
            self.remaining = -1


class Client(asyncio.Protocol):
    """One client connection: whole requests are written to its upstream connection."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.transport: asyncio.Transport | None = None
        self.upstream: Upstream | None = None
        self.buffer = b""
        self.connecting: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.connecting = asyncio.ensure_future(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, self.upstream = await loop.create_connection(
                lambda: Upstream(self), "127.0.0.1", self.upstream_port
            )
        except OSError:
            self.close()
            return
        self._forward()  # what came while connecting

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        self.buffer = self.buffer + data if self.buffer else data
        if self.upstream is not None:
            self._forward()

    def _forward(self) -> None:
        """Write every whole request in the buffer to the upstream."""
        assert self.upstream is not None and self.upstream.transport is not None
        upstream, data = self.upstream.transport, self.buffer
        while True:
            end = data.find(_END_OF_HEAD)
            if end < 0:
                break
            total = end + 4 + _content_length(data[:end])
            if len(data) < total:
                break
            json.loads(data[end + 4 : total]).get("model")
            upstream.write(data[:total])
            data = data[total:]
        self.buffer = data


async def serve(port: int, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Client(upstream_port), "127.0.0.1", port)
    print(f"bare_forwarder listening on 127.0.0.1:{port} -> {upstream_port}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__.rsplit("Usage: ", 1)[1].strip(), file=sys.stderr)
        return 2
    port, upstream_port = int(sys.argv[1]), int(sys.argv[2])
    try:
        import uvloop

        uvloop.run(serve(port, upstream_port))
    except ImportError:
        asyncio.run(serve(port, upstream_port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
