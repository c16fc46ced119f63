"""What a profile will use per device: estimated from GGUF metadata, then learned from llama-server.

Before a first load the estimate is weights placed per `--n-gpu-layers` and the tensor overrides
(`--cpu-moe`, `--n-cpu-moe`, `--override-tensor`), plus the KV cache for the context at the cache
types (sliding-window layers sized as llama.cpp sizes them), plus the compute buffer llama.cpp will
reserve (see `compute_buffer`), plus a margin for what no buffer line shows (the CUDA context). Once
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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from llama_router.config.schema import ResolvedProfile
from llama_router.config.state import move_aside
from llama_router.core.devices import device_name
from llama_router.sizing.context_window import flag_value, int_setting, slots, switch, total_context
from llama_router.sizing.gguf import GGUFError, GGUFHeader, read_header
from llama_router.sizing.memory import MIB, Device, is_gpu

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
GPU_MARGIN = 384 * MIB  # CUDA context, cuBLAS workspace: what llama.cpp logs no buffer for
# Head sizes (key, value) llama.cpp's flash-attention kernels take on every GPU backend (CUDA's
# fattn.cu cases, Metal's and Vulkan's kernels); `-fa auto` turns it off for any other.
FLASH_ATTN_HEADS = {(size, size) for size in (40, 64, 72, 80, 96, 112, 128, 256)} | {(576, 512)}
FA_FLAGS = ("-fa", "--flash-attn")
FA_ENV = "LLAMA_ARG_FLASH_ATTN"

# Buffer names of llama.cpp's backends, one place for the estimate's `-ot` targets and the load log:
# `<backend><k>` is the k-th GPU the process sees and `<backend><k>_Split` that GPU's rows of
# row-split (`-sm row`) weights; Metal's are `MTL<k>` (`Metal` before late 2025) with `_Mapped` /
# `_Private` variants.
_GPU_BUFFER = re.compile(r"^(?:CUDA|ROCm|Vulkan|SYCL|MUSA|CANN)(\d+)(?:_Split)?$")
_METAL_BUFFER = re.compile(r"^(?:MTL(\d+)|Metal)(?:_Mapped|_Private)?$")
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
DEFAULT_CONTEXT = 4096  # the context assumed for a GGUF that does not say its training length


def _int_or_list_max(value: object, default: int) -> int:
    if isinstance(value, list):
        return max((int(v) for v in value), default=default)
    return int(value) if isinstance(value, (int, float)) else default


def estimate(profile: ResolvedProfile, devices: Sequence[Device]) -> dict[str, int]:
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
    gpu_devices = [device.name for device in devices if is_gpu(device.name)]
    names = {device.name for device in devices}
    workers = [device_name(worker) for worker in profile.rpc if device_name(worker) in names]
    footprint = _estimate_from_header(headers[0], profile.args, profile.env, gpu_devices, workers)
    if profile.mmproj_path is not None and profile.mmproj_path.exists():
        # The projector goes to the first GPU unless told not to, else stays in RAM.
        gpus = [device for device in footprint if device.startswith("gpu")]
        on_gpu = gpus and "--no-mmproj-offload" not in profile.args
        device = gpus[0] if on_gpu else "ram"
        footprint[device] += profile.mmproj_path.stat().st_size
    return count_shared_memory(footprint, devices)


def count_shared_memory(footprint: Mapping[str, int], devices: Sequence[Device]) -> dict[str, int]:
    """What a footprint takes from each budget, the one place this rule lives (estimates and learned
    footprints both pass through it).

    On unified memory (Apple silicon) a GPU's buffers are host RAM as well: they stay on the GPU
    device, whose budget caps what Metal may wire, and are added to `ram`, whose budget caps all the
    memory the model takes. So `ram` is the RAM the model really uses, counted once.
    """
    unified = {device.name for device in devices if device.unified}
    shared = sum(amount for device, amount in footprint.items() if device in unified)
    result = dict(footprint)
    if shared:
        result["ram"] = result.get("ram", 0) + shared
    return result


def visible_gpus(env: Mapping[str, str], gpu_devices: Sequence[str]) -> list[str]:
    """The router's GPUs that a llama-server with this environment sees, in the order it numbers them
    (its `CUDA0` is the first of them). ROCm narrows the list first by `ROCR_VISIBLE_DEVICES`, then
    by `HIP_VISIBLE_DEVICES`, which counts within what is left and, unset, yields to
    `CUDA_VISIBLE_DEVICES` (as HIP reads them); NVIDIA's CUDA reads only the last."""

    def setting(name: str) -> str | None:
        return env.get(name, os.environ.get(name))

    visible = list(gpu_devices)
    rocr = setting("ROCR_VISIBLE_DEVICES")
    if rocr is not None:
        visible = _narrowed(visible, rocr)
    chosen = setting("HIP_VISIBLE_DEVICES")
    chosen = setting("CUDA_VISIBLE_DEVICES") if chosen is None else chosen
    return visible if chosen is None else _narrowed(visible, chosen)


def _narrowed(devices: Sequence[str], value: str) -> list[str]:
    """The devices a `*_VISIBLE_DEVICES` list leaves, in its order. As the CUDA runtime reads it, an
    index that names no device hides the rest of the list; entries that are no index (GPU UUIDs,
    MIG instances, -1) name nothing the router can map and are passed over."""
    chosen: list[str] = []
    for part in value.split(","):
        part = part.strip()
        if not part.isdigit():
            continue
        if int(part) >= len(devices):
            break
        if devices[int(part)] not in chosen:
            chosen.append(devices[int(part)])
    return chosen


def _estimate_from_header(
    header: GGUFHeader,
    args: Sequence[str],
    env: dict[str, str],
    gpu_devices: Sequence[str],
    workers: Sequence[str] = (),
) -> dict[str, int]:
    """`workers`: the devices of the profile's RPC workers, which llama.cpp puts before the local GPUs
    when it spreads the offloaded layers (and numbers `--tensor-split` so)."""
    n_layer = int(header.arch_value("block_count", 0) or 0)
    gpus = visible_gpus(env, gpu_devices)
    offload = [*workers, *gpus]
    ngl_text = flag_value(args, "-ngl", "--gpu-layers", "--n-gpu-layers")
    if not offload or flag_value(args, "--device", "-dev") == "none":
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

    train = header.arch_value("context_length")
    n_ctx = total_context(args, env, train if isinstance(train, int) and train > 0 else DEFAULT_CONTEXT)
    assert n_ctx is not None  # a training length is always given
    n_embd = int(header.arch_value("embedding_length", 0) or 0)
    n_head = _int_or_list_max(header.arch_value("attention.head_count"), 1) or 1
    n_head_kv = _int_or_list_max(header.arch_value("attention.head_count_kv"), n_head)
    key_len = int(header.arch_value("attention.key_length", n_embd // n_head) or 0)
    value_len = int(header.arch_value("attention.value_length", n_embd // n_head) or 0)
    k_bytes = CACHE_TYPE_BYTES.get(flag_value(args, "-ctk", "--cache-type-k") or "f16", 2.0)
    v_bytes = CACHE_TYPE_BYTES.get(flag_value(args, "-ctv", "--cache-type-v") or "f16", 2.0)
    head_bytes = key_len * k_bytes + value_len * v_bytes
    # Each layer's KV cache sits with the layer: the offloaded (last) layers' on the GPUs.
    cells = _kv_cells(header, args, env, n_layer, n_ctx)
    layer_kv = [int(layer_cells * n_head_kv * head_bytes) for layer_cells in cells]
    gpu_kv = sum(layer_kv[first_gpu_layer:])
    ram_kv = sum(layer_kv[:first_gpu_layer])

    shares = layer_shares(args, offload) if offloaded > 0 else {}
    holders = [device for device in offload if shares.get(device, 0.0) > 0 or device in placed]
    # The output layer (and so the logits) sits with the last offload device that has layers.
    output_device = holders[-1] if holders and offloaded > n_layer else "ram"
    footprint = {"ram": placed["ram"] + ram_kv + RAM_MARGIN}
    if not holders:  # nothing offloaded: the CPU backend reserves the compute buffer in RAM
        footprint["ram"] += compute_buffer(header, args, env, n_ctx, output=True)
    for device in holders:
        layers = int((placed["layers"] + gpu_kv) * shares.get(device, 0.0))
        compute = compute_buffer(header, args, env, n_ctx, output=device == output_device)
        footprint[device] = layers + placed.get(device, 0) + compute + GPU_MARGIN
    return footprint


def flash_attention(header: GGUFHeader, args: Sequence[str], env: Mapping[str, str]) -> bool:
    """Whether llama.cpp will run this model with flash attention.

    `-fa on|off` says so; `auto` (the default) is resolved when the context is made
    (`llama_context::resolve_fused_ops`, src/llama-context.cpp): a probe graph is reserved and flash
    attention stays on only if every layer's FLASH_ATTN_EXT op lands on that layer's device, which
    the GPU backends refuse for head sizes they have no kernel for. The router cannot run the probe,
    so `auto` is on exactly for the head sizes in `FLASH_ATTN_HEADS`. Before 2025 `-fa` took no
    value and meant on.
    """
    value = flag_value(args, *FA_FLAGS)
    if value is None and any(arg in FA_FLAGS for arg in args):
        value = "on"
    value = (env.get(FA_ENV, "auto") if value is None else value).strip().lower()
    if value in ("off", "false", "0", "disabled"):
        return False
    if value in ("on", "true", "1", "enabled") or value.startswith("-"):  # `-fa -c ...`: the old switch
        return True
    n_embd = int(header.arch_value("embedding_length", 0) or 0)
    n_head = _int_or_list_max(header.arch_value("attention.head_count"), 1) or 1
    key_len = int(header.arch_value("attention.key_length", n_embd // n_head) or 0)
    value_len = int(header.arch_value("attention.value_length", n_embd // n_head) or 0)
    return (key_len, value_len) in FLASH_ATTN_HEADS


def _n_vocab(header: GGUFHeader) -> int:
    """Rows of the output (logits) matrix: `<arch>.vocab_size`, else the output tensor's shape, else
    the tokenizer's token count."""
    size = header.arch_value("vocab_size")
    if isinstance(size, int) and size > 0:
        return size
    for tensor in header.tensors:
        if tensor.name in ("output.weight", "token_embd.weight") and len(tensor.shape) >= 2:
            return int(tensor.shape[1])
    tokens = header.metadata.get("tokenizer.ggml.tokens")
    return len(tokens) if isinstance(tokens, list) else 0


def compute_buffer(
    header: GGUFHeader, args: Sequence[str], env: Mapping[str, str], n_ctx: int, *, output: bool
) -> int:
    """Bytes of the compute buffer llama.cpp reserves on a device that holds layers (`output`: and
    the output layer), as `llama_context::sched_reserve` (src/llama-context.cpp) sizes it.

    It reserves the worst-case graph: one ubatch of `min(n_ctx, --ubatch-size)` tokens against a
    full KV cache, and ggml-alloc keeps one buffer as large as the most that graph has alive at once
    (every activation f32). The attention mask, n_kv x n_ubatch (f16 with flash attention, else f32),
    is a graph input that every layer reads, so it stays for the whole graph; beside it, the largest
    of three moments:

    - attention: without flash attention the scores `K*Q` are materialised, n_kv x n_ubatch x n_head
      floats (softmax reuses them in place), beside four n_embd-wide rows per token (residual, norm,
      Q, attention output); flash attention keeps only those rows;
    - the feed-forward: gate and up (n_ff each) and two n_embd-wide rows per token;
    - the output, on its device only: the logits (n_vocab per token) beside n_ff + 4 n_embd per
      token that ggml-alloc has not been able to reuse below them.

    n_kv is one stream's cells: the whole cache when it is unified, a slot's share when each slot has
    its own. Checked against real logs (docs/design.md, "The compute buffer"); MLA attention and
    pipeline parallelism's extra copies are not modelled.
    """
    n_ub = min(
        int_setting(args, env, 512, "LLAMA_ARG_UBATCH", "-ub", "--ubatch-size"),
        int_setting(args, env, 2048, "LLAMA_ARG_BATCH", "-b", "--batch-size"),
        max(n_ctx, 1),
    )
    layout = slots(args, env)
    n_kv = n_ctx if layout.unified else max(n_ctx // layout.count, 1)
    n_embd = int(header.arch_value("embedding_length", 0) or 0)
    n_head = _int_or_list_max(header.arch_value("attention.head_count"), 1) or 1
    key_len = int(header.arch_value("attention.key_length", n_embd // n_head) or 0)
    rows = 4 * max(n_embd, n_head * key_len) * n_ub * 4
    n_ff = _int_or_list_max(header.arch_value("feed_forward_length"), 0)
    expert_ff = int(header.arch_value("expert_feed_forward_length", 0) or 0)
    experts_used = int(header.arch_value("expert_used_count", 0) or 0)
    n_ff = max(n_ff, expert_ff * experts_used)
    if flash_attention(header, args, env):
        mask, attention = n_kv * n_ub * 2, rows
    else:
        mask, attention = n_kv * n_ub * 4, n_kv * n_ub * n_head * 4 + rows
    feed_forward = (2 * n_ff + 2 * n_embd) * n_ub * 4
    logits = (_n_vocab(header) + n_ff + 4 * n_embd) * n_ub * 4 if output else 0
    return mask + max(attention, feed_forward, logits)


def _kv_cells(
    header: GGUFHeader, args: Sequence[str], env: dict[str, str], n_layer: int, n_ctx: int
) -> list[int]:
    """KV cache cells per layer: the context for full-attention layers, the (much smaller) SWA cache
    for sliding-window ones unless `--swa-full` asks llama.cpp for full-size SWA caches."""
    window, is_swa = _sliding_window(header, n_layer)
    if not window or switch(args, env, "LLAMA_ARG_SWA_FULL", ("--swa-full",)):
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
        int_setting(args, env, 512, "LLAMA_ARG_UBATCH", "-ub", "--ubatch-size"),
        int_setting(args, env, 2048, "LLAMA_ARG_BATCH", "-b", "--batch-size"),
    )
    layout = slots(args, env)
    if layout.unified:
        return _pad(min(n_ctx, window * layout.count + ubatch))
    return layout.count * _pad(min(_pad(_pad(n_ctx) // layout.count), window + ubatch))


def _pad(cells: int) -> int:
    return -(-cells // SWA_PAD) * SWA_PAD


def layer_shares(args: Sequence[str], gpus: Sequence[str]) -> dict[str, float]:
    """Each offload device's share of the offloaded layers (visible GPUs, after RPC workers): equal
    unless `--tensor-split` says otherwise."""
    split_text = flag_value(args, "-ts", "--tensor-split")
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
            index = gpu_ordinal(buffer)
            return gpus[index] if index is not None and index < len(gpus) else None
    return None


def _layer_of(name: str) -> int | None:
    if name.startswith("blk."):
        part = name.split(".", 2)[1]
        if part.isdigit():
            return int(part)
    return None


def gpu_ordinal(buffer: str) -> int | None:
    """k for a buffer of the k-th GPU a llama.cpp process sees (`CUDA<k>`, `ROCm<k>`, `Vulkan<k>`,
    `MTL<k>_Mapped`, `Metal`...); None for host memory and anything else."""
    gpu = _GPU_BUFFER.match(buffer)
    if gpu is not None:
        return int(gpu.group(1))
    metal = _METAL_BUFFER.match(buffer)
    if metal is not None:
        return int(metal.group(1) or 0)
    return None


def _valid_entry(entry: object) -> dict[str, int] | None:
    """The footprint of a saved entry (`{"identity": str, "footprint": {device: bytes}}`), or None
    when it has another shape."""
    if not isinstance(entry, dict) or not isinstance(entry.get("identity"), str):
        return None
    footprint = entry.get("footprint")
    if not isinstance(footprint, dict) or not footprint:
        return None
    if not all(
        isinstance(device, str) and type(amount) is int and amount >= 0
        for device, amount in footprint.items()
    ):
        return None
    return dict(footprint)


# Why a learned footprint is what it is: per device, the log lines that made it up and what each put
# there (`{"gpu0": [{"line": "load_tensors: CUDA0 model buffer size = 8000.00 MiB", "bytes": ...}]}`).
Sources = dict[str, list[dict[str, object]]]


def _valid_sources(entry: dict[str, object]) -> Sources:
    """A saved entry's sources, or none when they are missing or of another shape (an older file)."""
    sources = entry.get("sources")
    if not isinstance(sources, dict):
        return {}
    valid: Sources = {}
    for device, lines in sources.items():
        if isinstance(device, str) and isinstance(lines, list):
            valid[device] = [
                {"line": item["line"], "bytes": item["bytes"]}
                for item in lines
                if isinstance(item, dict)
                and isinstance(item.get("line"), str)
                and type(item.get("bytes")) is int
            ]
    return valid


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
    """Learned footprints, kept in `<state_dir>/footprints.json` across router restarts.

    The file is a cache of measurements, never a reason not to start: one that cannot be read as a
    JSON object is set aside (renamed `footprints.json.corrupt-<time>`, for a person to look at) and
    learning starts afresh; an entry of the wrong shape is dropped on its own, the others kept."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._data: dict[str, dict[str, object]] = {}
        try:
            text = path.read_text()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("cannot read learned footprints from %s: %s", path, exc.strerror or exc)
            return
        try:
            loaded = json.loads(text)
        except (ValueError, RecursionError) as exc:
            self._quarantine(f"not JSON ({exc})")
            return
        if not isinstance(loaded, dict):
            self._quarantine(f"a JSON {type(loaded).__name__}, not an object")
            return
        for name, entry in loaded.items():
            footprint = _valid_entry(entry)
            if footprint is None:
                log.warning("%s: dropped the entry for %r, which is not a learned footprint", path, name)
                continue
            self._data[name] = {
                "identity": entry["identity"],
                "footprint": footprint,
                "sources": _valid_sources(entry),
            }

    def _quarantine(self, why: str) -> None:
        """Move an unreadable state file aside so the next save does not lose it, and say so."""
        move_aside(self.path, why, "footprints will be learned again")

    def get(self, profile: ResolvedProfile) -> dict[str, int] | None:
        entry = self._data.get(profile.name)
        if not entry or entry.get("identity") != identity(profile):
            return None
        footprint = entry.get("footprint")
        return dict(footprint) if isinstance(footprint, dict) else None

    def sources(self, profile: ResolvedProfile) -> Sources:
        """The lines behind a profile's learned footprint; none for another footprint."""
        entry = self._data.get(profile.name)
        if not entry or entry.get("identity") != identity(profile):
            return {}
        sources = entry.get("sources")
        return dict(sources) if isinstance(sources, dict) else {}

    def put(
        self, profile: ResolvedProfile, footprint: dict[str, int], sources: Sources | None = None
    ) -> None:
        self._data[profile.name] = {
            "identity": identity(profile),
            "footprint": footprint,
            "sources": sources or {},
        }
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.path.with_suffix(".partial")
            partial.write_text(json.dumps(self._data, indent=1, sort_keys=True))
            partial.replace(self.path)
        except OSError as exc:
            log.warning("could not save learned footprints to %s: %s", self.path, exc)
