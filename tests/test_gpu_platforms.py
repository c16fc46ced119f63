"""Where budgets come from on each kind of machine, told by faking the facts the router reads (NVML
through tests/fake_nvml, sysfs as a directory tree, sysctls as a dict, the platform's name): NVIDIA,
AMD, Apple silicon, none; what `check` and `/running` say about them; and a router that runs on macOS,
whose upstreams die with it when it is SIGKILLed."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
import yaml

from llama_router.cli import main
from llama_router.config.schema import load_config
from llama_router.sizing import memory
from llama_router.sizing.budgets import Sizing
from llama_router.sizing.footprint import _estimate_from_header
from llama_router.sizing.gguf import read_header
from llama_router.sizing.memory import GIB, MIB, Host, detect_devices, metal_working_set, page_in

from . import fake_nvml
from .conftest import ROOT, RouterFactory, fake_profile, wait_until
from .router_process import free_port, pid_gone

MAC_SYSCTLS = {"hw.optional.arm64": "1", "hw.memsize": str(32 * GIB)}


def devices_of(host: Host, **memory_config: Any) -> memory.Detected:
    settings: dict[str, Any] = {
        "gpus_mib": None,
        "ram_mib": 4096,
        "gpu_headroom_mib": 512,
        "ram_headroom_mib": 0,
    }
    return detect_devices(**{**settings, **memory_config}, host=host)


def amd_sysfs(root: Path, cards: dict[str, dict[str, str]]) -> Path:
    """A /sys with these /sys/class/drm entries, each with these files under its device/."""
    for card, files in cards.items():
        device = root / "class" / "drm" / card / "device"
        device.mkdir(parents=True)
        for name, text in files.items():
            (device / name).write_text(text + "\n")
    return root


# ------------------------------------------------------------------------------------------------ AMD


def test_amd_gpus_come_from_the_amdgpu_drivers_sysfs_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_nvml.install(
        monkeypatch, tmp_path, error="library_not_found"
    )  # nvidia-ml-py installed, no NVIDIA driver
    sysfs = amd_sysfs(
        tmp_path / "sys",
        {
            "card0": {"mem_info_vram_total": str(24 * GIB), "mem_info_vram_used": str(300 * MIB)},
            "card0-DP-1": {},  # a connector
            "card1": {"vendor": "0x8086"},  # an Intel iGPU: no VRAM figures
            "card2": {"mem_info_vram_total": str(16 * GIB), "product_name": "AMD Radeon RX 7800 XT"},
            "renderD128": {"mem_info_vram_total": "1"},
        },
    )
    devices, notes = devices_of(Host(platform="linux", sysfs=sysfs))
    gpus = [device for device in devices if device.name != "ram"]
    assert [(gpu.name, gpu.total, gpu.budget, gpu.source) for gpu in gpus] == [
        ("gpu0", 24 * GIB, 24 * GIB - 512 * MIB, "sysfs"),
        ("gpu1", 16 * GIB, 16 * GIB - 512 * MIB, "sysfs"),
    ]
    assert (gpus[0].in_use, gpus[0].detail) == (300 * MIB, "card0")
    assert (gpus[1].in_use, gpus[1].detail) == (None, "AMD Radeon RX 7800 XT")
    assert notes == []


def test_nvidia_gpus_seen_by_nvml_come_before_the_kernels_view(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_nvml.install(monkeypatch, tmp_path, 24564)
    sysfs = amd_sysfs(tmp_path / "sys", {"card0": {"mem_info_vram_total": str(16 * GIB)}})
    devices, _ = devices_of(Host(platform="linux", sysfs=sysfs))
    assert [(device.name, device.source) for device in devices] == [("gpu0", "nvml"), ("ram", "config")]


@pytest.fixture
def tiny_header(tiny_models: tuple[Path, Path]) -> Any:
    return read_header(tiny_models[0])


@pytest.mark.parametrize(
    ("env", "gpus"),
    [
        ({}, {"gpu0", "gpu1", "gpu2"}),
        ({"HIP_VISIBLE_DEVICES": "2"}, {"gpu2"}),
        ({"ROCR_VISIBLE_DEVICES": "1,2", "HIP_VISIBLE_DEVICES": "1"}, {"gpu2"}),  # HIP counts within ROCr's
        ({"ROCR_VISIBLE_DEVICES": "2,0"}, {"gpu0", "gpu2"}),
        ({"HIP_VISIBLE_DEVICES": "0", "CUDA_VISIBLE_DEVICES": "1"}, {"gpu0"}),  # HIP's own variable wins
        ({"CUDA_VISIBLE_DEVICES": "1,7,0"}, {"gpu1"}),  # an index naming no device hides the rest
        ({"CUDA_VISIBLE_DEVICES": ""}, set()),
    ],
)
def test_rocm_and_cuda_visible_devices_choose_the_gpus_of_the_estimate(
    tiny_header: Any, env: dict[str, str], gpus: set[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for variable in ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES"):
        monkeypatch.delenv(variable, raising=False)
    footprint = _estimate_from_header(tiny_header, ["-c", "512"], env, ("gpu0", "gpu1", "gpu2"))
    assert set(footprint) - {"ram"} == gpus


# ---------------------------------------------------------------------------------------------- Apple


@pytest.mark.parametrize(
    ("ram_gib", "working_set_mib"),
    [(16, 10922.67), (32, 21845.33), (36, 24576), (48, 36864), (64, 49152), (128, 98304)],
)
def test_metals_default_working_set_is_two_thirds_of_ram_up_to_36_gib_then_three_quarters(
    ram_gib: int, working_set_mib: float
) -> None:
    assert metal_working_set(ram_gib * GIB) / MIB == pytest.approx(working_set_mib, abs=0.01)


def test_an_apple_gpu_budget_is_the_wired_limit_when_set_else_macos_default(tmp_path: Path) -> None:
    sysctls = {**MAC_SYSCTLS, "iogpu.wired_limit_mb": "28672"}
    host = Host(platform="darwin", sysfs=tmp_path, sysctl=sysctls.get, ram_total=lambda: 32 * GIB)
    (gpu, ram), notes = devices_of(host, ram_mib=None, ram_headroom_mib=2048)
    assert (gpu.name, gpu.total, gpu.source, gpu.detail, gpu.unified) == (
        "gpu0",
        28672 * MIB,
        "sysctl",
        "iogpu.wired_limit_mb",
        True,
    )
    assert (ram.total, ram.budget, ram.source, ram.unified) == (32 * GIB, 30 * GIB, "psutil", False)
    sysctls["iogpu.wired_limit_mb"] = "0"  # macOS's default
    (gpu, _), _ = devices_of(host)
    assert (gpu.total, gpu.detail) == (metal_working_set(32 * GIB), "macOS default: two thirds of RAM")
    assert notes == []


def test_an_intel_mac_has_no_gpu_budget_and_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_nvml.install(monkeypatch, tmp_path, 24564)  # not consulted on macOS
    sysctls = {**MAC_SYSCTLS, "hw.optional.arm64": "0"}
    devices, notes = devices_of(Host(platform="darwin", sysfs=tmp_path, sysctl=sysctls.get))
    assert [device.name for device in devices] == ["ram"]
    assert notes == ["sysctl: an Intel Mac's GPU memory cannot be read"]


def test_on_apple_silicon_estimates_count_the_gpus_bytes_in_ram_too(
    tmp_path: Path, tiny_models: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "profiles.yaml"
    server = {"state_dir": str(tmp_path / "state"), "memory": {"gpus": [8000], "ram": 16000}}
    profile = {"model": str(tiny_models[0]), "args": ["-ngl", "99", "-c", "512"]}
    path.write_text(yaml.safe_dump({"server": server, "profiles": {"m": profile}}))
    monkeypatch.setattr(memory, "THIS_MACHINE", Host(platform="linux", sysfs=tmp_path / "none"))
    plain, _ = Sizing(load_config(path)).footprint_and_source(load_config(path).profiles["m"])
    monkeypatch.setattr(memory, "THIS_MACHINE", Host(platform="darwin", sysctl=MAC_SYSCTLS.get))
    unified, source = Sizing(load_config(path)).footprint_and_source(load_config(path).profiles["m"])
    assert source == "estimated"
    assert plain["gpu0"] > 0
    assert unified == {"gpu0": plain["gpu0"], "ram": plain["ram"] + plain["gpu0"]}


# ------------------------------------------------------------------------------- what the router says


def write_profiles(tmp_path: Path, **memory_config: Any) -> Path:
    path = tmp_path / "profiles.yaml"
    server = {"state_dir": str(tmp_path / "state"), "memory": {"ram": 30000, **memory_config}}
    profiles = {"m": {"model": str(path), "binary": sys.executable}}
    path.write_text(yaml.safe_dump({"server": server, "profiles": profiles}))
    return path


def test_check_says_where_each_budget_came_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_nvml.install(monkeypatch, tmp_path, 24564, 12288)
    assert main(["check", "-c", str(write_profiles(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "  memory budgets:\n" in out
    assert "    gpu0  23.5 GiB of 24.0 GiB  (nvml: NVIDIA GeForce RTX 4090, 300 MiB in use now)\n" in out
    assert "    gpu1  11.5 GiB of 12.0 GiB  (nvml: NVIDIA GeForce RTX 4090, 300 MiB in use now)\n" in out
    assert "    ram   29.3 GiB of 29.3 GiB  (config)\n" in out
    assert "no GPU budget" not in out


def test_check_shows_an_apple_gpu_as_the_same_memory_as_ram(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(memory, "THIS_MACHINE", Host(platform="darwin", sysctl=MAC_SYSCTLS.get))
    assert main(["check", "-c", str(write_profiles(tmp_path))]) == 0
    out = capsys.readouterr().out
    expected = "gpu0  20.8 GiB of 21.3 GiB  (sysctl: macOS default: two thirds of RAM; the same memory as ram"
    assert expected in out


@pytest.mark.parametrize(
    ("machine", "memory_config", "note"),
    [
        ("driver_not_loaded", {}, "nvml: NVML is installed but unusable: Driver Not Loaded"),
        ("library_not_found", {}, "nvml: NVML is installed but unusable: NVML Shared Library Not Found"),
        ("no nvidia-ml-py", {}, "nvml: nvidia-ml-py is not installed"),
        ("no GPU", {}, "nvml: NVML lists no GPU"),
        ("library_not_found", {"nvml": False}, "NVML: off (server.memory.nvml: false)"),
    ],
)
def test_check_says_why_there_is_no_gpu_budget(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    machine: str,
    memory_config: dict[str, Any],
    note: str,
) -> None:
    fake_nvml.install(
        monkeypatch, tmp_path, error=None if machine in ("no GPU", "no nvidia-ml-py") else machine
    )
    if machine == "no nvidia-ml-py":
        monkeypatch.setitem(sys.modules, "pynvml", None)  # what `import pynvml` meets without the package
    assert main(["check", "-c", str(write_profiles(tmp_path, **memory_config))]) == 0
    out = capsys.readouterr().out
    (line,) = [line for line in out.splitlines() if "no GPU budget:" in line]
    assert note in line
    assert f"sysfs: no {tmp_path / 'no-sysfs' / 'class' / 'drm'}" in line


async def test_running_says_why_there_is_no_gpu_budget(
    start_router: RouterFactory, dummy_model: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake_nvml.install(monkeypatch, tmp_path, error="driver_not_loaded")
    router = await start_router({"m": fake_profile(dummy_model)})
    async with router.session.get("/running") as response:
        body = await response.json()
    assert list(body["budgets"]) == ["ram"]
    assert body["memory_notes"][0] == "nvml: NVML is installed but unusable: Driver Not Loaded"


def test_read_ahead_without_kernel_advice_reads_the_file_through(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(os.urandom(8 * MIB))

    def bytes_read() -> int:  # this process's read() total, as Linux counts it
        return int(re.findall(r"rchar: (\d+)", Path("/proc/self/io").read_text())[0])

    before = bytes_read()
    assert page_in(str(path), keep_free=0, advise=None)
    assert bytes_read() - before >= 8 * MIB


# ------------------------------------------------------------------------ upstreams die with the router

HOLDER = textwrap.dedent(
    """
    import subprocess, sys, time
    from llama_router.upstream.lifeline import Watchdog
    watchdog = Watchdog()
    kept = subprocess.Popen(["sleep", "60"], preexec_fn=watchdog.arm(), start_new_session=True)
    released = subprocess.Popen(["sleep", "60"], preexec_fn=watchdog.arm(), start_new_session=True)
    watchdog.released(released.pid)
    print(watchdog.pid, kept.pid, released.pid, flush=True)
    time.sleep(60)
    """
)


def test_the_watchdog_kills_what_is_registered_once_its_router_is_gone() -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert holder.stdout is not None
    watchdog, kept, released = map(int, holder.stdout.readline().split())
    try:
        assert not pid_gone(watchdog) and not pid_gone(kept)
        holder.kill()
        holder.wait()
        deadline = time.monotonic() + 5
        while not (pid_gone(kept) and pid_gone(watchdog)):
            assert time.monotonic() < deadline, "the registered process outlived its router"
            time.sleep(0.02)
        assert not pid_gone(released), "a released pid is never touched"
    finally:
        for pid in (kept, released, watchdog):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# `python -m llama_router` as it runs on an Apple silicon Mac: the platform facts the router reads say so.
AS_ON_A_MAC = textwrap.dedent(
    """
    import sys
    from llama_router.upstream import lifeline
    from llama_router.sizing import memory
    lifeline.PLATFORM = "darwin"
    sysctls = {"hw.optional.arm64": "1", "hw.memsize": str(16 << 30)}
    memory.THIS_MACHINE = memory.Host(platform="darwin", sysctl=sysctls.get)
    from llama_router.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


async def test_a_router_on_macos_serves_and_its_upstreams_die_when_it_is_sigkilled(
    tmp_path: Path, dummy_model: Path
) -> None:
    config = tmp_path / "profiles.yaml"
    server = {"state_dir": str(tmp_path / "state"), "max_resident": 2}
    profiles = {"a": fake_profile(dummy_model), "b": fake_profile(dummy_model)}
    config.write_text(yaml.safe_dump({"server": server, "profiles": profiles}))
    port = free_port()
    log = (tmp_path / "router.log").open("wb")
    router = subprocess.Popen(
        [sys.executable, "-c", AS_ON_A_MAC, "serve", "-c", str(config), "--port", str(port)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    upstreams: list[int] = []
    try:
        async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{port}") as session:

            async def healthy() -> bool:
                assert router.poll() is None, (tmp_path / "router.log").read_text()
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get("/health") as response:
                        return response.status == 200
                return False

            await wait_until(healthy, timeout=20, what="the router to listen")
            for model in ("a", "b"):
                body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
                async with session.post("/v1/chat/completions", json=body) as response:
                    assert response.status == 200
            async with session.get("/running") as response:
                running = await response.json()
        assert running["budgets"]["gpu0"]["source"] == "sysctl"
        assert running["budgets"]["gpu0"]["shares"] == "ram"
        upstreams = [row["pid"] for row in running["running"]]
        children = psutil.Process(router.pid).children()
        (watchdog,) = [child.pid for child in children if "lifeline.py" in " ".join(child.cmdline())]
        assert sorted(upstreams) == sorted(child.pid for child in children if child.pid != watchdog)

        router.send_signal(signal.SIGKILL)
        router.wait(timeout=5)
        await wait_until(
            lambda: all(pid_gone(pid) for pid in [*upstreams, watchdog]),
            timeout=10,
            what="the upstreams and the watchdog to go",
        )
    finally:
        if router.poll() is None:
            router.kill()
            router.wait()
        for pid in upstreams:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        log.close()
