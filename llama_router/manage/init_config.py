"""`llama-router init`: a commented `profiles.yaml` for the models found on disk and this machine.

Each model found (see model_folders) becomes a profile of its own, with its estimated footprint and
context per request written beside it, `--n-gpu-layers` chosen so that it fits the budgets where it
can (`gpu_layers`), and the residency keys (standby, ttl, keep_context) there to uncomment.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from llama_router.config.schema import ResolvedProfile, RouterConfig
from llama_router.core.devices import describe, size_text
from llama_router.manage.model_folders import Findings
from llama_router.sizing.footprint import estimate
from llama_router.sizing.gguf import read_header
from llama_router.sizing.memory import Device, is_gpu

GPU_LAYER_FLAG = "--n-gpu-layers"


def _fits(footprint: dict[str, int], devices: Sequence[Device]) -> bool:
    budgets = {device.name: device.budget for device in devices}
    return all(amount <= budgets.get(device, 0) for device, amount in footprint.items())


def gpu_layers(profile: ResolvedProfile, devices: Sequence[Device]) -> tuple[int | None, dict[str, int]]:
    """The most layers to offload for the model to fit the budgets (None: no GPU, the flag is not
    needed), with the footprint that gives. All of them when they fit; else the largest count whose
    estimate fits every device (the estimate grows with the count on the GPUs and shrinks in RAM);
    0 when none does (the note then says it cannot fit)."""
    if not any(is_gpu(device.name) for device in devices):
        return None, estimate(profile, devices)

    def sized(layers: int) -> dict[str, int]:
        return estimate(
            profile.model_copy(update={"args": (*profile.args, GPU_LAYER_FLAG, str(layers))}), devices
        )

    total = _layer_count(profile)
    if _fits(every := sized(total), devices):
        return total, every
    low, high = 0, total
    while low < high:  # the largest count that fits, if any does
        middle = (low + high + 1) // 2
        if _fits(sized(middle), devices):
            low = middle
        else:
            high = middle - 1
    return low, sized(low)


def _q(value: str) -> str:
    """A YAML scalar (JSON's quoting is valid YAML)."""
    return json.dumps(value)


def render(
    config: RouterConfig,
    findings: Findings,
    devices: Sequence[Device],
    budget_lines: Sequence[str],
    context_lines: Callable[[ResolvedProfile], list[tuple[str, str]]],
) -> str:
    """The text of the `profiles.yaml`."""
    searched = [str(folder) for folder in config.server.models_dir]
    if config.server.hf_cache:
        searched.append("the Hugging Face cache")
    out = [
        f"# profiles.yaml written by `llama-router init` on {platform.node() or 'this machine'}, "
        f"{time.strftime('%Y-%m-%d %H:%M', time.localtime())},",
        f"# for the models in {', '.join(searched)}.",
        "# Check it: `llama-router check -c <this file>`; run it: `llama-router serve -c <this file>`.",
        "# Every key is described in docs/configuration.md.",
        "",
        "server:",
        "  host: 127.0.0.1  # loopback only; set api_keys before listening on other addresses",
        f"  port: {config.server.port}",
        "  # The memory budgets detected here (detected again at each start unless set under memory:):",
        *[f"  # {line}" for line in budget_lines[1:]],
        "  # memory:",
        "  #   ram: <MiB>       # fix the RAM budget instead",
        "  #   gpus: [<MiB>]    # fix each GPU's budget instead",
    ]
    if searched:
        folders = ", ".join(_q(str(folder)) for folder in config.server.models_dir)
        out += [
            "  # Serve every GGUF dropped into these folders later too, without a profile each (a profile",
            "  # below still wins for its own file):",
            f"  # models_dir: [{folders}]",
        ]
    out += [
        "  # keep_context: false  # the default of each profile's keep_context (see below)",
        "",
        "profiles:",
    ]
    for name, profile in config.profiles.items():
        out += ["", *_profile(name, profile, devices, context_lines)]
    if findings.skipped:
        out += ["", "# Files found but not made profiles:"]
        out += [f"#   {skipped.path}: {skipped.reason}" for skipped in findings.skipped]
    return "\n".join(out) + "\n"


def _profile(
    name: str,
    profile: ResolvedProfile,
    devices: Sequence[Device],
    context_lines: Callable[[ResolvedProfile], list[tuple[str, str]]],
) -> list[str]:
    layers, footprint = gpu_layers(profile, devices)
    args = [*profile.args, *([GPU_LAYER_FLAG, str(layers)] if layers is not None else [])]
    sized = profile.model_copy(update={"args": tuple(args)})
    out = [f"  {_q(name)}:"]
    if profile.origin == "cache":
        repo, _, quant = name.partition(":")
        out.append(f"    hf: {_q(repo)}")
        out.append(f"    hf_file: {_q(_in_snapshot(profile.model_path))}  # quant {quant}")
        if profile.mmproj_path is not None:
            out.append(f"    mmproj: {_q(_in_snapshot(profile.mmproj_path))}")
    else:
        out.append(f"    model: {_q(str(profile.model_path))}")
        if len(profile.model_files) > 1:
            out.append(f"    # a split model: {len(profile.model_files)} shards beside it, loaded together")
        if profile.mmproj_path is not None:
            out.append(f"    mmproj: {_q(str(profile.mmproj_path))}")
    if args:
        out.append(f"    args: [{', '.join(_q(arg) for arg in args)}]")
    out.append(f"    # estimated memory: {describe(footprint)}")
    for label, value in context_lines(sized):
        out.append(f"    # {label}: {value}")
    if layers is None:
        out.append("    # no GPU budget on this machine: it runs on the CPU, from RAM")
    else:
        total = _layer_count(profile)
        placed = "every layer on the GPU" if layers >= total else f"{layers} of {total} layers on the GPU"
        out.append(f"    # {GPU_LAYER_FLAG} {layers}: {placed}, the most that fit the budgets")
    if not _fits(footprint, devices):
        budgets = ", ".join(f"{d.name} {size_text(d.budget)}" for d in devices if d.name in footprint)
        out.append(f"    # NOTE: it cannot fit: it needs {describe(footprint)}, the budgets are {budgets};")
        out.append("    # it would fail to load: a smaller quant, a smaller -c, or more memory")
    out += [
        "    # standby: true      # keep it loaded whenever memory is free and nobody waits for another",
        "    # ttl: 600           # unload it after this many idle seconds (not with standby)",
        "    # keep_context: true # save its slots' prompt caches before a stop, restore them after a start",
    ]
    return out


def _in_snapshot(path: Path) -> str:
    """A cached file's path inside its repo (after `snapshots/<commit>/`)."""
    parts = path.parts
    start = len(parts) - 1 - parts[::-1].index("snapshots") + 2 if "snapshots" in parts else len(parts) - 1
    return "/".join(parts[start:])


def _layer_count(profile: ResolvedProfile) -> int:
    try:
        return int(read_header(profile.model_path).arch_value("block_count", 0) or 0) + 1
    except (OSError, ValueError):
        return 0
