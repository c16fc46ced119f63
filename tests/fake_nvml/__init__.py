"""A stand-in for nvidia-ml-py (pynvml.py here), and how a test puts it in the router's place."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from llama_router.sizing import memory

from . import pynvml


def install(
    monkeypatch: pytest.MonkeyPatch,
    root: Path,
    *gpus_mib: int,
    error: str | None = None,
    fastest_first: list[int] | None = None,
    release_delay: float = 0.0,
) -> Path:
    """Make the routers this test runs in-process see these NVIDIA GPUs (sizes in MiB), or an NVML
    that fails with `error`, on a Linux machine without AMD cards whatever this one has (a driver
    `release_delay` seconds slow to free an exited process's memory); the fake upstreams they start
    inherit `$FAKE_NVML` to report their own use."""
    monkeypatch.setitem(sys.modules, "pynvml", pynvml)
    monkeypatch.setattr(memory, "THIS_MACHINE", memory.Host(platform="linux", sysfs=root / "no-sysfs"))
    for variable in (
        "CUDA_VISIBLE_DEVICES",
        "HIP_VISIBLE_DEVICES",
        "ROCR_VISIBLE_DEVICES",
        "CUDA_DEVICE_ORDER",
    ):
        monkeypatch.delenv(variable, raising=False)
    machine = pynvml.write_machine(
        root / "nvml", list(gpus_mib), error=error, fastest_first=fastest_first, release_delay=release_delay
    )
    monkeypatch.setenv("FAKE_NVML", str(machine))
    return root / "no-sysfs"
