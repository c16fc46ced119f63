"""An upstream must not outlive its router, even a router killed with SIGKILL.

On Linux the kernel does it: every upstream asks, in its child before exec, for SIGKILL when its
parent dies (prctl PR_SET_PDEATHSIG).

macOS and the BSDs have no such signal, so there the router keeps one small watchdog process. The
router holds the only write end of a pipe whose read end the watchdog holds. Each upstream, in its
child before exec, writes `+<its pid>` into that pipe itself, so no upstream runs unregistered
however early the router dies; once the router has reaped an upstream it writes `-<pid>`, so a
later process that is given the same pid is never touched. When the router dies, for any reason,
the kernel closes the write end: the watchdog reads end-of-file, SIGKILLs the process group (its
own session, see supervisor.py) of every upstream still registered, and exits. It runs in a session
of its own, so a terminal's Ctrl-C reaches the router (which stops its upstreams in order) but not
the watchdog.

`PLATFORM` is the platform fact the choice rests on; tests set it to "darwin" to run the watchdog
on Linux.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger("llama_router.upstream")

PLATFORM = sys.platform
_PR_SET_PDEATHSIG = 1


class Lifeline(Protocol):
    """What makes upstreams die with the router."""

    def arm(self) -> Callable[[], None]:
        """The function an upstream's child runs before exec."""
        ...

    def released(self, pid: int) -> None:
        """The router has reaped this upstream: forget its pid."""
        ...


class ParentDeathSignal:
    """Linux: the kernel sends SIGKILL to the child when the router dies."""

    def arm(self) -> Callable[[], None]:
        return _ask_for_sigkill

    def released(self, pid: int) -> None:
        pass


def _ask_for_sigkill() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class Watchdog:
    """Elsewhere: a watchdog process that kills the registered upstreams when the router is gone."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._write_fd = -1

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def _ensure(self) -> int:
        """The write end of a live watchdog's pipe, starting a watchdog if there is none (or it died)."""
        with self._lock:
            if self._process is not None and self._process.poll() is None:
                return self._write_fd
            if self._process is not None:
                os.close(self._write_fd)
                log.warning("the upstream watchdog exited (%s); starting another", self._process.returncode)
            read_fd, write_fd = os.pipe()  # both close on exec: no other child keeps the write end
            try:
                self._process = subprocess.Popen(
                    [sys.executable, "-I", os.path.abspath(__file__), str(read_fd)],
                    pass_fds=(read_fd,),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            finally:
                os.close(read_fd)
            self._write_fd = write_fd
            return write_fd

    def arm(self) -> Callable[[], None]:
        fd = self._ensure()

        def register() -> None:  # in the child, before exec
            with contextlib.suppress(OSError):
                os.write(fd, b"+%d\n" % os.getpid())

        return register

    def released(self, pid: int) -> None:
        with self._lock:
            if self._write_fd >= 0:
                with contextlib.suppress(OSError):
                    os.write(self._write_fd, b"-%d\n" % pid)


_current: Lifeline | None = None


def lifeline() -> Lifeline:
    """This router's lifeline, chosen by the platform once."""
    global _current
    if _current is None:
        _current = ParentDeathSignal() if PLATFORM.startswith("linux") else Watchdog()
    return _current


def watch(read_fd: int) -> None:
    """The watchdog: read registrations until end-of-file, then kill what is still registered."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    registered: set[int] = set()
    pending = b""
    while chunk := os.read(read_fd, 4096):
        lines = (pending + chunk).split(b"\n")
        pending = lines.pop()
        for line in lines:
            if line[:1] == b"+" and line[1:].isdigit():
                registered.add(int(line[1:]))
            elif line[:1] == b"-" and line[1:].isdigit():
                registered.discard(int(line[1:]))
    for pid in registered:
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)


if __name__ == "__main__":
    watch(int(sys.argv[1]))
