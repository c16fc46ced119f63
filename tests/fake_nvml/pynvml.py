"""A stand-in for nvidia-ml-py's `pynvml`, for tests on machines without an NVIDIA GPU.

The router reads NVIDIA GPUs through `import pynvml`; a test puts this directory first on a router
process's PYTHONPATH (or this module into `sys.modules` for an in-process router) and describes the
machine in `$FAKE_NVML/machine.json`:

    {"gpus": [{"name": "NVIDIA GeForce RTX 4090", "total_mib": 24564, "used_mib": 400,
               "pci_bus_id": "00000000:17:00.0"}],
     "error": null, "fastest_first": null}

`error` makes `nvmlInit` fail as a machine without a driver does: "library_not_found" (no NVIDIA
driver installed) or "driver_not_loaded". What each process uses on each GPU, as the driver reports
it per process, is in `$FAKE_NVML/processes/<pid>.json` ({"<gpu index>": MiB}); the fake upstream
writes its own with `--nvml-mib`. A GPU's used memory is its `used_mib` plus what the processes on it
use. `"release_delay_s": S` makes a slow driver: a process that has exited is still listed, its
memory still used, for S seconds after it was first seen gone. Only the calls the router makes are
here, with nvidia-ml-py's names, shapes and error classes.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

MIB = 1024 * 1024

NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_UNINITIALIZED = 1
_MESSAGES = {
    NVML_ERROR_UNINITIALIZED: "Uninitialized",
    NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
}


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return _MESSAGES.get(self.value, "Unknown Error")


class NVMLError_Uninitialized(NVMLError):
    def __init__(self) -> None:
        super().__init__(NVML_ERROR_UNINITIALIZED)


class NVMLError_InvalidArgument(NVMLError):
    def __init__(self) -> None:
        super().__init__(NVML_ERROR_INVALID_ARGUMENT)


class NVMLError_DriverNotLoaded(NVMLError):
    def __init__(self) -> None:
        super().__init__(NVML_ERROR_DRIVER_NOT_LOADED)


class NVMLError_LibraryNotFound(NVMLError):
    def __init__(self) -> None:
        super().__init__(NVML_ERROR_LIBRARY_NOT_FOUND)


_ERRORS = {"driver_not_loaded": NVMLError_DriverNotLoaded, "library_not_found": NVMLError_LibraryNotFound}
_initialised = 0


def _root() -> Path:
    return Path(os.environ["FAKE_NVML"])


def _machine() -> dict[str, Any]:
    data = json.loads((_root() / "machine.json").read_text())
    assert isinstance(data, dict)
    return data


def _gpus() -> list[dict[str, Any]]:
    if not _initialised:
        raise NVMLError_Uninitialized()
    return list(_machine().get("gpus", []))


def nvmlInit() -> None:
    global _initialised
    if "FAKE_NVML" not in os.environ:
        raise NVMLError_LibraryNotFound()
    error = _machine().get("error")
    if error:
        raise _ERRORS[error]()
    _initialised += 1


def nvmlShutdown() -> None:
    global _initialised
    if not _initialised:
        raise NVMLError_Uninitialized()
    _initialised -= 1


def nvmlSystemGetDriverVersion() -> str:
    _gpus()
    return "580.95.05"


def nvmlDeviceGetCount() -> int:
    return len(_gpus())


def nvmlDeviceGetHandleByIndex(index: int) -> int:
    if not 0 <= index < len(_gpus()):
        raise NVMLError_InvalidArgument()
    return index


def nvmlDeviceGetName(handle: int) -> str:
    return str(_gpus()[handle].get("name", "NVIDIA GeForce RTX 4090"))


def nvmlDeviceGetMemoryInfo(handle: int) -> SimpleNamespace:
    gpu = _gpus()[handle]
    total = int(gpu["total_mib"]) * MIB
    used = int(gpu.get("used_mib", 0)) * MIB
    used += sum(process.usedGpuMemory for process in nvmlDeviceGetComputeRunningProcesses(handle))
    return SimpleNamespace(total=total, used=used, free=total - used)


def nvmlDeviceGetComputeRunningProcesses(handle: int) -> list[SimpleNamespace]:
    """The processes with memory on this GPU, from `$FAKE_NVML/processes/<pid>.json`: the live ones,
    and on a slow driver those gone for less than `release_delay_s`."""
    _gpus()
    delay = float(_machine().get("release_delay_s") or 0)
    found = []
    for path in sorted((_root() / "processes").glob("*.json")):
        pid = int(path.stem)
        try:
            used = json.loads(path.read_text()).get(str(handle))
        except (OSError, ValueError):
            continue
        if used and (_alive(pid) or _releasing(path, delay)):
            found.append(SimpleNamespace(pid=pid, usedGpuMemory=int(float(used) * MIB)))
    return found


def nvmlDeviceGetPciInfo(handle: int) -> SimpleNamespace:
    """The GPU's PCI address; NVML lists GPUs in this (bus) order."""
    return SimpleNamespace(busId=str(_gpus()[handle].get("pci_bus_id", f"00000000:{handle + 1:02X}:00.0")))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _releasing(path: Path, delay: float) -> bool:
    """Whether the driver still holds the memory of this exited process: for `delay` seconds after
    it was first seen gone (noted beside its file, for every reader to agree)."""
    if delay <= 0:
        return False
    gone = path.with_suffix(".gone")
    try:
        since = float(gone.read_text())
    except (OSError, ValueError):
        since = time.time()
        gone.write_text(repr(since))
    return time.time() - since < delay


def write_machine(
    root: Path,
    gpus_mib: list[int],
    *,
    error: str | None = None,
    fastest_first: list[int] | None = None,
    release_delay: float = 0.0,
) -> Path:
    """Describe a machine for this module: one GPU of each size (MiB) on its own PCI bus, in bus
    order, or an NVML that fails. `fastest_first`: the order CUDA numbers them in by default (NVML
    indices), which is not bus order on a machine with mixed GPUs; a `release_delay` (seconds) makes
    its driver slow to release an exited process's memory."""
    (root / "processes").mkdir(parents=True, exist_ok=True)
    gpus = [
        {
            "name": "NVIDIA GeForce RTX 4090",
            "total_mib": mib,
            "used_mib": 300,
            "pci_bus_id": f"00000000:{0x17 + 0x20 * index:02X}:00.0",
        }
        for index, mib in enumerate(gpus_mib)
    ]
    machine = {"gpus": gpus, "error": error, "fastest_first": fastest_first, "release_delay_s": release_delay}
    (root / "machine.json").write_text(json.dumps(machine))
    return root
