"""Shared fixtures: tiny real models, the real llama-server, the fake upstream, an in-process router.

The in-process router is the one `llama-router serve` runs (`RouterServer`): the same application,
runner, listening socket and shutdown, without the process's signals."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
import yaml

from llama_router.app import ENDS, RouterServer
from llama_router.config.schema import RouterConfig, _find_binary, load_config
from llama_router.upstream.controller import Controller
from tests.make_tiny_models import make_model
from tests.router_process import RouterProcess

ROOT = Path(__file__).resolve().parent.parent
FAKE_UPSTREAM = ROOT / "tests" / "fake_upstream.py"


def upstream_processes() -> list[psutil.Process]:
    """Live llama-server or fake upstream processes that this test process started."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
            cmdline = " ".join(child.cmdline())
        except psutil.NoSuchProcess:
            continue
        if "llama-server" in cmdline or "fake_upstream" in cmdline:
            found.append(child)
    return found


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache that this test owns, in offline mode."""
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two different tiny random-weight llama models that the real llama-server loads."""
    folder = tmp_path_factory.mktemp("models")
    return make_model(folder / "tiny-a.gguf", seed=1), make_model(folder / "tiny-b.gguf", seed=2)


@pytest.fixture(scope="session")
def llama_server() -> Path:
    """The real llama-server binary, found as the router finds it."""
    binary = _find_binary(None, ROOT)
    if binary is None:
        pytest.fail(
            "no llama-server found: run `python scripts/install/install_llama_server.py` (see README)"
        )
    return binary


@pytest.fixture
def dummy_model(tmp_path: Path) -> Path:
    """A file for fake-upstream profiles to name as their model (the fake only reads its name)."""
    path = tmp_path / "fake-model.gguf"
    path.write_bytes(b"GGUF")
    return path


def fake_profile(model: Path, *flags: str, **extra: Any) -> dict[str, Any]:
    """A profile that runs the fake upstream with the given fault flags."""
    return {"model": str(model), "binary": sys.executable, "args": [str(FAKE_UPSTREAM), *flags], **extra}


# The error types OpenAI's API answers with, by status (any other 4xx: invalid_request_error).
OPENAI_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


def assert_openai_error(body: Any, code: str | None = None, *, status: int | None = None) -> dict[str, Any]:
    """`body` (parsed, or the JSON text) is `{"error": {"message", "type", "code"}}`, the one shape of
    every refusal: a message, the type its `status` gives (when given), and `code` (when given).
    Returns the inner error, for assertions on its message."""
    if isinstance(body, (str, bytes)):
        body = json.loads(body)
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error, dict) and {"message", "type", "code"} <= set(error), error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    if status is not None:
        kind = OPENAI_ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        assert error["type"] == kind, (status, error)
    if code is not None:
        assert error["code"] == code, error
    return dict(error)


class RunningRouter:
    """A router listening on a free loopback port inside the test's event loop."""

    def __init__(self, server: RouterServer, config: RouterConfig) -> None:
        self.server = server
        self.runner = server.runner
        self.port = server.port
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = config
        self.session = aiohttp.ClientSession(base_url=self.url)
        self._serving = asyncio.ensure_future(server.serve())

    @property
    def controller(self) -> Controller:
        return self.server.controller

    def recorded(self) -> None:
        """Do now the bookkeeping of the requests that have ended (metrics, activity row, access
        line), which the router does within `request_ends.END_BATCH` seconds."""
        self.server.app[ENDS].flush()

    async def chat(self, model: str, **body: Any) -> tuple[int, Any]:
        payload = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, **body}
        async with self.session.post("/v1/chat/completions", json=payload) as response:
            return response.status, await response.json()

    async def close(self) -> None:
        """Shut down as `serve` does on SIGTERM: drain what is in flight, then stop every upstream."""
        if self._serving.done():
            return
        await self.session.close()
        self.server.stop()
        await self._serving
        await self.server.shutdown()


RouterFactory = Callable[..., Awaitable[RunningRouter]]


@pytest.fixture
async def router_processes() -> AsyncIterator[list[RouterProcess]]:
    """`llama-router serve` processes a test starts (append them); closed at the end if still running."""
    started: list[RouterProcess] = []
    yield started
    for router in started:
        await router.close()


@pytest.fixture
async def start_router(tmp_path: Path) -> AsyncIterator[RouterFactory]:
    """Start routers from config dicts; on teardown stop them and check no upstream is left."""
    routers: list[RunningRouter] = []

    async def start(profiles: dict[str, Any], **server: Any) -> RunningRouter:
        config_path = tmp_path / f"profiles-{len(routers)}.yaml"
        server.setdefault("state_dir", str(tmp_path / "state"))
        server.setdefault("host", "127.0.0.1")
        server.setdefault("port", 0)
        config_path.write_text(yaml.safe_dump({"server": server, "profiles": profiles}))
        config = load_config(config_path)
        running = RouterServer(config)
        await running.start()
        router = RunningRouter(running, config)
        routers.append(router)
        return router

    before = os.getpid()
    yield start
    for router in routers:
        await router.close()
    assert os.getpid() == before
    leftovers = upstream_processes()
    for process in leftovers:
        process.kill()
    assert not leftovers, f"upstream processes left running: {[p.cmdline() for p in leftovers]}"


async def wait_until(condition: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll `condition` (a function, or a coroutine function) until true; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)
