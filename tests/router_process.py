"""`python -m llama_router serve` as a real process, for what only a process shows: signals, sd_notify,
stale-upstream cleanup, SIGKILL. Logs are JSON lines, collected as they arrive, so tests wait for
events instead of sleeping."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(path: Path, profiles: dict[str, Any], **server: Any) -> Path:
    """A profiles file with test-friendly defaults (its own state dir, loopback)."""
    server.setdefault("state_dir", str(path.parent / "state"))
    server.setdefault("host", "127.0.0.1")
    path.write_text(yaml.safe_dump({"server": server, "profiles": profiles}))
    return path


def pid_gone(pid: int) -> bool:
    """True once `pid` has exited (a zombie waiting to be reaped counts as exited)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class RouterProcess:
    """A router subprocess listening on its own loopback port."""

    def __init__(
        self, config: Path, *, env: dict[str, str] | None = None, args: tuple[str, ...] = ()
    ) -> None:
        self.config = config
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        self.args = args
        self.process: asyncio.subprocess.Process | None = None
        self.lines: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._new_line = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    async def start(self, *, wait_listening: bool = True) -> RouterProcess:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "llama_router",
            "--log-format",
            "json",
            "--log-level",
            "DEBUG",
            "serve",
            "-c",
            str(self.config),
            "--port",
            str(self.port),
            *self.args,
            env=self.env,
            cwd=str(ROOT),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        self._reader = asyncio.create_task(self._read())
        if wait_listening:
            await self.wait_log(lambda e: e.get("event") == "listening", timeout=30, what="listening")
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def _read(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        while line := await self.process.stderr.readline():
            text = line.decode("utf-8", "replace").rstrip("\n")
            self.raw.append(text)
            try:
                entry = json.loads(text)
            except ValueError:
                entry = {"message": text, "not_json": True}
            self.lines.append(entry if isinstance(entry, dict) else {"message": text, "not_json": True})
            self._new_line.set()

    async def wait_log(
        self, match: Callable[[dict[str, Any]], bool], *, timeout: float = 20.0, what: str = "a log line"
    ) -> dict[str, Any]:
        """The first log entry `match` accepts, waiting for it to be written."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for entry in self.lines[seen:]:
                if match(entry):
                    return entry
            seen = len(self.lines)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                tail = "\n".join(self.raw[-30:])
                raise AssertionError(f"router never logged {what} within {timeout}s; last lines:\n{tail}")
            if self.process is not None and self.process.returncode is not None and self._reader.done():  # type: ignore[union-attr]
                tail = "\n".join(self.raw[-30:])
                raise AssertionError(f"router exited ({self.process.returncode}) before {what}:\n{tail}")
            self._new_line.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._new_line.wait(), min(remaining, 0.5))

    def messages(self) -> list[str]:
        return [str(entry.get("message", "")) for entry in self.lines]

    def signal(self, sig: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    async def wait_exit(self, timeout: float = 30.0) -> int:
        assert self.process is not None
        code = await asyncio.wait_for(self.process.wait(), timeout)
        if self._reader is not None:
            await asyncio.wait_for(self._reader, timeout)
        return code

    async def running(self) -> list[dict[str, Any]]:
        async with aiohttp.ClientSession() as session, session.get(f"{self.url}/running") as response:
            body = await response.json()
        return list(body["running"])

    async def close(self) -> None:
        """Make sure the process is gone (SIGKILL if it still runs)."""
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        if self._reader is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._reader, 5)


async def accepts_connections(port: int) -> bool:
    """Whether something listens on this loopback port."""
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    return True
