"""What a loaded llama.cpp process holds on each device, read from the buffer lines of its load log,
with the lines behind each figure kept as its reason ("why this number").

Each buffer line names a buffer type and a size: `load_tensors: %12s model buffer size = %8.2f MiB`
(src/llama-model.cpp), `llama_kv_cache: %10s KV buffer size` (llama-kv-cache.cpp), `llama_context:
%10s  output buffer size` and `sched_reserve: %10s compute buffer size` (llama-context.cpp), `RS`
(llama-memory-recurrent.cpp), `LoRA` (llama-adapter.cpp), the projector's `alloc_compute_meta: ...
compute buffer size` (tools/mtmd/clip.cpp); before 2025 `llm_load_tensors: %10s buffer size`,
`llama_kv_cache_init:` and `llama_new_context_with_model:`. Summaries (`KV self size`, `llama_kv_cache:
size = ...`, the memory breakdown table) are not buffers. A line that speaks of a buffer size but
cannot be placed on a device is a warning naming it, never a silent drop.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from llama_router.config.schema import ResolvedProfile
from llama_router.core.devices import describe, device_name
from llama_router.sizing.context_window import fits, flag_value
from llama_router.sizing.footprint import (
    GPU_MARGIN,
    RAM_MARGIN,
    Sources,
    count_shared_memory,
    gpu_ordinal,
    layer_shares,
    visible_gpus,
)
from llama_router.sizing.memory import MIB, Device, is_gpu

log = logging.getLogger("llama_router.footprint")

# A buffer line, wherever it sits in a line: behind llama-server's own prefixes and those of the
# programs that relay llama.cpp's log (Ollama, LM Studio, GPUStack's llama-box, a journal).
_BUFFER_LINE = re.compile(
    r"(?:^|(?<=\s))(?P<func>\w+): +(?P<buffer>\S+) +(?:(?P<kind>\w[\w ]*?) +)?"
    r"buffer size = *(?P<mib>\d+(?:\.\d+)?) MiB\b"
)
# Any other line that speaks of a buffer's size: what the parser cannot place, said as a warning.
_BUFFER_MENTION = re.compile(r"\bbuffer size *[=:]")
# With --log-prefix (and --log-timestamps) each line starts with `[M.s.ms.us ]<level letter> ` (with
# `[<port>] ` before it from llama-server's router mode, `[<date> <time>] ` from llama-box); with
# --log-colors it carries ANSI colour codes, which a paste from a terminal keeps without their escape
# character; with --log-jsonl it is a JSON object whose `msg` is the line.
_LOG_PREFIX = re.compile(r"^(?:\[[^\]]*\] *)?(?:\d+\.\d+\.\d+\.\d+ )?([IWED]) ")
_ANSI = re.compile(r"\x1b?\[[0-9;]*m")
# The projector (mmproj) logs its weights apart from its buffers: `clip_ctx: CLIP using CUDA0 backend`,
# then `load_hparams: model size: 851.19 MiB` for each modality (the whole file each time). In 2024
# `clip_model_load: CLIP using CUDA backend` named a backend without an index (its first device) and
# gave sizes in `MB` (clip.cpp divided by 1024*1024: MiB), its compute buffer as `compute allocated
# memory`, and its weights a second time as `params backend buffer size`.
_CLIP_BACKEND = re.compile(r"(?:^|(?<=\s))\w+: CLIP using (?P<backend>\S+) backend")
_CLIP_SIZE = re.compile(r"(?:^|(?<=\s))\w+: model size: +(?P<mib>\d+(?:\.\d+)?) (?:MiB|MB)\b")
_CLIP_COMPUTE_2024 = re.compile(
    r"(?:^|(?<=\s))clip_model_load: compute allocated memory: +(?P<mib>\d+(?:\.\d+)?) MB\b"
)
_CLIP_PARAMS_2024 = re.compile(r"(?:^|(?<=\s))clip_model_load: params backend buffer size = ")
_INDEXLESS_BACKENDS = ("CUDA", "ROCm", "Vulkan", "SYCL", "MUSA", "CANN")
# `llama_model_loader: loaded meta data with N key-value pairs and M tensors from <file> (version ...`:
# the file the next weights come from.
_MODEL_FILE = re.compile(
    r"\bloaded meta data with \d+ key-value pairs and \d+ tensors from (?P<path>.+?) \(version"
)
# A sibling load of the same GGUF (the built-in MTP head): `done_getting_tensors: partial load — used
# 23 of 753 tensors in the file (rest belong to a sibling model on the same .gguf)`.
_SIBLING = re.compile(r"\bpartial load\b.*\bsibling model\b")
# llama-server's `srv init: initializing slots, n_slots = N` (2024 to mid 2025): a draft model's
# per-slot contexts follow it, and the context its load made before it was freed.
_SLOTS = re.compile(r"\binitializing slots\b")
# llama-server's `main: model loaded`, once the model, its projector and its draft model are loaded:
# every buffer line comes before it.
_LOADED = re.compile(r"\bmodel loaded\b")
# `load_tensors: offloaded 20/33 layers to GPU` (src/llama-model.cpp): how many layers a load put on
# the GPUs, the output layer counted as one.
_OFFLOADED = re.compile(r"\boffloaded (\d+)/(\d+) layers to GPU")
# `--fit` found the free memory short of what the arguments ask (common/fit.cpp, logged at -lv 4:
# `cannot meet free memory target of N MiB` on one GPU, `... targets on all devices` on several):
# what it changes next, the context or the layers, is for this moment's neighbours only.
_FIT_SHORT = re.compile(r"\bcannot meet free memory targets?\b")
# Buffer types that are not one GPU's: `<backend>_Split` holds the row-split weights of all GPUs
# (spread as `--tensor-split` shares them); `Meta(...)` is the device `-sm tensor` makes of its GPUs
# (named `Meta()` by builds that lose the names, `Meta` before); `CPU`, `CPU_Mapped`, `CPU_REPACK`,
# `AMX`, `<backend>_Host` (pinned) and the like are host RAM; `RPC[<host:port>]` (`RPC<k>[...]` since
# 2025) is on that RPC worker.
_SPLIT_BUFFER = re.compile(r"^(?:CUDA|ROCm|SYCL|MUSA)_Split$")
_META_BUFFER = re.compile(r"^Meta(?:\((?P<devices>[^)]*)\))?$")
_HOST_BUFFER = re.compile(r"^(?:CPU(?:_\w+)?|AMX|\w+_Host)$")
_RPC_BUFFER = re.compile(r"^RPC\d*\[(?P<worker>[^\]]+)\]$")
_METAL_NAME = re.compile(r"^(?:MTL\d+|Metal)")

SOURCE_LINES = 6  # lines kept per device as a footprint's reason; the rest are summed in one entry
SOURCE_CHARS = 200  # a longer line is cut


class BufferLine(NamedTuple):
    """One buffer llama.cpp logged."""

    buffer: str  # its buffer type's name: CUDA0, CPU_Mapped, MTL0_Mapped, CUDA_Host, RPC0[host:port]...
    kind: str  # "model" (weights), "KV", "output", "compute", "RS", "LoRA"...
    nbytes: int


def parse_buffer_line(text: str) -> BufferLine | None:
    """The buffer a line of llama.cpp's log (without its decorations) reports, if it reports one."""
    match = _BUFFER_LINE.search(text)
    if match is None:
        return None
    # Before 2025 the weights' line had no kind: `llm_load_tensors:      CUDA0 buffer size = ...`.
    kind = match["kind"] or ("model" if match["func"].endswith("load_tensors") else "")
    return BufferLine(match["buffer"], kind, int(float(match["mib"]) * MIB))


def log_message(line: str) -> tuple[str, bool]:
    """A line of llama-server's output without its decorations, and whether it was logged at debug
    level (as the trial loads of `--fit` are; only `-v` shows them)."""
    text = _ANSI.sub("", line).strip()
    if text.startswith("{"):
        try:
            entry = json.loads(text)
        except ValueError:
            return text, False
        if isinstance(entry, dict) and isinstance(entry.get("msg"), str):
            return entry["msg"].strip(), str(entry.get("level", "")).lower().startswith("d")
        return text, False
    prefix = _LOG_PREFIX.match(text)
    if prefix is not None:
        return text[prefix.end() :], prefix.group(1) == "D"
    return text, False


@dataclass
class _Part:
    """What one log line put on one device."""

    device: str
    nbytes: int
    line: str
    context: bool = False  # a context's buffer (KV, output, compute...), not weights
    before_slots: bool = False  # logged before llama-server initialized its slots
    mapped: tuple[str, str] | None = None  # (model file, buffer) of a weights range mapped from the file


@dataclass
class _Load:
    """The buffers of one model load: its weights first, then its contexts'."""

    key: str  # the model file it reads, or its place in the log where the log does not say
    parts: list[_Part] = field(default_factory=list)
    unbudgeted: list[tuple[str, int, str]] = field(default_factory=list)  # (buffer, bytes, line)
    weight_lines: int = 0
    weights: int = 0
    context_seen: bool = False
    slot_contexts: bool = False  # it made contexts after llama-server initialized its slots

    def trial(self) -> bool:
        """One of `--fit`'s trial loads: weights logged at 0 MiB, no memory behind any buffer."""
        return self.weight_lines > 0 and self.weights == 0


class BufferTally:
    """Adds up, per device, the buffers llama-server logs while it loads, keeping the lines.

    Each model load logs its weights' buffers, then its contexts' (output, KV, compute); a draft
    model's load follows the main one and counts too. Not counted: a trial load of `--fit` (all
    weights at 0 MiB, shown only with -v); a context a load made and llama-server freed before making
    its per-slot ones (a draft model's, 2024 to mid 2025); a weights range mapped from a file (`*_Mapped`)
    that an earlier load of the same file mapped already (a sibling MTP head logs the whole model's
    range again), which counts once. llama.cpp numbers the GPUs it sees, so `CUDA0` is the first GPU
    the process's `*_VISIBLE_DEVICES` leaves. Buffers on a device the router has no budget for are
    left out (a budget of nothing would refuse the model for ever) and said, with their lines, when
    the footprint is taken.
    """

    def __init__(
        self,
        devices: Sequence[Device] = (),
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        label: str = "llama-server",
    ) -> None:
        self.devices = list(devices)
        self.visible = visible_gpus(env or {}, [device.name for device in devices if is_gpu(device.name)])
        self.budgeted = {device.name for device in devices}
        self.shares = layer_shares(args, self.visible)
        # The GPUs a `-sm tensor` group spans: those `--device` names, else all that take a share.
        listed_names = (flag_value(args, "--device", "-dev") or "").split(",")
        named = [gpu_ordinal(name.strip()) for name in listed_names]
        listed = [self.visible[k] for k in named if k is not None and k < len(self.visible)]
        self.group = listed or [gpu for gpu, share in self.shares.items() if share > 0]
        self.label = label
        self.args, self.env = list(args), dict(env or {})
        self.offloaded: tuple[int, int] | None = None  # (layers on GPUs, layers) of the main model
        self.fit_short = False  # --fit said the free memory was short of what the arguments ask
        self._loads: list[_Load] = []
        self._clip_device: str | None = None
        self._clip_counted = False
        self._next_file: str | None = None
        self._sibling = False
        self._slots_started = False
        self.loaded = False  # the output said the model is loaded: every buffer has been logged

    @classmethod
    def of(cls, profile: ResolvedProfile, devices: Sequence[Device]) -> BufferTally:
        return cls(devices, profile.args, profile.env, f"llama-server for {profile.name!r}")

    def feed(self, line: str) -> None:
        text, debug = log_message(line)
        if debug:
            return
        buffer = parse_buffer_line(text)
        if buffer is not None:
            weights = buffer.kind == "model"
            load = self._load(new=weights)
            if weights:
                load.weight_lines += 1
                load.weights += buffer.nbytes
            else:
                load.context_seen = True
                load.slot_contexts |= self._slots_started
            self._add(load, buffer.buffer, buffer.nbytes, text, context=not weights)
        elif match := _MODEL_FILE.search(text):
            self._next_file = match["path"]
        elif _SIBLING.search(text):
            self._sibling = True
        elif _SLOTS.search(text):
            self._slots_started = True
        elif match := _CLIP_BACKEND.search(text):
            backend = match["backend"]
            self._clip_device = backend + "0" if backend in _INDEXLESS_BACKENDS else backend
        elif _LOADED.search(text):
            self.loaded = True
        elif (match := _OFFLOADED.search(text)) and self.offloaded is None:
            self.offloaded = (int(match[1]), int(match[2]))
        elif _FIT_SHORT.search(text):
            self.fit_short = True
        elif (match := _CLIP_SIZE.search(text)) and self._clip_device is not None:
            if not self._clip_counted:  # each modality logs the size of the whole file again
                self._clip_counted = True
                self._add(self._load(), self._clip_device, int(float(match["mib"]) * MIB), text)
        elif (match := _CLIP_COMPUTE_2024.search(text)) and self._clip_device is not None:
            self._add(self._load(), self._clip_device, int(float(match["mib"]) * MIB), text, context=True)
        elif _BUFFER_MENTION.search(text) and not _CLIP_PARAMS_2024.search(text):
            log.warning("%s: cannot read a buffer from this line; it is left out: %r", self.label, text)

    def _load(self, new: bool = False) -> _Load:
        """The load a buffer belongs to: a new one for weights logged after a context's buffers."""
        if self._loads and not (new and self._loads[-1].context_seen):
            return self._loads[-1]
        key = self._next_file
        if key is None and self._sibling and self._loads:
            key = self._loads[-1].key  # the sibling reads the file the load before it read
        self._loads.append(_Load(key or f"load #{len(self._loads) + 1}"))
        self._next_file, self._sibling = None, False
        return self._loads[-1]

    def _add(self, load: _Load, buffer: str, nbytes: int, text: str, context: bool = False) -> None:
        """Put a buffer's bytes on the router's devices, with the line that says so."""
        placed = self._place(buffer, nbytes)
        if placed is None:
            log.warning(
                "%s: cannot place buffer %s on a device; it is left out: %r", self.label, buffer, text
            )
            return
        if not placed:
            load.unbudgeted.append((buffer, nbytes, text))
        mapped = (load.key, buffer) if buffer.endswith("_Mapped") and not context else None
        for device, (amount, how) in placed.items():
            line = f"{text} ({how})" if how else text
            before = context and not self._slots_started
            load.parts.append(_Part(device, amount, line[:SOURCE_CHARS], context, before, mapped))

    def _place(self, buffer: str, nbytes: int) -> dict[str, tuple[int, str]] | None:
        """Bytes (and how they were shared out, if they were) per device for a buffer; empty for a
        device without a budget, None for a buffer type the parser does not know."""
        if _HOST_BUFFER.match(buffer):
            return {"ram": (nbytes, "")}
        rpc = _RPC_BUFFER.match(buffer)
        if rpc is not None:
            device = device_name(rpc["worker"])
            return {device: (nbytes, "")} if device in self.budgeted else {}
        if _SPLIT_BUFFER.match(buffer):
            return {
                gpu: (int(nbytes * share), f"{share:.0%} of it, per --tensor-split")
                for gpu, share in self.shares.items()
                if share > 0
            }
        meta = _META_BUFFER.match(buffer)
        if meta is not None:
            # ggml-backend-meta sizes each GPU's buffer alike, at the largest share: every GPU of the
            # group holds the size logged.
            names = [name for name in (meta["devices"] or "").split(",") if name]
            ordinals = [gpu_ordinal(name) for name in names]
            if names and all(ordinal is not None for ordinal in ordinals):
                gpus = [self.visible[k] for k in ordinals if k is not None and k < len(self.visible)]
            else:
                gpus = self.group
            return {gpu: (nbytes, "on each GPU of the -sm tensor group") for gpu in gpus}
        ordinal = gpu_ordinal(buffer)
        if ordinal is None:
            return None
        if ordinal < len(self.visible):
            return {self.visible[ordinal]: (nbytes, "")}
        if _METAL_NAME.match(buffer):
            return {"ram": (nbytes, "")}  # an Apple GPU the router does not budget: its memory is RAM
        return {}

    def _counted(self) -> list[_Part]:
        """The parts of the real loads that hold memory now."""
        counted: list[_Part] = []
        mapped: dict[tuple[tuple[str, str], str], _Part] = {}
        for load in self._loads:
            if load.trial():
                continue
            for part in load.parts:
                if part.context and part.before_slots and load.slot_contexts:
                    continue  # made at load time and freed for the per-slot contexts
                if part.mapped is not None:  # the same range of the same file counts once
                    seen = mapped.get((part.mapped, part.device))
                    if seen is None or part.nbytes > seen.nbytes:
                        mapped[(part.mapped, part.device)] = part
                    continue
                counted.append(part)
        return counted + list(mapped.values())

    def shrunk(self) -> bool:
        """Whether `--fit`, finding the free memory short, put fewer layers on the GPUs than the
        arguments ask for (all of them unless `-ngl` says a number): the buffers of such a load say
        what the model took beside those neighbours, not what it takes (sizing/fit.py)."""
        if not self.fit_short or self.offloaded is None or not self.visible or not fits(self.args, self.env):
            return False
        if flag_value(self.args, "--device", "-dev") == "none":
            return False
        placed, layers = self.offloaded
        asked = flag_value(self.args, "-ngl", "--gpu-layers", "--n-gpu-layers")
        wanted = layers if asked is None or not asked.lstrip("-").isdigit() or int(asked) < 0 else int(asked)
        return placed < min(wanted, layers)

    def logged(self) -> dict[str, int]:
        """Bytes per device of the real loads so far, as logged."""
        total: dict[str, int] = {}
        for part in self._counted():
            total[part.device] = total.get(part.device, 0) + part.nbytes
        return total

    def measured(self) -> tuple[dict[str, int], Sources]:
        """What was logged plus the margins nothing logs (process, CUDA context), as the budgets
        count it, and per device the lines that make it up."""
        unbudgeted = [entry for load in self._loads if not load.trial() for entry in load.unbudgeted]
        if unbudgeted:
            amounts: dict[str, int] = {}
            for buffer, amount, _ in unbudgeted:
                amounts[buffer] = amounts.get(buffer, 0) + amount
            log.warning(
                "%s logged %s on devices the router has no budget for (see `llama-router check`); "
                "they are left out of its footprint: %s",
                self.label,
                describe(amounts),
                "; ".join(repr(line) for _, _, line in unbudgeted[:SOURCE_LINES]),
            )
        parts = self._counted()
        if not parts:
            return {}, {}
        logged: dict[str, int] = {}
        for part in parts:
            logged[part.device] = logged.get(part.device, 0) + part.nbytes
        margins = {device: GPU_MARGIN for device in logged if device != "ram"} | {"ram": RAM_MARGIN}
        unshared = {device: logged.get(device, 0) + margin for device, margin in margins.items()}
        result = count_shared_memory(unshared, self.devices)
        sources: Sources = {}
        for device, margin in margins.items():
            sources[device] = _capped([part for part in parts if part.device == device])
            what = (
                "the process, its threads and HTTP server"
                if device == "ram"
                else "the backend's context on it"
            )
            sources[device].append({"line": f"not logged: {what} (margin)", "bytes": margin})
        shared = result["ram"] - unshared["ram"]
        if shared:
            sources["ram"].append({"line": "the GPU buffers above, in unified memory", "bytes": shared})
        return result, sources

    def footprint(self) -> dict[str, int]:
        """What was logged plus the margins nothing logs, as the budgets count it."""
        return self.measured()[0]

    def sources(self) -> Sources:
        """Per device, the lines behind `footprint()`."""
        return self.measured()[1]


def _capped(parts: list[_Part]) -> list[dict[str, object]]:
    """The largest parts as `{line, bytes}`, the rest summed in one entry."""
    ordered = sorted(parts, key=lambda part: -part.nbytes)
    kept: list[dict[str, object]] = [
        {"line": part.line, "bytes": part.nbytes} for part in ordered[:SOURCE_LINES]
    ]
    rest = ordered[SOURCE_LINES:]
    if rest:
        kept.append({"line": f"{len(rest)} more buffer lines", "bytes": sum(part.nbytes for part in rest)})
    return kept
