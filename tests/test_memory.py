"""Memory-aware residency end to end: fake upstreams that declare sizes against a configured budget;
the estimate's placement of a MoE model's experts per `--cpu-moe`, `--n-cpu-moe` and `-ot`; the KV
cache of sliding-window attention layers sized as llama.cpp sizes it."""

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

from llama_router.cli import main
from llama_router.sizing.context_window import total_context
from llama_router.sizing.footprint import GPU_MARGIN, RAM_MARGIN, _estimate_from_header, compute_buffer
from llama_router.sizing.gguf import read_header
from llama_router.sizing.memory import MIB

from .conftest import (
    RouterFactory,
    RunningRouter,
    assert_openai_error,
    fake_profile,
    upstream_processes,
    wait_until,
)


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
    assert_openai_error(body, "model_too_large")
    assert body["error"]["message"] == (
        "model 'big' needs ram 500 MiB: more than the budget (ram 1000 MiB) leaves beside pinned "
        "models; resident now: 'pin' (pinned) ram 600 MiB"
    ), "sizes per device in MiB or GiB, the budget, and what is resident"
    assert set(await running(router)) == {"pin"}


async def test_learned_footprint_replaces_the_estimate_and_survives_a_restart(
    start_router: RouterFactory, dummy_model: Path, tmp_path: Path
) -> None:
    profiles = {"m": fake_profile(dummy_model, "--memory-mib", "300")}
    state = tmp_path / "learned"
    router = await start_router(profiles, state_dir=str(state))
    estimate = router.controller.view("m").footprint["ram"]
    assert (await router.chat("m"))[0] == 200
    await wait_until(lambda: (state / "footprints.json").exists(), what="the learned footprint to be saved")
    learned = router.controller.view("m").footprint["ram"]
    assert learned != estimate
    assert 300 * MIB <= learned < 400 * MIB
    saved = json.loads((state / "footprints.json").read_text())
    assert saved["m"]["footprint"]["ram"] == learned
    await router.close()
    again = await start_router(profiles, state_dir=str(state))
    assert again.controller.view("m").footprint["ram"] == learned


async def test_standby_profile_is_preloaded_and_yields_to_real_demand(
    start_router: RouterFactory, dummy_model: Path
) -> None:
    router = await start_router(
        {"warm": sized(dummy_model, 600, standby=True), "other": sized(dummy_model, 600)},
        memory={"ram": 1000},
    )
    await wait_until(lambda: router.controller.view("warm").standby, what="the standby preload")
    async with router.session.get("/v1/models") as response:
        states = {entry["id"]: entry["status"] for entry in (await response.json())["data"]}
    assert states["warm"] == {"value": "loaded", "detail": "standby"}
    assert (await router.chat("other"))[0] == 200  # the standby model gives way
    assert set(await running(router)) == {"other"}
    assert len(upstream_processes()) == 1


async def test_ttl_unloads_an_idle_model(start_router: RouterFactory, dummy_model: Path) -> None:
    router = await start_router({"short": fake_profile(dummy_model, ttl=0.3)})
    events: list[dict[str, Any]] = []
    router.controller.events.subscribe(lambda event: events.append(event.json()))
    assert (await router.chat("short"))[0] == 200
    view = router.controller.view
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
    assert on_cpu["gpu0"] == GPU_MARGIN + MIB + compute(moe_model, "-c", "512", output=False)


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
    # the margin and the compute buffer, plus a few KiB of attention and norms, less than a MiB
    margin = (GPU_MARGIN + compute(moe_model, "-c", "512")) // MIB
    budget_mib = margin + 4  # room for the margin, the compute buffer and all but the 12 MiB of experts
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
    assert int(shown["moe"]) - margin in (0, 1), shown
    assert int(shown["all-on-gpu"]) - int(shown["moe"]) == 12, "check leaves out the experts"

    router = await start_router(profiles, memory=memory)
    status, body = await router.chat("all-on-gpu")
    assert status == 503, body
    assert_openai_error(body, "model_too_large", status=status)
    assert (await router.chat("moe"))[0] == 200


# ------------------------------------------------------------------------- sliding-window attention KV

SWA_LAYERS = 12
SWA_CTX = 32768
WINDOW = 512
# One KV cell of one layer: 2 KV heads x (64 key + 64 value) dims x 2 bytes (f16).
CELL_BYTES = 2 * (64 + 64) * 2
# Gemma 3 attends to the whole context in every 6th layer (5 and 11 here), to the window elsewhere.
DENSE_LAYERS, SWA_LAYER_COUNT = 2, 10


def write_swa_model(
    path: Path, arch: str = "gemma3", window: int | None = WINDOW, pattern: int | list[bool] | None = None
) -> Path:
    """A GGUF shaped like a small Gemma 3: 12 layers, 2 KV heads of 64 dims, a 512-token window."""
    writer = GGUFWriter(path, arch)
    writer.add_context_length(131072)
    writer.add_embedding_length(256)
    writer.add_block_count(SWA_LAYERS)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_key_length(64)
    writer.add_value_length(64)
    if window is not None:
        writer.add_sliding_window(window)
    if pattern is not None:
        writer.add_sliding_window_pattern(pattern)
    writer.add_tensor("token_embd.weight", np.zeros((64, 16), np.float32))
    for i in range(SWA_LAYERS):
        for name in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_up", "ffn_down"):
            writer.add_tensor(f"blk.{i}.{name}.weight", np.zeros((16, 16), np.float32))
    writer.add_tensor("output_norm.weight", np.zeros(16, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def swa_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_swa_model(tmp_path_factory.mktemp("swa") / "tiny-gemma3.gguf")


def weights(model: Path, layers: Sequence[int] | None = None) -> int:
    tensors = read_header(model).tensors
    return sum(
        t.nbytes for t in tensors if layers is None or any(t.name.startswith(f"blk.{i}.") for i in layers)
    )


def kv_in_ram(model: Path, *args: str, env: dict[str, str] | None = None) -> int:
    """The KV bytes of an estimate with no GPU: what it puts in RAM beyond the weights and margin."""
    footprint = _estimate_from_header(read_header(model), ["-c", str(SWA_CTX), *args], env or {}, ())
    return footprint["ram"] - weights(model) - RAM_MARGIN - compute(model, "-c", str(SWA_CTX), *args, env=env)


def compute(model: Path, *args: str, env: dict[str, str] | None = None, output: bool = True) -> int:
    """The compute buffer an estimate counts for these arguments (tests/test_compute_estimate.py
    checks it against real logs); here it is taken out to see the KV cache alone."""
    header = read_header(model)
    context = total_context(args, env or {}, header.arch_value("context_length"))
    assert context is not None
    return compute_buffer(header, args, env or {}, context, output=output)


def kv(context: int, swa_cells: int, dense: int = DENSE_LAYERS, swa: int = SWA_LAYER_COUNT) -> int:
    return (dense * context + swa * swa_cells) * CELL_BYTES


@pytest.mark.parametrize(
    ("args", "context", "swa_cells"),
    [
        # llama-server's default: 4 slots sharing one cache, `n_swa * 4 + n_ubatch` cells (-ub 512)
        ([], SWA_CTX, 4 * WINDOW + 512),
        (["-np", "1"], SWA_CTX, WINDOW + 512),
        (["-np", "2", "--kv-unified"], SWA_CTX, 2 * WINDOW + 512),
        # two slots, a stream each: min(n_ctx/2, n_swa + n_ubatch) cells per stream
        (["--parallel=2"], SWA_CTX, 2 * (WINDOW + 512)),
        (["-np", "2", "-kvu", "-no-kvu"], SWA_CTX, 2 * (WINDOW + 512)),
        # padded to a multiple of 256 cells: 4 * 512 + 1000 = 3048 -> 3072
        (["-ub", "1000"], SWA_CTX, 3072),
        (["-ub", "4096"], SWA_CTX, 4 * WINDOW + 2048),  # the micro-batch is capped by -b (2048)
        # never more than the context, which llama.cpp pads to 256 cells (every layer): 2000 -> 2048
        (["-c", "2000"], 2048, 2048),
    ],
)
def test_sliding_window_layers_keep_llama_cpps_swa_cache_not_the_context(
    swa_model: Path, args: list[str], context: int, swa_cells: int
) -> None:
    assert kv_in_ram(swa_model, *args) == kv(context, swa_cells)


def test_the_swa_settings_also_come_from_llama_arg_variables(swa_model: Path) -> None:
    assert kv_in_ram(swa_model, env={"LLAMA_ARG_N_PARALLEL": "1"}) == kv(SWA_CTX, WINDOW + 512)
    # the flag wins: 4 slots, a stream each (no -kvu), min(32768 / 4, 512 + 512) cells per stream
    assert kv_in_ram(swa_model, "-np", "4", env={"LLAMA_ARG_N_PARALLEL": "1"}) == kv(SWA_CTX, 4 * 1024)


def test_offloaded_layers_take_their_own_kv_to_the_gpu(swa_model: Path) -> None:
    header = read_header(swa_model)
    footprint = _estimate_from_header(header, ["-c", str(SWA_CTX), "-ngl", "3"], {}, ("gpu0",))
    # Layers 9-11 on the GPU: one dense (11), two sliding-window; layers 0-8 in RAM: one dense (5).
    swa_cells = 4 * WINDOW + 512
    on_gpu = footprint["gpu0"] - GPU_MARGIN - compute(swa_model, "-c", str(SWA_CTX), output=False)
    assert on_gpu - weights(swa_model, [9, 10, 11]) == kv(SWA_CTX, swa_cells, 1, 2)
    in_ram = footprint["ram"] - RAM_MARGIN - (weights(swa_model) - weights(swa_model, [9, 10, 11]))
    assert in_ram == kv(SWA_CTX, swa_cells, 1, 8)


@pytest.mark.parametrize(
    ("args", "env"),
    [(["--swa-full"], {}), (["-np", "1", "--swa-full"], {}), ([], {"LLAMA_ARG_SWA_FULL": "1"})],
)
def test_swa_full_sizes_every_layer_for_the_whole_context(
    swa_model: Path, args: list[str], env: dict[str, str]
) -> None:
    assert kv_in_ram(swa_model, *args, env=env) == SWA_LAYERS * SWA_CTX * CELL_BYTES


@pytest.mark.parametrize(
    ("arch", "metadata"),
    [
        ("llama", {}),
        ("phi3", {}),  # has the key, but llama.cpp turns Phi-3's sliding window off
        ("gemma3", {"window": 0}),
        ("gemma3", {"window": None}),
        ("gemma3", {"pattern": [True] * (SWA_LAYERS - 1)}),  # not one flag per layer
    ],
)
def test_models_without_a_usable_sliding_window_keep_the_full_context(
    tmp_path: Path, arch: str, metadata: dict[str, Any]
) -> None:
    model = write_swa_model(tmp_path / "model.gguf", arch, **metadata)
    assert kv_in_ram(model) == SWA_LAYERS * SWA_CTX * CELL_BYTES


@pytest.mark.parametrize(
    ("arch", "metadata", "dense", "window"),
    [
        ("gpt-oss", {}, 6, WINDOW),  # every 2nd layer dense
        ("cohere2", {}, 3, WINDOW),  # every 4th
        ("gemma2", {"window": None}, 6, 4096),  # Gemma 2's window when the GGUF names none
        ("llama4", {}, 3, 8192),  # chunked attention: 8192 whatever the key says
        ("smallthinker", {}, 3, 4096),  # layers 0, 4, 8 dense
        ("gemma3", {"pattern": 3}, 4, WINDOW),  # the GGUF's own period
        ("gemma3", {"pattern": [i % 2 == 0 for i in range(SWA_LAYERS)]}, 6, WINDOW),  # per-layer flags
    ],
)
def test_each_covered_architecture_follows_its_llama_cpp_layer_pattern(
    tmp_path: Path, arch: str, metadata: dict[str, Any], dense: int, window: int
) -> None:
    model = write_swa_model(tmp_path / "model.gguf", arch, **metadata)
    context = 65536  # above Llama 4's 4 * 8192 + 512 cells
    assert kv_in_ram(model, "-c", str(context)) == kv(context, 4 * window + 512, dense, SWA_LAYERS - dense)


async def test_a_long_context_gemma3_profile_fits_a_gpu_that_only_holds_its_swa_cache(
    start_router: RouterFactory, swa_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    full_mib = SWA_LAYERS * SWA_CTX * CELL_BYTES // MIB  # 192 MiB at full context in every layer
    swa_mib = kv(SWA_CTX, 4 * WINDOW + 512) // MIB  # 44.5 MiB as llama.cpp sizes it
    fixed_mib = (GPU_MARGIN + compute(swa_model, "-c", str(SWA_CTX))) // MIB  # margin and compute buffer
    budget_mib = fixed_mib + 64
    assert fixed_mib + swa_mib + 2 < budget_mib < fixed_mib + full_mib
    memory = {"gpus": [budget_mib], "ram": 4096, "nvml": False}
    profiles = {
        "swa": fake_profile(swa_model, "-c", str(SWA_CTX)),
        "swa-full": fake_profile(swa_model, "-c", str(SWA_CTX), "--swa-full"),
    }
    path = tmp_path / "check.yaml"
    state = str(tmp_path / "state")
    path.write_text(yaml.safe_dump({"server": {"memory": memory, "state_dir": state}, "profiles": profiles}))
    assert main(["check", "-c", str(path)]) == 0
    shown = dict(re.findall(r"^- (\S+).*?memory:\s+gpu0 (\d+) MiB", capsys.readouterr().out, re.M | re.S))
    assert int(shown["swa"]) < budget_mib < int(shown["swa-full"]), shown

    router = await start_router(profiles, memory=memory)
    status, body = await router.chat("swa-full")
    assert status == 503, body
    assert_openai_error(body, "model_too_large", status=status)
    assert (await router.chat("swa"))[0] == 200
