"""llama-server's `--fit` inside the router's plan, and memory confirmed free before the next load.

The rule (sizing/fit.py) on its own, then end to end on a simulated GPU: the fake NVML
(tests/fake_nvml) reports free memory, and the fake upstream applies `--fit`'s rule to it (an unset
context shrinks first, then layers leave the GPU) and, with `--oom-if-short`, fails a load the free
memory cannot hold, as CUDA does. A slow driver keeps an exited process's memory for a while."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from llama_router.config.schema import load_config
from llama_router.sizing.fit import Claim, fit_args, fit_target
from llama_router.sizing.memory import GIB, MIB, Device

from . import fake_nvml
from .conftest import RouterFactory, RunningRouter, fake_profile, wait_until

GPU_MIB = 24564  # what NVML reports for a 24 GB card, 300 MiB of it in use by the desktop
HEADROOM = 512 * MIB  # server.memory.gpu_headroom's default

MachineFactory = Callable[..., Path]


@pytest.fixture
def nvidia(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> MachineFactory:
    return functools.partial(fake_nvml.install, monkeypatch, tmp_path)


def foreign_use(root: Path, mib: int) -> None:
    """Something that is not a model (another user's job) takes `mib` on GPU 0."""
    machine_path = root / "nvml" / "machine.json"
    machine = json.loads(machine_path.read_text())
    machine["gpus"][0]["used_mib"] = mib
    machine_path.write_text(json.dumps(machine))


def upstream_log(router: RunningRouter, name: str) -> list[str]:
    return list(router.controller.logs[name])


def fit_lines(router: RunningRouter, name: str) -> list[tuple[int, int]]:
    """(free MiB, target MiB) each start of `name` saw on GPU 0, as its `--fit` reads them."""
    found = re.findall(r"fit: GPU 0 free (\d+) MiB, target (\d+) MiB", "\n".join(upstream_log(router, name)))
    return [(int(free), int(target)) for free, target in found]


def offloaded(router: RunningRouter, name: str) -> list[str]:
    return re.findall(r"offloaded (\d+/\d+) layers", "\n".join(upstream_log(router, name)))


async def models(router: RunningRouter) -> dict[str, dict[str, Any]]:
    async with router.session.get("/v1/models") as response:
        return {entry["id"]: entry for entry in (await response.json())["data"]}


# ---------------------------------------------------------------------------------------------- the rule


def test_fit_target_keeps_free_the_headroom_and_what_neighbours_have_not_taken_yet() -> None:
    loading = Claim({"gpu0": 8 * GIB, "gpu1": 2 * GIB}, held=None, loaded=False)
    loaded = Claim({"gpu0": 6 * GIB}, held=None, loaded=True)  # no driver figure: taken, as planned
    partly = Claim({"gpu0": 6 * GIB}, held={"gpu0": 5 * GIB}, loaded=False)
    assert fit_target("gpu0", HEADROOM, []) == HEADROOM
    assert fit_target("gpu0", HEADROOM, [loading]) == HEADROOM + 8 * GIB
    assert fit_target("gpu1", HEADROOM, [loading]) == HEADROOM + 2 * GIB
    assert fit_target("gpu0", HEADROOM, [loaded]) == HEADROOM
    assert fit_target("gpu0", HEADROOM, [partly, loaded, loading]) == HEADROOM + GIB + 8 * GIB


def test_fit_args_fix_the_context_and_give_each_visible_gpu_its_target(
    tmp_path: Path, tiny_models: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    model = str(tiny_models[0])
    profiles = {
        "unset": {"model": model},
        "split": {"model": model, "args": ["-np", "2"]},
        "set": {"model": model, "args": ["-c", "4096"]},
        "zero": {"model": model, "args": ["-c", "0"]},
        "no-fit": {"model": model, "args": ["--fit", "off"]},
        "second-first": {"model": model, "env": {"CUDA_VISIBLE_DEVICES": "1,0"}},
    }
    path = tmp_path / "profiles.yaml"
    path.write_text(json.dumps({"profiles": profiles}))
    config = load_config(path)
    devices = [Device("gpu0", 24 * GIB, 23 * GIB, "nvml"), Device("gpu1", 24 * GIB, 23 * GIB, "nvml")]
    others = [Claim({"gpu1": 4 * GIB}, held=None, loaded=False)]

    def args(name: str) -> list[str]:
        return fit_args(config.profiles[name], devices, HEADROOM, others)

    # The training length (8192) is the context llama-server would choose; now it is said.
    assert args("unset") == ["-c", "8192", "--fit-target", "512,4608"]
    assert args("split")[:2] == ["-c", "16384"], "two slots of their own, the whole length each"
    assert args("set") == ["--fit-target", "512,4608"]
    assert args("zero")[:2] == ["-c", "8192"]
    assert args("no-fit") == ["-c", "8192"]
    assert args("second-first") == ["-c", "8192", "--fit-target", "4608,512"], "CUDA0 is gpu1 there"


# ---------------------------------------------------------------------------------------------- end to end


async def test_the_window_a_client_is_told_is_the_window_it_gets_when_free_memory_is_short(
    start_router: RouterFactory, tiny_models: tuple[Path, Path], nvidia: MachineFactory
) -> None:
    root = nvidia(GPU_MIB).parent
    foreign_use(root, 20000)  # 4.5 GB free: --fit would shrink an unset context to fit
    profile = fake_profile(tiny_models[0], "--nvml-mib", "0=6000", "--layers", "10")
    router = await start_router({"m": profile})
    told = (await models(router))["m"]["context_length"]
    assert told == 8192
    status, body = await router.chat("m")
    assert status == 200, body

    async def window_from_props() -> bool:
        return bool((await models(router))["m"]["context"]["source"] == "props")

    await wait_until(window_from_props, what="the window llama-server reports on /props")
    assert (await models(router))["m"]["context_length"] == told, "the planned context, not one --fit chose"
    assert not any("context size reduced" in line for line in upstream_log(router, "m"))
    assert offloaded(router, "m") == ["6/10"], "--fit made room by moving layers, not by a smaller window"


async def test_a_loading_neighbours_share_stays_free_for_it(
    start_router: RouterFactory, tiny_models: tuple[Path, Path], nvidia: MachineFactory, tmp_path: Path
) -> None:
    root = nvidia(GPU_MIB).parent
    foreign_use(root, 3300)  # a job the router does not know of: 21264 MiB free
    # a is promised 12000 MiB and takes it 2 s into its load; b takes 11000 MiB at once.
    slow = fake_profile(
        tiny_models[0], "--nvml-mib", "0=12000", "--alloc-delay", "2", "--layers", "10", "--oom-if-short"
    )
    quick = fake_profile(tiny_models[1], "--nvml-mib", "0=11000", "--layers", "10", "--oom-if-short")
    router = await start_router({"a": {**slow, "footprint": {"gpu0": 12000}}, "b": quick})
    a_done = asyncio.ensure_future(router.chat("a"))
    await wait_until(lambda: router.controller.view("a").state.value == "starting", what="a loading")
    status, body = await router.chat("b")
    assert status == 200, body
    status, body = await a_done
    assert status == 200, ("a found the memory it was promised", body)
    ((free, target),) = fit_lines(router, "b")
    assert target == 512 + 12000, "b's --fit kept a's promise and the headroom free"
    assert free == GPU_MIB - 3300
    assert offloaded(router, "b") == ["7/10"], "b shrank to what is left, as --fit does"

    # Learned under that neighbour, b's footprint would be 7/10 of it: it is not learned.
    saved = tmp_path / "state" / "footprints.json"
    assert "b" not in (json.loads(saved.read_text()) if saved.exists() else {})
    # Alone, b takes what it takes, and that is what is learned.
    router.controller.unload("a")
    router.controller.unload("b")
    await wait_until(lambda: router.controller.view("b").state.value == "cold", what="b unloaded")
    await wait_until(lambda: router.controller.view("a").state.value == "cold", what="a unloaded")
    status, body = await router.chat("b")
    assert status == 200, body
    assert offloaded(router, "b")[-1] == "10/10"
    await wait_until(lambda: router.controller.view("b").footprint.get("gpu0") == 11000 * MIB, what="learned")


# ---------------------------------------------------------------------------------------------- the driver


def swapping(model: Path, *flags: str) -> dict[str, Any]:
    """A model that takes 14000 MiB of the 24 GB GPU: two cannot stay together."""
    profile = fake_profile(model, "--nvml-mib", "0=14000", "--layers", "10", "--oom-if-short", *flags)
    return {**profile, "footprint": {"gpu0": 14000}}


async def test_a_swap_waits_until_the_slow_driver_reports_the_stopped_models_memory_free(
    start_router: RouterFactory,
    tiny_models: tuple[Path, Path],
    nvidia: MachineFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    nvidia(GPU_MIB, release_delay=1.5)
    router = await start_router({"a": swapping(tiny_models[0]), "b": swapping(tiny_models[1])})
    assert (await router.chat("a"))[0] == 200
    with caplog.at_level(logging.INFO, logger="llama_router.release"):
        status, body = await router.chat("b")
    assert status == 200, body
    ((free, _),) = fit_lines(router, "b")
    assert free == GPU_MIB - 300, "b started once the driver had a's memory back"
    assert offloaded(router, "b") == ["10/10"]
    (slow,) = [record.getMessage() for record in caplog.records if "driver took" in record.getMessage()]
    waited = float(re.search(r"took ([\d.]+)s", slow).group(1))  # type: ignore[union-attr]
    assert waited >= 1.0, slow


async def test_without_the_wait_the_next_load_finds_the_memory_still_held(
    start_router: RouterFactory, tiny_models: tuple[Path, Path], nvidia: MachineFactory
) -> None:
    nvidia(GPU_MIB, release_delay=60)
    memory = {"release_wait": 0}
    flags = ("-ngl", "99")  # --fit may not move layers: the load fails for memory instead
    profiles = {"a": swapping(tiny_models[0], *flags), "b": swapping(tiny_models[1], *flags)}
    router = await start_router(profiles, memory=memory)
    assert (await router.chat("a"))[0] == 200
    status, body = await router.chat("b")
    assert (status, body["error"]["code"]) == (503, "model_load_failed")
    frees = [free for free, _ in fit_lines(router, "b")]
    assert len(frees) >= 2, "the load was retried after running out of memory"
    assert set(frees) == {GPU_MIB - 300 - 14000}, "every load of b saw a's memory still held"


async def test_a_load_that_fails_for_memory_after_the_wait_is_retried_once_and_loads(
    start_router: RouterFactory,
    tiny_models: tuple[Path, Path],
    nvidia: MachineFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    nvidia(GPU_MIB, release_delay=1.0)
    marker = tmp_path / "b-ran-out-once"
    profiles = {
        "a": swapping(tiny_models[0]),
        "b": swapping(tiny_models[1], "--oom-once", str(marker)),
    }
    router = await start_router(profiles)
    assert (await router.chat("a"))[0] == 200
    with caplog.at_level(logging.INFO, logger="llama_router.release"):
        status, body = await router.chat("b")
    assert status == 200, body
    assert marker.exists(), "b's first load ran out of memory"
    assert router.controller.view("b").starts == 2, "retried once"
    assert [free for free, _ in fit_lines(router, "b")] == [GPU_MIB - 300] * 2
    assert any("driver took" in record.getMessage() for record in caplog.records)
