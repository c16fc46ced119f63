"""An upstream is the process the router started: a Unix socket in a private directory where the
binary can listen on one, else a loopback port trusted only once the child is seen listening on it.
A process that takes the port first receives nothing: no prompt, not even a health probe."""

from __future__ import annotations

import socket
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
from aiohttp import web

from llama_router.upstream import supervisor
from tests.conftest import RouterFactory, fake_profile


def _tcp_listeners(pid: int) -> list[Any]:
    return [c for c in psutil.Process(pid).net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]


async def test_the_real_llama_server_listens_on_a_private_unix_socket(
    start_router: RouterFactory, tiny_models: tuple[Path, Path], llama_server: Path
) -> None:
    router = await start_router({"a": {"model": str(tiny_models[0]), "binary": str(llama_server)}})
    status, body = await router.chat("a", max_tokens=4)
    assert status == 200, body
    upstream = router.controller.upstreams["a"]
    assert upstream.socket_path is not None and upstream.port == 0
    path = Path(upstream.socket_path)
    assert stat.S_ISSOCK(path.stat().st_mode)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert upstream.pid is not None and _tcp_listeners(upstream.pid) == []  # nothing on any port
    async with router.session.get("/running") as response:
        row = (await response.json())["running"][0]
    assert row["socket"] == str(path) and row["port"] is None
    await router.close()
    assert not path.parent.exists()


async def test_a_fake_that_can_listen_on_a_unix_socket_is_served_there(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router({"m": fake_profile(dummy_model, "--accepts-unix-socket")})
    status, body = await router.chat("m")
    assert status == 200, body
    assert router.controller.upstreams["m"].socket_path is not None


class Impostor:
    """A server that took a loopback port first: it answers everything and keeps what it was sent."""

    def __init__(self) -> None:
        self.received: list[str] = []
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append(f"{request.method} {request.path} {await request.text()}")
        if request.path == "/health":
            return web.json_response({"status": "ok"})
        return web.json_response({"choices": [{"message": {"role": "assistant", "content": "impostor"}}]})

    async def __aenter__(self) -> Impostor:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        with socket.socket() as probe:  # a port the kernel calls free, as the router's own choice does
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


@pytest.fixture
async def impostor(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Impostor]:
    """An impostor on the port the router picks for its next upstream (the race, made certain)."""
    async with Impostor() as thief:
        picks = iter([thief.port])
        real = supervisor.free_port
        monkeypatch.setattr(supervisor, "free_port", lambda host="127.0.0.1": next(picks, None) or real(host))
        yield thief


async def test_a_process_that_took_the_port_first_receives_nothing(
    start_router: RouterFactory, dummy_model: Path, impostor: Impostor
) -> None:
    router = await start_router({"m": fake_profile(dummy_model)}, restart_backoff=0)
    status, body = await router.chat("m", messages=[{"role": "user", "content": "my secret prompt"}])
    assert status == 200, body
    assert body["choices"][0]["message"]["content"].startswith("Hello from")
    upstream = router.controller.upstreams["m"]
    assert upstream.socket_path is None and upstream.port != impostor.port
    assert upstream.pid is not None and supervisor.owns_listener(upstream.pid, upstream.port)
    assert impostor.received == []
    log = "\n".join(router.controller.logs["m"])
    assert f"couldn't bind HTTP server socket, hostname: 127.0.0.1, port: {impostor.port}" in log


LISTENING_CHILD = (
    "import socket, sys, time\n"
    "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
    "print(s.getsockname()[1], flush=True); time.sleep(30)\n"
)


@pytest.mark.parametrize("answered_by", ["the kernel's listening sockets", "psutil"])
def test_a_port_is_owned_by_the_process_listening_on_it_or_its_children(
    answered_by: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if answered_by == "psutil":  # what answers where there is no sock_diag (macOS, BSD)
        monkeypatch.setattr(supervisor, "_listening_inodes", lambda port: None)
    child = subprocess.Popen([sys.executable, "-c", LISTENING_CHILD], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        child_port = int(child.stdout.readline())
        assert supervisor.owns_listener(psutil.Process().pid, child_port), "a descendant's listener"
        assert supervisor.owns_listener(child.pid, child_port)
    finally:
        child.kill()
        child.wait()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        me = psutil.Process().pid
        assert supervisor.owns_listener(me, port)
        other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        try:
            assert not supervisor.owns_listener(other.pid, port)
        finally:
            other.kill()
            other.wait()
    assert not supervisor.owns_listener(me, port)  # closed: nobody listens


async def test_a_binary_without_unix_sockets_gets_a_port(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router({"m": fake_profile(dummy_model)})
    assert (await router.chat("m"))[0] == 200
    upstream = router.controller.upstreams["m"]
    assert upstream.socket_path is None and upstream.port > 0
    async with aiohttp.ClientSession() as session, session.get(f"{upstream.base_url}/health") as response:
        assert response.status == 200
