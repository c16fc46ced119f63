"""systemd: the unit files verify, and the router speaks the notify protocol (READY=1 once it
listens, RELOADING=1/READY=1 around a reload, WATCHDOG=1, STOPPING=1 on SIGTERM) over a real datagram
socket, abstract or on disk."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import psutil
import pytest

from llama_router.manage.sdnotify import Notifier
from tests.conftest import fake_profile
from tests.router_process import RouterProcess, accepts_connections, write_config

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD = ROOT / "systemd"


def systemd_analyze() -> str:
    """The systemd-analyze binary; where setup.sh could have installed it, its absence is a failure."""
    found = shutil.which("systemd-analyze")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        pytest.fail(
            "systemd-analyze is missing although scripts/install/setup.sh installs it as root: run it"
        )
    pytest.skip(
        "systemd-analyze not installed (scripts/install/setup.sh installs it when run as root with apt-get)"
    )


def runnable(text: str) -> str:
    """A unit's text with its install paths pointed at this checkout, so verify finds the commands."""
    text = re.sub(r"[^\s=]*/\.venv/bin/llama-router", f"{sys.executable} -m llama_router", text)
    text = text.replace("%h/llama-router", str(ROOT))
    return re.sub(r"/(opt|srv)/llama-router", str(ROOT), text)


def verify(unit: Path, *extra: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [systemd_analyze(), *extra, "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=unit.parent,
        env={**os.environ, **(env or {})},
    )
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0, output
    return output


def test_system_unit_and_drop_in_examples_verify(tmp_path: Path) -> None:
    unit = tmp_path / "llama-router.service"
    unit.write_text(runnable((SYSTEMD / "llama-router.service").read_text()))
    drop_ins = tmp_path / "llama-router.service.d"
    drop_ins.mkdir()
    examples = sorted((SYSTEMD / "examples").glob("*.conf"))
    assert examples
    for example in examples:
        (drop_ins / example.name).write_text(runnable(example.read_text()))
    # verify exits 0 on mere warnings (unknown keys, bad values): demand silence.
    assert verify(unit) == ""


def test_user_unit_verifies(tmp_path: Path) -> None:
    unit = tmp_path / "llama-router.service"
    unit.write_text(runnable((SYSTEMD / "user" / "llama-router.service").read_text()))
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    assert verify(unit, "--user", env={"XDG_RUNTIME_DIR": str(runtime)}) == ""


@pytest.mark.parametrize("unit", ["llama-router.service", "user/llama-router.service"])
def test_unit_settings(unit: str) -> None:
    lines = {line.strip() for line in (SYSTEMD / unit).read_text().splitlines()}
    for setting in (
        "Type=notify",
        "NotifyAccess=main",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "KillMode=mixed",
        "Restart=on-failure",
        "OOMPolicy=continue",
    ):
        assert setting in lines, f"{unit}: missing {setting}"
    assert any(line.startswith("WatchdogSec=") for line in lines)
    # Settings that would cut llama-server off its GPU must not be there.
    for forbidden in ("PrivateDevices=yes", "MemoryDenyWriteExecute=yes", "ProcSubset=pid"):
        assert forbidden not in lines


# ------------------------------------------------------------------------------------------ notify


class NotifySocket:
    """A datagram socket standing in for systemd's notify socket."""

    def __init__(self, abstract: bool) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._dir: str | None = None
        if abstract:
            name = f"llama-router-test-{uuid.uuid4().hex}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            # A short path: unix socket paths are limited to 108 bytes, pytest's tmp_path may be longer.
            self._dir = tempfile.mkdtemp(prefix="lr-notify-", dir="/tmp")
            self.address = os.path.join(self._dir, "notify")
            self.sock.bind(self.address)
        self.sock.setblocking(False)
        self.messages: list[str] = []

    async def receive(self, field: str, timeout: float = 30.0) -> str:
        """Wait for a message carrying `field` (e.g. READY=1); return the whole message."""
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout
        for message in self.messages:
            if field in message.split("\n"):
                self.messages.remove(message)
                return message
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {field} within {timeout}s; got {self.messages}")
            try:
                data = await asyncio.wait_for(loop.sock_recv(self.sock, 4096), remaining)
            except TimeoutError:
                continue
            message = data.decode()
            if field in message.split("\n"):
                return message
            self.messages.append(message)

    def close(self) -> None:
        self.sock.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


@pytest.fixture(params=[True, False], ids=["abstract", "path"])
def notify_socket(request: pytest.FixtureRequest) -> Iterator[NotifySocket]:
    sock = NotifySocket(abstract=request.param)
    yield sock
    sock.close()


async def test_ready_after_listening_and_stopping_on_sigterm(
    tmp_path: Path,
    dummy_model: Path,
    notify_socket: NotifySocket,
    router_processes: list[RouterProcess],
) -> None:
    config = write_config(tmp_path / "p.yaml", {"a": fake_profile(dummy_model)}, max_resident=1)
    router = RouterProcess(config, env={"NOTIFY_SOCKET": notify_socket.address})
    router_processes.append(router)
    await router.start(wait_listening=False)
    ready = await notify_socket.receive("READY=1")
    # READY=1 means "clients may connect now".
    assert await accepts_connections(router.port)
    assert "STATUS=serving 1 profile(s)" in ready
    router.signal(signal.SIGTERM)
    await notify_socket.receive("STOPPING=1")
    assert await router.wait_exit() == 0


async def test_reload_and_watchdog_notifications(
    tmp_path: Path, dummy_model: Path, router_processes: list[RouterProcess]
) -> None:
    notify = NotifySocket(abstract=True)
    try:
        config = write_config(
            tmp_path / "p.yaml", {"a": fake_profile(dummy_model)}, max_resident=1, watch_config=False
        )
        env = {"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "200000"}
        router = await RouterProcess(config, env=env).start()
        router_processes.append(router)
        await notify.receive("READY=1")
        for _ in range(3):  # every 0.1 s
            await notify.receive("WATCHDOG=1", timeout=5)
        router.signal(signal.SIGHUP)
        reloading = await notify.receive("RELOADING=1")
        assert re.search(r"^MONOTONIC_USEC=\d+$", reloading, re.MULTILINE)
        await notify.receive("READY=1")
        # The notify variables are not passed on to the upstreams the router starts.
        async with aiohttp.ClientSession() as session:
            body = {"model": "a", "messages": [{"role": "user", "content": "hi"}]}
            async with session.post(f"{router.url}/v1/chat/completions", json=body) as response:
                assert response.status == 200
        (upstream,) = await router.running()
        environ = psutil.Process(upstream["pid"]).environ()
        assert "NOTIFY_SOCKET" not in environ and "WATCHDOG_USEC" not in environ
        router.signal(signal.SIGTERM)
        await notify.receive("STOPPING=1")
        assert await router.wait_exit() == 0
    finally:
        notify.close()


def test_notifier_outside_systemd_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier.from_environment()
    assert not notifier.enabled
    assert notifier.ready() is False and notifier.watchdog() is False
    assert notifier.watchdog_interval is None


def test_notifier_reads_and_hides_its_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    sock = NotifySocket(abstract=True)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", sock.address)
        monkeypatch.setenv("WATCHDOG_USEC", "3000000")
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
        notifier = Notifier.from_environment()
        assert notifier.watchdog_interval == 1.5
        assert "NOTIFY_SOCKET" not in os.environ and "WATCHDOG_USEC" not in os.environ
        assert notifier.status("hello") is True
        assert sock.sock.recv(100) == b"STATUS=hello"
        monkeypatch.setenv("WATCHDOG_USEC", "3000000")
        monkeypatch.setenv("WATCHDOG_PID", "1")  # meant for another process
        assert Notifier.from_environment().watchdog_interval is None
    finally:
        sock.close()
