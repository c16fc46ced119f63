"""Whether an upstream that sends nothing is at work: its `/slots`, read and compared over time.

The relay asks (a local target's patience: `SlotReader.still_working`) when a request has been silent
for its stall limit; one reading of the upstream's `/slots` answers every request asking.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeAlias, TypeVar

Work: TypeAlias = tuple[tuple[int, int], ...]  # (task id, tokens done) per processing slot
U = TypeVar("U", bound=Hashable)  # an upstream

# Seconds within which one reading of an upstream's `/slots` answers every request that asks.
SLOTS_READ_EVERY = 0.5


def slot_work(payload: object) -> Work | None:
    """What llama-server's `GET /slots` says its busy slots have done: (task id, prompt tokens
    processed + tokens generated) for each slot that is processing; None for another answer."""
    if not isinstance(payload, list):
        return None
    work = []
    for slot in payload:
        if not isinstance(slot, dict):
            return None
        if slot.get("is_processing") is True:
            next_token = slot.get("next_token")
            first = next_token[0] if isinstance(next_token, list) and next_token else None
            decoded = first.get("n_decoded") if isinstance(first, dict) else 0
            work.append(
                (_count(slot.get("id_task")), _count(slot.get("n_prompt_tokens_processed")) + _count(decoded))
            )
    return tuple(work)


def _count(value: object) -> int:
    return value if type(value) is int else 0


@dataclass(slots=True)
class SlotWatch:
    """An upstream's slots as last read from its `/slots`, and since when they have looked so.

    A request beyond an upstream's slots waits inside llama-server, where it gets no byte for as long
    as the requests before it take: silence alone does not tell such a queued request from a wedged
    server. The slots do: a server at work has a slot processing whose counters grow, while a wedged
    one shows none growing, or does not answer (its processing loop answers `/slots`)."""

    work: Work | None = None  # None: no reading, or no answer to the last one
    since: float = 0.0  # when `work` was first read as it is
    read_at: float = float("-inf")

    def due(self, now: float, silent: float) -> bool:
        """Whether a new reading is needed: the last one is older than a fraction of the silence
        being judged (requests asking at about the same time share one)."""
        return now - self.read_at >= min(SLOTS_READ_EVERY, silent / 4)

    def read(self, work: Work | None, now: float) -> None:
        """A reading of `/slots` (None: it did not answer, or has no such page)."""
        self.read_at = now
        if work is None or work != self.work:
            self.work, self.since = work, now

    def working(self, now: float, silent: float) -> bool:
        """Whether a request silent for `silent` seconds is waiting behind work in progress: some slot
        is processing and the slots' counters moved within the last `silent` seconds (a first
        reading gets the benefit of the doubt until the next one, `silent` seconds later)."""
        return bool(self.work) and now - self.since < silent


class SlotReader(Generic[U]):
    """One `SlotWatch` per upstream, and the reading of its `/slots` in progress, shared by every
    request that asks at about the same time."""

    def __init__(self, read: Callable[[U, float], Awaitable[Work | None]], now: Callable[[], float]) -> None:
        self._read, self._now = read, now
        self._watches: dict[U, SlotWatch] = {}
        self._reads: dict[U, asyncio.Future[None]] = {}

    async def still_working(self, upstream: U, silent: float) -> bool:
        """Asked when a request has had nothing from `upstream` for `silent` seconds: whether the
        upstream is at work (its slots show progress), so the request is queued behind others, not
        stalled."""
        watch = self._watches.setdefault(upstream, SlotWatch())
        if watch.due(self._now(), silent):
            reading = self._reads.get(upstream)
            if reading is None or reading.done():
                reading = asyncio.ensure_future(self._reading(upstream, watch, silent))
                self._reads[upstream] = reading
            await asyncio.shield(reading)  # a request that goes away leaves the reading to the others
        return watch.working(self._now(), silent)

    async def _reading(self, upstream: U, watch: SlotWatch, timeout: float) -> None:
        watch.read(await self._read(upstream, timeout), self._now())

    def forget(self, upstream: U) -> None:
        """The upstream is gone."""
        self._watches.pop(upstream, None)
        self._reads.pop(upstream, None)
