"""What a profile will use per device: estimated from GGUF metadata, then learned from llama-server.

Before a first load the estimate is weights placed per `--n-gpu-layers` and the tensor overrides
(`--cpu-moe`, `--n-cpu-moe`, `--override-tensor`), plus the KV cache for the context at the cache
types (sliding-window layers sized as llama.cpp sizes them), plus a compute margin. Once
llama-server has loaded, the buffer sizes it logs replace the estimate and are kept across router
restarts in a small JSON state file, keyed by what changes the figure (binary, model file identity,
arguments).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from .config import ResolvedProfile
from .gguf import GGUFError, GGUFHeader, read_header
from .memory import MIB

log = logging.getLogger("llama_router.footprint")

# Bytes per element of the KV cache types llama.cpp accepts (quantised ones per their block layout).
CACHE_TYPE_BYTES = {
    "f32": 4.0,
    "f16": 2.0,
    "bf16": 2.0,
    "q8_0": 34 / 32,
    "q5_1": 24 / 32,
    "q5_0": 22 / 32,
    "q4_1": 20 / 32,
    "q4_0": 18 / 32,
    "iq4_nl": 18 / 32,
}
RAM_MARGIN = 64 * MIB  # process, threads, tokenizer, HTTP server
GPU_MARGIN = 384 * MIB  # CUDA context and compute buffers not known before a load

_BUFFER_LINE = re.compile(
    r"(\S+)\s+(?:\S+\s+)?(?:model|KV|compute|output|RS|LoRA) buffer size =\s*([\d.]+) MiB"
)
_GPU_BUFFER = re.compile(r"^(?:CUDA|ROCm|Vulkan|SYCL|MUSA|CANN)(\d+)$")
# llama.cpp's LLM_FFN_EXPS_REGEX (common/common.h): the stacked per-expert FFN weights of a MoE layer,
# not its router (`ffn_gate_inp`) nor its shared expert (`ffn_*_shexp`).
EXPERTS_REGEX = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"


class SwaRule(NamedTuple):
    """How llama.cpp sets up an architecture's sliding-window (SWA) layers in `load_hparams`
    (src/llama-model.cpp; `load_arch_hparams` in src/models/<arch>.cpp in newer trees):
    `hparams.set_swa_pattern(period[, dense_first])` and `hparams.n_swa`."""

    period: int  # every period-th layer attends to the whole context (llama-hparams.cpp set_swa_pattern)
    missing: int = 0  # n_swa when the GGUF has no `<arch>.attention.sliding_window` (0: no SWA then)
    fixed: int = 0  # an n_swa llama.cpp sets whatever the key says (a key of 0 still turns SWA off)
    dense_first: bool = False  # layers 0, period, 2*period... are the full-attention ones


# The architectures whose KV cache llama.cpp splits into a full and a sliding-window part
# (`llama_kv_cache_iswa`, created when `hparams.swa_type != LLAMA_SWA_TYPE_NONE`), by GGUF
# `general.architecture`. Any other one (phi3 too: llama.cpp turns its SWA off) keeps the full context
# for every layer, which can only over-estimate.
SWA_ARCHS = {
    "gemma2": SwaRule(2, missing=4096),
    "gemma3": SwaRule(6),
    "gemma3n": SwaRule(5),
    "cohere2": SwaRule(4),
    "gpt-oss": SwaRule(2),  # LLM_ARCH_OPENAI_MOE
    "olmo2": SwaRule(4),
    "llama4": SwaRule(4, missing=8192, fixed=8192),  # chunked attention, sized the same way
    "smallthinker": SwaRule(4, fixed=4096, dense_first=True),
}
SWA_PAD = 256  # llama.cpp pads the SWA cache (and n_ctx) to a multiple of 256 cells


def _flag_value(args: Sequence[str], *names: str) -> str | None:
    value = None
    for index, arg in enumerate(args):
        flag, eq, inline = arg.partition("=")
        if flag in names:
            if eq:
                value = inline
            elif index + 1 < len(args):
                value = args[index + 1]
    return value


def _int_or_list_max(value: object, default: int) -> int:
    if isinstance(value, list):
        return max((int(v) for v in value), default=default)
    return int(value) if isinstance(value, (int, float)) else default


def estimate(profile: ResolvedProfile, gpu_devices: Sequence[str]) -> dict[str, int]:
    """Bytes per device a profile should use, from its GGUF header and arguments."""
    files = profile.model_files or (profile.model_path,)
    try:
        headers = [read_header(path) for path in files]
    except (OSError, GGUFError) as exc:
        log.debug("no GGUF estimate for %s: %s", profile.name, exc)
        size = sum(path.stat().st_size for path in files if path.exists())
        return {"ram": size + RAM_MARGIN}
    if len(headers) > 1:  # a sharded model: metadata in the first file, tensors spread over all
        tensors = tuple(tensor for header in headers for tensor in header.tensors)
        headers[0] = dataclasses.replace(headers[0], tensors=tensors)
    footprint = _estimate_from_header(headers[0], profile.args, profile.env, gpu_devices)
    if profile.mmproj_path is not None and profile.mmproj_path.exists():
        # The projector goes to the first GPU unless told not to, else stays in RAM.
        gpus = [device for device in footprint if device.startswith("gpu")]
        on_gpu = gpus and "--no-mmproj-offload" not in profile.args
        device = gpus[0] if on_gpu else "ram"
        footprint[device] += profile.mmproj_path.stat().st_size
    return footprint


def describe(footprint: dict[str, int]) -> str:
    """A footprint for people: `ram 70 MiB, gpu0 4.2 GiB`."""
    parts = []
    for device, amount in sorted(footprint.items()):
        if device == "slots":
            continue
        parts.append(
            f"{device} {amount / MIB:.0f} MiB"
            if amount < 10 * 1024 * MIB
            else f"{device} {amount / (1024 * MIB):.1f} GiB"
        )
    return ", ".join(parts) or "nothing"


def _visible_gpus(env: dict[str, str], gpu_devices: Sequence[str]) -> list[str]:
    visible = env.get("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES"))
    if visible is None:
        return list(gpu_devices)
    chosen = [f"gpu{part.strip()}" for part in visible.split(",") if part.strip().isdigit()]
    return [gpu for gpu in chosen if gpu in gpu_devices]


def _estimate_from_header(
    header: GGUFHeader, args: Sequence[str], env: dict[str, str], gpu_devices: Sequence[str]
) -> dict[str, int]:
    n_layer = int(header.arch_value("block_count", 0) or 0)
    gpus = _visible_gpus(env, gpu_devices)
    ngl_text = _flag_value(args, "-ngl", "--gpu-layers", "--n-gpu-layers")
    if not gpus or _flag_value(args, "--device", "-dev") == "none":
        offloaded = 0
    elif ngl_text is None or ngl_text in ("auto", "all") or int(ngl_text) < 0:
        offloaded = n_layer + 1
    else:
        offloaded = min(int(ngl_text), n_layer + 1)
    first_gpu_layer = n_layer - min(offloaded, n_layer)

    overrides = _tensor_overrides(args)
    # Weight bytes per device; "layers" is what the offloaded layers put on the GPUs, split below.
    placed = {"ram": 0, "layers": 0}
    for tensor in header.tensors:
        layer = _layer_of(tensor.name)
        on_gpu = (layer is not None and layer >= first_gpu_layer and offloaded > 0) or (
            layer is None and tensor.name.startswith("output") and offloaded > n_layer
        )
        device = _overridden_device(tensor.name, overrides, gpus) or ("layers" if on_gpu else "ram")
        placed[device] = placed.get(device, 0) + tensor.nbytes

    ctx_text = _flag_value(args, "-c", "--ctx-size")
    n_ctx = (
        int(ctx_text) if ctx_text and int(ctx_text) > 0 else int(header.arch_value("context_length", 4096))
    )
    n_embd = int(header.arch_value("embedding_length", 0) or 0)
    n_head = _int_or_list_max(header.arch_value("attention.head_count"), 1) or 1
    n_head_kv = _int_or_list_max(header.arch_value("attention.head_count_kv"), n_head)
    key_len = int(header.arch_value("attention.key_length", n_embd // n_head) or 0)
    value_len = int(header.arch_value("attention.value_length", n_embd // n_head) or 0)
    k_bytes = CACHE_TYPE_BYTES.get(_flag_value(args, "-ctk", "--cache-type-k") or "f16", 2.0)
    v_bytes = CACHE_TYPE_BYTES.get(_flag_value(args, "-ctv", "--cache-type-v") or "f16", 2.0)
    head_bytes = key_len * k_bytes + value_len * v_bytes
    # Each layer's KV cache sits with the layer: the offloaded (last) layers' on the GPUs.
    cells = _kv_cells(header, args, env, n_layer, n_ctx)
    layer_kv = [int(layer_cells * n_head_kv * head_bytes) for layer_cells in cells]
    gpu_kv = sum(layer_kv[first_gpu_layer:])
    ram_kv = sum(layer_kv[:first_gpu_layer])

    footprint = {"ram": placed["ram"] + ram_kv + RAM_MARGIN}
    shares = _layer_shares(args, gpus) if offloaded > 0 else {}
    for gpu in gpus:
        share = shares.get(gpu, 0.0)
        if share > 0 or gpu in placed:
            layers = int((placed["layers"] + gpu_kv) * share)
            footprint[gpu] = layers + placed.get(gpu, 0) + GPU_MARGIN
    return footprint


def _kv_cells(
    header: GGUFHeader, args: Sequence[str], env: dict[str, str], n_layer: int, n_ctx: int
) -> list[int]:
    """KV cache cells per layer: the context for full-attention layers, the (much smaller) SWA cache
    for sliding-window ones unless `--swa-full` asks llama.cpp for full-size SWA caches."""
    window, is_swa = _sliding_window(header, n_layer)
    if not window or _switch(args, env, "LLAMA_ARG_SWA_FULL", ("--swa-full",)):
        return [n_ctx] * n_layer
    swa_cells = _swa_cache_cells(args, env, n_ctx, window)
    return [swa_cells if swa else n_ctx for swa in is_swa]


def _sliding_window(header: GGUFHeader, n_layer: int) -> tuple[int, list[bool]]:
    """The window (`n_swa`) and which layers use it, as llama.cpp's `load_hparams` decides; (0, [])
    when the architecture is not in `SWA_ARCHS` or its GGUF turns SWA off.

    A GGUF's own `<arch>.attention.sliding_window_pattern` wins over the architecture's period, as
    in newer llama.cpp (`ml.get_key_or_arr(LLM_KV_ATTENTION_SLIDING_WINDOW_PATTERN, ...)`): a number
    is a period, an array one flag per layer (true: sliding window), as the converters write it. An
    array this reader skipped (over 64 entries) or of the wrong length leaves every layer full.
    """
    rule = SWA_ARCHS.get(header.architecture)
    key = header.arch_value("attention.sliding_window")
    if rule is None or (key is not None and not (isinstance(key, int) and key > 0)):
        return 0, []
    window = rule.missing if key is None else (rule.fixed or key)
    if not window:
        return 0, []
    pattern = header.arch_value("attention.sliding_window_pattern", rule.period)
    if isinstance(pattern, list):
        flags = [bool(flag) for flag in pattern]
        return (window, flags) if len(flags) == n_layer else (0, [])
    if not isinstance(pattern, int) or pattern < 0:
        return 0, []
    period = pattern  # llama-hparams.cpp set_swa_pattern: a period of 0 makes every layer SWA
    if rule.dense_first:
        return window, [period == 0 or layer % period != 0 for layer in range(n_layer)]
    return window, [period == 0 or layer % period < period - 1 for layer in range(n_layer)]


def _swa_cache_cells(args: Sequence[str], env: dict[str, str], n_ctx: int, window: int) -> int:
    """Cells of the SWA half of llama.cpp's `llama_kv_cache_iswa`, over all its streams.

    src/llama-kv-cache-iswa.cpp: `size_swa = GGML_PAD(min(size_base, n_swa*(unified ? n_seq_max : 1)
    + n_ubatch), 256)`, where `size_base` is `n_ctx_seq` (src/llama-context.cpp: `n_ctx` with a
    unified cache, else `GGML_PAD(n_ctx/n_seq_max, 256)`) and a split cache has `n_seq_max` streams
    of that size (src/llama-kv-cache.cpp `n_stream`). llama-server's slots are `-np` (default auto:
    4 slots sharing a unified cache, tools/server/server.cpp); a set `-np` shares only with `-kvu`;
    `-ub` defaults to 512 and is capped by `-b` (2048), as in common/common.h and llama_context.
    """
    ubatch = min(
        _int_setting(args, env, 512, "LLAMA_ARG_UBATCH", "-ub", "--ubatch-size"),
        _int_setting(args, env, 2048, "LLAMA_ARG_BATCH", "-b", "--batch-size"),
    )
    parallel = _int_setting(args, env, -1, "LLAMA_ARG_N_PARALLEL", "-np", "--parallel")
    if parallel < 0:
        slots, unified = 4, True
    else:
        slots = max(parallel, 1)
        on, off = ("-kvu", "--kv-unified"), ("-no-kvu", "--no-kv-unified")
        unified = _switch(args, env, "LLAMA_ARG_KV_UNIFIED", on, off)
    if unified:
        return _pad(min(n_ctx, window * slots + ubatch))
    return slots * _pad(min(_pad(_pad(n_ctx) // slots), window + ubatch))


def _pad(cells: int) -> int:
    return -(-cells // SWA_PAD) * SWA_PAD


def _int_setting(args: Sequence[str], env: dict[str, str], default: int, env_name: str, *names: str) -> int:
    """A llama-server number: its flag, else its `LLAMA_ARG_*` variable (the flag wins, as in
    common/arg.cpp), else the default; a value that is not a number counts as unset."""
    value = _flag_value(args, *names)
    value = env.get(env_name) if value is None else value
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default


def _switch(
    args: Sequence[str], env: dict[str, str], env_name: str, on: Sequence[str], off: Sequence[str] = ()
) -> bool:
    """A llama-server on/off flag: its last spelling in the arguments, else its `LLAMA_ARG_*` variable."""
    for arg in reversed(args):
        if arg in on or arg in off:
            return arg in on
    return env.get(env_name, "").lower() in ("1", "true", "on", "enabled")


def _layer_shares(args: Sequence[str], gpus: Sequence[str]) -> dict[str, float]:
    """Each visible GPU's share of the offloaded layers: equal unless `--tensor-split` says otherwise."""
    split_text = _flag_value(args, "-ts", "--tensor-split")
    weights = [float(x) for x in split_text.replace("/", ",").split(",")] if split_text else []
    weights = (weights + [0.0] * len(gpus))[: len(gpus)] if weights else [1.0] * len(gpus)
    total_weight = sum(weights) or 1.0
    return {gpu: weight / total_weight for gpu, weight in zip(gpus, weights, strict=True)}


def _tensor_overrides(args: Sequence[str]) -> list[tuple[re.Pattern[str], str]]:
    """The (pattern, buffer type) list llama-server builds from its arguments, in argument order.

    MoE models are often run with their experts in RAM and the rest on the GPU; counting the experts
    on the GPU would refuse them as too large. This mirrors llama.cpp's common/arg.cpp, where every
    one of these flags appends to the same `tensor_buft_overrides` list:
    `-ot`/`--override-tensor <regex>=<buffer type>[,...]` (repeatable; each item split at its first
    `=`), `-cmoe`/`--cpu-moe` (`LLM_FFN_EXPS_REGEX` to CPU) and `-ncmoe`/`--n-cpu-moe N` (one
    `llm_ffn_exps_block_regex(i)` = `blk\\.<i>` + `LLM_FFN_EXPS_REGEX` to CPU for each i < N).
    A pattern Python cannot compile is left out rather than failing on a user's arguments.
    """
    rules: list[tuple[str, str]] = []
    for index, arg in enumerate(args):
        flag, eq, inline = arg.partition("=")
        value = inline if eq else (args[index + 1] if index + 1 < len(args) else "")
        if arg in ("-cmoe", "--cpu-moe"):
            rules.append((EXPERTS_REGEX, "CPU"))
        elif flag in ("-ncmoe", "--n-cpu-moe"):
            count = int(value) if value.isdigit() else 0
            rules.extend((rf"blk\.{layer}{EXPERTS_REGEX}", "CPU") for layer in range(count))
        elif flag in ("-ot", "--override-tensor"):
            for item in value.split(","):
                pattern, eq, buffer = item.partition("=")
                if eq:
                    rules.append((pattern, buffer))
                else:
                    log.debug("ignoring tensor override %r: no '=<buffer type>'", item)
    compiled = []
    for pattern, buffer in rules:
        try:
            compiled.append((re.compile(pattern), buffer))
        except re.error as exc:
            log.debug("ignoring tensor override %r: %s", pattern, exc)
    return compiled


def _overridden_device(
    name: str, overrides: Sequence[tuple[re.Pattern[str], str]], gpus: Sequence[str]
) -> str | None:
    """Where the first override whose pattern is found in a tensor's name puts it, if anywhere.

    As llama.cpp's model loader does (`std::regex_search`, first match wins): `CPU` is RAM, `CUDA<k>`
    (or another backend's `<name><k>`) the k-th GPU the process sees, so the k-th visible one. None
    when nothing matches or the GPU named is not visible: the tensor stays where `-ngl` put it.
    """
    for pattern, buffer in overrides:
        if pattern.search(name):
            if buffer == "CPU":
                return "ram"
            gpu = _GPU_BUFFER.match(buffer)
            index = int(gpu.group(1)) if gpu else len(gpus)
            return gpus[index] if index < len(gpus) else None
    return None


def _layer_of(name: str) -> int | None:
    if name.startswith("blk."):
        part = name.split(".", 2)[1]
        if part.isdigit():
            return int(part)
    return None


class BufferTally:
    """Adds up the buffer sizes llama-server logs while it loads, per device."""

    def __init__(self) -> None:
        self.bytes: dict[str, int] = {}

    def feed(self, line: str) -> None:
        match = _BUFFER_LINE.search(line)
        if match is None:
            return
        buffer, mib = match.group(1), float(match.group(2))
        gpu = _GPU_BUFFER.match(buffer)
        device = f"gpu{gpu.group(1)}" if gpu else ("gpu0" if buffer.startswith("Metal") else "ram")
        self.bytes[device] = self.bytes.get(device, 0) + int(mib * MIB)

    def footprint(self) -> dict[str, int]:
        """What was logged plus the margins nothing logs (process, CUDA context)."""
        if not self.bytes:
            return {}
        result = {
            device: amount + (GPU_MARGIN if device.startswith("gpu") else 0)
            for device, amount in self.bytes.items()
        }
        result["ram"] = result.get("ram", 0) + RAM_MARGIN
        return result


def identity(profile: ResolvedProfile) -> str:
    """What a learned footprint depends on; a change invalidates it."""
    try:
        stat = profile.model_path.stat()
        model = [str(profile.model_path), stat.st_size, stat.st_mtime_ns]
    except OSError:
        model = [str(profile.model_path)]
    data = json.dumps([str(profile.binary), model, list(profile.args), sorted(profile.env.items())])
    return hashlib.sha256(data.encode()).hexdigest()[:16]


class FootprintStore:
    """Learned footprints, kept in `<state_dir>/footprints.json` across router restarts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._data: dict[str, dict[str, object]] = {}
        try:
            loaded = json.loads(path.read_text())
            if isinstance(loaded, dict):
                self._data = loaded
        except (OSError, ValueError):
            pass

    def get(self, profile: ResolvedProfile) -> dict[str, int] | None:
        entry = self._data.get(profile.name)
        if not entry or entry.get("identity") != identity(profile):
            return None
        footprint = entry.get("footprint")
        if not isinstance(footprint, dict):
            return None
        return {str(device): int(amount) for device, amount in footprint.items()}

    def put(self, profile: ResolvedProfile, footprint: dict[str, int]) -> None:
        self._data[profile.name] = {"identity": identity(profile), "footprint": footprint}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.path.with_suffix(".partial")
            partial.write_text(json.dumps(self._data, indent=1, sort_keys=True))
            partial.replace(self.path)
        except OSError as exc:
            log.warning("could not save learned footprints to %s: %s", self.path, exc)
