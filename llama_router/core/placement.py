"""Placement arithmetic: the footprint a model takes on the GPUs it is given.

A placeable profile (one whose command line and environment fix no device) carries what it needs on
GPUs as one figure, `need`, whatever GPU it last ran on: that is what travels from one placement to
the next. Here that figure becomes bytes per device for one GPU, a split over several (in proportion
to the room on each, as `--tensor-split` shares the layers), or a GPU part with the rest in RAM. The
choice among these, and of what to stop for them, is the scheduler's (`Scheduler._plan`).

Standard library only, like the rest of `core`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Placement:
    """How a placeable profile may be placed: plain data from its config and what was learned."""

    gpus: tuple[str, ...]  # the GPUs it may use, in the machine's (NVML, PCI bus) order
    need: int  # bytes it needs on GPUs when whole on one
    split: bool = True  # may be split over several GPUs when no single one can hold it
    ram: bool = False  # may keep part of itself in RAM when no GPU (nor split) can hold it
    split_extra: int = 0  # bytes each further GPU of a split needs besides its share (compute, context)


@dataclass(frozen=True)
class Placed:
    """Where a start puts a model, and why; what `/running`, the timeline and the dry run show."""

    gpus: tuple[str, ...]  # the machine's GPUs it sees, in the order it numbers them
    shares: tuple[int, ...] = ()  # `--tensor-split` proportions for a split; () on one GPU
    ram: int = 0  # bytes of its GPU need kept in RAM instead (partial offload)
    need: int = 0  # bytes it needs on GPUs when whole on one (the figure that travels)
    stops: tuple[str, ...] = ()  # the models stopped to make room for it
    by_demand: bool = False  # not every model fits at once: these GPUs' victims were asked for least

    @property
    def how(self) -> str:
        """`fits`, `made room`, `split` or `ram`: the kind of placement, for counting."""
        if self.ram:
            return "ram"
        if len(self.gpus) > 1:
            return "split"
        return "made room" if self.stops else "fits"

    @property
    def why(self) -> str:
        """The placement for people: `fits on gpu1`, `made room on gpu0 by stopping 'a'`..."""
        where = ", ".join(self.gpus) or "no GPU"
        if self.ram:
            text = f"partly in RAM: {where} holds what fits, the rest ({self.ram // 2**20} MiB) is in RAM"
        elif len(self.gpus) > 1:
            shares = ",".join(str(share) for share in self.shares)
            text = f"split over {where} (--tensor-split {shares}): no single GPU can hold it"
        else:
            text = f"fits on {where}" if not self.stops else f"made room on {where}"
        if self.stops:
            stopped = ", ".join(repr(name) for name in self.stops)
            text += f" by stopping {stopped}" if not text.startswith("fits") else f" (stopped {stopped})"
            if self.by_demand:
                text += ", the least asked-for lately (not every model fits at once)"
        return text

    def describe(self) -> dict[str, object]:
        """The JSON `/running`, `/v1/models` and the dry run show."""
        entry: dict[str, object] = {"gpus": list(self.gpus), "how": self.how, "why": self.why}
        if self.shares:
            entry["tensor_split"] = list(self.shares)
        if self.stops:
            entry["stopped"] = list(self.stops)
        if self.ram:
            entry["ram_bytes"] = self.ram
        return entry


def on_one(placement: Placement, gpu: str) -> dict[str, int]:
    """The GPU bytes of a model whole on `gpu`."""
    return {gpu: placement.need}


def split_over(
    placement: Placement, room: Mapping[str, int]
) -> tuple[dict[str, int], tuple[int, ...]] | None:
    """The GPU bytes of a split over the fewest GPUs whose room can hold it, each taking a share in
    proportion to its room plus `split_extra`; with the `--tensor-split` proportions (percent of
    the room, in the GPUs' order). None when all of them together cannot."""
    order = sorted(
        (gpu for gpu in placement.gpus if room.get(gpu, 0) > placement.split_extra), key=lambda g: -room[g]
    )
    for count in range(2, len(order) + 1):
        chosen = [gpu for gpu in placement.gpus if gpu in order[:count]]
        total = sum(room[gpu] for gpu in chosen)
        amounts = {gpu: -(-placement.need * room[gpu] // total) + placement.split_extra for gpu in chosen}
        if all(amounts[gpu] <= room[gpu] for gpu in chosen):
            return amounts, tuple(max(1, round(100 * room[gpu] / total)) for gpu in chosen)
    return None


def partly_in_ram(placement: Placement, room: Mapping[str, int]) -> tuple[str, int] | None:
    """For a partial offload: the GPU with the most room and the bytes it holds (the rest goes to
    RAM); None when no GPU has any room."""
    usable = [gpu for gpu in placement.gpus if room.get(gpu, 0) > 0]
    if not usable:
        return None
    gpu = max(usable, key=lambda g: room[g])
    return gpu, min(placement.need, room[gpu])


def room(gpus: Sequence[str], used: Mapping[str, int], budget: Mapping[str, int]) -> dict[str, int]:
    """Bytes free on each GPU beside `used`."""
    return {gpu: max(0, budget.get(gpu, 0) - used.get(gpu, 0)) for gpu in gpus}


def learns_need(placed: Placed | None) -> bool:
    """Whether what a load on `placed` was measured to use says what the model needs on GPUs: not
    after a partial offload, whose GPU part is only what fitted then, so the need it had is kept
    (in the scheduler and in the footprint learned for its next start)."""
    return placed is None or not placed.ram


def travelling_need(measured: Mapping[str, int], placed: Placed, split_extra: int) -> int | None:
    """What a model measured on its placement needs on one GPU: the bytes on its GPUs, less what
    each further GPU of a split holds twice. None where the load does not say (`learns_need`), so
    the figure it had is kept."""
    if not learns_need(placed):
        return None
    on_gpus = sum(measured.get(gpu, 0) for gpu in placed.gpus)
    if not on_gpus:
        return None
    return max(0, on_gpus - split_extra * (len(placed.gpus) - 1))
