"""Pieces the benchmark scripts share: tiny models, a router subprocess, timed requests."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "temperature": 0}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_healthy(
    session: aiohttp.ClientSession, url: str, interval: float, timeout: float = 30
) -> None:
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        with contextlib.suppress(aiohttp.ClientError):
            async with session.get(url + "/health") as response:
                if response.status == 200:
                    return
        await asyncio.sleep(interval)
    raise TimeoutError(f"{url} not healthy within {timeout}s")


async def chat(session: aiohttp.ClientSession, url: str, model: str, **extra: Any) -> None:
    async with session.post(url + "/v1/chat/completions", json={"model": model, **CHAT, **extra}) as response:
        body = await response.read()
        if response.status != 200:
            raise RuntimeError(f"{url}: {response.status} {body[:300]!r}")


@dataclasses.dataclass
class RunningRouter:
    """A router subprocess started by `running_router`."""

    url: str
    process: subprocess.Popen[bytes]


@contextlib.asynccontextmanager
async def running_router(
    session: aiohttp.ClientSession,
    workdir: Path,
    profiles: dict[str, Any],
    *,
    log_level: str = "WARNING",
    log_file: Path | None = None,
    **server: Any,
) -> AsyncIterator[RunningRouter]:
    """Run `llama-router serve` on a config of these profiles (its log to `log_file`, else inherited)."""
    port = free_port()
    config_path = workdir / f"profiles-{port}.yaml"
    server = {"port": port, "state_dir": str(workdir / "state"), **server}
    config_path.write_text(yaml.safe_dump({"server": server, "profiles": profiles}))
    command = [sys.executable, "-m", "router", "--log-level", log_level, "serve", "-c", str(config_path)]
    with contextlib.ExitStack() as files:
        log = files.enter_context(log_file.open("ab")) if log_file is not None else None
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=log)
        url = f"http://127.0.0.1:{port}"
        try:
            await wait_healthy(session, url, interval=0.01)
            yield RunningRouter(url, process)
        finally:
            process.terminate()
            process.wait(timeout=30)


@contextlib.asynccontextmanager
async def router_process(
    session: aiohttp.ClientSession, workdir: Path, profiles: dict[str, Any], **server: Any
) -> AsyncIterator[str]:
    """Run `llama-router serve` on a config of these profiles; yields its base URL."""
    async with running_router(session, workdir, profiles, **server) as router:
        yield router.url


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def latency_summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {
        "median_ms": ms(statistics.median(values)),
        "p95_ms": ms(percentile(values, 95)),
        "max_ms": ms(max(values)),
    }
