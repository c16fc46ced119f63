#!/usr/bin/env python3
"""What a busy or hostile client can do to a router, measured: one JSON object per run.

    limits.py burst        [--streams 500] [--parallel 2] [--stall 2] [--tokens 32]
    limits.py bodies       [--mb 200] [--count 1] [--max-body-mb N]
    limits.py connections  [--max 3000] [--nofile 1024]
    limits.py impostor

`burst`: concurrent streams at a real llama-server with few slots under a short
`stall_timeout_prompt`: how many complete, how many fail and why, how often the model was
restarted. `bodies`: peak RSS of the router while it takes large bodies, and the answers.
`connections`: idle connections held open (the router started under an open-file limit of
`--nofile`) until `/health` stops answering. `impostor`: a process that takes the loopback port the
router picks for an upstream: what it receives, and who answers the client.

`--root DIR` runs the router of another checkout (an earlier commit exported with `git archive`,
say) to compare; its config gets only the settings it knows. Loopback only; bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import socket
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

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))

from scripts.make_tiny_models import make_model  # noqa: E402

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
    root: Path, workdir: Path, profiles: dict[str, Any], *, nofile: int | None = None, **server: Any
) -> AsyncIterator[tuple[str, psutil.Process]]:
    """`python -m router serve` of the checkout at `root`; yields its URL and process."""
    port = free_port()
    config = workdir / f"profiles-{port}.yaml"
    settings = {"port": port, "state_dir": str(workdir / "state"), "watch_config": False, **server}
    config.write_text(yaml.safe_dump({"server": settings, "profiles": profiles}))

    def limit_files() -> None:
        if nofile is not None:
            resource.setrlimit(
                resource.RLIMIT_NOFILE, (nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
            )

    process = subprocess.Popen(
        [sys.executable, "-m", "router", "--log-level", "ERROR", "serve", "-c", str(config)],
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


# ---------------------------------------------------------------------------------------------- impostor


async def impostor(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """The router runs in this process (its supervisor's port choice is made the impostor's port,
    which makes the race between choosing a port and binding it certain)."""
    sys.path.insert(0, str(args.root))
    for name in [name for name in sys.modules if name == "router" or name.startswith("router.")]:
        del sys.modules[name]
    from aiohttp import web

    from router import supervisor
    from router.app import RouterServer
    from router.config import load_config

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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, default=HERE, help="checkout whose router to run")
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
    args = parser.parse_args()
    args.root = args.root.resolve()
    run = {"burst": burst, "bodies": bodies, "connections": connections, "impostor": impostor}[args.command]
    with tempfile.TemporaryDirectory(prefix="limits-") as folder:
        result = asyncio.run(run(args, Path(folder)))
    print(json.dumps({"command": args.command, "root": str(args.root), **result}, indent=1))


if __name__ == "__main__":
    main()
