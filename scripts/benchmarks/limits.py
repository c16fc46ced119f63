#!/usr/bin/env python3
"""What a busy or hostile client can do to a router, measured: one JSON object per run.

    limits.py burst        [--streams 500] [--parallel 2] [--stall 2] [--tokens 32]
    limits.py bodies       [--mb 200] [--count 1] [--max-body-mb N]
    limits.py connections  [--max 3000] [--nofile 1024]
    limits.py impostor
    limits.py held-bodies  [--count 100] [--max-body-mb 8] [--hold 5]
    limits.py peer-flood   [--models 1000000] [--clients 2] [--listings 2] [--seconds 10]

`burst`: concurrent streams at a real llama-server with few slots under a short
`stall_timeout_prompt`: how many complete, how many fail and why, how often the model was
restarted. `bodies`: peak RSS of the router while it takes large bodies, and the answers.
`connections`: idle connections held open (the router started under an open-file limit of
`--nofile`) until `/health` stops answering. `impostor`: a process that takes the loopback port the
router picks for an upstream: what it receives, and who answers the client. `held-bodies`:
`--count` connections each send a chat whose `Content-Length` is the per-request limit and all of its
body but the last byte, then hold it: the router's RSS before and while they hold, the answers, and
`/health` latency meanwhile. `peer-flood`: a peer (the fake upstream) lists `--models` models;
`--clients` clients each list `/v1/models` `--listings` times and for `--seconds` at least, while
`/health` and a local chat are timed: RSS, listing sizes and times, and the latencies against the
same probes on a quiet router.

`--root DIR` runs the router of another checkout (an earlier commit exported with `git archive`,
say) to compare; its config gets only the settings it knows. `--base DIR` runs the same measurement on
that checkout first, then on `--root`, and prints both with their ratios. Loopback only; bounded in
count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import yaml

HERE = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(HERE))

from tests.make_tiny_models import make_model  # noqa: E402

FAKE = HERE / "tests" / "fake_upstream.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def llama_server() -> str:
    found = HERE / ".venv" / "bin" / "llama-server"
    return str(found) if found.exists() else "llama-server"


@contextlib.asynccontextmanager
async def router(
    root: Path,
    workdir: Path,
    profiles: dict[str, Any],
    *,
    nofile: int | None = None,
    peers: dict[str, Any] | None = None,
    **server: Any,
) -> AsyncIterator[tuple[str, psutil.Process]]:
    """`python -m llama_router serve` of the checkout at `root`; yields its URL and process."""
    port = free_port()
    config = workdir / f"profiles-{port}.yaml"
    settings = {"port": port, "state_dir": str(workdir / "state"), "watch_config": False, **server}
    config.write_text(yaml.safe_dump({"server": settings, "profiles": profiles, "peers": peers or {}}))

    def limit_files() -> None:
        if nofile is not None:
            resource.setrlimit(
                resource.RLIMIT_NOFILE, (nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
            )

    process = subprocess.Popen(
        [sys.executable, "-m", "llama_router", "--log-level", "ERROR", "serve", "-c", str(config)],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        stdout=subprocess.DEVNULL,
        stderr=(workdir / "router.log").open("ab"),
        preexec_fn=limit_files,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(600):
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(url + "/health") as response:
                        if response.status == 200:
                            break
                await asyncio.sleep(0.05)
        yield url, psutil.Process(process.pid)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


# ---------------------------------------------------------------------------------------------- burst


async def burst(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    model = make_model(workdir / "tiny.gguf", seed=1)
    ctx = str(512 * args.parallel)
    profile = {
        "model": str(model),
        "binary": llama_server(),
        "args": ["-c", ctx, "-np", str(args.parallel), "-t", "1"],
    }
    outcomes: Counter[str] = Counter()
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "tell me a story"}],
        "max_tokens": args.tokens,
        "stream": True,
    }
    async with router(args.root, workdir, {"m": profile}, stall_timeout_prompt=args.stall) as (url, _):
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=600)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            async with session.post(url + "/v1/chat/completions", json={**body, "stream": False}) as response:
                await response.read()  # loaded

            async def one() -> None:
                try:
                    async with session.post(url + "/v1/chat/completions", json=body) as response:
                        raw = await response.read()
                except (aiohttp.ClientError, TimeoutError) as exc:
                    outcomes[f"client error: {type(exc).__name__}"] += 1
                    return
                if response.status != 200:
                    outcomes[f"{response.status} {_code(raw)}"] += 1
                elif b'"error"' in raw:
                    outcomes[f"error event {_code(raw.rsplit(b'data: ', 1)[-1])}"] += 1
                elif raw.rstrip().endswith(b"data: [DONE]"):
                    outcomes["completed"] += 1
                else:
                    outcomes["cut short"] += 1

            started = time.monotonic()
            await asyncio.gather(*(one() for _ in range(args.streams)))
            seconds = time.monotonic() - started
            async with session.get(url + "/metrics") as response:
                metrics = await response.text()
    restarts = sum(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("llama_router_unhealthy_total{")
    )
    return {
        "streams": args.streams,
        "parallel": args.parallel,
        "stall_timeout_prompt": args.stall,
        "max_tokens": args.tokens,
        "seconds": round(seconds, 2),
        "outcomes": dict(outcomes),
        "failed": args.streams - outcomes["completed"],
        "model_restarts": restarts,
    }


def _code(raw: bytes) -> str:
    try:
        return str(json.loads(raw)["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return "?"


# ---------------------------------------------------------------------------------------------- bodies


async def bodies(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    dummy = workdir / "m.gguf"
    dummy.write_bytes(b"GGUF")
    profile = {"model": str(dummy), "binary": sys.executable, "args": [str(FAKE)]}
    server = {} if args.max_body_mb is None else {"max_body_mb": args.max_body_mb}
    size = args.mb * 1024 * 1024
    prefix, suffix = b'{"model": "m", "messages": [{"role": "user", "content": "', b'"}]}'
    payload = prefix + b"x" * (size - len(prefix) - len(suffix)) + suffix
    async with router(args.root, workdir, {"m": profile}, **server) as (url, process):
        port = int(url.rsplit(":", 1)[1])
        async with (
            aiohttp.ClientSession() as session,
            session.post(url + "/v1/chat/completions", json={"model": "m", "messages": []}) as response,
        ):
            await response.read()  # the model loaded, the router warm
        baseline = process.memory_info().rss
        peak = baseline
        sampling = True

        async def sample() -> None:
            nonlocal peak
            while sampling:
                peak = max(peak, process.memory_info().rss)
                await asyncio.sleep(0.005)

        async def send() -> str:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            head = (
                "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            )
            head += f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
            writer.write(head.encode())
            with contextlib.suppress(ConnectionError):
                view = memoryview(payload)
                for start in range(0, len(view), 1 << 20):
                    writer.write(view[start : start + (1 << 20)])
                    await writer.drain()
            try:
                status = (await asyncio.wait_for(reader.readline(), 300)).decode().split()[1]
            except (IndexError, ConnectionError, TimeoutError):
                status = "no answer"
            writer.close()
            return status

        sampler = asyncio.ensure_future(sample())
        started = time.monotonic()
        statuses = await asyncio.gather(*(send() for _ in range(args.count)))
        seconds = time.monotonic() - started
        await asyncio.sleep(0.2)
        sampling = False
        await sampler
    return {
        "body_mb": args.mb,
        "bodies_at_once": args.count,
        "max_body_mb": args.max_body_mb,
        "statuses": dict(Counter(statuses)),
        "rss_before_mb": round(baseline / 2**20, 1),
        "rss_peak_mb": round(peak / 2**20, 1),
        "peak_over_baseline_mb": round((peak - baseline) / 2**20, 1),
        "seconds": round(seconds, 2),
    }


# ---------------------------------------------------------------------------------------------- connections


async def connections(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):  # this script holds as many sockets as it opens
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, args.max + 256)), hard))
    dummy = workdir / "m.gguf"
    dummy.write_bytes(b"GGUF")
    profile = {"model": str(dummy), "binary": sys.executable, "args": [str(FAKE)]}
    held: list[socket.socket] = []
    failed_at: int | None = None
    async with router(args.root, workdir, {"m": profile}, nofile=args.nofile) as (url, process):
        port = int(url.rsplit(":", 1)[1])
        router_limit = process.rlimit(psutil.RLIMIT_NOFILE)[0]
        try:
            while len(held) < args.max:
                for _ in range(50):
                    held.append(socket.create_connection(("127.0.0.1", port)))
                if not await _health(port):
                    failed_at = len(held)
                    break
            answered = await _health(port)
            fds = process.num_fds()
        finally:
            for sock in held:
                sock.close()
    return {
        "router_open_file_limit": router_limit,
        "started_with_soft_limit": args.nofile,
        "idle_connections_held": len(held),
        "health_failed_at": failed_at,
        "health_answered_at_the_end": answered,
        "router_fds_at_the_end": fds,
    }


async def _health(port: int) -> bool:
    """Whether a new connection gets `/health` answered 200 within 3 s."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 3)
        writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        line = await asyncio.wait_for(reader.readline(), 3)
        writer.close()
        return line.split()[1:2] == [b"200"]
    except (OSError, TimeoutError, IndexError):
        return False


# ---------------------------------------------------------------------------------------------- held bodies


def _fake_profile(workdir: Path) -> dict[str, Any]:
    dummy = workdir / "m.gguf"
    dummy.write_bytes(b"GGUF")
    return {"model": str(dummy), "binary": sys.executable, "args": [str(FAKE)]}


def _mb(size: float) -> float:
    return round(size / 2**20, 1)


async def _timed_health(session: aiohttp.ClientSession, url: str) -> float:
    started = time.perf_counter()
    async with session.get(url + "/health") as response:
        await response.read()
    return time.perf_counter() - started


def _latencies(values: list[float]) -> dict[str, float]:
    ordered = sorted(values) or [0.0]
    return {
        "count": len(values),
        "median_ms": round(statistics.median(ordered) * 1000, 2),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 2),
        "max_ms": round(ordered[-1] * 1000, 2),
    }


async def held_bodies(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    size = int(args.max_body_mb * 2**20)  # the per-request limit: a Content-Length it takes
    async with router(args.root, workdir, {"m": _fake_profile(workdir)}, max_body_mb=args.max_body_mb) as (
        url,
        process,
    ):
        port = int(url.rsplit(":", 1)[1])
        async with aiohttp.ClientSession() as session:
            async with session.post(url + "/v1/chat/completions", json={"model": "m", "messages": []}) as r:
                await r.read()  # the model loaded, the router warm
            before = process.memory_info().rss
            answers: list[str] = []
            writers: list[asyncio.StreamWriter] = []
            sent: list[asyncio.StreamWriter] = []  # done sending (the body but its last byte, or refused)
            piece = b" " * (1 << 20)

            async def hold() -> None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writers.append(writer)
                head = (
                    f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {size}\r\n\r\n"
                )
                writer.write(head.encode())

                async def answer() -> None:  # read as the body goes out: a refusal comes at once
                    try:
                        line = await reader.readline()
                        answers.append(line.decode().split()[1] if line else "closed")
                    except ConnectionError:
                        answers.append("closed")

                answered = asyncio.ensure_future(answer())
                with contextlib.suppress(ConnectionError):
                    left = size - 1  # all but the last byte: the router waits for it, holding the rest
                    while left > 0 and not answered.done():
                        writer.write(piece[: min(left, len(piece))])
                        left -= min(left, len(piece))
                        await writer.drain()
                sent.append(writer)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(answered, args.hold + 60)

            started = time.monotonic()
            holders = [asyncio.ensure_future(hold()) for _ in range(args.count)]
            while len(sent) < args.count:
                await asyncio.sleep(0.05)  # every body sent or refused
                if time.monotonic() - started > 120:
                    break
            sending = time.monotonic() - started
            peak, health = before, []
            deadline = time.monotonic() + args.hold
            while time.monotonic() < deadline:
                peak = max(peak, process.memory_info().rss)
                health.append(await _timed_health(session, url))
                await asyncio.sleep(0.05)
            held = process.memory_info().rss
            refused_early = Counter(answers)
            for writer in writers:
                writer.close()
            for holder in holders:
                holder.cancel()
            await asyncio.gather(*holders, return_exceptions=True)
    return {
        "connections": args.count,
        "max_body_mb": args.max_body_mb,
        "content_length": size,
        "bytes_sent_each": size - 1,
        "seconds_to_send": round(sending, 2),
        "answered_while_holding": dict(refused_early),
        "rss_before_mb": _mb(before),
        "rss_holding_mb": _mb(held),
        "rss_peak_mb": _mb(peak),
        "rss_growth_mb": _mb(peak - before),
        "health_while_holding": _latencies(health),
    }


# ---------------------------------------------------------------------------------------------- peer flood


async def peer_flood(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    peer_port = free_port()
    (workdir / "big.gguf").write_bytes(b"GGUF")
    command = [sys.executable, str(FAKE), "--list-models", str(args.models), "--host", "127.0.0.1"]
    command += ["--port", str(peer_port), "--model", str(workdir / "big.gguf")]
    fake = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    peer = f"http://127.0.0.1:{peer_port}"
    try:
        timeout = aiohttp.ClientTimeout(total=600)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for _ in range(1200):  # the fake builds its list before it listens
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(peer + "/health") as response:
                        if response.status == 200:
                            break
                await asyncio.sleep(0.05)
            profiles = {"m": _fake_profile(workdir)}
            async with router(args.root, workdir, profiles, peers={"big": {"url": peer}}) as (url, process):
                return await _flood(args, session, url, process)
    finally:
        fake.terminate()
        fake.wait(timeout=30)


async def _flood(
    args: argparse.Namespace, session: aiohttp.ClientSession, url: str, process: psutil.Process
) -> dict[str, Any]:
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

    async def timed_chat() -> float:
        started = time.perf_counter()
        async with session.post(url + "/v1/chat/completions", json=chat) as response:
            await response.read()
        return time.perf_counter() - started

    await timed_chat()  # the local model loaded
    started = time.monotonic()
    while time.monotonic() - started < 120:  # until the peer's list was read (or refused)
        async with session.get(url + "/metrics") as response:
            if 'llama_router_peer_up{peer="big"} 1.0' in await response.text():
                break
        await asyncio.sleep(0.2)
    listed_after = time.monotonic() - started
    await asyncio.sleep(1)
    idle = process.memory_info().rss
    quiet_health = [await _timed_health(session, url) for _ in range(50)]
    quiet_chat = [await timed_chat() for _ in range(10)]

    listings: list[tuple[float, int]] = []
    health: list[float] = []
    chats: list[float] = []
    peak = idle
    busy = True

    async def client() -> None:
        """One client listing, in a process of its own so that reading the lists does not slow
        this process's probes."""
        command = [sys.executable, __file__, "lister", url, str(args.listings), str(args.seconds)]
        process = await asyncio.create_subprocess_exec(*command, stdout=subprocess.PIPE)
        out, _ = await process.communicate()
        listings.extend((seconds, size) for seconds, size in json.loads(out))

    async def probe(record: list[float], call: Callable[[], Any], pause: float) -> None:
        while busy:
            record.append(await call())
            await asyncio.sleep(pause)

    async def sample() -> None:
        nonlocal peak
        while busy:
            peak = max(peak, process.memory_info().rss)
            await asyncio.sleep(0.01)

    probes = [
        asyncio.ensure_future(probe(health, lambda: _timed_health(session, url), 0.02)),
        asyncio.ensure_future(probe(chats, timed_chat, 0.1)),
        asyncio.ensure_future(sample()),
    ]
    began = time.monotonic()
    await asyncio.gather(*(client() for _ in range(args.clients)))
    seconds = time.monotonic() - began
    busy = False
    await asyncio.gather(*probes)
    async with session.get(url + "/running") as response:
        running = await response.json()
    state: dict[str, Any] = next((p for p in running.get("peers", []) if p.get("peer") == "big"), {})
    return {
        "peer_models": args.models,
        "peer_state": state.get("state"),
        "peer_last_error": state.get("last_error"),
        "peer_read_after_s": round(listed_after, 2),
        "rss_idle_after_peer_read_mb": _mb(idle),
        "rss_peak_during_listings_mb": _mb(peak),
        "listings": len(listings),
        "listing_bytes": sorted({size for _, size in listings}),
        "listing_median_s": round(statistics.median(t for t, _ in listings), 3),
        "listings_took_s": round(seconds, 2),
        "health_quiet": _latencies(quiet_health),
        "health_during_listings": _latencies(health),
        "chat_quiet": _latencies(quiet_chat),
        "chat_during_listings": _latencies(chats),
    }


async def lister(url: str, listings: int, seconds: float) -> None:
    """List `/v1/models` `listings` times and for `seconds` at least; print each (seconds, bytes)."""
    timings: list[tuple[float, int]] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        first = time.monotonic()
        while len(timings) < listings or time.monotonic() - first < seconds:
            began = time.perf_counter()
            async with session.get(url + "/v1/models") as response:
                size = len(await response.read())
            timings.append((time.perf_counter() - began, size))
    print(json.dumps(timings))


# ---------------------------------------------------------------------------------------------- impostor


async def impostor(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """The router runs in this process (its supervisor's port choice is made the impostor's port,
    which makes the race between choosing a port and binding it certain)."""
    sys.path.insert(0, str(args.root))
    for name in [name for name in sys.modules if name == "llama_router" or name.startswith("llama_router.")]:
        del sys.modules[name]
    from aiohttp import web

    from llama_router.app import RouterServer
    from llama_router.config.schema import load_config
    from llama_router.upstream import supervisor

    received: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        received.append(f"{request.method} {request.path} {(await request.text())[:80]}".strip())
        if request.path == "/health":
            return web.json_response({"status": "ok"})
        reply = {"choices": [{"message": {"role": "assistant", "content": "answered by the impostor"}}]}
        return web.json_response(reply)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    picks = iter([port])
    real: Callable[..., int] = supervisor.free_port
    supervisor.free_port = lambda host="127.0.0.1": next(picks, None) or real(host)

    dummy = workdir / "m.gguf"
    dummy.write_bytes(b"GGUF")
    config_path = workdir / "profiles.yaml"
    profile = {"model": str(dummy), "binary": sys.executable, "args": [str(FAKE)]}
    server = {"port": 0, "state_dir": str(workdir / "state"), "restart_backoff": 0, "watch_config": False}
    config_path.write_text(yaml.safe_dump({"server": server, "profiles": {"m": profile}}))
    routed = RouterServer(load_config(config_path))
    await routed.start()
    try:
        body = {"model": "m", "messages": [{"role": "user", "content": "my secret prompt"}]}
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"http://127.0.0.1:{routed.port}/v1/chat/completions", json=body) as response,
        ):
            answer = await response.json(content_type=None)
    finally:
        routed.stop()
        await routed.shutdown()
        await runner.cleanup()
    content = (
        answer.get("choices", [{}])[0].get("message", {}).get("content", "")
        if isinstance(answer, dict)
        else ""
    )
    return {
        "impostor_port": port,
        "impostor_received": received,
        "prompt_reached_impostor": any("my secret prompt" in line for line in received),
        "client_was_answered_by": "impostor" if "impostor" in content else "the router's upstream",
    }


def _ratios(root: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """root / base of every figure both runs have (in nested objects too)."""
    ratios: dict[str, Any] = {}
    for key, value in base.items():
        other = root.get(key)
        if isinstance(value, dict) and isinstance(other, dict):
            ratios[key] = _ratios(other, value)
        elif isinstance(value, int | float) and isinstance(other, int | float) and value and key != "count":
            ratios[key] = round(other / value, 3)
    return ratios


def main() -> None:
    if sys.argv[1:2] == ["lister"]:  # a listing client of peer-flood
        asyncio.run(lister(sys.argv[2], int(sys.argv[3]), float(sys.argv[4])))
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, default=HERE, help="checkout whose router to run")
    parser.add_argument("--base", type=Path, default=None, help="a checkout measured first, to compare")
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("burst")
    one.add_argument("--streams", type=int, default=500)
    one.add_argument("--parallel", type=int, default=2)
    one.add_argument("--stall", type=float, default=2.0, help="stall_timeout_prompt, seconds")
    one.add_argument("--tokens", type=int, default=32)
    one = commands.add_parser("bodies")
    one.add_argument("--mb", type=int, default=200)
    one.add_argument("--count", type=int, default=1)
    one.add_argument("--max-body-mb", type=float, default=None, help="server.max_body_mb (newer routers)")
    one = commands.add_parser("connections")
    one.add_argument("--max", type=int, default=3000, help="most idle connections to open")
    one.add_argument("--nofile", type=int, default=1024, help="the router's soft open-file limit at start")
    commands.add_parser("impostor")
    one = commands.add_parser("held-bodies")
    one.add_argument("--count", type=int, default=100, help="connections, each holding one body")
    one.add_argument("--max-body-mb", type=float, default=8.0, help="server.max_body_mb: each body's size")
    one.add_argument("--hold", type=float, default=5.0, help="seconds the bodies are held and measured")
    one = commands.add_parser("peer-flood")
    one.add_argument("--models", type=int, default=1_000_000, help="models the peer lists")
    one.add_argument("--clients", type=int, default=2, help="clients listing /v1/models at once")
    one.add_argument("--listings", type=int, default=2, help="listings per client, at least")
    one.add_argument("--seconds", type=float, default=10.0, help="clients list for at least this long")
    args = parser.parse_args()
    run = {
        "burst": burst,
        "bodies": bodies,
        "connections": connections,
        "impostor": impostor,
        "held-bodies": held_bodies,
        "peer-flood": peer_flood,
    }[args.command]
    results: dict[str, Any] = {}
    for label, root in [("base", args.base), ("root", args.root)]:
        if root is None:
            continue
        args.root = root.resolve()
        with tempfile.TemporaryDirectory(prefix="limits-") as folder:
            results[label] = {"root": str(args.root), **asyncio.run(run(args, Path(folder)))}
    if args.base is None:
        print(json.dumps({"command": args.command, **results["root"]}, indent=1))
        return
    ratios = _ratios(results["root"], results["base"])
    print(json.dumps({"command": args.command, **results, "root_over_base": ratios}, indent=1))


if __name__ == "__main__":
    main()
