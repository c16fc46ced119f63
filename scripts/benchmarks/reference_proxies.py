"""Reference proxies for bench.py's overhead section, run in front of the same upstream as the router.

A ratio such as "router requests/s / direct" says little by itself on a machine where client, proxy
and upstream share two cores: every relayed request costs CPU that the client and upstream would
otherwise use. Two references, measured in the same rounds, put the router's ratio in scale:

- `nginx` (when installed): the reverse proxy most deployments would put in front of a model server,
  set up as one would for SSE (HTTP/1.1 and keep-alive to the upstream, no buffering), one worker per
  core (`worker_processes auto`) and an access log written to a file, as the router writes one;
- `python_forwarder`: scripts/benchmarks/bare_forwarder.py, the least a Python proxy can do per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from scripts.benchmarks.benchlib import free_port

FORWARDER = Path(__file__).resolve().parent / "bare_forwarder.py"
AIOHTTP_FLOOR = Path(__file__).resolve().parent / "aiohttp_floor.py"

_NGINX_CONFIG = """\
worker_processes auto;
daemon off;
pid {folder}/nginx.pid;
error_log {folder}/error.log;
events {{ worker_connections 4096; }}
http {{
  access_log {folder}/access.log;
  client_body_temp_path {folder}/body;
  proxy_temp_path {folder}/proxy;
  upstream model {{ server 127.0.0.1:{upstream}; keepalive 64; keepalive_requests 100000000; }}
  server {{
    listen 127.0.0.1:{port};
    keepalive_requests 100000000;
    location / {{
      proxy_pass http://model;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }}
  }}
}}
"""


def find_nginx() -> str | None:
    return shutil.which("nginx") or next(
        (str(path) for path in (Path("/usr/sbin/nginx"), Path("/usr/local/sbin/nginx")) if path.exists()),
        None,
    )


def nginx_version(binary: str) -> str:
    result = subprocess.run([binary, "-v"], capture_output=True, text=True, check=False)
    return (result.stderr or result.stdout).strip().rsplit(": ", 1)[-1]


async def _wait_listening(port: int, process: asyncio.subprocess.Process, timeout: float = 10.0) -> None:
    """Until `port` accepts a connection; RuntimeError if the process exits or the time runs out."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        if process.returncode is not None:
            raise RuntimeError(f"reference proxy exited with code {process.returncode}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if loop.time() > deadline:
                raise RuntimeError(f"reference proxy did not listen on {port} within {timeout:g}s") from None
            await asyncio.sleep(0.01)
            continue
        writer.close()
        return


@contextlib.asynccontextmanager
async def _running(command: list[str], port: int) -> AsyncIterator[asyncio.subprocess.Process]:
    process = await asyncio.create_subprocess_exec(
        *command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        await _wait_listening(port, process)
        yield process
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 5)
            except TimeoutError:
                process.kill()
                await process.wait()


@contextlib.asynccontextmanager
async def nginx_in_front(binary: str, upstream_port: int, folder: Path) -> AsyncIterator[int]:
    """nginx relaying to `upstream_port`; yields the port it listens on."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = folder / "nginx.conf"
    config.write_text(_NGINX_CONFIG.format(folder=folder, upstream=upstream_port, port=port))
    async with _running([binary, "-c", str(config), "-p", str(folder)], port):
        yield port


@contextlib.asynccontextmanager
async def forwarder_in_front(upstream_port: int) -> AsyncIterator[int]:
    """scripts/benchmarks/bare_forwarder.py relaying to `upstream_port`; yields the port it listens on."""
    port = free_port()
    async with _running([sys.executable, str(FORWARDER), str(port), str(upstream_port)], port):
        yield port


@contextlib.asynccontextmanager
async def aiohttp_floor_in_front(upstream_port: int) -> AsyncIterator[tuple[int, int]]:
    """scripts/benchmarks/aiohttp_floor.py relaying to `upstream_port`; yields its port and pid."""
    port = free_port()
    async with _running([sys.executable, str(AIOHTTP_FLOOR), str(port), str(upstream_port)], port) as process:
        yield port, process.pid
