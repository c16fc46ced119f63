"""One upstream `llama-server` process: spawn, readiness, stop, logs and exit reasons.

Every upstream gets its own process group (so a stop reaches any children too) and a lifeline
(lifeline.py), so it dies with the router even when the router is SIGKILLed.

An upstream is the process the router started, never whatever answers at its address. Where the
binary can listen on a Unix socket (`--host <path>.sock`, which its `--help` says), it listens in the
router's private directory (mode 0700), where no other user's process can take its place. Otherwise
it gets a free loopback port, and since another process may bind that port between the router
choosing it and llama-server binding it, the port is only trusted (even for `/health`) once its
listening socket belongs to the child or one of its descendants.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import aiohttp
import psutil

from llama_router.config.schema import ResolvedProfile
from llama_router.core.redact import scrub, secret_values
from llama_router.upstream import child_protocol
from llama_router.upstream.child_protocol import LoadProgress, NotUnderstood
from llama_router.upstream.lifeline import lifeline

log = logging.getLogger("llama_router.upstream")

# What llama-server prints once it answers: readiness is checked at once instead of at the next poll.
READY_MARKS = ("model loaded", "server is listening", "listening on http")
# Seconds after SIGTERM before the second signal that ends a llama-server still finishing requests.
SECOND_SIGNAL_AFTER = 1.0
# Tag put in every upstream's environment so a later router can recognise processes it started.
OWNER_ENV = "LLAMA_ROUTER_OWNER"


# The longest Unix socket path the kernel takes (sun_path is 108 bytes on Linux, 104 on macOS).
MAX_SOCKET_PATH = 103
# Seconds `<binary> --help` may take when asked what the binary can do.
HELP_TIMEOUT = 10.0
_socket_numbers = itertools.count(1)
_help_outputs: dict[tuple[str, ...], bytes] = {}


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port on `host`, chosen by the kernel."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


async def _help_output(profile: ResolvedProfile) -> bytes:
    """The profile's `<binary> [args] --help`, run once per binary (and its version on disk) and args:
    what it says tells which features it has. Empty where it cannot be run."""
    try:
        mtime = str(profile.binary.stat().st_mtime_ns)
    except OSError:
        return b""
    key = (str(profile.binary), mtime, *profile.args)
    known = _help_outputs.get(key)
    if known is not None:
        return known
    output = b""
    try:
        process = await asyncio.create_subprocess_exec(
            str(profile.binary),
            *profile.args,
            "--help",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, **profile.env},
            start_new_session=True,
        )
        try:
            output, _ = await asyncio.wait_for(process.communicate(), HELP_TIMEOUT)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    except (OSError, TimeoutError):
        pass
    _help_outputs[key] = output
    return output


async def listens_on_unix_sockets(profile: ResolvedProfile) -> bool:
    """Whether the profile's llama-server takes a Unix socket path as `--host` (builds since late
    2025 do, and say so in `--help`)."""
    found = b".sock" in await _help_output(profile)
    log.debug("%s %s Unix sockets", profile.binary, "listens on" if found else "cannot listen on")
    return found


async def reports_its_load(profile: ResolvedProfile) -> bool:
    """Whether the profile's llama-server reports its load's progress when started as a router
    child (child_protocol.py)."""
    return child_protocol.has_child_protocol(await _help_output(profile))


def owns_listener(pid: int, port: int) -> bool:
    """Whether the TCP socket listening on `port` belongs to process `pid` or one of its descendants
    (a wrapper script's llama-server), rather than to another process that took the port.

    Asked every readiness poll until it holds, so it is cheap where it can be: on Linux the kernel
    lists just the listening sockets (sock_diag over netlink, as `ss -l` asks), whose inodes are looked
    for among the child's own descriptors first, its descendants only if need be: about a hundred µs,
    where reading /proc/net/tcp or psutil's connection table walks every socket of the machine (tens
    of ms on a busy one). Elsewhere psutil answers."""
    inodes = _listening_inodes(port)
    if inodes is None:
        return _owns_listener_by_psutil(pid, port)
    if not inodes:
        return False
    if _holds_socket(pid, inodes):
        return True
    try:
        descendants = [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return False
    return any(_holds_socket(child, inodes) for child in descendants)


_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST_DUMP = 0x1 | 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_TCP_LISTEN = 10
_NLMSG_HEADER = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
_DIAG_REQUEST = struct.Struct("=BBBBI48x")  # family, protocol, extensions, pad, states; a zero sockid
_DIAG_MESSAGE = struct.Struct("=BBBB2s46x5I")  # family, state, timer, retrans, sport; ...; inode last


def _listening_inodes(port: int) -> set[str] | None:
    """The inodes of the TCP sockets listening on `port` (IPv4 and IPv6), from the kernel's own list
    of listening sockets; None where there is no sock_diag (not Linux)."""
    if not hasattr(socket, "AF_NETLINK"):
        return None
    inodes: set[str] = set()
    wanted = struct.pack("!H", port)
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG) as link:
            for family in (socket.AF_INET, socket.AF_INET6):
                request = _DIAG_REQUEST.pack(family, socket.IPPROTO_TCP, 0, 0, 1 << _TCP_LISTEN)
                header = _NLMSG_HEADER.pack(
                    _NLMSG_HEADER.size + len(request), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST_DUMP, 1, 0
                )
                link.sendall(header + request)
                done = False
                while not done:
                    data = link.recv(65536)
                    offset = 0
                    while offset + _NLMSG_HEADER.size <= len(data):
                        length, kind, *_ = _NLMSG_HEADER.unpack_from(data, offset)
                        if kind == _NLMSG_DONE:
                            done = True
                            break
                        if kind == _NLMSG_ERROR or length < _NLMSG_HEADER.size:
                            return None
                        body = offset + _NLMSG_HEADER.size
                        if len(data) >= body + _DIAG_MESSAGE.size:
                            _, state, _, _, sport, *rest = _DIAG_MESSAGE.unpack_from(data, body)
                            if state == _TCP_LISTEN and sport == wanted:
                                inodes.add(str(rest[-1]))
                        offset += (length + 3) & ~3
    except OSError:
        return None
    return inodes


def _holds_socket(pid: int, inodes: set[str]) -> bool:
    """Whether process `pid` has one of these sockets among its file descriptors."""
    wanted = {f"socket:[{inode}]" for inode in inodes}
    directory = f"/proc/{pid}/fd"
    try:
        names = os.listdir(directory)
    except OSError:
        return False
    for name in names:
        try:
            if os.readlink(f"{directory}/{name}") in wanted:
                return True
        except OSError:
            continue
    return False


def _owns_listener_by_psutil(pid: int, port: int) -> bool:
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return False
    for process in processes:
        try:
            connections = process.net_connections(kind="tcp")
        except psutil.Error:
            continue
        for connection in connections:
            if connection.status == psutil.CONN_LISTEN and connection.laddr and connection.laddr.port == port:
                return True
    return False


class LoadError(Exception):
    """The upstream did not become ready; the message carries the reason and its log tail."""


class StoppedBeforeSpawn(Exception):
    """A stop was decided before the process was started: it is not started at all."""


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
        on_progress: Callable[[str, LoadProgress], None] | None = None,
        extra_args: list[str] | None = None,
        socket_dir: Path | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.profile = profile
        self.served_name = profile.served_name  # read by every request's lease: worked out once
        self.extra_args = extra_args or []
        self.extra_env = extra_env or {}  # what the router adds: the GPUs a placed model may see, their order
        self.host = host
        self.port = 0
        self.socket_dir = socket_dir  # a private directory for its Unix socket; None: TCP only
        self.socket_path: str | None = None  # where it listens, when on a Unix socket
        self._own_session: aiohttp.ClientSession | None = None
        self.log: deque[str] = deque(maxlen=log_lines)
        self.health_interval = health_interval
        self.owner_tag = owner_tag
        self.on_output = on_output
        self.on_progress = on_progress
        # Started as a router child (child_protocol.py): its load's progress is read from its output.
        self.reports_load = False
        self.progress: LoadProgress | None = None  # the last progress it reported, while it loads
        # Secret values of its command line and environment, cut from its output before it is kept.
        self._secrets = secret_values([*profile.args, *self.extra_args], profile.env)
        self.process: asyncio.subprocess.Process | None = None
        self.spawned_at = 0.0
        self.ready_at = 0.0
        self.stopping = False  # a stop was decided: set before the process exists, the spawn honours it
        self.gone = asyncio.Event()  # set once the router has processed this process's exit
        self._says_ready = asyncio.Event()  # its output announced the model is loaded
        self._reader: asyncio.Task[None] | None = None

    @property
    def base_url(self) -> str:
        """The URL prefix of its endpoints (for a Unix socket, reached through `client`'s connector)."""
        return "http://localhost" if self.socket_path else f"http://{self.host}:{self.port}"

    @property
    def address(self) -> tuple[str, int] | str:
        """Where it listens: a (host, port), or a Unix socket path."""
        return self.socket_path or (self.host, self.port)

    @property
    def authority(self) -> str:
        """The `Host` of requests sent to it."""
        return "localhost" if self.socket_path else f"{self.host}:{self.port}"

    def client(self, shared: aiohttp.ClientSession) -> aiohttp.ClientSession:
        """The HTTP session that reaches it: `shared` over TCP, its own on a Unix socket."""
        return self._own_session or shared

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
        """The last lines of the upstream's output, for error messages (its state reports left out:
        they say nothing of why it failed)."""
        said = [line for line in self.log if not line.startswith(child_protocol.STATE_PREFIX)]
        return "\n".join(said[-lines:])

    async def _listen_address(self) -> tuple[str, int]:
        """The `--host` and `--port` to give it: a socket in the private directory where the binary
        can listen on one (its path short enough), else a free loopback port."""
        if self.socket_dir is not None and await listens_on_unix_sockets(self.profile):
            path = str(self.socket_dir / f"{next(_socket_numbers)}.sock")
            if len(path.encode()) <= MAX_SOCKET_PATH:
                self.socket_path = path
                self._own_session = aiohttp.ClientSession(
                    connector=aiohttp.UnixConnector(path=path, force_close=True), trust_env=False
                )
                return path, 0
        self.port = free_port(self.host)
        return self.host, self.port

    def mark_stopping(self) -> None:
        """A stop is decided. Where the process does not exist yet, `spawn` carries the stop out:
        it starts none, or ends the one that the operating system was creating meanwhile."""
        self.stopping = True

    async def spawn(self) -> None:
        """Start the process on its own address; output goes to the bounded log buffer. Raises
        StoppedBeforeSpawn if a stop was decided before the process could be started."""
        if self.stopping:
            raise StoppedBeforeSpawn(self.profile.name)
        host, port = await self._listen_address()
        if self.stopping:
            if self._own_session is not None:
                await self._own_session.close()
            raise StoppedBeforeSpawn(self.profile.name)
        env = {**os.environ, **self.profile.env, **self.extra_env}
        if self.owner_tag:
            env[OWNER_ENV] = self.owner_tag
        self.reports_load = await reports_its_load(self.profile)
        if self.reports_load:
            # Only its presence matters to the child; it never connects back to this port.
            env[child_protocol.ROUTER_PORT_ENV] = "0"
        command = [*self.profile.command(host, port), *self.extra_args]
        self.spawned_at = time.monotonic()
        try:
            self.process = await asyncio.create_subprocess_exec(
                *command,
                # A router child exits when its stdin closes: it stays open for the child's life.
                stdin=asyncio.subprocess.PIPE if self.reports_load else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=lifeline().arm(),
            )
        except BaseException:
            if self._own_session is not None:
                await self._own_session.close()
            raise
        where = f"socket={self.socket_path}" if self.socket_path else f"port={self.port}"
        log.info("spawned %s pid=%s %s", self.profile.name, self.process.pid, where)
        self._reader = asyncio.create_task(self._read_output(self.process))
        if self.stopping:
            # Stopped while the process was being created: nothing is loaded yet, nothing to lose.
            log.info("%s was stopped while it was being spawned", self.profile.name)
            self._signal_group(signal.SIGKILL)

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
            line = scrub(raw.decode("utf-8", "replace").rstrip("\r\n"), self._secrets)
            self.log.append(line)  # state reports too: the log keeps everything the child wrote
            if self.reports_load:
                self._read_state(line)
            if not self._says_ready.is_set() and any(mark in line for mark in READY_MARKS):
                self._says_ready.set()
            if self.on_output is not None:
                self.on_output(self.profile.name, line)

    def _read_state(self, line: str) -> None:
        """Note the progress a state report gives; one not understood ends the reading of reports
        (the load goes on, watched as for a binary without them)."""
        try:
            state = child_protocol.parse_state(line)
            if state is None:
                return
            if state.state == "ready":
                self.progress = None
                self._says_ready.set()
                return
            progress = child_protocol.load_progress(state.payload) if state.state == "loading" else None
        except NotUnderstood as exc:
            log.warning(
                "%s: state report not understood (%s); its load's progress is not followed",
                self.profile.name,
                exc,
            )
            self.reports_load = False
            self.progress = None
            return
        if progress is not None:
            self.progress = progress
            if self.on_progress is not None:
                self.on_progress(self.profile.name, progress)

    async def wait_ready(self, session: aiohttp.ClientSession) -> None:
        """Poll `/health` until it answers 200; raise LoadError at once if the process exits.

        On a TCP port, nothing is sent there until the child is seen listening on it: another
        process that took the port first gets no request (the child fails to bind and exits)."""
        assert self.process is not None
        exited = asyncio.ensure_future(self.process.wait())
        session = self.client(session)
        owned = self.socket_path is not None
        try:
            url = f"{self.base_url}/health"
            timeout = aiohttp.ClientTimeout(total=1.0)
            while not exited.done():
                if not owned:
                    owned = await asyncio.to_thread(owns_listener, self.process.pid, self.port)
                if owned:
                    with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                        async with session.get(url, timeout=timeout) as response:
                            if response.status == 200:
                                self.ready_at = time.monotonic()
                                self.progress = None
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
        """Wait for the process to end (for any reason) and its output to be read; then let go of
        its socket."""
        assert self.process is not None
        code = await self.process.wait()
        lifeline().released(self.process.pid)
        self._close_stdin()
        self.progress = None
        await self._drain_reader()
        if self._own_session is not None:
            await self._own_session.close()
        if self.socket_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.socket_path)
        return code

    async def stop(self, timeout: float) -> None:
        """SIGTERM the process group, then SIGKILL it after `timeout` seconds. Before the process
        exists, the stop is left to `spawn` (see `mark_stopping`)."""
        self.mark_stopping()
        process = self.process
        if process is None or process.returncode is not None:
            return
        self._ask_child_to_exit()
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
        self._close_stdin()

    def _ask_child_to_exit(self) -> None:
        """Send a router child the exit command (child_protocol.py) its SIGTERM needs to end with
        code 0; a child still loading reads it only if it gets that far."""
        stdin = self.process.stdin if self.process is not None else None
        if stdin is not None and not stdin.is_closing():
            with contextlib.suppress(OSError, RuntimeError):
                stdin.write(child_protocol.EXIT_COMMAND)

    def _close_stdin(self) -> None:
        """Let go of a router child's stdin (once it has exited: closing it earlier makes the child
        exit at once, with code 1, where a stop lets it finish what it is doing)."""
        if self.process is not None and self.process.stdin is not None:
            self.process.stdin.close()

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
