"""llama.cpp RPC workers: a model split across `rpc-server` processes, each leased to one model.

The end-to-end tests run real `rpc-server` workers (built with llama-server by
scripts/install/install_llama_server.py) on 127.0.0.1 and a real llama-server on a tiny model; the leasing
rule itself is tested without processes in tests/test_scheduler_leases.py."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from llama_router.config.addresses import parse_worker
from llama_router.config.schema import ConfigError, load_config
from llama_router.core.events import Event, Loading, Stopped
from llama_router.sizing.buffer_log import BufferTally
from llama_router.sizing.context_window import total_context
from llama_router.sizing.footprint import GPU_MARGIN, RAM_MARGIN, compute_buffer, estimate
from llama_router.sizing.gguf import read_header
from llama_router.sizing.memory import MIB, Device, rpc_devices
from tests.conftest import ROOT, RouterFactory, assert_openai_error, wait_until
from tests.router_process import accepts_connections, free_port

WORKER = "127.0.0.1:50052"


def write(path: Path, profiles: dict[str, Any], **server: Any) -> Path:
    server.setdefault("state_dir", str(path.parent / "state"))
    path.write_text(yaml.safe_dump({"server": server, "profiles": profiles}))
    return path


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("worker", "expected"),
    [("10.0.0.2:50052", ("10.0.0.2", 50052)), ("[::1]:50052", ("::1", 50052)), ("box:1", ("box", 1))],
)
def test_worker_addresses_are_host_and_port(worker: str, expected: tuple[str, int]) -> None:
    assert parse_worker(worker) == expected


@pytest.mark.parametrize("worker", ["10.0.0.2", ":50052", "box:0", "box:port", "::1:50052", "box:70000"])
def test_a_worker_address_without_a_usable_port_is_refused(worker: str) -> None:
    with pytest.raises(ValueError, match=r"host:port|in brackets"):
        parse_worker(worker)


@pytest.mark.parametrize(
    ("profile", "memory", "problem"),
    [
        (
            {"rpc": [WORKER]},
            {},
            f"profiles.big.rpc: worker '{WORKER}' has no budget; add it to server.memory.rpc",
        ),
        ({"rpc": ["10.0.0.2"]}, {}, "profiles.big.rpc: Value error, '10.0.0.2': expected host:port"),
        ({"rpc": [WORKER, WORKER]}, {"rpc": {WORKER: 100}}, "a worker is listed twice"),
        ({"args": ["--rpc", WORKER]}, {}, "list the RPC workers under 'rpc:'"),
        ({}, {"rpc": {"nowhere": 100}}, "server.memory.rpc: Value error, 'nowhere': expected host:port"),
    ],
)
def test_rpc_config_errors_name_the_key_and_the_problem(
    tmp_path: Path, dummy_model: Path, profile: dict[str, Any], memory: dict[str, Any], problem: str
) -> None:
    path = write(tmp_path / "profiles.yaml", {"big": {"model": str(dummy_model), **profile}}, memory=memory)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(path) in str(caught.value)
    assert problem.replace("Value error, ", "") in str(caught.value)


def test_the_router_adds_rpc_to_the_command_line(tmp_path: Path, dummy_model: Path) -> None:
    path = write(
        tmp_path / "profiles.yaml",
        {
            "big": {
                "model": str(dummy_model),
                "rpc": [WORKER, "10.0.0.3:50052"],
                "footprint": {f"rpc:{WORKER}": 5},
            }
        },
        memory={"rpc": {WORKER: 100, "10.0.0.3:50052": 100}},
    )
    profile = load_config(path).profiles["big"]
    command = profile.command("127.0.0.1", 1234)
    assert command[command.index("--rpc") + 1] == f"{WORKER},10.0.0.3:50052"


# ---------------------------------------------------------------------------------------------- footprints


def test_the_estimate_puts_the_offloaded_layers_on_the_workers(
    tmp_path: Path, tiny_models: tuple[Path, Path]
) -> None:
    workers = {WORKER: 1000, "127.0.0.1:50053": 1000}
    path = write(
        tmp_path / "profiles.yaml",
        {
            "split": {"model": str(tiny_models[0]), "rpc": list(workers), "args": ["-ngl", "99"]},
            "local": {"model": str(tiny_models[0]), "args": ["-ngl", "99"]},
        },
        memory={"rpc": workers},
    )
    config = load_config(path)
    devices = [Device("ram", 8000 * MIB, 8000 * MIB, "config"), *rpc_devices(workers)]
    split = estimate(config.profiles["split"], devices)
    alone = estimate(config.profiles["local"], devices)
    # On a machine without GPUs, every layer stays in RAM unless workers take them: equal shares.
    first, second = f"rpc:{WORKER}", "rpc:127.0.0.1:50053"
    assert set(split) == {"ram", first, second}
    header, args = read_header(tiny_models[0]), config.profiles["split"].args
    context = total_context(args, {}, header.arch_value("context_length"))
    assert context is not None
    # Each worker holds half the layers and a compute buffer; the last one the output layer too.
    layers = compute_buffer(header, args, {}, context, output=False)
    last = compute_buffer(header, args, {}, context, output=True)
    assert split[first] - layers == split[second] - last > GPU_MARGIN
    assert split["ram"] < alone["ram"]
    assert set(alone) == {"ram"}
    placed = split[first] - layers + split[second] - last - 2 * GPU_MARGIN + split["ram"] - RAM_MARGIN
    assert placed <= alone["ram"] - RAM_MARGIN - last


def test_a_workers_buffers_are_learned_on_its_device() -> None:
    devices = [Device("ram", 8000 * MIB, 8000 * MIB, "config"), *rpc_devices({WORKER: 1000})]
    tally = BufferTally(devices)
    for line in (
        f"load_tensors: RPC0[{WORKER}] model buffer size =    12.50 MiB",
        "load_tensors:   CPU_Mapped model buffer size =     1.00 MiB",
        f"llama_kv_cache: RPC0[{WORKER}] KV buffer size =     4.00 MiB",
        "load_tensors: RPC1[10.9.9.9:1] model buffer size =     7.00 MiB",  # a worker with no budget
    ):
        tally.feed(line)
    assert tally.footprint() == {f"rpc:{WORKER}": int(16.5 * MIB) + GPU_MARGIN, "ram": MIB + RAM_MARGIN}


# ---------------------------------------------------------------------------------------------- real workers


def rpc_server_binary() -> Path:
    found = shutil.which("rpc-server") or str(Path(sys.executable).parent / "rpc-server")
    if not os.access(found, os.X_OK):
        pytest.fail("no rpc-server: run `make setup` (scripts/install/install_llama_server.py builds it)")
    return Path(found)


StartWorker = Callable[[], Awaitable[str]]


@pytest.fixture
async def workers() -> AsyncIterator[StartWorker]:
    """Start real rpc-server workers on 127.0.0.1 (returns each one's address); killed at the end."""
    binary = rpc_server_binary()
    processes: list[asyncio.subprocess.Process] = []

    async def start() -> str:
        port = free_port()
        process = await asyncio.create_subprocess_exec(
            str(binary), "-H", "127.0.0.1", "-p", str(port), "-t", "1",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        processes.append(process)
        await wait_until(lambda: accepts_connections(port), timeout=20, what="rpc-server to listen")
        return f"127.0.0.1:{port}"

    yield start
    for process in processes:
        if process.returncode is None:
            process.kill()
        await process.wait()


def split_profile(model: Path, llama_server: Path, *workers: str) -> dict[str, Any]:
    return {
        "model": str(model),
        "binary": str(llama_server),
        "rpc": list(workers),
        "args": ["-ngl", "99", "--ctx-size", "512", "--parallel", "1", "--no-warmup"],
        "load_timeout": 60,
    }


async def test_a_model_split_over_a_real_worker_answers_and_its_use_there_is_learned(
    start_router: RouterFactory, workers: StartWorker, tiny_models: tuple[Path, Path], llama_server: Path
) -> None:
    worker = await workers()
    router = await start_router(
        {"split": split_profile(tiny_models[0], llama_server, worker)}, memory={"rpc": {worker: 2000}}
    )
    status, answer = await router.chat("split")
    assert status == 200, answer
    assert answer["model"] == "split"
    device = f"rpc:{worker}"
    await wait_until(
        lambda: router.controller.view("split").footprint.get(device, 0) > GPU_MARGIN, what="learning"
    )
    async with router.session.get("/running") as response:
        running = await response.json()
    assert running["budgets"][device]["budget"] == 2000 * MIB
    assert running["budgets"][device]["used"] == router.controller.view("split").footprint[device]
    assert any(f"RPC0[{worker}]" in line for line in router.controller.logs["split"])


async def test_two_models_on_one_worker_take_turns_the_old_one_stops_first(
    start_router: RouterFactory, workers: StartWorker, tiny_models: tuple[Path, Path], llama_server: Path
) -> None:
    worker = await workers()
    model_a, model_b = tiny_models
    router = await start_router(
        {
            "first": split_profile(model_a, llama_server, worker),
            "second": split_profile(model_b, llama_server, worker),
        },
        memory={"rpc": {worker: 2000}},
    )
    events: list[Event] = []
    router.controller.events.subscribe(events.append)
    for name in ("first", "second", "first"):
        status, answer = await router.chat(name)
        assert status == 200, answer
    lifecycle = [
        (type(event).__name__, event.model) for event in events if isinstance(event, (Loading, Stopped))
    ]
    assert lifecycle == [
        ("Loading", "first"),
        ("Stopped", "first"),
        ("Loading", "second"),
        ("Stopped", "second"),
        ("Loading", "first"),
    ]


async def test_a_worker_that_does_not_answer_fails_the_load_with_its_address(
    start_router: RouterFactory, tiny_models: tuple[Path, Path], llama_server: Path
) -> None:
    worker = f"127.0.0.1:{free_port()}"
    router = await start_router(
        {"split": split_profile(tiny_models[0], llama_server, worker)}, memory={"rpc": {worker: 2000}}
    )
    status, answer = await router.chat("split")
    assert status == 503
    assert_openai_error(answer, "model_load_failed")
    assert f"rpc worker {worker} does not answer: connection refused" in answer["error"]["message"]
    assert not router.controller.upstreams  # no llama-server was started for it


async def test_check_shows_each_worker_and_whether_it_answers(
    tmp_path: Path, workers: StartWorker, tiny_models: tuple[Path, Path], llama_server: Path
) -> None:
    live, dead = await workers(), f"127.0.0.1:{free_port()}"
    path = write(
        tmp_path / "profiles.yaml",
        {"split": split_profile(tiny_models[0], llama_server, live, dead)},
        memory={"rpc": {live: 2000, dead: 1000}},
    )
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "llama_router", "check", "-c", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any(
        live in line and "2000 MiB" in line and "for split" in line and "answers (" in line for line in lines
    )
    assert any(dead in line and "does not answer: connection refused" in line for line in lines)
    assert any(line.strip() == f"rpc:     {live}, {dead}" for line in lines)
