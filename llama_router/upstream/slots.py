"""Whether an upstream that sends nothing is at work: its `/slots`, read and compared over time.

The relay asks (`Controller.still_working`) when a request has been silent for its stall limit;
one reading of the upstream's `/slots` answers every request asking."""

from __future__ import annotations

from dataclasses import dataclass

# Seconds within which one reading of an upstream's `/slots` answers every request that asks.
SLOTS_READ_EVERY = 0.5


def slot_work(payload: object) -> tuple[tuple[int, int], ...] | None:
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

    work: tuple[tuple[int, int], ...] | None = None  # None: no reading, or no answer to the last one
    since: float = 0.0  # when `work` was first read as it is
    read_at: float = float("-inf")

    def due(self, now: float, silent: float) -> bool:
        """Whether a new reading is needed: the last one is older than a fraction of the silence
        being judged (requests asking at about the same time share one)."""
        return now - self.read_at >= min(SLOTS_READ_EVERY, silent / 4)

    def read(self, work: tuple[tuple[int, int], ...] | None, now: float) -> None:
        """A reading of `/slots` (None: it did not answer, or has no such page)."""
        self.read_at = now
        if work is None or work != self.work:
            self.work, self.since = work, now

    def working(self, now: float, silent: float) -> bool:
        """Whether a request silent for `silent` seconds is waiting behind work in progress: some slot
        is processing and the slots' counters moved within the last `silent` seconds (a first
        reading gets the benefit of the doubt until the next one, `silent` seconds later)."""
        return bool(self.work) and now - self.since < silent
