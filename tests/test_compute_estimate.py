"""The compute allowance of the GGUF estimate against the compute buffers real llama.cpp loads logged.

Each file in tests/fixtures/compute_logs/ is a real load log: three published ones from CUDA users
(long and short contexts, flash attention on and off) and five of the llama-server this project
builds, on a generated model (context, --ubatch-size, flash attention, split slots varied). The
model's shape comes from the log's `print_info:` lines, or, where an excerpt left them out, from its
`# model-numbers:` line; the context settings from its `llama_context:` lines."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from llama_router.sizing.buffer_log import log_message
from llama_router.sizing.footprint import compute_buffer, flash_attention
from llama_router.sizing.gguf import GGUFHeader
from llama_router.sizing.memory import MIB

LOGS = sorted((Path(__file__).parent / "fixtures" / "compute_logs").glob("*.txt"))
SETTING = re.compile(r"^(?:print_info|llama_context|llama_new_context_with_model): (\w+) *= *(\S+)")
COMPUTE = re.compile(r"^\w+: +(CUDA0|CPU) compute buffer size = +([\d.]+) MiB")


def _read(path: Path) -> tuple[dict[str, str], float]:
    settings: dict[str, str] = {}
    logged = 0.0
    for line in path.read_text().splitlines():
        if line.startswith("# model-numbers:"):
            settings.update(item.partition("=")[::2] for item in line.split(":", 1)[1].split())
            continue
        text, _ = log_message(line)
        setting = SETTING.match(text)
        if setting:
            settings.setdefault(setting[1], setting[2])
        if "Flash Attention enabled" in text:
            settings["resolved_fa"] = "on"
        compute = COMPUTE.match(text)
        if compute:
            logged = float(compute[2])
    return settings, logged


def _case(settings: dict[str, str]) -> tuple[GGUFHeader, list[str], int]:
    arch = settings.get("arch", "llama")
    metadata = {
        "general.architecture": arch,
        f"{arch}.embedding_length": int(settings["n_embd"]),
        f"{arch}.attention.head_count": int(settings["n_head"]),
        f"{arch}.feed_forward_length": int(settings["n_ff"]),
        f"{arch}.vocab_size": int(settings["n_vocab"]),
    }
    header = GGUFHeader(Path("model.gguf"), 3, metadata, (), 0)
    fa = settings["flash_attn"]
    fa = "auto" if fa == "auto" else "on" if fa in ("1", "enabled", "on", "true") else "off"
    args = ["-c", settings["n_ctx"], "-ub", settings["n_ubatch"], "-b", settings["n_batch"]]
    args += ["-fa", fa, "-np", settings.get("n_seq_max", "1")]
    if settings.get("kv_unified") == "true":
        args.append("-kvu")
    return header, args, int(settings["n_ctx"])


def test_there_are_enough_real_logs() -> None:
    assert len(LOGS) >= 5
    assert sum(path.name.startswith("public-") for path in LOGS) >= 3


@pytest.mark.parametrize("path", LOGS, ids=[path.stem for path in LOGS])
def test_compute_estimate_is_within_ten_percent_of_the_logged_buffer(path: Path) -> None:
    settings, logged = _read(path)
    assert logged > 0, f"{path.name} logs no compute buffer"
    header, args, n_ctx = _case(settings)
    if settings["flash_attn"] == "auto":  # `-fa auto` resolved as llama.cpp resolved it
        assert flash_attention(header, args, {}) == (settings.get("resolved_fa") == "on")
    estimated = compute_buffer(header, args, {}, n_ctx, output=True) / MIB
    assert abs(estimated - logged) <= 0.10 * logged, f"estimated {estimated:.2f} MiB, logged {logged:.2f} MiB"


def test_without_flash_attention_the_allowance_grows_with_context_and_heads() -> None:
    """The scores matrix, n_ctx x n_ubatch x n_head floats, is what makes long contexts expensive."""
    settings, _ = _read(next(path for path in LOGS if path.name == "public-logdetective-106-c2048.txt"))
    header, _, _ = _case(settings)

    def size(context: int, *args: str) -> int:
        return compute_buffer(header, ["-np", "1", "-c", str(context), *args], {}, context, output=True)

    short, long = size(8192, "-fa", "off"), size(32768, "-fa", "off")
    flash, small_batch = size(32768, "-fa", "on"), size(32768, "-fa", "off", "-ub", "128")
    assert long - short >= (32768 - 8192) * 512 * 32 * 4
    assert flash < long / 4
    assert small_batch < long / 3


def test_flash_attention_auto_follows_the_head_size() -> None:
    def header(key_length: int, value_length: int) -> GGUFHeader:
        metadata = {
            "general.architecture": "llama",
            "llama.embedding_length": 4096,
            "llama.attention.head_count": 32,
            "llama.attention.key_length": key_length,
            "llama.attention.value_length": value_length,
        }
        return GGUFHeader(Path("m.gguf"), 3, metadata, (), 0)

    assert flash_attention(header(128, 128), [], {})
    assert flash_attention(header(576, 512), [], {})  # DeepSeek's MLA
    assert not flash_attention(header(192, 128), [], {})  # no kernel for it: auto falls back
    assert not flash_attention(header(128, 128), ["-fa", "off"], {})
    assert not flash_attention(header(128, 128), [], {"LLAMA_ARG_FLASH_ATTN": "off"})
    assert flash_attention(header(192, 128), ["--flash-attn", "on"], {})
    assert flash_attention(header(192, 128), ["-fa", "-c", "4096"], {})  # the old switch
