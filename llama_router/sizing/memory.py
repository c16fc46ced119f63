"""Memory budgets per device: what the router may fill with models.

Devices are named "gpu0", "gpu1", ... and "ram". Each budget says where its figure came from:

- `config`: `server.memory.gpus` / `server.memory.ram`, which win over anything detected;
- `nvml`: NVIDIA GPUs, through nvidia-ml-py;
- `sysfs`: AMD GPUs, from the amdgpu driver (`/sys/class/drm/card<N>/device/mem_info_vram_total`);
- `sysctl`: Apple silicon's GPU, which is host RAM (unified memory): what Metal may wire, the
  `iogpu.wired_limit_mb` sysctl when set, else macOS's default share of RAM;
- `psutil`: host RAM.

A detected budget keeps a headroom free for everything that is not a model. Where no GPU budget could
be had, the detection says why (nvidia-ml-py missing, NVML present but unusable, no amdgpu card), so
`llama-router check` and `/running` can tell a user what to fix.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import sys
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import psutil

from llama_router.core.devices import device_name

log = logging.getLogger("llama_router.memory")

MIB = 1024 * 1024
GIB = 1024 * MIB
_CARD = re.compile(r"card(\d+)")


@dataclass(frozen=True)
class Device:
    name: str
    total: int  # bytes
    budget: int  # bytes the router may fill with models
    source: str  # "config", "nvml", "sysfs", "sysctl" or "psutil"
    unified: bool = False  # host RAM as well (Apple silicon): its bytes also count in "ram"
    in_use: int | None = None  # bytes in use by anyone when detected, where the source says
    detail: str = ""  # the GPU's name, or which setting the figure came from

    def describe(self) -> dict[str, Any]:
        """Where the budget came from, for `/running`."""
        entry: dict[str, Any] = {"source": self.source}
        if self.detail:
            entry["detail"] = self.detail
        if self.unified:
            entry["shares"] = "ram"  # a model's bytes here are counted in `ram` too
        return entry


def _run_sysctl(name: str) -> str | None:
    """A macOS sysctl as text; None where it does not exist."""
    try:
        done = subprocess.run(
            ["/usr/sbin/sysctl", "-n", name], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    value = done.stdout.strip()
    return value if done.returncode == 0 and value else None


def _psutil_ram() -> int:
    return int(psutil.virtual_memory().total)


@dataclass(frozen=True)
class Host:
    """The facts about a machine that budgets are read from. Tests describe another machine (a Mac,
    an AMD box) by passing their own facts; how the facts are used stays the same."""

    platform: str = sys.platform
    sysfs: Path = Path("/sys")
    sysctl: Callable[[str], str | None] = _run_sysctl
    ram_total: Callable[[], int] = _psutil_ram

    def apple_silicon(self) -> bool:
        """macOS on an Apple GPU, whose memory is the host's RAM (`hw.optional.arm64` is also 1 for
        an x86 Python under Rosetta)."""
        return self.platform == "darwin" and self.sysctl("hw.optional.arm64") == "1"


THIS_MACHINE = Host()


class Reading(NamedTuple):
    """One GPU as a source reports it."""

    total: int
    in_use: int | None
    detail: str


class Detected(NamedTuple):
    devices: list[Device]
    notes: list[str]  # why no GPU budget could be detected, when none was


@contextlib.contextmanager
def _nvml() -> Iterator[tuple[Any, str]]:
    """NVML, initialised for the block: (pynvml, "") or (None, why there is none)."""
    try:
        import pynvml
    except ImportError:
        yield None, "nvidia-ml-py is not installed"
        return
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # pynvml.NVMLError, or what a broken install raises
        if type(exc).__name__ != "NVMLError_LibraryNotFound":  # that one only means: no NVIDIA driver
            log.warning("NVML is installed but unusable: %s", exc)
        yield None, f"NVML is installed but unusable: {exc}"
        return
    try:
        yield pynvml, ""
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def _nvml_gpus() -> tuple[list[Reading], str]:
    """Every NVIDIA GPU, in NVML's (PCI bus) order."""
    with _nvml() as (nvml, why):
        if nvml is None:
            return [], why
        try:
            readings = []
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                name = nvml.nvmlDeviceGetName(handle)
                name = name.decode() if isinstance(name, bytes) else str(name)
                readings.append(Reading(int(memory.total), int(memory.used), name))
        except Exception as exc:
            log.warning("NVML is present but unreadable: %s", exc)
            return [], f"NVML is present but unreadable: {exc}"
    return readings, "" if readings else "NVML lists no GPU"


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _amd_gpus(sysfs: Path) -> tuple[list[Reading], str]:
    """AMD GPUs as the amdgpu kernel driver reports them, in card order (which is ROCm's unless a
    machine says otherwise; `server.memory.gpus` then sets the budgets)."""
    drm = sysfs / "class" / "drm"
    try:
        cards = sorted(
            (entry for entry in drm.iterdir() if _CARD.fullmatch(entry.name)),
            key=lambda entry: int(entry.name[4:]),
        )
    except OSError:
        return [], f"no {drm}"
    readings = []
    for card in cards:
        device = card / "device"
        total = _read_int(device / "mem_info_vram_total")
        if total is None:  # not an amdgpu card
            continue
        try:
            product = (device / "product_name").read_text().strip()
        except OSError:
            product = ""
        readings.append(Reading(total, _read_int(device / "mem_info_vram_used"), product or card.name))
    return readings, "" if readings else f"no amdgpu card under {drm}"


def metal_working_set(memsize: int) -> int:
    """What Metal lets a process keep on an Apple GPU by default (MTLDevice
    recommendedMaxWorkingSetSize, which llama.cpp reports as the Metal device's memory in
    ggml-metal-device.m): two thirds of RAM up to 36 GiB, three quarters above, as Macs report it
    (16 GiB: 10922.67 MiB, 32 GiB: 21845.34 MiB, 64 GiB: 49152 MiB). Newer macOS releases give
    large Macs somewhat more, so on those this is on the safe side."""
    return memsize * 2 // 3 if memsize <= 36 * GIB else memsize * 3 // 4


def _apple_gpu(host: Host) -> tuple[list[Reading], str]:
    if not host.apple_silicon():
        return [], "an Intel Mac's GPU memory cannot be read"
    memsize = _read_sysctl_int(host, "hw.memsize")
    if not memsize:
        return [], "sysctl hw.memsize is unreadable"
    limit_mib = _read_sysctl_int(host, "iogpu.wired_limit_mb")
    if limit_mib:  # 0 means macOS's default
        return [Reading(limit_mib * MIB, None, "iogpu.wired_limit_mb")], ""
    share = "two thirds" if memsize <= 36 * GIB else "three quarters"
    return [Reading(metal_working_set(memsize), None, f"macOS default: {share} of RAM")], ""


def _read_sysctl_int(host: Host, name: str) -> int | None:
    try:
        return int(host.sysctl(name) or "")
    except ValueError:
        return None


def _detect_gpus(host: Host, use_nvml: bool) -> tuple[list[Reading], str, list[str]]:
    """The GPUs of the first source that finds any, that source, and why the others found none."""
    sources: list[tuple[str, Callable[[], tuple[list[Reading], str]]]] = []
    if host.platform == "darwin":
        sources.append(("sysctl", lambda: _apple_gpu(host)))
    else:
        if use_nvml:
            sources.append(("nvml", _nvml_gpus))
        if host.platform.startswith("linux"):
            sources.append(("sysfs", lambda: _amd_gpus(host.sysfs)))
    notes = [] if use_nvml or host.platform == "darwin" else ["NVML: off (server.memory.nvml: false)"]
    for source, read in sources:
        readings, why = read()
        if readings:
            return readings, source, []
        notes.append(f"{source}: {why}")
    return [], "", notes


def detect_devices(
    *,
    gpus_mib: list[int] | None,
    ram_mib: int | None,
    gpu_headroom_mib: int,
    ram_headroom_mib: int,
    use_nvml: bool = True,
    host: Host | None = None,
    rpc_mib: Mapping[str, int] | None = None,
) -> Detected:
    """The devices and their budgets: configured numbers first, then what the machine reports;
    llama.cpp RPC workers (`rpc_mib`: MiB per "host:port") only as configured."""
    host = host or THIS_MACHINE
    unified = host.apple_silicon()
    devices: list[Device] = []
    notes: list[str] = []
    if gpus_mib is not None:
        devices = [
            Device(f"gpu{index}", mib * MIB, mib * MIB, "config", unified)
            for index, mib in enumerate(gpus_mib)
        ]
    else:
        readings, source, notes = _detect_gpus(host, use_nvml)
        devices = [
            Device(
                f"gpu{index}",
                reading.total,
                max(0, reading.total - gpu_headroom_mib * MIB),
                source,
                unified,
                reading.in_use,
                reading.detail,
            )
            for index, reading in enumerate(readings)
        ]
    if ram_mib is not None:
        devices.append(Device("ram", ram_mib * MIB, ram_mib * MIB, "config"))
    else:
        total = host.ram_total()
        devices.append(Device("ram", total, max(0, total - ram_headroom_mib * MIB), "psutil"))
    return Detected(devices + rpc_devices(rpc_mib or {}), notes)


def rpc_devices(rpc_mib: Mapping[str, int]) -> list[Device]:
    """The devices of llama.cpp RPC workers, with their configured budgets (MiB per "host:port")."""
    return [
        Device(device_name(worker), mib * MIB, mib * MIB, "config", detail="llama.cpp rpc-server")
        for worker, mib in rpc_mib.items()
    ]


def is_gpu(device: str) -> bool:
    """Whether a device is one of this machine's GPUs (not `ram`, nor an RPC worker)."""
    return device.startswith("gpu")


def nvml_usage_by_pid() -> dict[int, dict[str, int]]:
    """GPU memory each process uses, per device, as the driver reports it."""
    usage: dict[int, dict[str, int]] = {}
    with _nvml() as (nvml, _):
        if nvml is None:
            return usage
        with contextlib.suppress(Exception):
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                for process in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                    used = getattr(process, "usedGpuMemory", None)
                    if used:
                        usage.setdefault(int(process.pid), {})[f"gpu{index}"] = int(used)
    return usage


def amd_usage_by_pid(
    pids: Collection[int], sysfs: Path, proc: Path = Path("/proc")
) -> dict[int, dict[str, int]]:
    """VRAM each of these processes holds on each AMD GPU, from the amdgpu driver's per-client
    figures in `/proc/<pid>/fdinfo/<fd>` (`drm-driver: amdgpu`, `drm-pdev: <PCI address>`,
    `drm-client-id`, `drm-memory-vram: <n> KiB`; the kernel's drm-usage-stats format). A client
    opened through several file descriptors is counted once; a process that is gone holds nothing."""
    cards = {address: f"gpu{index}" for index, address in enumerate(_amd_pci_addresses(sysfs))}
    usage: dict[int, dict[str, int]] = {}
    for pid in pids:
        try:
            entries = list((proc / str(pid) / "fdinfo").iterdir())
        except OSError:
            continue
        seen: set[tuple[str, str]] = set()
        for entry in entries:
            try:
                fields = dict(
                    (key.strip(), value.strip())
                    for key, _, value in (line.partition(":") for line in entry.read_text().splitlines())
                )
            except OSError:
                continue
            device = cards.get(fields.get("drm-pdev", ""))
            client = (fields.get("drm-pdev", ""), fields.get("drm-client-id", entry.name))
            vram = fields.get("drm-memory-vram", "").split()
            if fields.get("drm-driver") != "amdgpu" or device is None or client in seen or not vram:
                continue
            seen.add(client)
            amount = int(vram[0]) * _FDINFO_UNITS.get(vram[1] if len(vram) > 1 else "", 1)
            if amount:
                usage.setdefault(pid, {})[device] = usage.get(pid, {}).get(device, 0) + amount
    return usage


_FDINFO_UNITS = {"": 1, "KiB": 1024, "MiB": MIB, "GiB": GIB}


def _amd_pci_addresses(sysfs: Path) -> list[str]:
    """The PCI address of each amdgpu card, in the order `_amd_gpus` numbers them."""
    drm = sysfs / "class" / "drm"
    try:
        cards = sorted(
            (entry for entry in drm.iterdir() if _CARD.fullmatch(entry.name)),
            key=lambda entry: int(entry.name[4:]),
        )
    except OSError:
        return []
    return [
        (card / "device").resolve().name
        for card in cards
        if (card / "device" / "mem_info_vram_total").exists()
    ]


def driver_usage(
    pids: Collection[int], devices: Sequence[Device], host: Host | None = None
) -> dict[int, dict[str, int]]:
    """GPU memory each of these processes holds, per device, as the driver reports it: NVML for
    NVIDIA GPUs, the amdgpu driver's fdinfo figures for AMD ones; nothing where neither can say."""
    usage = {pid: used for pid, used in nvml_usage_by_pid().items() if pid in pids}
    if any(device.source == "sysfs" for device in devices):
        for pid, used in amd_usage_by_pid(pids, (host or THIS_MACHINE).sysfs).items():
            usage.setdefault(pid, {}).update(used)
    return usage


def _will_need(fd: int) -> None:
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)


# The kernel's read-ahead advice where there is one (Linux, the BSDs); macOS has none.
FADVISE: Callable[[int], None] | None = _will_need if hasattr(os, "posix_fadvise") else None


def page_in(path: str, keep_free: int, advise: Callable[[int], None] | None = FADVISE) -> bool:
    """Ask the kernel to read a model file into the page cache ahead of a load, if RAM allows.

    A restart from the page cache runs at memory speed instead of disk speed (on an H200: 1.7 s
    instead of 3.1 s for an 11 GB model). Without read-ahead advice (macOS) the file is read through
    once, here in the caller's (executor) thread, which leaves it cached just the same. Returns
    whether the read-ahead was done or requested.
    """
    try:
        size = os.path.getsize(path)
        if int(psutil.virtual_memory().available) < size + keep_free:
            return False
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        if advise is not None:
            advise(fd)
        else:
            chunk = bytearray(4 * MIB)
            while os.readv(fd, [chunk]):
                pass
    except OSError:
        return False
    finally:
        os.close(fd)
    return True
