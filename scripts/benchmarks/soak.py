#!/usr/bin/env python3
"""Soak: mixed traffic, swaps and upstream kills against one router for N minutes.

The router runs as `llama-router serve` on three profiles of generated tiny models for the real
llama-server, with room for one model at a time, so traffic to all three keeps it swapping. Client
loops send a mix of non-streamed and streamed chats, model listings, unknown models, malformed bodies,
streams dropped half-way and hostile connections (an oversized body, a body that stalls, a connection
left idle); every `--kill-every` seconds a running upstream is SIGKILLed. Each
`--sample-every` seconds the router's RSS, open file descriptors, threads and upstream processes are
sampled. At the end the router is stopped and every upstream it ever ran is checked to be gone.

Prints one JSON object: requests sent / completed / failed by reason, the samples over time, and what
was left behind. Loopback only; bounded in count and time (it stops by itself).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from scripts.benchmarks.benchlib import running_router
from tests.make_tiny_models import make_model

MODELS = ("a", "b", "c")
ARGS = ["--ctx-size", "512", "--parallel", "2", "--threads", "1"]
SIZE_MIB = 100  # declared footprint of each model; the RAM budget holds one
REQUEST_TIMEOUT = 120.0  # a request still unanswered after this counts as hung
HOSTILE_PATIENCE = 40.0  # s a hostile connection waits for the router to answer and close it


class Tally:
    """Outcomes by reason, plus the counts the report starts with."""

    def __init__(self) -> None:
        self.sent = 0
        self.outcomes: collections.Counter[str] = collections.Counter()

    def add(self, outcome: str) -> None:
        self.outcomes[outcome] += 1

    def report(self) -> dict[str, Any]:
        completed = sum(n for outcome, n in self.outcomes.items() if outcome.startswith("ok"))
        expected = sum(n for outcome, n in self.outcomes.items() if outcome.startswith("expected"))
        return {
            "sent": self.sent,
            "completed": completed,
            "expected_errors": expected,
            "failed": self.sent - completed - expected,
            "by_reason": dict(sorted(self.outcomes.items(), key=lambda item: -item[1])),
        }


def _error_code(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"].get("code"))
    except (ValueError, KeyError, TypeError, AttributeError):
        return "?"


async def _chat(session: aiohttp.ClientSession, url: str, model: str, *, stream: bool, drop: bool) -> str:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "tell me a story"}],
        "max_tokens": 24,
        "stream": stream,
    }
    async with session.post(url + "/v1/chat/completions", json=body) as response:
        if response.status != 200:
            return f"http {response.status} {_error_code(await response.read())}"
        if not stream:
            await response.read()
            return "ok chat"
        done = False
        async for line in response.content:
            if drop:
                return "ok stream dropped by client"
            if line.startswith(b"event: error") or b'"error"' in line:
                return "stream error event"
            if line.strip() == b"data: [DONE]":
                done = True
        return "ok stream" if done else "stream ended without [DONE]"


async def _one(session: aiohttp.ClientSession, url: str, rng: random.Random) -> str:
    """One request of the mix; its outcome as a reason string."""
    roll = rng.random()
    if roll < 0.05:
        async with session.get(url + "/v1/models") as response:
            await response.read()
            return "ok models" if response.status == 200 else f"http {response.status} models"
    if roll < 0.08:
        async with session.post(url + "/v1/chat/completions", json={"model": "no-such-model"}) as response:
            await response.read()
            return "expected 404 unknown model" if response.status == 404 else f"http {response.status}"
    if roll < 0.10:
        async with session.post(url + "/v1/chat/completions", data=b"{not json") as response:
            await response.read()
            return "expected 400 malformed" if response.status == 400 else f"http {response.status}"
    if roll < 0.12:
        return await _hostile(url, rng)
    model = rng.choice(MODELS)
    stream = roll < 0.55
    return await _chat(session, url, model, stream=stream, drop=stream and rng.random() < 0.1)


async def _hostile(url: str, rng: random.Random) -> str:
    """A client the limits are for, on a raw connection: an oversized body announced, a body that
    stalls half-way, or a connection left idle. Each must end with its answer or a close."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    head = "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n\r\n"
    kind = rng.choice(("oversized", "stalled body", "idle"))
    try:
        if kind == "oversized":
            writer.write(head.format(1 << 30).encode())
        elif kind == "stalled body":
            writer.write(head.format(100).encode() + b'{"model": "a"')
        answer = await asyncio.wait_for(reader.read(), HOSTILE_PATIENCE)  # to the router's close
    except (TimeoutError, ConnectionError):
        return f"{kind} connection not closed"
    finally:
        writer.close()
    expected = {"oversized": b" 413 ", "stalled body": b" 408 ", "idle": b""}[kind]
    if answer.split(b"\r\n", 1)[0][8:13] == expected or (not expected and not answer):
        return f"expected {kind}: answered and closed"
    return f"{kind}: {answer[:40]!r}"


async def client_loop(url: str, seed: int, until: float, tally: Tally) -> None:
    rng = random.Random(seed)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while time.monotonic() < until:
            tally.sent += 1
            try:
                outcome = await _one(session, url, rng)
            except TimeoutError:
                outcome = "hung (no answer within the client timeout)"
            except aiohttp.ClientError as exc:
                outcome = f"connection {type(exc).__name__}"
            tally.add(outcome)


async def killer(
    url: str,
    every: float,
    started: float,
    until: float,
    seen: dict[int, psutil.Process],
    kills: list[dict[str, Any]],
) -> None:
    """SIGKILL one running upstream every `every` seconds; remember every upstream pid seen."""
    rng = random.Random(7)
    async with aiohttp.ClientSession() as session:
        next_kill = time.monotonic() + every
        while time.monotonic() < until:
            await asyncio.sleep(0.5)
            with contextlib.suppress(aiohttp.ClientError, ValueError):
                async with session.get(url + "/running") as response:
                    running = (await response.json()).get("running", [])
                pids = [(row.get("model"), row.get("pid")) for row in running if row.get("pid")]
                for _, pid in pids:
                    if pid not in seen or not seen[pid].is_running():
                        with contextlib.suppress(psutil.Error):
                            seen[pid] = psutil.Process(pid)  # the pid and its start time
                if pids and time.monotonic() >= next_kill:
                    model, pid = rng.choice(pids)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                        kills.append(
                            {"t_s": round(time.monotonic() - started, 1), "model": model, "pid": pid}
                        )
                    next_kill = time.monotonic() + every


async def sampler(
    pid: int, every: float, until: float, started: float, samples: list[dict[str, Any]]
) -> None:
    process = psutil.Process(pid)
    while True:
        with contextlib.suppress(psutil.Error):
            children = [
                child for child in process.children(recursive=True) if child.status() != psutil.STATUS_ZOMBIE
            ]
            samples.append(
                {
                    "t_s": round(time.monotonic() - started, 1),
                    "rss_mib": round(process.memory_info().rss / 2**20, 1),
                    "fds": process.num_fds(),
                    "threads": process.num_threads(),
                    "upstreams": len(children),
                }
            )
        if time.monotonic() >= until:
            return
        await asyncio.sleep(min(every, max(0.0, until - time.monotonic())))


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="llama-router-soak-") as tmp:
        workdir = Path(tmp)
        profiles = {
            name: {
                "model": str(make_model(workdir / f"{name}.gguf", seed=seed)),
                "args": ARGS,
                "footprint": {"ram": SIZE_MIB},
            }
            for seed, name in enumerate(MODELS, start=1)
        }
        server: dict[str, Any] = {
            "memory": {"ram": SIZE_MIB + SIZE_MIB // 2},
            "wait_timeout": 60,
            "swap_delay": 1,
            "upstream_sockets": True,  # the default (the benchmarks' helper turns it off)
            "idle_timeout": 20,  # above aiohttp clients' 15 s keep-alive, short enough for the soak
            "body_timeout": 5,
        }
        tally = Tally()
        samples: list[dict[str, Any]] = []
        kills: list[dict[str, Any]] = []
        seen: dict[int, psutil.Process] = {}
        log_file = workdir / "router.log"
        async with (
            aiohttp.ClientSession() as session,
            running_router(session, workdir, profiles, log_file=log_file, **server) as router,
        ):
            started = time.monotonic()
            until = started + args.minutes * 60
            tasks = [client_loop(router.url, seed, until, tally) for seed in range(args.clients)]
            tasks.append(sampler(router.process.pid, args.sample_every, until, started, samples))
            if args.kill_every > 0:
                tasks.append(killer(router.url, args.kill_every, started, until, seen, kills))
            await asyncio.gather(*tasks)
            # Let the last requests finish, then take a final sample with the load gone.
            await sampler(router.process.pid, 0, time.monotonic(), started, samples)
            router_process = router.process
        # Upstreams get a moment to finish dying (a parent-death signal is delivered as the router exits);
        # `is_running` compares start times, so a pid the system has since given to another process
        # does not count.
        _, alive = psutil.wait_procs([p for p in seen.values() if p.is_running()], timeout=3)
        left = [process.pid for process in alive if _alive(process)]
        return {
            "minutes": args.minutes,
            "clients": args.clients,
            "kill_every_s": args.kill_every,
            "requests": tally.report(),
            "upstream_kills": len(kills),
            "upstreams_seen": len(seen),
            "upstreams_left_after_stop": left,
            "router_exit_code": router_process.returncode,
            "samples": samples,
            "rss_mib_first_last_max": _first_last_max(samples, "rss_mib"),
            "fds_first_last_max": _first_last_max(samples, "fds"),
            "threads_first_last_max": _first_last_max(samples, "threads"),
        }


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _first_last_max(samples: list[dict[str, Any]], key: str) -> list[float]:
    values = [sample[key] for sample in samples]
    return [values[0], values[-1], max(values)] if values else []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--minutes", type=float, default=1.0, help="how long to run (default 1)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent client loops (default 8)")
    parser.add_argument("--kill-every", type=float, default=10.0, help="s between upstream kills; 0: none")
    parser.add_argument("--sample-every", type=float, default=10.0, help="s between resource samples")
    parser.add_argument("--json-out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    result = asyncio.run(soak(args))
    text = json.dumps(result)
    print(text)
    if args.json_out:
        args.json_out.write_text(text)
    failed = result["requests"]["failed"]
    print(
        f"sent {result['requests']['sent']}, completed {result['requests']['completed']}, "
        f"failed {failed}, upstreams left {len(result['upstreams_left_after_stop'])}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
