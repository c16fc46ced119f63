"""The learned footprint of every backend llama.cpp logs: the buffer lines of real-format log excerpts
(tests/fixtures/llama_logs) land on the router's devices, each file adding up to the totals its
header states, and every line is read exactly as llama.cpp's own format strings say."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from llama_router.sizing.footprint import GPU_MARGIN, RAM_MARGIN, BufferTally, log_message, parse_buffer_line
from llama_router.sizing.memory import MIB, Device

from .conftest import RouterFactory

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
    `%8.2f` the MiB."""
    pieces = []
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
    return re.compile("".join(pieces) + "$")


PATTERNS = {source: format_pattern(fmt) for source, fmt in FORMATS.items()}


def undecorated(line: str) -> str:
    """A line without --log-prefix/--log-timestamps' head, or --log-jsonl's envelope."""
    if line.startswith("{"):
        return str(json.loads(line)["msg"]).rstrip("\n")
    return re.sub(r"^(?:\d+\.\d+\.\d+\.\d+ )?[IWED] ", "", line)


@dataclass
class Fixture:
    path: Path
    lines: list[str]
    devices: list[Device]
    args: list[str]
    env: dict[str, str]
    expect_mib: dict[str, float]


def load(path: Path) -> Fixture:
    header: dict[str, str] = {}
    lines = []
    for line in path.read_text().splitlines():
        if line.startswith("# ") and re.match(r"# (devices|unified|args|env|expect): ", line):
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
    return Fixture(path, lines, devices, header.get("args", "").split(), env, expect)


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
    matches = [match for match in (pattern.match(text) for pattern in PATTERNS.values()) if match]
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
    for name in ("CUDA0", "CUDA1", "CUDA_Split", "ROCm0", "Vulkan0", "MTL0_Mapped", "Metal", "CPU_REPACK"):
        assert f" {name} " in text, name
    for spelling in ("llm_load_tensors:", "llama_kv_cache_init:", "llama_new_context_with_model:"):
        assert spelling in text
    used = {source for source, pattern in PATTERNS.items() if any(pattern.match(line) for line in plain)}
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
    assert "llama-server for 'm' logged CUDA0 10.7 GiB on GPUs the router has no budget for" in caplog.text


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
        for match in (pattern.match(undecorated(line)) for pattern in PATTERNS.values())
        if match
    ]
    assert logged, "llama-server logged no buffer"
    assert {match["buffer"].strip() for match in logged} <= {"CPU", "CPU_Mapped", "CPU_REPACK"}
    in_ram = sum(int(float(match["mib"]) * MIB) for match in logged)
    assert router.controller.view("m").footprint == {"ram": in_ram + RAM_MARGIN}
