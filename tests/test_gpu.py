"""Residency on simulated GPUs, end to end: a router reading NVIDIA GPUs through a fake NVML
(tests/fake_nvml) or an Apple GPU through faked sysctls, in front of fake upstreams that log the
buffer lines a CUDA or Metal build of llama.cpp logs. What the router learns from those lines decides
what stays loaded: models that do not fit one GPU together swap, ones that do stay, a learned
footprint larger than the estimate evicts an idle model, pinned and standby models behave as on RAM."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from llama_router.sizing import memory
from llama_router.sizing.footprint import GPU_MARGIN, RAM_MARGIN
from llama_router.sizing.memory import GIB, MIB, Host

from . import fake_nvml
from .conftest import RouterFactory, RunningRouter, fake_profile, upstream_processes, wait_until

LOGS = Path(__file__).parent / "fixtures" / "llama_logs"
GPU_MIB = 24564  # what NVML reports for a 24 GB card
HEADROOM_MIB = 512  # server.memory.gpu_headroom's default


MachineFactory = Callable[..., Path]


@pytest.fixture
def nvidia(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> MachineFactory:
    """Give the router NVIDIA GPUs of the sizes asked (MiB), through the fake NVML."""
    return functools.partial(fake_nvml.install, monkeypatch, tmp_path)


def cuda(*buffers: str, **extra: Any) -> Callable[[Path], dict[str, Any]]:
    """A profile whose upstream logs these buffers (`--buffer` specs) as it loads."""
    flags = [arg for spec in buffers for arg in ("--buffer", spec)]
    return lambda model: fake_profile(model, *flags, **extra)


async def running(router: RunningRouter) -> dict[str, Any]:
    async with router.session.get("/running") as response:
        assert response.status == 200
        return dict(await response.json())


async def resident(router: RunningRouter) -> set[str]:
    return {row["model"] for row in (await running(router))["running"] if row["state"] != "stopping"}


async def settles_on(router: RunningRouter, models: set[str]) -> None:
    """Wait until exactly these models are loaded and nothing else is still stopping."""

    async def settled() -> bool:
        rows = (await running(router))["running"]
        return {row["model"] for row in rows} == models and all(row["state"] == "ready" for row in rows)

    await wait_until(settled, what=f"exactly {sorted(models)} to be loaded")
    assert len(upstream_processes()) == len(models)


async def chat_ok(router: RunningRouter, model: str) -> None:
    status, body = await router.chat(model)
    assert status == 200, body


def mib(amount: float) -> int:
    return int(amount * MIB)


async def test_a_cuda_logging_upstream_is_learned_on_gpu0_and_shown_in_running(
    start_router: RouterFactory, dummy_model: Path, nvidia: MachineFactory, tmp_path: Path
) -> None:
    nvidia(GPU_MIB)
    profile = cuda(
        "model:CUDA0:8000",
        "model:CPU_Mapped:300",
        "kv:CUDA0:512",
        "compute:CUDA0:300.5",
        "compute:CUDA_Host:24.01",
    )
    router = await start_router({"coder": profile(dummy_model)})
    await chat_ok(router, "coder")
    body = await running(router)
    (row,) = body["running"]
    learned = {"gpu0": mib(8000 + 512 + 300.5) + GPU_MARGIN, "ram": mib(300 + 24.01) + RAM_MARGIN}
    assert row["footprint"] == learned
    assert body["budgets"]["gpu0"] == {
        "total": GPU_MIB * MIB,
        "budget": (GPU_MIB - HEADROOM_MIB) * MIB,
        "used": learned["gpu0"],
        "source": "nvml",
        "detail": "NVIDIA GeForce RTX 4090",
    }
    assert body["budgets"]["ram"]["source"] == "psutil"
    assert body["memory_notes"] == []
    saved = json.loads((tmp_path / "state" / "footprints.json").read_text())
    assert saved["coder"]["footprint"] == learned


async def test_the_drivers_per_process_figure_wins_over_the_logged_buffers(
    start_router: RouterFactory, dummy_model: Path, nvidia: MachineFactory
) -> None:
    nvidia(GPU_MIB)
    profile = fake_profile(dummy_model, "--buffer", "model:CUDA0:8000", "--nvml-mib", "0=8650")
    router = await start_router({"m": profile})
    await chat_ok(router, "m")
    (row,) = (await running(router))["running"]
    assert row["footprint"]["gpu0"] == 8650 * MIB, "NVML's figure, CUDA context included"


async def test_on_a_24_gb_gpu_models_that_do_not_fit_together_swap_and_ones_that_do_stay(
    start_router: RouterFactory, dummy_model: Path, nvidia: MachineFactory
) -> None:
    nvidia(GPU_MIB)
    big = cuda("model:CUDA0:13000", "kv:CUDA0:1000", "compute:CUDA_Host:20")
    small = cuda("model:CUDA0:5000", "kv:CUDA0:1000")
    router = await start_router({"a": big(dummy_model), "b": big(dummy_model), "c": small(dummy_model)})
    await chat_ok(router, "a")
    await settles_on(router, {"a"})
    # b's estimate knows nothing of the GPU (its file is no GGUF), so it starts beside a; what it
    # logs puts both over the GPU's budget, and the idle a is stopped.
    await chat_ok(router, "b")
    await settles_on(router, {"b"})
    # Now both are known to need 14 GB of the 23.5 GB: a request for a swaps them.
    await chat_ok(router, "a")
    await settles_on(router, {"a"})
    # c's 6 GB fits beside a's 14: both stay.
    await chat_ok(router, "c")
    await settles_on(router, {"a", "c"})
    used = (await running(router))["budgets"]["gpu0"]["used"]
    assert used == mib(14000) + mib(6000) + 2 * GPU_MARGIN
    assert used <= (GPU_MIB - HEADROOM_MIB) * MIB


async def test_pinned_and_standby_models_on_a_gpu_behave_as_on_ram(
    start_router: RouterFactory, dummy_model: Path, nvidia: MachineFactory
) -> None:
    nvidia(GPU_MIB)
    router = await start_router(
        {
            "pin": cuda("model:CUDA0:12000", pinned=True)(dummy_model),
            "warm": cuda("model:CUDA0:10000", standby=True)(dummy_model),
            "other": cuda("model:CUDA0:10000")(dummy_model),
        }
    )
    view = router.controller.view
    await wait_until(lambda: view("warm").standby, what="the standby preload")
    await chat_ok(router, "pin")
    await settles_on(router, {"warm", "pin"})  # 22 of 23.5 GB
    await chat_ok(router, "other")
    await settles_on(router, {"pin", "other"})  # the standby model gave way, the pinned one stayed
    async with router.session.post("/models/unload", json={"model": "other"}) as response:
        assert response.status == 200
    # GPU memory is free again: the standby model is preloaded into it.
    await settles_on(router, {"pin", "warm"})
    assert view("warm").standby


async def test_two_gpus_with_a_tensor_split_hold_what_fits_on_each(
    start_router: RouterFactory, dummy_model: Path, nvidia: MachineFactory
) -> None:
    nvidia(GPU_MIB, GPU_MIB)
    profiles = {
        "split": fake_profile(dummy_model, "--replay", str(LOGS / "cuda-tensor-split.txt"), "-ts", "1,1"),
        # llama.cpp calls the one GPU these see CUDA0; the router knows it as gpu1, resp. gpu0.
        "second": cuda("model:CUDA0:12000", env={"CUDA_VISIBLE_DEVICES": "1"})(dummy_model),
        "first": cuda("model:CUDA0:9000", env={"CUDA_VISIBLE_DEVICES": "0"})(dummy_model),
    }
    router = await start_router(profiles)
    await chat_ok(router, "split")
    (row,) = (await running(router))["running"]
    assert row["footprint"]["gpu0"] == pytest.approx(mib(13659.21) + GPU_MARGIN, abs=1024)
    assert row["footprint"]["gpu1"] == pytest.approx(mib(13798.48) + GPU_MARGIN, abs=1024)
    await chat_ok(router, "second")  # 12 GB on gpu1 does not fit beside split's 14
    await settles_on(router, {"second"})
    assert set(router.controller.view("second").footprint) == {"gpu1", "ram"}
    await chat_ok(router, "first")  # 9 GB on gpu0 fits beside second
    await settles_on(router, {"first", "second"})
    await chat_ok(router, "split")  # needs gpu1 from second; gpu0 still holds first beside it
    await settles_on(router, {"first", "split"})


@pytest.fixture
def apple_silicon(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    """A 32 GiB Mac with Apple silicon whose owner let Metal wire 20 GiB; its sysctls as a dict."""
    sysctls = {"hw.optional.arm64": "1", "hw.memsize": str(32 * GIB), "iogpu.wired_limit_mb": "20480"}
    host = Host(
        platform="darwin", sysfs=tmp_path / "no-sysfs", sysctl=sysctls.get, ram_total=lambda: 32 * GIB
    )
    monkeypatch.setattr(memory, "THIS_MACHINE", host)
    return sysctls


def metal(gpu_mib: int, cpu_mib: int = 0) -> list[str]:
    """The flags of an upstream logging a Metal build's buffers."""
    specs = [f"model:MTL0_Mapped:{gpu_mib - 1000}", "kv:MTL0:700", "compute:MTL0:300"]
    specs += [f"model:CPU_Mapped:{cpu_mib}"] if cpu_mib else []
    return [arg for spec in specs for arg in ("--buffer", spec)]


async def test_an_apple_gpu_budget_is_what_metal_may_wire_and_its_bytes_count_in_ram_once(
    start_router: RouterFactory, dummy_model: Path, apple_silicon: dict[str, str]
) -> None:
    profiles = {
        "big": fake_profile(dummy_model, *metal(10000, cpu_mib=300)),
        "big2": fake_profile(dummy_model, *metal(10000)),
        "small": fake_profile(dummy_model, *metal(5000)),
        "cpu": fake_profile(dummy_model, "--buffer", "model:CPU_Mapped:12000"),
    }
    router = await start_router(profiles, memory={"ram": 24576})
    await chat_ok(router, "big")
    body = await running(router)
    gpu = mib(10000) + GPU_MARGIN
    assert body["running"][0]["footprint"] == {"gpu0": gpu, "ram": gpu + mib(300) + RAM_MARGIN}
    assert body["budgets"]["gpu0"] == {
        "total": 20480 * MIB,
        "budget": (20480 - HEADROOM_MIB) * MIB,
        "used": gpu,
        "source": "sysctl",
        "detail": "iogpu.wired_limit_mb",
        "shares": "ram",
    }
    await chat_ok(router, "big2")  # 2 x 10 GB is more than Metal may wire: swapped
    await settles_on(router, {"big2"})
    await chat_ok(router, "small")  # 15 GB on the GPU, 15 GB of RAM in all: both stay
    await settles_on(router, {"big2", "small"})
    # 12 GB more of RAM (none of it on the GPU) is over the 24 GiB RAM budget: the least recently
    # used model gives way, though the GPU had room.
    await chat_ok(router, "cpu")
    await settles_on(router, {"small", "cpu"})


async def test_a_footprint_learned_on_a_gpu_the_router_no_longer_sees_gives_way_to_the_estimate(
    start_router: RouterFactory, dummy_model: Path, nvidia: MachineFactory
) -> None:
    nvidia(GPU_MIB)
    profiles = {"m": cuda("model:CUDA0:8000")(dummy_model)}
    router = await start_router(profiles)
    await chat_ok(router, "m")
    assert "gpu0" in router.controller.view("m").footprint
    await router.close()
    nvidia(error="driver_not_loaded")  # a driver update waiting for a reboot, say
    again = await start_router(profiles)
    assert set(again.controller.view("m").footprint) == {"ram"}, "the estimate, not a gpu0 of 0 bytes"
    await chat_ok(again, "m")


async def test_the_drivers_figure_for_a_gpu_without_a_budget_is_left_out(
    start_router: RouterFactory, dummy_model: Path, nvidia: MachineFactory
) -> None:
    nvidia(GPU_MIB, GPU_MIB)  # two GPUs, of which the config budgets one
    profile = fake_profile(
        dummy_model, "--buffer", "model:CUDA0:8000", "--nvml-mib", "0=8500", "--nvml-mib", "1=300"
    )
    router = await start_router({"m": profile}, memory={"gpus": [20000]})
    await chat_ok(router, "m")
    assert set(router.controller.view("m").footprint) == {"gpu0", "ram"}
    async with router.session.post("/models/unload", json={"model": "m"}) as response:
        assert response.status == 200
    await settles_on(router, set())
    await chat_ok(router, "m")  # not refused as too large for a GPU it has no budget on
