"""The learned footprint of every backend llama.cpp logs: the buffer lines of load logs
(tests/fixtures/llama_logs: `real-*` excerpts of logs people pasted in public issues, each naming its
source; synthetic ones written from llama.cpp's format strings for what no excerpt shows) land on the
router's devices, each file adding up to the totals its header states, read alone and through a
router replaying it; every line is read exactly as llama.cpp's own format strings say."""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from llama_router.config.schema import load_config
from llama_router.sizing.buffer_log import SOURCE_LINES, BufferTally, log_message, parse_buffer_line
from llama_router.sizing.footprint import GPU_MARGIN, RAM_MARGIN, FootprintStore
from llama_router.sizing.memory import MIB, Device

from .conftest import RouterFactory, fake_profile

LOGS = Path(__file__).parent / "fixtures" / "llama_logs"
FIXTURES = sorted(LOGS.glob("*.txt"))

# The LLAMA_LOG_INFO format strings of llama.cpp's buffer lines, copied from its sources: the oracle
# the parser is held to, line by line.
FORMATS = {
    "src/llama-model.cpp (load_tensors)": "%s: %12s model buffer size = %8.2f MiB",
    "llama.cpp before 2025 (llm_load_tensors)": "%s: %10s buffer size = %8.2f MiB",
    "src/llama-kv-cache.cpp (llama_kv_cache, llama_kv_cache_init)": "%s: %10s KV buffer size = %8.2f MiB",
    "src/llama-context.cpp (output)": "%s: %10s  output buffer size = %8.2f MiB",
    "src/llama-context.cpp, tools/mtmd/clip.cpp (compute)": "%s: %10s compute buffer size = %8.2f MiB",
    "src/llama-memory-recurrent.cpp": "%s: %10s RS buffer size = %8.2f MiB",
    "src/llama-adapter.cpp": "%s: %10s LoRA buffer size = %8.2f MiB",
}


def format_pattern(fmt: str) -> re.Pattern[str]:
    """A printf format as a regex: `%s` the function name, `%Ns` the right-aligned buffer name,
    `%8.2f` the MiB; found anywhere after a space, behind whatever relayed the line."""
    pieces = [r"(?:^|(?<=\s))"]
    for token in re.split(r"(%\d*(?:\.\d+)?[sf])", fmt):
        if token == "%s":
            pieces.append(r"\w+")
        elif re.fullmatch(r"%(\d+)s", token):
            width = int(token[1:-1])
            pieces.append(rf"(?P<buffer>(?=.{{{width}}}) *\S+)")
        elif re.fullmatch(r"%\d+\.\d+f", token):
            pieces.append(r" *(?P<mib>\d+\.\d\d)")
        else:
            pieces.append(re.escape(token))
    return re.compile("".join(pieces) + r"(?:\s|$)")


PATTERNS = {source: format_pattern(fmt) for source, fmt in FORMATS.items()}


def undecorated(line: str) -> str:
    """A line without --log-jsonl's envelope and --log-colors' codes (also with their escape lost)."""
    if line.startswith("{"):
        return str(json.loads(line)["msg"]).rstrip("\n")
    return re.sub(r"\x1b?\[[0-9;]*m", "", line)


@dataclass
class Fixture:
    path: Path
    source: str  # where a real excerpt came from; empty for a synthetic or captured one
    lines: list[str]
    devices: list[Device]
    args: list[str]
    env: dict[str, str]
    expect_mib: dict[str, float]

    def devices_names(self) -> list[str]:
        return [device.name for device in self.devices]


def load(path: Path) -> Fixture:
    header: dict[str, str] = {}
    lines = []
    for line in path.read_text().splitlines():
        if line.startswith("# ") and re.match(r"# (source|devices|unified|args|env|expect): ", line):
            key, _, value = line[2:].partition(": ")
            header[key] = value
        elif not line.startswith("#"):
            lines.append(line)
    unified = header.get("unified") == "yes"
    devices = [
        Device(name, 24 * 1024 * MIB, 24 * 1024 * MIB, "config", unified=unified and name != "ram")
        for name in header["devices"].split()
    ]
    env = dict(part.split("=", 1) for part in header.get("env", "").split())
    expect = {device: float(mib) for device, mib in (part.split("=") for part in header["expect"].split())}
    return Fixture(
        path, header.get("source", ""), lines, devices, header.get("args", "").split(), env, expect
    )


def tally(fixture: Fixture) -> BufferTally:
    result = BufferTally(fixture.devices, fixture.args, fixture.env)
    for line in fixture.lines:
        result.feed(line)
    return result


@pytest.mark.parametrize("path", FIXTURES, ids=[path.stem for path in FIXTURES])
def test_each_log_adds_up_to_its_stated_totals_per_device(path: Path) -> None:
    fixture = load(path)
    logged = tally(fixture).logged()
    assert set(logged) == set(fixture.expect_mib)
    for device, mib in fixture.expect_mib.items():
        assert logged[device] / MIB == pytest.approx(mib, abs=0.01), device


LINES = [(path, number, line) for path in FIXTURES for number, line in enumerate(load(path).lines, 1)]


@pytest.mark.parametrize(
    ("path", "number", "line"), LINES, ids=[f"{path.stem}:{number}" for path, number, _ in LINES]
)
def test_every_line_is_read_as_llama_cpps_format_strings_say(path: Path, number: int, line: str) -> None:
    text = undecorated(line)
    matches = [match for match in (pattern.search(text) for pattern in PATTERNS.values()) if match]
    parsed = parse_buffer_line(log_message(line)[0])
    if not matches:
        assert parsed is None, f"not a buffer line of llama.cpp: {text!r}"
        return
    assert parsed is not None, f"a llama.cpp buffer line was missed: {text!r}"
    assert parsed.buffer == matches[0]["buffer"].strip()
    assert parsed.nbytes == int(float(matches[0]["mib"]) * MIB)


def test_the_fixtures_cover_every_backend_and_spelling() -> None:
    plain = [undecorated(line) for path in FIXTURES for line in load(path).lines]
    text = "\n".join(plain)
    for name in (
        "CUDA0",
        "CUDA1",
        "CUDA_Split",
        "CUDA0_Split",
        "ROCm0",
        "Vulkan0",
        "SYCL0",
        "MTL0_Mapped",
        "Metal",
        "CPU_REPACK",
        "RPC[192.168.90.190:50052]",
        "RPC0[10.0.0.2:50054]",
        "Meta()",
    ):
        assert f" {name} " in text, name
    for spelling in ("llm_load_tensors:", "llama_kv_cache_init:", "llama_new_context_with_model:"):
        assert spelling in text
    used = {source for source, pattern in PATTERNS.items() if any(pattern.search(line) for line in plain)}
    assert used == set(FORMATS) - {"src/llama-adapter.cpp"}  # LoRA: see the per-backend test below


@pytest.mark.parametrize(
    ("line", "device"),
    [
        ("load_tensors:        SYCL0 model buffer size =  1000.00 MiB", "gpu0"),
        ("load_tensors:        MUSA1 model buffer size =  1000.00 MiB", "gpu1"),
        ("load_tensors:        CANN0 model buffer size =  1000.00 MiB", "gpu0"),
        ("load_tensors:    SYCL_Host model buffer size =  1000.00 MiB", "ram"),
        ("load_tensors:   CPU_KLEIDIAI model buffer size =  1000.00 MiB", "ram"),
        ("load_tensors:          AMX model buffer size =  1000.00 MiB", "ram"),
        ("llama_adapter_lora_init_impl:      CUDA1 LoRA buffer size =  1000.00 MiB", "gpu1"),
        ("\x1b[32mI \x1b[0mload_tensors:        CUDA1 model buffer size =  1000.00 MiB", "gpu1"),
    ],
)
def test_each_backends_buffer_names_land_on_their_device(line: str, device: str) -> None:
    devices = [Device(name, 0, 0, "config") for name in ("gpu0", "gpu1", "ram")]
    result = BufferTally(devices)
    result.feed(line)
    assert result.logged() == {device: 1000 * MIB}


def test_the_footprint_adds_the_margins_nothing_logs() -> None:
    fixture = load(LOGS / "cuda-tensor-split.txt")
    footprint = tally(fixture).footprint()
    assert footprint["gpu0"] == pytest.approx(13659.21 * MIB + GPU_MARGIN, abs=1024)
    assert footprint["gpu1"] == pytest.approx(13798.48 * MIB + GPU_MARGIN, abs=1024)
    assert footprint["ram"] == pytest.approx(684.26 * MIB + RAM_MARGIN, abs=1024)


def test_metal_buffers_count_on_the_gpu_and_in_ram_on_unified_memory() -> None:
    fixture = load(LOGS / "metal.txt")
    footprint = tally(fixture).footprint()
    gpu = 2965.66 * MIB + GPU_MARGIN
    assert footprint["gpu0"] == pytest.approx(gpu, abs=1024)
    assert footprint["ram"] == pytest.approx(320.87 * MIB + RAM_MARGIN + gpu, abs=1024)


def test_metal_buffers_without_an_apple_gpu_device_are_ram() -> None:
    result = BufferTally([Device("ram", 0, 0, "config")])
    for line in load(LOGS / "metal.txt").lines:
        result.feed(line)
    assert result.logged() == {"ram": pytest.approx((2965.66 + 320.87) * MIB, abs=1024)}


def test_gpu_buffers_the_router_has_no_budget_for_are_left_out_and_said(
    caplog: pytest.LogCaptureFixture,
) -> None:
    result = BufferTally([Device("ram", 0, 0, "psutil")], label="llama-server for 'm'")
    for line in load(LOGS / "cuda-single.txt").lines:
        result.feed(line)
    with caplog.at_level("WARNING", logger="llama_router.footprint"):
        footprint = result.footprint()
    assert set(footprint) == {"ram"}
    assert "llama-server for 'm' logged CUDA0 10.7 GiB on devices the router has no budget for" in caplog.text
    assert "load_tensors:        CUDA0 model buffer size =  4489.53 MiB" in caplog.text, "names the lines"


async def test_the_real_llama_server_is_learned_from_the_buffers_it_logs(
    start_router: RouterFactory, tiny_models: tuple[Path, Path], llama_server: Path
) -> None:
    profile = {"model": str(tiny_models[0]), "binary": str(llama_server), "args": ["-c", "1024", "-np", "1"]}
    router = await start_router({"m": profile}, memory={"nvml": False})
    status, body = await router.chat("m")
    assert status == 200, body
    logged = [
        match
        for line in router.controller.logs["m"]
        for match in (pattern.search(undecorated(line)) for pattern in PATTERNS.values())
        if match
    ]
    assert logged, "llama-server logged no buffer"
    assert {match["buffer"].strip() for match in logged} <= {"CPU", "CPU_Mapped", "CPU_REPACK"}
    in_ram = sum(int(float(match["mib"]) * MIB) for match in logged)
    assert router.controller.view("m").footprint == {"ram": in_ram + RAM_MARGIN}


def test_at_least_twenty_excerpts_are_real_and_each_names_its_public_source() -> None:
    real = [load(path) for path in FIXTURES if path.stem.startswith("real-")]
    assert len(real) >= 20
    for fixture in real:
        assert re.search(
            r"^[\w.-]+/[\w.-]+#\d+ https://github\.com/\S+/(issues|pull)/\d+\b", fixture.source
        ), fixture.path.name
    others = [path for path in FIXTURES if not path.stem.startswith("real-")]
    for path in others:
        assert re.search(r"^# (synthetic|captured): ", path.read_text(), re.M), f"{path.name} says what it is"


@pytest.mark.parametrize(
    ("line", "shown"),
    [
        # A backend the parser does not know (Qualcomm's Hexagon NPU): which memory is it?
        ("load_tensors:         HTP0 model buffer size =  1000.00 MiB", "cannot place buffer HTP0"),
        # A size in another unit than llama.cpp's MiB.
        ("sched_reserve:      CUDA0 compute buffer size = 1.50 GiB", "cannot read a buffer from this line"),
    ],
)
def test_a_buffer_line_that_cannot_be_placed_is_a_warning_naming_it_not_a_silent_drop(
    line: str, shown: str, caplog: pytest.LogCaptureFixture
) -> None:
    result = BufferTally([Device("gpu0", 0, 0, "config"), Device("ram", 0, 0, "config")], label="m")
    with caplog.at_level("WARNING", logger="llama_router.footprint"):
        result.feed(line)
    assert result.logged() == {}
    assert shown in caplog.text
    assert line.split(": ", 1)[1].strip() in caplog.text, "the warning names the line"


def test_the_footprint_says_per_device_which_lines_make_it_up_and_they_add_up() -> None:
    fixture = load(LOGS / "cuda-row-split.txt")
    result = tally(fixture)
    footprint, sources = result.measured()
    assert set(sources) == set(footprint)
    for device, lines in sources.items():
        assert sum(int(str(entry["bytes"])) for entry in lines) == footprint[device], device
    top = sources["gpu0"][0]
    assert (
        top["line"]
        == "load_tensors:   CUDA_Split model buffer size = 18035.30 MiB (75% of it, per --tensor-split)"
    )
    assert top["bytes"] == int(int(18035.30 * MIB) * 0.75)
    assert sources["gpu0"][-1] == {
        "line": "not logged: the backend's context on it (margin)",
        "bytes": GPU_MARGIN,
    }


def test_a_footprints_lines_are_capped_and_the_rest_summed() -> None:
    devices = [Device("ram", 0, 0, "config")]
    result = BufferTally(devices)
    for index in range(SOURCE_LINES + 5):
        result.feed(f"load_tensors:          CPU model buffer size = {100 + index:8.2f} MiB")
    lines = result.sources()["ram"]
    assert len(lines) == SOURCE_LINES + 2  # the largest, one for the rest, the margin
    assert lines[0]["bytes"] == int((100 + SOURCE_LINES + 4) * MIB)
    assert lines[SOURCE_LINES] == {
        "line": "5 more buffer lines",
        "bytes": sum(int((100 + i) * MIB) for i in range(5)),
    }


def test_the_lines_behind_a_learned_footprint_survive_a_restart(tmp_path: Path, dummy_model: Path) -> None:
    config_path = tmp_path / "config.yaml"
    config_path.write_text(json.dumps({"profiles": {"m": {"model": str(dummy_model)}}}))
    profile = load_config(config_path).profiles["m"]
    sources = {
        "gpu0": [{"line": "load_tensors:        CUDA0 model buffer size =  8000.00 MiB", "bytes": 8000 * MIB}]
    }
    FootprintStore(tmp_path / "footprints.json").put(profile, {"gpu0": 8000 * MIB}, sources)
    again = FootprintStore(tmp_path / "footprints.json")
    assert again.get(profile) == {"gpu0": 8000 * MIB}
    assert again.sources(profile) == sources


async def _answering_worker() -> tuple[asyncio.Server, str]:
    """A TCP listener standing in for an rpc-server, so the router's probe of the worker passes."""

    def drop(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(drop, "127.0.0.1", 0)
    return server, f"127.0.0.1:{server.sockets[0].getsockname()[1]}"


@pytest.mark.parametrize("path", FIXTURES, ids=[path.stem for path in FIXTURES])
async def test_a_router_replaying_each_log_learns_its_totals_and_shows_why_in_running(
    path: Path, start_router: RouterFactory, dummy_model: Path, tmp_path: Path
) -> None:
    text = path.read_text()
    workers = sorted({name[4:] for name in load(path).devices_names() if name.startswith("rpc:")})
    listeners = []
    for worker in workers:  # the log's workers become local ones the router can reach
        server, address = await _answering_worker()
        listeners.append(server)
        text = text.replace(worker, address)
    replay = tmp_path / path.name
    replay.write_text(text)
    fixture = load(replay)
    names = fixture.devices_names()
    gpus = [name for name in names if name.startswith("gpu")]
    rpc = {name[4:]: 10**7 for name in names if name.startswith("rpc:")}
    profile = fake_profile(
        dummy_model, "--replay", str(replay), *fixture.args, env=fixture.env, rpc=list(rpc)
    )
    memory = {"ram": 10**7, "gpus": [10**7] * len(gpus), "rpc": rpc}
    router = await start_router({"m": profile}, memory=memory)
    try:
        status, body = await router.chat("m")
        assert status == 200, body
        async with router.session.get("/running") as response:
            (row,) = (await response.json())["running"]
    finally:
        for server in listeners:
            server.close()
    margins = {
        device: RAM_MARGIN if device == "ram" else GPU_MARGIN for device in [*fixture.expect_mib, "ram"]
    }
    expected = {
        device: int(fixture.expect_mib.get(device, 0) * MIB) + margin for device, margin in margins.items()
    }
    assert row["footprint"].keys() == expected.keys()
    for device, amount in expected.items():
        assert row["footprint"][device] == pytest.approx(amount, abs=16 * 1024), device
    why = row["footprint_why"]
    assert why.keys() == expected.keys()
    messages = [log_message(line)[0] for line in fixture.lines]
    for device, lines in why.items():
        assert sum(entry["bytes"] for entry in lines) == row["footprint"][device], device
        for entry in lines:
            summary = entry["line"].startswith(("not logged:", "the GPU buffers above")) or entry[
                "line"
            ].endswith("more buffer lines")
            assert summary or any(entry["line"].startswith(message) for message in messages), entry
