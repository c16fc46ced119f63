"""llama.cpp RPC workers: the `rpc-server` processes a profile's model is split across.

A profile's `rpc: [host:port, ...]` becomes llama-server's `--rpc` list. Each worker is a device of
its own, `rpc:<host:port>`, with the budget `server.memory.rpc` gives it; an `rpc-server` serves one
client at a time, so the scheduler leases such a device whole to one model (see `scheduler.leased`).
Before a model that uses workers is started, each is asked for a TCP connection, so a worker that
does not answer fails the load at once with its address, instead of llama-server aborting on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass

from llama_router.config.addresses import parse_worker

PROBE_TIMEOUT = 2.0  # seconds a worker has to accept a connection


@dataclass(frozen=True)
class Probe:
    """Whether a worker accepted a connection, how fast, or why not."""

    worker: str
    answers: bool
    seconds: float
    error: str = ""

    def describe(self) -> str:
        if self.answers:
            return f"answers ({self.seconds * 1000:.1f} ms)"
        return f"does not answer: {self.error}"


async def probe(worker: str, timeout: float = PROBE_TIMEOUT) -> Probe:
    """Open and close a TCP connection to the worker (rpc-server accepts the next client when this
    one leaves, so a probe never holds it)."""
    host, port = parse_worker(worker)
    started = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(host, port)
    except TimeoutError:
        return Probe(worker, False, time.monotonic() - started, f"no connection within {timeout:g}s")
    except OSError as exc:  # asyncio words a refusal "Connect call failed (...)": the errno says it
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        return Probe(worker, False, time.monotonic() - started, why.lower())
    seconds = time.monotonic() - started
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return Probe(worker, True, seconds)


async def probe_all(workers: tuple[str, ...] | list[str], timeout: float = PROBE_TIMEOUT) -> list[Probe]:
    """Every worker probed at once."""
    return list(await asyncio.gather(*(probe(worker, timeout) for worker in workers)))


def unanswered(probes: list[Probe]) -> str | None:
    """The load's error when some worker did not answer (naming each), else None."""
    down = [f"rpc worker {p.worker} {p.describe()}" for p in probes if not p.answers]
    return "; ".join(down) if down else None


def probe_now(workers: list[str], timeout: float = PROBE_TIMEOUT) -> list[Probe]:
    """`probe_all` for synchronous callers (`llama-router check`)."""
    return asyncio.run(probe_all(workers, timeout))
