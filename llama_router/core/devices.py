"""Device names the scheduler budgets: `gpu<n>`, `ram`, `slots`, and `rpc:<host:port>` for a llama.cpp
RPC worker, which one upstream holds whole at a time, and amounts per device written for people.
Budgets come from `sizing`."""

from __future__ import annotations

from collections.abc import Mapping

MIB = 1024 * 1024

# Devices whose name starts so are leased whole to one model at a time (llama.cpp's rpc-server workers).
LEASED_PREFIX = "rpc:"


def device_name(worker: str) -> str:
    """The device a worker is to the scheduler and in `/running`."""
    return LEASED_PREFIX + worker


def worker_of(device: str) -> str | None:
    """The worker address a device names, or None for another device."""
    return device[len(LEASED_PREFIX) :] if device.startswith(LEASED_PREFIX) else None


def size_text(amount: int) -> str:
    """Bytes for people: `70 MiB`, `23.5 GiB`."""
    return f"{amount / MIB:.0f} MiB" if amount < 10 * 1024 * MIB else f"{amount / (1024 * MIB):.1f} GiB"


def describe(footprint: Mapping[str, int]) -> str:
    """Amounts per device for people: `gpu0 4.2 GiB, ram 70 MiB` (request slots are no memory)."""
    parts = [
        f"{device} {size_text(amount)}" for device, amount in sorted(footprint.items()) if device != "slots"
    ]
    return ", ".join(parts) or "nothing"
