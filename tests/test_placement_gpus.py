"""Placement end to end, on simulated machines of 2 and 4 NVIDIA GPUs (tests/fake_nvml, with PCI bus
ids) in front of fake upstreams that see only the GPUs their visible-devices variable leaves them,
number them as CUDA does, share a split as `--tensor-split` says, and tell the fake NVML what they use
on which of the machine's GPUs."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from llama_router.sizing.memory import MIB

from . import fake_nvml
from .conftest import RouterFactory, RunningRouter, assert_openai_error, fake_profile, wait_until

GPU_MIB = 24564  # what NVML reports for a 24 GB card; the budget keeps 512 MiB headroom

MachineFactory = Callable[..., Path]


@pytest.fixture
def nvidia(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> MachineFactory:
    return functools.partial(fake_nvml.install, monkeypatch, tmp_path)


def model(path: Path, gpu_mib: int, **extra: Any) -> dict[str, Any]:
    """A placeable profile whose upstream takes `gpu_mib` on the GPUs it sees (known beforehand, as
    a configured footprint would be: a fake model file has no GGUF header to estimate from)."""
    return fake_profile(path, "--gpu-mib", str(gpu_mib), footprint={"gpu0": gpu_mib}, **extra)


async def running(router: RunningRouter) -> dict[str, Any]:
    async with router.session.get("/running") as response:
        assert response.status == 200
        return dict(await response.json())


async def placements(router: RunningRouter) -> dict[str, dict[str, Any]]:
    return {row["model"]: row["placement"] for row in (await running(router))["running"]}


async def chat_ok(router: RunningRouter, name: str) -> None:
    status, body = await router.chat(name)
    assert status == 200, body


def recorded(router: RunningRouter) -> list[dict[str, Any]]:
    """The lifecycle events from now on, as `/events` sends them."""
    events: list[dict[str, Any]] = []
    router.controller.events.subscribe(lambda event: events.append(event.json()))
    return events


def environment(router: RunningRouter, name: str) -> dict[str, str]:
    pid = router.controller.upstreams[name].pid
    assert pid is not None
    return dict(psutil.Process(pid).environ())


def driver_use(router: RunningRouter, name: str) -> dict[str, float]:
    """What the fake NVML reports the model's process using, per machine GPU index."""
    pid = router.controller.upstreams[name].pid
    path = Path(os.environ["FAKE_NVML"]) / "processes" / f"{pid}.json"
    return dict(json.loads(path.read_text()))


async def test_on_two_gpus_each_model_goes_where_it_fits_and_the_driver_sees_it_there(
    start_router: RouterFactory, dummy_model: Path, nvidia: MachineFactory
) -> None:
    nvidia(GPU_MIB, GPU_MIB, fastest_first=[1, 0])  # CUDA's own order is not the bus order here
    router = await start_router(
        {"a": model(dummy_model, 16000), "b": model(dummy_model, 16000), "c": model(dummy_model, 6000)}
    )
    events = recorded(router)
    for name in "abc":
        await chat_ok(router, name)
    placed = await placements(router)
    assert placed["a"] == {"gpus": ["gpu0"], "how": "fits", "why": "fits on gpu0"}
    assert placed["b"] == {"gpus": ["gpu1"], "how": "fits", "why": "fits on gpu1"}
    assert placed["c"]["how"] == "fits"  # 6 GB beside a 16 GB model, on either GPU
    # Each process saw only its GPU, numbered in the bus order NVML gives, so the driver reports its
    # memory on that GPU of the machine (under CUDA's default fastest-first order b would be on 0).
    assert environment(router, "b")["CUDA_VISIBLE_DEVICES"] == "1"
    assert environment(router, "b")["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert driver_use(router, "a") == {"0": 16000.0}
    assert driver_use(router, "b") == {"1": 16000.0}
    budgets = (await running(router))["budgets"]
    assert all(budgets[gpu]["used"] <= budgets[gpu]["budget"] for gpu in ("gpu0", "gpu1"))
    assert not [event for event in events if event["event"] == "stopping"], "nothing was stopped"
    async with router.session.get("/v1/models") as response:
        listed = {entry["id"]: entry for entry in (await response.json())["data"]}
    assert listed["b"]["placement"]["gpus"] == ["gpu1"] and listed["b"]["memory"] == {"gpu1": 16000 * MIB}
    async with router.session.get("/overview") as response:
        devices = {device["name"]: device for device in (await response.json())["devices"]}
    (on_gpu1,) = [entry for entry in devices["gpu1"]["models"] if entry["model"] == "b"]
    assert on_gpu1["placement"]["why"] == "fits on gpu1", "the Devices panel says why it is there"
    loading = {event["model"]: event["placement"]["why"] for event in events if event["event"] == "loading"}
    assert loading["a"] == "fits on gpu0" and loading["b"] == "fits on gpu1", "the timeline says it too"


async def test_a_model_no_gpu_can_hold_is_split_with_a_tensor_split_in_proportion_to_the_room(
    start_router: RouterFactory, dummy_model: Path, nvidia: MachineFactory
) -> None:
    nvidia(GPU_MIB, GPU_MIB)
    router = await start_router({"small": model(dummy_model, 4000), "huge": model(dummy_model, 36000)})
    await chat_ok(router, "small")
    await chat_ok(router, "huge")
    placed = await placements(router)
    assert placed["huge"]["how"] == "split" and placed["huge"]["gpus"] == ["gpu0", "gpu1"]
    shares = placed["huge"]["tensor_split"]
    assert shares[1] > shares[0], "more of it on the GPU with more room"
    command = psutil.Process(router.controller.upstreams["huge"].pid).cmdline()
    assert command[command.index("--tensor-split") + 1] == ",".join(map(str, shares))
    assert environment(router, "huge")["CUDA_VISIBLE_DEVICES"] == "0,1"
    used = driver_use(router, "huge")
    assert used["1"] > used["0"] and sum(used.values()) == pytest.approx(36000)
    budgets = (await running(router))["budgets"]
    assert all(budgets[gpu]["used"] <= budgets[gpu]["budget"] for gpu in ("gpu0", "gpu1"))


async def test_on_four_gpus_the_fifth_model_makes_room_on_the_gpu_used_least_recently(
    start_router: RouterFactory, dummy_model: Path, nvidia: MachineFactory
) -> None:
    nvidia(GPU_MIB, GPU_MIB, GPU_MIB, GPU_MIB)
    router = await start_router({name: model(dummy_model, 20000) for name in ("m0", "m1", "m2", "m3", "m4")})
    events = recorded(router)
    for name in ("m0", "m1", "m2", "m3"):
        await chat_ok(router, name)
    placed = await placements(router)
    assert sorted(placed[name]["gpus"][0] for name in placed) == ["gpu0", "gpu1", "gpu2", "gpu3"]
    await chat_ok(router, "m1")  # m0 is now the least recently used
    await chat_ok(router, "m4")
    where = {name: row["gpus"] for name, row in (await placements(router)).items() if row}
    assert "m0" not in where and where["m4"] == placed["m0"]["gpus"]
    assert (await placements(router))["m4"]["stopped"] == ["m0"]
    assert "by stopping 'm0'" in (await placements(router))["m4"]["why"]
    loading = [event for event in events if event["event"] == "loading"]
    assert loading[-1]["placement"]["why"] == (await placements(router))["m4"]["why"]


async def test_a_profile_pinned_by_cuda_visible_devices_numbers_the_gpus_as_nvml_does(
    start_router: RouterFactory, dummy_model: Path, nvidia: MachineFactory
) -> None:
    nvidia(GPU_MIB, GPU_MIB, fastest_first=[1, 0])  # CUDA's own order is not the bus order here
    router = await start_router(
        {
            "pinned": fake_profile(dummy_model, "--gpu-mib", "6000", env={"CUDA_VISIBLE_DEVICES": "1"}),
            "own_order": fake_profile(
                dummy_model,
                "--gpu-mib",
                "5000",
                env={"CUDA_VISIBLE_DEVICES": "1", "CUDA_DEVICE_ORDER": "FASTEST_FIRST"},
            ),
        }
    )
    await chat_ok(router, "pinned")
    await chat_ok(router, "own_order")
    # "1" means gpu1, as nvidia-smi shows it, and the router counts its memory there.
    assert environment(router, "pinned")["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert driver_use(router, "pinned") == {"1": 6000.0}
    view = router.controller.view
    await wait_until(lambda: view("pinned").footprint.get("gpu1", 0) > 0, what="its footprint learned")
    assert view("pinned").footprint.get("gpu0", 0) == 0
    # A profile that sets an order keeps it: under fastest first, its "1" is the machine's gpu0.
    assert environment(router, "own_order")["CUDA_DEVICE_ORDER"] == "FASTEST_FIRST"
    assert driver_use(router, "own_order") == {"0": 5000.0}


async def test_a_footprint_learned_spread_over_two_gpus_places_the_model_whole_on_one(
    start_router: RouterFactory, dummy_model: Path, nvidia: MachineFactory
) -> None:
    nvidia(GPU_MIB, GPU_MIB)
    learned = fake_profile(dummy_model, "--gpu-mib", "14000")  # no estimate: learned on its first load
    router = await start_router(
        {
            "learned": learned,
            "pin": model(dummy_model, 12000, pinned=True),
        }
    )
    await chat_ok(router, "learned")  # unknown GPU need: llama.cpp spreads it over both GPUs
    view = router.controller.view
    await wait_until(lambda: sum(v for d, v in view("learned").footprint.items() if d != "ram") > 0)
    async with router.session.post("/models/unload", json={"model": "learned"}) as response:
        assert response.status == 200
    await wait_until(lambda: view("learned").state.value == "cold", what="learned to stop")
    await chat_ok(router, "pin")
    await chat_ok(router, "learned")  # now placed whole on one GPU, with what it was seen to need
    placed = (await placements(router))["learned"]
    assert placed["how"] == "fits" and len(placed["gpus"]) == 1
    used = driver_use(router, "learned")
    assert list(used) == [placed["gpus"][0][3:]] and used[placed["gpus"][0][3:]] == pytest.approx(14000)


async def test_the_dry_run_says_where_a_model_would_go_and_what_it_would_stop(
    start_router: RouterFactory, dummy_model: Path, nvidia: MachineFactory
) -> None:
    nvidia(GPU_MIB, GPU_MIB)
    fixed = fake_profile(dummy_model, "--gpu-mib", "1000", env={"CUDA_VISIBLE_DEVICES": "1"})
    router = await start_router(
        {
            "a": model(dummy_model, 20000),
            "b": model(dummy_model, 20000),
            "c": model(dummy_model, 20000),
            "f": fixed,
        }
    )
    await chat_ok(router, "a")
    await chat_ok(router, "b")
    async with router.session.get("/placement", params={"model": "c"}) as response:
        assert response.status == 200
        answer = await response.json()
    assert answer["placed_by"] == "router" and answer["now"] is False and answer["state"] == "cold"
    assert answer["would_stop"] == ["a"] and answer["placement"]["gpus"] == ["gpu0"]
    assert "by stopping 'a'" in answer["placement"]["why"]
    assert {row["model"] for row in (await running(router))["running"]} == {"a", "b"}, "it decided nothing"
    async with router.session.get("/placement", params={"model": "a"}) as response:
        answer = await response.json()
    assert (
        answer["state"] == "ready" and answer["would_stop"] == [] and answer["placement"]["gpus"] == ["gpu0"]
    )
    async with router.session.get("/placement", params={"model": "f"}) as response:
        answer = await response.json()
    assert answer["placed_by"] == "profile" and answer["fixed_by"] == "env CUDA_VISIBLE_DEVICES"


@pytest.mark.parametrize(
    ("query", "status"),
    [
        ("", 400),
        ("?model=", 400),
        ("?model=nope", 404),
        ("?model=..%2F..%2Fetc%2Fpasswd", 404),
        ("?model=a%0D%0AX-Injected:%201", 404),
        ("?model=" + "x" * 5000, 404),
        ("?model=a&model=b", 200),
    ],
)
async def test_the_dry_run_answers_hostile_input_with_an_openai_error(
    start_router: RouterFactory, dummy_model: Path, nvidia: MachineFactory, query: str, status: int
) -> None:
    nvidia(GPU_MIB, GPU_MIB)
    router = await start_router({"a": model(dummy_model, 1000), "b": model(dummy_model, 1000)})
    async with router.session.get("/placement" + query) as response:
        assert response.status == status
        body = await response.json()
        assert "X-Injected" not in response.headers
    if status != 200:
        assert_openai_error(body, status=status)
    else:
        assert body["model"] == "a"  # the first value, like every `?model=` page
    assert not router.controller.upstreams, "a dry run starts nothing"
