"""Fault tests: the router in front of the fake upstream when loads, streams and processes go wrong."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
import yaml

from llama_router.core.events import Event, Stopping
from llama_router.core.scheduler import State
from llama_router.upstream.supervisor import Upstream

from .conftest import (
    ROOT,
    RouterFactory,
    RunningRouter,
    assert_openai_error,
    fake_profile,
    upstream_processes,
    wait_until,
)

CHAT = "/v1/chat/completions"


# ---------------------------------------------------------------------------------------------- helpers


async def chat(router: RunningRouter, model: str, timeout: float = 10, **body: Any) -> tuple[int, Any]:
    """`router.chat`, bounded: a router that hangs fails the test instead of stalling the run."""
    return await asyncio.wait_for(router.chat(model, **body), timeout)


def chat_body(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, **extra}


def pid_gone(pid: int) -> bool:
    """True when `pid` no longer runs (reaped, or a zombie nobody reaped yet)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def fake_last(router: RunningRouter, name: str) -> dict[str, Any]:
    """The fake upstream's `/fake/last` report for profile `name` (which must be running)."""
    url = router.controller.upstreams[name].base_url + "/fake/last"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200
        report: dict[str, Any] = await response.json()
        return report


async def running_models(router: RunningRouter) -> list[str]:
    async with router.session.get("/running") as response:
        assert response.status == 200
        return [row["model"] for row in (await response.json())["running"]]


def sse_data(raw: bytes) -> list[str]:
    """The `data:` payloads of an SSE body, in order."""
    events = []
    for line in raw.decode().splitlines():
        if line.startswith("data: "):
            events.append(line[len("data: ") :])
    return events


# ---------------------------------------------------------------------------------------------- loads


async def test_slow_load_serves_concurrent_requests_with_one_start(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router({"slow": fake_profile(dummy_model, "--load-delay", "0.5")})
    tasks = [asyncio.create_task(chat(router, "slow")) for _ in range(6)]
    await wait_until(lambda: router.controller.view("slow").state is State.STARTING, what="load")
    results = await asyncio.gather(*tasks)
    for status, body in results:
        assert status == 200, body
        assert body["model"] == "slow"
        assert body["choices"][0]["message"]["content"].startswith("Hello from")
    assert router.controller.view("slow").starts == 1
    assert len(upstream_processes()) == 1


async def test_crash_during_load_is_a_503_with_the_log_and_the_router_stays_up(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router(
        {"broken": fake_profile(dummy_model, "--crash-during-load"), "good": fake_profile(dummy_model)},
        max_failures=1,  # fail at the first crash; crash loops have their own tests
    )
    status, body = await chat(router, "broken")
    assert status == 503, body
    error = assert_openai_error(body, "model_load_failed")
    assert "failed to load model" in error["message"], error["message"]
    assert error["type"] == "server_error"

    status, body = await chat(router, "good")
    assert status == 200, body
    assert body["model"] == "good"

    status, body = await chat(router, "broken")
    assert status == 503, body
    error = assert_openai_error(body, "model_load_failed")
    assert "failed to load model" in error["message"]
    assert router.controller.view("broken").starts == 2


async def test_load_timeout_is_a_503_and_the_process_is_stopped(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router({"hang": fake_profile(dummy_model, "--hang-health", load_timeout=0.5)})
    started = time.monotonic()
    status, body = await chat(router, "hang")
    elapsed = time.monotonic() - started
    assert status == 503, body
    error = assert_openai_error(body, "model_load_timeout")
    assert "0.5" in error["message"]
    assert elapsed < 3.0
    await wait_until(lambda: not upstream_processes(), what="the hung upstream to be stopped")
    await wait_until(lambda: "hang" not in router.controller.upstreams, what="the router to forget it")
    assert router.controller.view("hang").state in (State.FAILED, State.COLD)


# ---------------------------------------------------------------------------------------------- crashes


async def test_crash_mid_stream_ends_the_stream_with_an_error_event(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router({"crashy": fake_profile(dummy_model, "--crash-mid-stream", "2")})

    async def streamed() -> tuple[int, str, bytes]:
        async with router.session.post(CHAT, json=chat_body("crashy", stream=True)) as response:
            return response.status, response.headers.get("Content-Type", ""), await response.read()

    status, content_type, raw = await asyncio.wait_for(streamed(), timeout=10)
    assert status == 200
    assert content_type.startswith("text/event-stream")
    events = sse_data(raw)
    chunks = [json.loads(event) for event in events[:-1]]
    contents = [chunk["choices"][0]["delta"].get("content") for chunk in chunks]
    assert [text for text in contents if text] == ["Hello from fake-model.", " (1)"]
    assert_openai_error(json.loads(events[-1]), "upstream_failed")
    # (Sending at once, before the router has seen the exit, is test_next_request_right_after_a_crash.)
    await wait_until(lambda: _not_running(router, "crashy"), what="the router to see the crash")

    async with router.session.post(CHAT, json=chat_body("crashy")) as response:
        assert response.status == 502
        assert_openai_error(await response.json())
    await wait_until(lambda: _not_running(router, "crashy"), what="the router to see the crash")

    # A request the fake does not crash on: the model is started again and answers.
    starts = router.controller.view("crashy").starts
    async with router.session.post("/tokenize", json={"model": "crashy", "content": "ab"}) as response:
        assert response.status == 200, await response.text()
        assert (await response.json())["tokens"] == [97, 98]
    assert router.controller.view("crashy").starts == starts + 1


async def test_next_request_right_after_a_crash_restarts_the_model(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    """The client sees the error event and at once sends again: it must not hit the dead process."""
    router = await start_router({"crashy": fake_profile(dummy_model, "--crash-mid-stream", "1")})
    for _ in range(10):  # the window is a race: try it often enough to see it
        async with router.session.post(CHAT, json=chat_body("crashy", stream=True)) as response:
            assert response.status == 200
            events = sse_data(await response.read())
        assert_openai_error(json.loads(events[-1]), "upstream_failed")
        async with router.session.post("/tokenize", json={"model": "crashy", "content": "x"}) as response:
            assert response.status == 200, await response.text()


async def test_request_sent_before_the_router_hears_of_a_crash_waits_for_a_restart(
    start_router: RouterFactory, dummy_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same window, made wide: news of an exit arrives late (a busy loop, a child process still
    holding the log pipe...). A request dispatched to the dead upstream meanwhile must not fail."""
    original = Upstream.wait_exit

    async def late_news(self: Upstream) -> int:
        code = await original(self)
        await asyncio.sleep(0.3)
        return code

    monkeypatch.setattr(Upstream, "wait_exit", late_news)
    router = await start_router({"crashy": fake_profile(dummy_model, "--crash-mid-stream", "1")})
    for _ in range(2):
        async with router.session.post(CHAT, json=chat_body("crashy", stream=True)) as response:
            assert response.status == 200
            events = sse_data(await response.read())
        assert_openai_error(json.loads(events[-1]), "upstream_failed")
        dead = router.controller.upstreams["crashy"]
        await wait_until(functools.partial(_reaped, dead), what="the crashed upstream to be reaped")
        assert router.controller.upstreams.get("crashy") is dead, "the router has not heard of it yet"
        async with router.session.post("/tokenize", json={"model": "crashy", "content": "x"}) as response:
            assert response.status == 200, await response.text()
        assert router.controller.upstreams["crashy"] is not dead


def _reaped(upstream: Upstream) -> bool:
    return upstream.returncode is not None


async def test_upstream_exiting_while_idle_is_restarted_on_the_next_request(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router({"flaky": fake_profile(dummy_model, "--exit-after", "0.3")})
    status, body = await chat(router, "flaky")
    assert status == 200, body
    pid = router.controller.upstreams["flaky"].pid
    assert pid is not None
    await wait_until(lambda: pid_gone(pid), what="the upstream to exit by itself")
    await wait_until(lambda: _not_running(router, "flaky"), what="the router to see the upstream exited")
    status, body = await chat(router, "flaky")
    assert status == 200, body
    assert router.controller.view("flaky").starts == 2


async def _not_running(router: RunningRouter, name: str) -> bool:
    return name not in await running_models(router)


# ---------------------------------------------------------------------------------------------- swaps


async def test_sigterm_ignored_is_killed_after_stop_timeout_and_the_swap_happens(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router(
        {
            "stubborn": fake_profile(dummy_model, "--ignore-sigterm", stop_timeout=0.3),
            "other": fake_profile(dummy_model),
        },
        max_resident=1,
    )
    status, body = await chat(router, "stubborn")
    assert status == 200, body
    stubborn_pid = router.controller.upstreams["stubborn"].pid
    assert stubborn_pid is not None

    started = time.monotonic()
    status, body = await chat(router, "other")
    assert status == 200, body
    assert body["model"] == "other"
    assert time.monotonic() - started < 5.0
    assert pid_gone(stubborn_pid), "the SIGTERM-ignoring upstream was SIGKILLed"
    assert await running_models(router) == ["other"]
    assert len(upstream_processes()) == 1


async def test_in_flight_request_survives_a_swap(start_router: RouterFactory, dummy_model: Path) -> None:
    router = await start_router(
        {"a": fake_profile(dummy_model), "b": fake_profile(dummy_model)}, max_resident=1, swap_delay=0
    )
    events: list[tuple[str, str, int]] = []

    def on_event(event: Event) -> None:
        if isinstance(event, Stopping):
            events.append((event.kind, event.model, router.controller.view(event.model).in_flight))

    router.controller.events.subscribe(on_event)
    status, body = await chat(router, "a")  # load A first so the slow request is served at once
    assert status == 200, body
    finished: dict[str, float] = {}

    async def timed_chat(model: str, **extra: Any) -> tuple[int, Any]:
        result = await chat(router, model, **extra)
        finished[model] = time.monotonic()
        return result

    slow = asyncio.create_task(timed_chat("a", fake_delay=1.0))
    await wait_until(lambda: router.controller.view("a").in_flight == 1, what="A in flight")
    status_b, body_b = await timed_chat("b")
    status_a, body_a = await slow

    assert status_a == 200, body_a
    assert body_a["choices"][0]["message"]["content"].startswith("Hello from")
    assert status_b == 200, body_b
    assert body_b["model"] == "b"
    assert finished["a"] <= finished["b"]
    stops = [event for event in events if event[0] == "stopping" and event[1] == "a"]
    assert stops, events
    assert all(in_flight == 0 for _, _, in_flight in stops), f"A stopped with a request in flight: {events}"
    assert await running_models(router) == ["b"]


async def test_drain_timeout_stops_a_busy_model_for_a_waiting_one(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router(
        {"a": fake_profile(dummy_model), "b": fake_profile(dummy_model)},
        max_resident=1,
        drain_timeout=0.3,
        swap_delay=0,
    )
    status, body = await chat(router, "a")
    assert status == 200, body
    started = time.monotonic()
    slow = asyncio.create_task(chat(router, "a", fake_delay=5))
    await wait_until(lambda: router.controller.view("a").in_flight == 1, what="A in flight")

    status_b, body_b = await chat(router, "b")
    b_elapsed = time.monotonic() - started
    status_a, body_a = await asyncio.wait_for(slow, timeout=5)
    a_elapsed = time.monotonic() - started

    assert status_b == 200, body_b
    assert body_b["model"] == "b"
    assert b_elapsed < 2.0, f"B waited {b_elapsed:.2f}s"
    assert status_a == 502, body_a
    assert_openai_error(body_a)
    assert a_elapsed < 2.0, f"A's request took {a_elapsed:.2f}s to fail"


async def test_wait_timeout_fails_a_request_whose_model_loads_too_long(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router(
        {"slow": fake_profile(dummy_model, "--load-delay", "3", load_timeout=10)}, wait_timeout=0.5
    )
    started = time.monotonic()
    async with router.session.post(CHAT, json=chat_body("slow")) as response:
        status, body = response.status, await response.json()
        retry_after = response.headers.get("Retry-After")
    assert status == 503, body
    error = assert_openai_error(body, "model_wait_timeout")
    assert "slow" in error["message"]
    assert time.monotonic() - started < 2.5
    assert retry_after == "1", "a client told to come back, and when"


# ---------------------------------------------------------------------------------------------- clients


async def test_client_disconnect_mid_stream_cancels_the_upstream_request(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router(
        {"long": fake_profile(dummy_model, "--chunk-delay", "0.05", "--chunks", "2000")}
    )
    response = await router.session.post(CHAT, json=chat_body("long", stream=True))
    assert response.status == 200
    first = b""
    while not first.startswith(b"data: "):  # skip blank lines and `: loading` comments
        first = await asyncio.wait_for(response.content.readline(), timeout=5)
        assert first, "the stream ended before its first event"
    report = await fake_last(router, "long")
    assert report["in_flight"] == 1
    response.close()

    await wait_until(lambda: _fake_idle(router, "long"), what="the fake upstream's request to be cancelled")
    await wait_until(lambda: router.controller.view("long").in_flight == 0, what="lease released")
    assert (await fake_last(router, "long"))["count"] == report["count"], "the stream was retried or replayed"
    status, body = await chat(router, "long", fake_chunks=2)
    assert status == 200, body


async def test_client_cancel_while_waiting_for_a_plain_answer_cancels_the_upstream_request(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router({"slow": fake_profile(dummy_model)})
    task = asyncio.create_task(router.chat("slow", fake_delay=30))
    await wait_until(lambda: router.controller.view("slow").in_flight == 1, what="dispatch")
    await wait_until(lambda: _fake_busy(router, "slow"), what="the fake to get the request")
    upstream = router.controller.upstreams["slow"]
    assert upstream.pid is not None
    assert _upstream_connections(upstream.pid, upstream.port) == 1
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task

    # The fake cannot notice a closed connection while it sleeps in `fake_delay` (its handlers are
    # not cancelled on disconnect), so look at what llama-server would notice: the router closed the
    # upstream connection instead of waiting 30 s for an answer nobody reads.
    await wait_until(
        lambda: _upstream_connections(upstream.pid or 0, upstream.port) == 0,
        what="the router to close its connection to the upstream",
    )
    await wait_until(lambda: router.controller.view("slow").in_flight == 0, what="lease released")
    status, body = await chat(router, "slow")
    assert status == 200, body


def _upstream_connections(pid: int, port: int) -> int:
    """Established connections the upstream `pid` holds on its listening `port`."""
    return sum(
        1
        for conn in psutil.Process(pid).net_connections(kind="tcp")
        if conn.status == psutil.CONN_ESTABLISHED and conn.laddr and conn.laddr.port == port
    )


async def _fake_idle(router: RunningRouter, name: str) -> bool:
    return (await fake_last(router, name))["in_flight"] == 0


async def _fake_busy(router: RunningRouter, name: str) -> bool:
    return (await fake_last(router, name))["in_flight"] == 1


# ---------------------------------------------------------------------------------------------- logs


async def test_log_buffer_is_bounded_and_keeps_the_newest_lines(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router({"chatty": fake_profile(dummy_model, "--log-lines", "5000")}, log_lines=100)
    status, body = await chat(router, "chatty")
    assert status == 200, body
    logs = router.controller.logs["chatty"]
    last_line = "srv  log_server_r: request: POST /v1/chat/completions"
    await wait_until(lambda: logs and logs[-1].startswith(last_line), what="the fake's last log line")
    assert len(logs) <= 100
    assert "fake_upstream: log line 5000/5000" in logs
    assert "fake_upstream: log line 1/5000" not in logs
    assert "main: model loaded" in logs


# ---------------------------------------------------------------------------------------------- router death


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_sigkilled_router_leaves_no_upstream(tmp_path: Path, dummy_model: Path) -> None:
    config = tmp_path / "profiles.yaml"
    server = {"state_dir": str(tmp_path / "state")}
    config.write_text(yaml.safe_dump({"server": server, "profiles": {"m": fake_profile(dummy_model)}}))
    port = _free_port()
    log_path = tmp_path / "router.log"
    fake_pid: int | None = None
    with log_path.open("wb") as log_file:
        router = subprocess.Popen(
            [sys.executable, "-m", "llama_router", "serve", "-c", str(config), "--port", str(port)],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            fake_pid = asyncio.run(_load_through(f"http://127.0.0.1:{port}", router))
            assert "fake_upstream" in " ".join(psutil.Process(fake_pid).cmdline())
            assert psutil.Process(fake_pid).ppid() == router.pid

            router.send_signal(signal.SIGKILL)
            router.wait(timeout=5)
            deadline = time.monotonic() + 5
            while not pid_gone(fake_pid):
                assert time.monotonic() < deadline, "the upstream outlived the SIGKILLed router"
                time.sleep(0.02)
        except BaseException:
            print(log_path.read_text(errors="replace"))
            raise
        finally:
            if router.poll() is None:
                router.kill()
                router.wait(timeout=5)
            if fake_pid is not None and not pid_gone(fake_pid):
                os.kill(fake_pid, signal.SIGKILL)


async def _load_through(url: str, router: subprocess.Popen[bytes]) -> int:
    """Wait for the router subprocess to listen, load the fake through it, return the fake's pid."""
    deadline = time.monotonic() + 10
    async with aiohttp.ClientSession(base_url=url) as session:
        while True:
            assert router.poll() is None, "the router exited at start-up"
            assert time.monotonic() < deadline, "the router did not start listening"
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get("/health") as response:
                    if response.status == 200:
                        break
            await asyncio.sleep(0.05)
        async with session.post(CHAT, json=chat_body("m")) as response:
            assert response.status == 200, await response.text()
        async with session.get("/running") as response:
            running = (await response.json())["running"]
    assert [row["model"] for row in running] == ["m"]
    return int(running[0]["pid"])
