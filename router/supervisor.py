"""One upstream `llama-server` process: spawn, readiness, stop, logs and exit reasons.

Every upstream gets a free loopback port, its own process group (so a stop reaches any children too)
and a lifeline (lifeline.py), so it dies with the router even when the router is SIGKILLed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections import deque
from collections.abc import Callable

import aiohttp
import psutil

from .config import ResolvedProfile
from .lifeline import lifeline

log = logging.getLogger("llama_router.upstream")

# What llama-server prints once it answers: readiness is checked at once instead of at the next poll.
READY_MARKS = ("model loaded", "server is listening", "listening on http")
# Seconds after SIGTERM before the second signal that ends a llama-server still finishing requests.
SECOND_SIGNAL_AFTER = 1.0
# Tag put in every upstream's environment so a later router can recognise processes it started.
OWNER_ENV = "LLAMA_ROUTER_OWNER"


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port on `host`, chosen by the kernel."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class LoadError(Exception):
    """The upstream did not become ready; the message carries the reason and its log tail."""


class Upstream:
    """A supervised llama-server for one profile; one instance per spawn."""

    def __init__(
        self,
        profile: ResolvedProfile,
        *,
        log_lines: int,
        health_interval: float,
        host: str = "127.0.0.1",
        owner_tag: str = "",
        on_output: Callable[[str, str], None] | None = None,
        extra_args: list[str] | None = None,
    ) -> None:
        self.profile = profile
        self.extra_args = extra_args or []
        self.host = host
        self.port = 0
        self.log: deque[str] = deque(maxlen=log_lines)
        self.health_interval = health_interval
        self.owner_tag = owner_tag
        self.on_output = on_output
        self.process: asyncio.subprocess.Process | None = None
        self.spawned_at = 0.0
        self.ready_at = 0.0
        self.stopping = False
        self.gone = asyncio.Event()  # set once the router has processed this process's exit
        self._says_ready = asyncio.Event()  # its output announced the model is loaded
        self._reader: asyncio.Task[None] | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def returncode(self) -> int | None:
        return self.process.returncode if self.process else None

    def is_alive(self) -> bool:
        """Whether the process runs (an exited one not yet reaped counts as dead)."""
        if self.process is None or self.process.returncode is not None:
            return False
        try:
            return psutil.Process(self.process.pid).status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def tail(self, lines: int = 20) -> str:
        """The last lines of the upstream's output, for error messages."""
        return "\n".join(list(self.log)[-lines:])

    async def spawn(self) -> None:
        """Start the process on a free port; output goes to the bounded log buffer."""
        self.port = free_port(self.host)
        env = {**os.environ, **self.profile.env}
        if self.owner_tag:
            env[OWNER_ENV] = self.owner_tag
        command = [*self.profile.command(self.host, self.port), *self.extra_args]
        self.spawned_at = time.monotonic()
        self.process = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=lifeline().arm(),
        )
        log.info("spawned %s pid=%s port=%s", self.profile.name, self.process.pid, self.port)
        self._reader = asyncio.create_task(self._read_output(self.process))

    async def _read_output(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        while True:
            try:
                raw = await process.stdout.readline()
            except (ValueError, asyncio.LimitOverrunError):
                # A line longer than the stream limit: keep what fits and go on.
                raw = await process.stdout.read(64 * 1024)
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            self.log.append(line)
            if not self._says_ready.is_set() and any(mark in line for mark in READY_MARKS):
                self._says_ready.set()
            if self.on_output is not None:
                self.on_output(self.profile.name, line)

    async def wait_ready(self, session: aiohttp.ClientSession) -> None:
        """Poll `/health` until it answers 200; raise LoadError at once if the process exits."""
        assert self.process is not None
        exited = asyncio.ensure_future(self.process.wait())
        try:
            url = f"{self.base_url}/health"
            timeout = aiohttp.ClientTimeout(total=1.0)
            while not exited.done():
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                    async with session.get(url, timeout=timeout) as response:
                        if response.status == 200:
                            self.ready_at = time.monotonic()
                            return
                # Poll again after the interval, or at once when the output says it has loaded.
                says_ready = asyncio.ensure_future(self._says_ready.wait())
                await asyncio.wait(
                    {exited, says_ready}, timeout=self.health_interval, return_when="FIRST_COMPLETED"
                )
                says_ready.cancel()
            await self._drain_reader()
            raise LoadError(self.exit_reason("during load"))
        finally:
            if not exited.done():
                exited.cancel()

    async def _drain_reader(self) -> None:
        """Let the output reader catch the last lines a dying process wrote."""
        if self._reader is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._reader), timeout=0.5)

    def exit_reason(self, when: str) -> str:
        code = self.returncode
        if code is None:
            what = "is not running"
        elif code < 0:
            what = f"was killed by signal {signal.Signals(-code).name}"
        else:
            what = f"exited with code {code}"
        tail = self.tail()
        message = f"llama-server for {self.profile.name!r} {what} {when}"
        return f"{message}; last output:\n{tail}" if tail else message

    async def wait_exit(self) -> int:
        """Wait for the process to end (for any reason) and its output to be read."""
        assert self.process is not None
        code = await self.process.wait()
        lifeline().released(self.process.pid)
        await self._drain_reader()
        return code

    async def stop(self, timeout: float) -> None:
        """SIGTERM the process group, then SIGKILL it after `timeout` seconds."""
        process = self.process
        if process is None or process.returncode is not None:
            return
        self.stopping = True
        self._signal_group(signal.SIGTERM)
        # llama-server waits for running requests after a first SIGTERM; a second signal makes it exit
        # at once. Give it a moment to exit cleanly first.
        patience = min(SECOND_SIGNAL_AFTER, timeout / 2)
        if not await self._exits_within(process, patience):
            self._signal_group(signal.SIGINT)
            if not await self._exits_within(process, timeout - patience):
                log.warning("%s ignored SIGTERM for %.1fs; sending SIGKILL", self.profile.name, timeout)
                self._signal_group(signal.SIGKILL)
                await process.wait()
        # The group leader is gone; make sure nothing it forked lingers in its group.
        self._signal_group(signal.SIGKILL)

    @staticmethod
    async def _exits_within(process: asyncio.subprocess.Process, seconds: float) -> bool:
        try:
            await asyncio.wait_for(process.wait(), max(seconds, 0))
        except TimeoutError:
            return False
        return True

    def kill_now(self) -> None:
        """Last resort at exit: SIGKILL without waiting."""
        if self.process is not None and self.process.returncode is None:
            self._signal_group(signal.SIGKILL)

    def _signal_group(self, sig: signal.Signals) -> None:
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)
