"""Memory-aware residency end to end: fake upstreams that declare sizes against a configured budget;
the estimate's placement of a MoE model's experts per `--cpu-moe`, `--n-cpu-moe` and `-ot`."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import yaml
from gguf import GGUFWriter

from router.cli import main
from router.footprint import GPU_MARGIN, _estimate_from_header
from router.gguf import read_header
from router.memory import MIB

from .conftest import RouterFactory, RunningRouter, fake_profile, upstream_processes, wait_until


def sized(model: Path, mib: int, **extra: Any) -> dict[str, Any]:
    return fake_profile(model, footprint={"ram": mib}, **extra)


async def running(router: RunningRouter) -> dict[str, dict[str, Any]]:
    async with router.session.get("/running") as response:
        assert response.status == 200
        return {row["model"]: row for row in (await response.json())["running"]}


async def test_models_that_fit_stay_resident_and_only_the_lru_one_is_evicted(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router(
        {name: sized(dummy_model, 400) for name in ("a", "b", "c")}, memory={"ram": 1000}
    )
    for name in ("a", "b", "a"):
        assert (await router.chat(name))[0] == 200
    rows = await running(router)
    assert set(rows) == {"a", "b"}
    assert rows["a"]["footprint"] == {"ram": 400 * MIB}
    pids = {name: row["pid"] for name, row in rows.items()}
    assert (await router.chat("c"))[0] == 200
    rows = await running(router)
    assert set(rows) == {"a", "c"}, "the least recently used model ('b') made room"
    assert rows["a"]["pid"] == pids["a"], "the model that still fits kept running"
    assert not psutil.pid_exists(pids["b"]) or psutil.Process(pids["b"]).status() == psutil.STATUS_ZOMBIE


async def test_pinned_model_stays_and_an_oversized_model_is_refused_with_a_reason(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router(
        {"pin": sized(dummy_model, 600, pinned=True), "big": sized(dummy_model, 500)},
        memory={"ram": 1000},
    )
    assert (await router.chat("pin"))[0] == 200
    status, body = await router.chat("big")
    assert status == 503
    assert body["error"]["code"] == "model_too_large"
    assert "pinned" in body["error"]["message"]
    assert set(await running(router)) == {"pin"}


async def test_learned_footprint_replaces_the_estimate_and_survives_a_restart(
    start_router: RouterFactory, dummy_model: Path, tmp_path: Path
) -> None:
    profiles = {"m": fake_profile(dummy_model, "--memory-mib", "300")}
    state = tmp_path / "learned"
    router = await start_router(profiles, state_dir=str(state))
    estimate = router.controller.scheduler.view("m").footprint["ram"]
    assert (await router.chat("m"))[0] == 200
    await wait_until(lambda: (state / "footprints.json").exists(), what="the learned footprint to be saved")
    learned = router.controller.scheduler.view("m").footprint["ram"]
    assert learned != estimate
    assert 300 * MIB <= learned < 400 * MIB
    saved = json.loads((state / "footprints.json").read_text())
    assert saved["m"]["footprint"]["ram"] == learned
    await router.close()
    again = await start_router(profiles, state_dir=str(state))
    assert again.controller.scheduler.view("m").footprint["ram"] == learned


async def test_standby_profile_is_preloaded_and_yields_to_real_demand(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router(
        {"warm": sized(dummy_model, 600, standby=True), "other": sized(dummy_model, 600)},
        memory={"ram": 1000},
    )
    await wait_until(lambda: router.controller.scheduler.view("warm").standby, what="the standby preload")
    async with router.session.get("/v1/models") as response:
        states = {entry["id"]: entry["status"]["value"] for entry in (await response.json())["data"]}
    assert states["warm"] == "standby"
    assert (await router.chat("other"))[0] == 200  # the standby model gives way
    assert set(await running(router)) == {"other"}
    assert len(upstream_processes()) == 1


async def test_ttl_unloads_an_idle_model(start_router: RouterFactory, dummy_model: Path) -> None:
    router = await start_router({"short": fake_profile(dummy_model, ttl=0.3)})
    events: list[dict[str, Any]] = []
    router.controller.subscribe(events.append)
    assert (await router.chat("short"))[0] == 200
    view = router.controller.scheduler.view
    await wait_until(lambda: view("short").state.value == "cold", what="the ttl to unload the model")
    assert await running(router) == {}
    assert not upstream_processes()
    ready = next(event for event in events if event["event"] == "ready")
    stopping = next(event for event in events if event["event"] == "stopping")
    assert stopping["cause"] == "ttl"
    assert stopping["time"] - ready["time"] >= 0.3, "not before it had been idle for its ttl"


# ---------------------------------------------------------------------------------- MoE expert placement

N_LAYER = 4
EXPERT_KINDS = ("ffn_up_exps", "ffn_down_exps", "ffn_gate_exps")


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A MoE-shaped GGUF: 12 MiB of expert tensors, a few KiB of everything else."""
    path = tmp_path_factory.mktemp("moe") / "tiny-moe.gguf"
    writer = GGUFWriter(path, "qwen3moe")
    writer.add_context_length(4096)
    writer.add_embedding_length(32)
    writer.add_block_count(N_LAYER)
    writer.add_head_count(4)
    writer.add_head_count_kv(4)
    writer.add_tensor("token_embd.weight", np.zeros((64, 32), np.float32))
    for i in range(N_LAYER):
        for name in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate_inp"):
            writer.add_tensor(f"blk.{i}.{name}.weight", np.zeros((32, 32), np.float32))
        for name in EXPERT_KINDS:
            writer.add_tensor(f"blk.{i}.{name}.weight", np.zeros((64, 128, 32), np.float32))  # 1 MiB
    writer.add_tensor("output_norm.weight", np.zeros(32, np.float32))
    writer.add_tensor("output.weight", np.zeros((64, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def experts(model: Path, layers: Sequence[int] = range(N_LAYER)) -> int:
    names = {f"blk.{i}.{kind}.weight" for i in layers for kind in EXPERT_KINDS}
    return sum(tensor.nbytes for tensor in read_header(model).tensors if tensor.name in names)


def placed(model: Path, *args: str, gpus: Sequence[str] = ("gpu0",)) -> dict[str, int]:
    return _estimate_from_header(read_header(model), ["-c", "512", *args], {}, gpus)


@pytest.fixture(autouse=True)
def _all_gpus_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


@pytest.mark.parametrize("flag", ["--cpu-moe", "-cmoe"])
def test_cpu_moe_moves_every_expert_tensor_and_nothing_else_to_ram(moe_model: Path, flag: str) -> None:
    base, moe = placed(moe_model), placed(moe_model, flag)
    moved = experts(moe_model)
    assert moved == 12 * MIB
    assert base["gpu0"] - moe["gpu0"] == moved, "attention, norms and the expert router stay on the GPU"
    assert moe["ram"] - base["ram"] == moved
    assert moe["gpu0"] - GPU_MARGIN > 0


@pytest.mark.parametrize("args", [["--n-cpu-moe", "2"], ["-ncmoe", "2"], ["--n-cpu-moe=2"]])
def test_n_cpu_moe_moves_only_the_experts_of_the_first_layers(moe_model: Path, args: list[str]) -> None:
    base, moe = placed(moe_model), placed(moe_model, *args)
    assert base["gpu0"] - moe["gpu0"] == experts(moe_model, [0, 1]) == 6 * MIB
    assert moe["ram"] - base["ram"] == 6 * MIB


@pytest.mark.parametrize(
    "args",
    [
        ["-ot", r"blk\.[0-1]\.ffn_.*_exps=CPU"],
        ["--override-tensor", r"blk\.0\.ffn_.*_exps=CPU", "-ot", r"blk\.1\.ffn_.*_exps=CPU"],
        [r"--override-tensor=blk\.0\.ffn_.*_exps=CPU,blk\.1\.ffn_.*_exps=CPU"],
    ],
)
def test_override_tensor_patterns_accumulate(moe_model: Path, args: list[str]) -> None:
    moe = placed(moe_model, *args)
    assert moe == placed(moe_model, "--n-cpu-moe", "2")
    assert moe["ram"] - placed(moe_model)["ram"] == 6 * MIB


def test_the_first_matching_override_wins_and_names_a_visible_gpu(moe_model: Path) -> None:
    kept = placed(moe_model, "-ot", r"blk\.0\.ffn_up_exps=CUDA0", "--cpu-moe")
    assert placed(moe_model)["gpu0"] - kept["gpu0"] == 11 * MIB
    two = ("gpu0", "gpu1")
    base, moved = placed(moe_model, gpus=two), placed(moe_model, "-ot", "exps=CUDA1", gpus=two)
    # The layers are split in halves, so gpu0's half of the experts moves to gpu1.
    assert base["gpu0"] - moved["gpu0"] == moved["gpu1"] - base["gpu1"] == 6 * MIB
    assert placed(moe_model, "-ot", "exps=CUDA3", gpus=two) == base, "an unseen GPU leaves -ngl's placement"
    on_cpu = placed(moe_model, "-ngl", "0", "-ot", r"blk\.3\.ffn_up_exps=CUDA0")
    assert on_cpu["gpu0"] == GPU_MARGIN + MIB


def test_unusable_overrides_are_ignored(moe_model: Path, caplog: pytest.LogCaptureFixture) -> None:
    base = placed(moe_model)
    with caplog.at_level(logging.DEBUG, logger="llama_router.footprint"):
        assert placed(moe_model, "-ot", r"blk\.(=CPU", "--n-cpu-moe", "x", "-ot", "exps") == base
        assert placed(moe_model, "-ot", r"blk\.(=CPU,exps=CPU") == placed(moe_model, "--cpu-moe")
    assert "ignoring tensor override 'blk\\\\.('" in caplog.text
    assert "ignoring tensor override 'exps'" in caplog.text


async def test_a_cpu_moe_profile_fits_a_gpu_that_only_holds_the_rest(
    start_router: RouterFactory, moe_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    budget_mib = GPU_MARGIN // MIB + 4  # room for the margin and all but the 12 MiB of experts
    memory = {"gpus": [budget_mib], "ram": 4096, "nvml": False}
    profiles = {
        "moe": fake_profile(moe_model, "--cpu-moe", "-c", "512"),
        "all-on-gpu": fake_profile(moe_model, "-c", "512"),
    }
    path = tmp_path / "check.yaml"
    state = str(tmp_path / "state")
    path.write_text(yaml.safe_dump({"server": {"memory": memory, "state_dir": state}, "profiles": profiles}))
    assert main(["check", "-c", str(path)]) == 0
    shown = dict(re.findall(r"^- (\S+).*?memory:\s+gpu0 (\d+) MiB", capsys.readouterr().out, re.M | re.S))
    margin = GPU_MARGIN // MIB  # plus a few KiB of attention and norms, less than a MiB
    assert shown == {"moe": f"{margin}", "all-on-gpu": f"{margin + 12}"}, "check leaves out the experts"

    router = await start_router(profiles, memory=memory)
    status, body = await router.chat("all-on-gpu")
    assert (status, body["error"]["code"]) == (503, "model_too_large")
    assert (await router.chat("moe"))[0] == 200
