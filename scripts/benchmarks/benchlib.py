"""Pieces the benchmark scripts share: tiny models, a router subprocess, timed requests."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
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

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from llama_router.config.schema import load_config  # noqa: E402

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
    tree: Path = ROOT,
    **server: Any,
) -> AsyncIterator[RunningRouter]:
    """Run `llama-router serve` on a config of these profiles (its log to `log_file`, else inherited),
    from this checkout or another `tree` (an older commit's, to hold a change against it)."""
    port = free_port()
    config_path = workdir / f"profiles-{port}.yaml"
    # Upstreams on loopback ports, not Unix sockets: the direct figures reach them over TCP too
    # (trees from before the sockets know no such setting, and use ports anyway).
    package = "llama_router" if (tree / "llama_router").is_dir() else "router"  # before the rename: router
    schema = (
        tree / "llama_router" / "config" / "schema.py"
        if package == "llama_router"
        else tree / "router" / "config.py"
    )
    sockets = "upstream_sockets" in schema.read_text()
    server = {"port": port, "state_dir": str(workdir / "state"), **server}
    if sockets:
        server.setdefault("upstream_sockets", False)
    config_path.write_text(yaml.safe_dump({"server": server, "profiles": profiles}))
    command = [sys.executable, "-m", package, "--log-level", log_level, "serve", "-c", str(config_path)]
    # The tree first; what the caller put on the path after it (gpu-check's dry run: the fake NVML).
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")])),
    }
    with contextlib.ExitStack() as files:
        log = files.enter_context(log_file.open("ab")) if log_file is not None else None
        process = subprocess.Popen(command, cwd=tree, env=environment, stdout=log, stderr=log)
        url = f"http://127.0.0.1:{port}"
        try:
            await wait_healthy(session, url, interval=0.01)
            yield RunningRouter(url, process)
        finally:
            process.terminate()
            process.wait(timeout=30)


@contextlib.asynccontextmanager
async def router_process(
    session: aiohttp.ClientSession, workdir: Path, profiles: dict[str, Any], tree: Path = ROOT, **server: Any
) -> AsyncIterator[str]:
    """Run `llama-router serve` on a config of these profiles (from `tree`); yields its base URL."""
    async with running_router(session, workdir, profiles, tree=tree, **server) as router:
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


async def bare_start(session: aiohttp.ClientSession, command: list[str], port: int) -> tuple[float, float]:
    """Spawn llama-server by hand: seconds to healthy (polled every 1 ms) and to a first answer."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        await wait_healthy(session, url, interval=0.001)
        healthy = time.perf_counter() - started
        await chat(session, url, "x")
        answered = time.perf_counter() - started
    finally:
        process.terminate()
        process.wait()
    return healthy, answered


async def until_nothing_runs(session: aiohttp.ClientSession, url: str) -> None:
    for _ in range(3000):
        async with session.get(url + "/running") as response:
            if not (await response.json())["running"]:
                return
        await asyncio.sleep(0.01)
    raise TimeoutError("models did not unload")


def summary(router: list[float], bare_healthy: list[float], bare_answer: list[float]) -> dict[str, Any]:
    return {
        "rounds": len(router),
        "router_request_to_answer_median_ms": ms(statistics.median(router)),
        "bare_spawn_to_healthy_median_ms": ms(statistics.median(bare_healthy)),
        "bare_spawn_to_answer_median_ms": ms(statistics.median(bare_answer)),
        "overhead_vs_healthy_ms": ms(statistics.median(router) - statistics.median(bare_healthy)),
        "overhead_vs_answer_ms": ms(statistics.median(router) - statistics.median(bare_answer)),
    }


async def swap_figures(
    session: aiohttp.ClientSession,
    workdir: Path,
    profiles: dict[str, Any],
    rounds: int,
    log_file: Path,
    log_level: str,
) -> dict[str, Any]:
    """Cold start and swap through the router against the same upstream started by hand."""
    config_path = workdir / "swap-profiles.yaml"
    config_path.write_text(yaml.safe_dump({"profiles": profiles}))
    config = load_config(config_path)
    async with running_router(
        session, workdir, profiles, log_level=log_level, log_file=log_file, max_resident=1
    ) as router:
        url = router.url
        bare_healthy: list[float] = []
        bare_answer: list[float] = []
        cold: list[float] = []
        swap: list[float] = []
        for _ in range(rounds):
            port = free_port()
            healthy, answered = await bare_start(
                session, config.profiles["a"].command("127.0.0.1", port), port
            )
            bare_healthy.append(healthy)
            bare_answer.append(answered)
            async with session.post(url + "/unload") as response:
                await response.read()
            await until_nothing_runs(session, url)
            for timings, model in ((cold, "a"), (swap, "b"), (swap, "a")):
                started = time.perf_counter()
                await chat(session, url, model)
                timings.append(time.perf_counter() - started)
    return {
        "binary": str(config.profiles["a"].binary),
        "cold_start": summary(cold, bare_healthy, bare_answer),
        "swap": summary(swap, bare_healthy, bare_answer),
    }
