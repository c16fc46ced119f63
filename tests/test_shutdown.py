"""Shutdown and restart: SIGTERM drains requests in flight, then stops every upstream; a SIGKILLed
router leaves no upstream behind; a new router removes stale tagged upstreams and nothing else."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp

from llama_router.upstream.stale import find_stale, remove_stale
from llama_router.upstream.supervisor import OWNER_ENV
from tests.conftest import FAKE_UPSTREAM, fake_profile, wait_until
from tests.router_process import RouterProcess, accepts_connections, free_port, pid_gone, write_config


async def stream_chat(url: str, model: str, **body: Any) -> tuple[int, list[str]]:
    """A streamed chat; returns the status and every SSE data payload received."""
    payload = {"model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}], **body}
    events: list[str] = []
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/v1/chat/completions", json=payload) as response,
    ):
        async for raw in response.content:
            line = raw.decode().strip()
            if line.startswith("data: "):
                events.append(line[len("data: ") :])
        return response.status, events


async def test_sigterm_drains_a_slow_request_then_stops_upstreams(
    tmp_path: Path, dummy_model: Path, router_processes: list[RouterProcess]
) -> None:
    config = write_config(
        tmp_path / "profiles.yaml", {"slow": fake_profile(dummy_model)}, max_resident=1, shutdown_timeout=20
    )
    router = await RouterProcess(config).start()
    router_processes.append(router)
    # Five chunks 0.3 s apart: the answer is still streaming when SIGTERM arrives.
    request = asyncio.create_task(stream_chat(router.url, "slow", fake_chunks=5, fake_chunk_delay=0.3))
    ready = await router.wait_log(lambda e: str(e.get("message", "")).startswith("slow ready"), what="ready")
    assert ready
    upstream_pid = (await router.running())[0]["pid"]
    router.signal(signal.SIGTERM)
    await router.wait_log(lambda e: "draining 1 request" in str(e.get("message")), what="draining")

    # New connections are refused while the old request finishes.
    async def refused() -> bool:
        return not await accepts_connections(router.port)

    await wait_until(refused, what="the listening socket to close")
    status, events = await request
    assert status == 200
    assert events[-1] == "[DONE]"
    contents = [json.loads(e)["choices"][0]["delta"].get("content") for e in events[:-1]]
    assert sum(1 for c in contents if c) == 5, contents
    assert await router.wait_exit() == 0
    assert pid_gone(upstream_pid)
    messages = router.messages()
    assert any(m.startswith("stopped in") for m in messages)
    # The access line was written before the upstream was stopped.
    access = next(i for i, e in enumerate(router.lines) if e.get("path") == "/v1/chat/completions")
    stopping = next(i for i, m in enumerate(messages) if m.startswith("stopping slow"))
    assert access < stopping


async def test_sigterm_gives_up_on_requests_after_shutdown_timeout(
    tmp_path: Path, dummy_model: Path, router_processes: list[RouterProcess]
) -> None:
    config = write_config(
        tmp_path / "profiles.yaml", {"slow": fake_profile(dummy_model)}, max_resident=1, shutdown_timeout=0.3
    )
    router = await RouterProcess(config).start()
    router_processes.append(router)
    request = asyncio.create_task(stream_chat(router.url, "slow", fake_chunks=100, fake_chunk_delay=0.5))
    await router.wait_log(lambda e: str(e.get("message", "")).startswith("slow ready"), what="ready")
    await router.wait_log(lambda e: e.get("path") is None and "spawned" in str(e.get("message")))
    router.signal(signal.SIGTERM)
    assert await router.wait_exit(timeout=15) == 0
    assert any("cancelling 1 request" in m for m in router.messages())
    try:
        _, events = await request
    except aiohttp.ClientError:
        pass  # the connection was cut
    else:
        assert not events or events[-1] != "[DONE]", "a cancelled stream must not look complete"


async def test_sigkill_of_the_router_leaves_no_upstream(
    tmp_path: Path, dummy_model: Path, router_processes: list[RouterProcess]
) -> None:
    profiles = {"a": fake_profile(dummy_model), "b": fake_profile(dummy_model)}
    router = await RouterProcess(write_config(tmp_path / "p.yaml", profiles, max_resident=2)).start()
    router_processes.append(router)
    async with aiohttp.ClientSession() as session:
        for model in ("a", "b"):
            body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
            async with session.post(f"{router.url}/v1/chat/completions", json=body) as response:
                assert response.status == 200
    pids = [row["pid"] for row in await router.running()]
    assert len(pids) == 2 and all(pids)
    router.signal(signal.SIGKILL)
    assert await router.wait_exit() == -signal.SIGKILL
    await wait_until(lambda: all(pid_gone(pid) for pid in pids), timeout=10, what="upstreams to die")


async def spawn_upstream(model: Path, env_extra: dict[str, str], *flags: str) -> subprocess.Popen[bytes]:
    """A fake upstream started like the supervisor starts one (own session), with extra environment;
    returns once it listens (so its signal handlers are in place)."""
    env = {k: v for k, v in os.environ.items() if k != OWNER_ENV}
    env.update(env_extra)
    port = free_port()
    command = [sys.executable, str(FAKE_UPSTREAM), *flags, "--port", str(port), "--model", str(model)]
    process = subprocess.Popen(
        command, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )

    async def listening() -> bool:
        assert process.poll() is None, "the fake upstream exited at start"
        return await accepts_connections(port)

    await wait_until(listening, timeout=30, what="the fake upstream to listen")
    return process


def dead_pid() -> int:
    """A router pid that is certainly not running: above the kernel's pid_max, so never reused."""
    return int(Path("/proc/sys/kernel/pid_max").read_text()) + 1


async def test_new_router_removes_stale_tagged_upstreams_only(
    tmp_path: Path, dummy_model: Path, router_processes: list[RouterProcess]
) -> None:
    stale = await spawn_upstream(dummy_model, {OWNER_ENV: str(dead_pid())})
    untagged = await spawn_upstream(dummy_model, {})
    owned_by_live_router = await spawn_upstream(dummy_model, {OWNER_ENV: str(os.getpid())})
    others = (untagged, owned_by_live_router)
    try:
        config = write_config(tmp_path / "p.yaml", {"a": fake_profile(dummy_model)}, max_resident=1)
        router = await RouterProcess(config).start()
        router_processes.append(router)
        # (Other stale processes on this machine, if any, are removed too: only ours are checked.)
        await router.wait_log(
            lambda e: e.get("event") == "stale_upstream" and e.get("pid") == stale.pid, what="stale cleanup"
        )
        await wait_until(lambda: stale.poll() is not None, what="the stale upstream to exit")
        assert all(process.poll() is None for process in others), "an untouchable process was killed"
        removed = {e["pid"] for e in router.lines if e.get("event") == "stale_upstream"}
        assert not removed & {process.pid for process in others}
    finally:
        for process in (stale, *others):
            if process.poll() is None:
                process.kill()
            process.wait()


async def test_stale_scan_in_process(dummy_model: Path) -> None:
    """find_stale/remove_stale directly: a stale process group is removed, SIGKILL if it ignores TERM."""
    stubborn = await spawn_upstream(dummy_model, {OWNER_ENV: f"{dead_pid()}:old-router"}, "--ignore-sigterm")
    untagged = await spawn_upstream(dummy_model, {})
    try:
        found = {s.pid for s in find_stale()}
        assert stubborn.pid in found
        assert untagged.pid not in found
        removed = await asyncio.to_thread(remove_stale, 0.5)
        assert stubborn.pid in {s.pid for s in removed}
        assert stubborn.wait(timeout=5) == -signal.SIGKILL
        assert untagged.poll() is None
    finally:
        for process in (stubborn, untagged):
            if process.poll() is None:
                process.kill()
            process.wait()
