#!/usr/bin/env python3
"""The least an aiohttp router can cost per request: a floor for the router's own per-request CPU.

bench_cpu.py runs it beside the router, in front of the same upstream, built from the same parts:
aiohttp's server (an `Application` with one route, no middleware, no access log) and the router's
own upstream connection pool (llama_router/upstream/upstream_http.py). Each request's body is read
and parsed for `model`, sent upstream on a kept-alive connection, and the whole answer is sent back
with the upstream's headers (less the hop-by-hop ones). Nothing else a router does: no keys, no
checks, no lease, no log, no metrics, no activity log. What the router costs above this is its own.

Usage: aiohttp_floor.py LISTEN_PORT UPSTREAM_PORT
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from llama_router.upstream.upstream_http import UpstreamPool

_HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length"})


def floor_app(upstream_port: int) -> web.Application:
    pool = UpstreamPool()
    address = ("127.0.0.1", upstream_port)
    host = f"Host: 127.0.0.1:{upstream_port}\r\nContent-Type: application/json\r\n"

    async def relay(request: web.Request) -> web.Response:
        body = await request.read()
        json.loads(body)["model"]
        head = f"POST {request.path} HTTP/1.1\r\n{host}Content-Length: {len(body)}\r\n\r\n".encode()
        answer = await pool.request(address, head, body, timeout=60)
        try:
            data = await answer.read(60)
        finally:
            answer.release()
        headers = [(name, value) for name, value in answer.raw_headers if name.lower() not in _HOP_BY_HOP]
        return web.Response(status=answer.status, body=data, headers=headers)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", relay)
    return app


async def serve(port: int, upstream_port: int) -> None:
    runner = web.AppRunner(floor_app(upstream_port), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print(f"aiohttp_floor listening on 127.0.0.1:{port} -> {upstream_port}", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    port, upstream_port = int(sys.argv[1]), int(sys.argv[2])
    try:
        import uvloop

        uvloop.run(serve(port, upstream_port))
    except ImportError:
        asyncio.run(serve(port, upstream_port))


if __name__ == "__main__":
    main()
