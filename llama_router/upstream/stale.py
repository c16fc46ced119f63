"""Find and remove upstreams left behind by a router that is gone.

The kernel kills each upstream when its router dies (parent-death signal), but not what an upstream
forked itself (a wrapper script's child, say), and not a process caught between fork and that signal
being armed. Every process the router starts carries `LLAMA_ROUTER_OWNER=<router pid>` in its
environment, and children inherit it; at start-up a router removes such processes whose owner is no
longer running. A process without the tag, or whose owner still runs, is never touched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass

import psutil

from llama_router.upstream.supervisor import OWNER_ENV

log = logging.getLogger("llama_router.stale")


@dataclass(frozen=True)
class StaleProcess:
    """A tagged process whose owning router is gone."""

    pid: int
    owner: str
    cmdline: str


def _owner_pid(tag: str) -> int | None:
    """The router pid in an owner tag (`<pid>` or `<pid>:<anything>`); None if it is not one."""
    head = tag.split(":", 1)[0].strip()
    return int(head) if head.isdigit() else None


def _owner_running(owner: int, child_created: float) -> bool:
    """Whether `owner` is still the process that started the child (not a later reuse of its pid)."""
    try:
        process = psutil.Process(owner)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        # A pid reused by a process created after the child cannot be the child's parent router.
        return process.create_time() <= child_created + 1.0
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return True  # it exists, and we cannot tell more: leave its children alone


def find_stale() -> list[StaleProcess]:
    """Tagged processes (readable by us) whose owner router no longer runs."""
    me = os.getpid()
    found: list[StaleProcess] = []
    for process in psutil.process_iter(["pid", "create_time"]):
        pid = process.info["pid"]
        if pid == me:
            continue
        try:
            tag = process.environ().get(OWNER_ENV)
            if not tag:
                continue
            owner = _owner_pid(tag)
            if owner is None or owner == me:
                continue
            if process.status() == psutil.STATUS_ZOMBIE:
                continue
            if _owner_running(owner, process.info["create_time"] or process.create_time()):
                continue
            cmdline = " ".join(process.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
        found.append(StaleProcess(pid=pid, owner=tag, cmdline=cmdline))
    return found


def _signal(stale: StaleProcess, sig: signal.Signals) -> None:
    """Signal the process group the router made for it, or the process alone if it leads none."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        group = os.getpgid(stale.pid)
        if group == stale.pid and group != os.getpgrp():
            os.killpg(group, sig)
        else:
            os.kill(stale.pid, sig)


def remove_stale(timeout: float = 5.0) -> list[StaleProcess]:
    """SIGTERM every stale upstream's process group, SIGKILL what is left after `timeout` seconds."""
    stale = find_stale()
    if not stale:
        return []
    processes: list[psutil.Process] = []
    for entry in stale:
        log.warning(
            "removing stale upstream pid=%s left by router pid %s (no longer running): %s",
            entry.pid,
            entry.owner,
            entry.cmdline,
            extra={"fields": {"event": "stale_upstream", "pid": entry.pid, "owner": entry.owner}},
        )
        with contextlib.suppress(psutil.NoSuchProcess):
            processes.append(psutil.Process(entry.pid))
        _signal(entry, signal.SIGTERM)
    alive = _wait_gone(processes, timeout)
    for process in alive:
        log.warning("stale upstream pid=%s ignored SIGTERM; sending SIGKILL", process.pid)
        _signal(next(e for e in stale if e.pid == process.pid), signal.SIGKILL)
    _wait_gone(alive, timeout)
    return stale


def _gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE  # dead; reaping is its parent's business
    except psutil.NoSuchProcess:
        return True


def _wait_gone(processes: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until every process has exited (zombies count as exited); return those still alive."""
    deadline = time.monotonic() + timeout
    alive = [p for p in processes if not _gone(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.02)
        alive = [p for p in alive if not _gone(p)]
    return alive
