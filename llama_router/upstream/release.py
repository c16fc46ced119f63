"""Memory really free before the next load: the driver, not the process's exit, says so.

A process's GPU memory can outlive it by a while: the driver tears its context down after the exit
(Ollama waits for the free figure to recover for this reason). A model started on that GPU in the
meantime sees less free memory than the router planned for, so `--fit` shrinks it or its allocation
fails. So before a model starts on a GPU, the processes that held memory there and have exited are
asked after, through the driver's per-process figures (NVML on NVIDIA, fdinfo on AMD), until none
holds any: at most `server.memory.release_wait` seconds, with a log line when the driver is slow.
A load that still runs out of memory is retried once by the scheduler, after the same wait.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass

from llama_router.core.devices import describe
from llama_router.sizing.memory import Device, driver_usage, is_gpu

log = logging.getLogger("llama_router.release")

SLOW = 1.0  # seconds: a release slower than this is worth a line in the log
POLL = 0.05  # seconds between two readings of the driver

Reader = Callable[[Collection[int], Sequence[Device]], dict[int, dict[str, int]]]


@dataclass
class _Exited:
    devices: frozenset[str]
    waits: int = 0  # starts that gave up waiting for it: after two, its driver figure is stuck


class MemoryRelease:
    """The exited processes whose GPU memory the driver may not have given back yet."""

    def __init__(
        self,
        devices: Sequence[Device],
        wait: float,
        read: Reader = driver_usage,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self.devices = list(devices)
        self.wait = wait
        self._read = read
        self._exited: dict[int, _Exited] = {}

    def exited(self, pid: int | None, devices: Iterable[str]) -> None:
        """A process that held memory on `devices` has exited. Waited for by at most two starts, so
        that a load that failed for memory after the first wait is retried after a second one."""
        gpus = frozenset(device for device in devices if is_gpu(device))
        if pid is not None and gpus and self.wait > 0:
            self._exited[pid] = _Exited(gpus)

    def pending(self, devices: Iterable[str]) -> list[int]:
        """The exited processes whose memory on any of `devices` is not known to be free."""
        wanted = set(devices)
        return [pid for pid, exited in self._exited.items() if exited.devices & wanted]

    async def settled(self, devices: Iterable[str], label: str) -> float:
        """Wait until the driver reports no memory on `devices` held by an exited process, or
        `wait` seconds have passed; the seconds waited."""
        wanted = {device for device in devices if is_gpu(device)}
        pids = self.pending(wanted)
        if not pids:
            return 0.0
        loop = asyncio.get_running_loop()
        started = self._clock()
        while True:
            usage = await loop.run_in_executor(None, self._read, pids, self.devices)
            held = {
                pid: {device: amount for device, amount in usage.get(pid, {}).items() if device in wanted}
                for pid in pids
            }
            held = {pid: amounts for pid, amounts in held.items() if any(amounts.values())}
            for pid in set(pids) - set(held):
                self._exited.pop(pid, None)
            pids = list(held)
            waited = self._clock() - started
            if not held:
                break
            if waited >= self.wait:
                for pid in held:
                    self._exited[pid].waits += 1
                    if self._exited[pid].waits >= 2:
                        del self._exited[pid]
                log.warning(
                    "%s: after %.1fs the driver still reports memory of exited process(es) %s (%s); "
                    "starting it anyway (server.memory.release_wait)",
                    label,
                    waited,
                    ", ".join(map(str, held)),
                    "; ".join(describe(amounts) for amounts in held.values()),
                )
                return waited
            await asyncio.sleep(POLL)
        if waited >= SLOW:
            log.warning(
                "%s: the driver took %.1fs to report the memory of exited processes free", label, waited
            )
        else:
            log.debug("%s: the driver reported the exited processes' memory free after %.2fs", label, waited)
        return waited
