"""Device names the scheduler budgets: `gpu<n>`, `ram`, `slots`, and `rpc:<host:port>` for a llama.cpp
RPC worker, which one upstream holds whole at a time. Names only: budgets come from `sizing`."""

from __future__ import annotations

# Devices whose name starts so are leased whole to one model at a time (llama.cpp's rpc-server workers).
LEASED_PREFIX = "rpc:"


def device_name(worker: str) -> str:
    """The device a worker is to the scheduler and in `/running`."""
    return LEASED_PREFIX + worker


def worker_of(device: str) -> str | None:
    """The worker address a device names, or None for another device."""
    return device[len(LEASED_PREFIX) :] if device.startswith(LEASED_PREFIX) else None
