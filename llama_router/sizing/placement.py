"""Placement between the machine and the scheduler: what a placeable profile needs on a GPU (from
the footprint it was estimated or learned with, on whichever GPUs that was), and how a placement
the scheduler decided is started (the visible-devices variable, `--tensor-split`, `-ngl`).

llama.cpp numbers the GPUs a process sees from 0, so after `CUDA_VISIBLE_DEVICES=2,3` its `CUDA0`
is the machine's `gpu2`. The router numbers GPUs in NVML's order, which is PCI bus order; CUDA's
own default order is fastest first, so a placed process also gets `CUDA_DEVICE_ORDER=PCI_BUS_ID`,
and the indices it is given then mean the same GPUs to it as to NVML. Learned footprints name the
machine's GPUs (see `BufferTally`, which reads the buffers through the same variables).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence

from llama_router.config.schema import ResolvedProfile
from llama_router.core.placement import Placed, Placement
from llama_router.core.scheduler import Plan
from llama_router.sizing.footprint import GPU_MARGIN
from llama_router.sizing.gguf import GGUFError, read_header
from llama_router.sizing.memory import Device, is_gpu

log = logging.getLogger("llama_router.placement")


def gpu_index(device: str) -> int:
    """The machine's number of a GPU device (`gpu2` is 2)."""
    return int(device[3:])


def placement_of(
    profile: ResolvedProfile, footprint: Mapping[str, int], devices: Sequence[Device], exclude: Sequence[str]
) -> Placement | None:
    """The scheduler's placement data for a profile, or None where the router does not place it: its
    devices are fixed, it has no GPU part, or the machine has fewer than two GPUs (no choice)."""
    gpus = [device.name for device in devices if is_gpu(device.name)]
    if profile.placement is None or len(gpus) < 2:
        return None
    allowed = profile.placement.gpus
    candidates = tuple(gpu for gpu in gpus if gpu not in exclude and (allowed is None or gpu in allowed))
    on_gpus = [amount for device, amount in footprint.items() if is_gpu(device)]
    if not candidates or not sum(on_gpus):
        return None
    # A footprint spread over k GPUs holds the per-GPU margin k times; on one GPU it is needed once.
    need = sum(on_gpus) - GPU_MARGIN * (len(on_gpus) - 1)
    return Placement(candidates, need, profile.placement.split, profile.placement.ram, split_extra=GPU_MARGIN)


def off_gpus(footprint: Mapping[str, int]) -> dict[str, int]:
    """The part of a footprint that stays wherever the model is placed (RAM, slots, RPC workers)."""
    return {device: amount for device, amount in footprint.items() if not is_gpu(device)}


def visible_variable(devices: Sequence[Device]) -> str:
    """The variable that shows a process only some GPUs, for the source the GPUs were found by:
    HIP's for AMD cards read from sysfs, CUDA's otherwise."""
    sources = {device.source for device in devices if is_gpu(device.name)}
    return "HIP_VISIBLE_DEVICES" if sources == {"sysfs"} else "CUDA_VISIBLE_DEVICES"


# CUDA numbers GPUs fastest first unless told to number them in PCI bus order, NVML's and the router's.
_PCI_ORDER = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def device_order(env: Mapping[str, str]) -> dict[str, str]:
    """What a profile that fixes its GPUs by `CUDA_VISIBLE_DEVICES` is started with besides its
    own environment: PCI bus order, so its numbers name the GPUs `nvidia-smi` (NVML) and the
    router number so, and the buffers it logs are counted on the right ones; nothing where its
    environment sets an order itself."""
    return dict(_PCI_ORDER) if "CUDA_VISIBLE_DEVICES" in env and "CUDA_DEVICE_ORDER" not in env else {}


def launch_settings(
    placed: Placed, profile: ResolvedProfile, devices: Sequence[Device]
) -> tuple[dict[str, str], list[str]]:
    """The environment and arguments that start a model where it was placed."""
    variable = visible_variable(devices)
    env = {variable: ",".join(str(gpu_index(gpu)) for gpu in placed.gpus) if placed.gpus else "-1"}
    if variable == "CUDA_VISIBLE_DEVICES":
        env.update(_PCI_ORDER)  # the router's indices: whatever order the profile's environment says
    args: list[str] = []
    if len(placed.gpus) > 1:
        args += ["--tensor-split", ",".join(str(share) for share in placed.shares)]
    if placed.ram and placed.need:
        layers = _block_count(profile)
        if layers:
            on_gpu = (placed.need - placed.ram) / placed.need
            args += ["--n-gpu-layers", str(int(layers * on_gpu))]
    return env, args


def _block_count(profile: ResolvedProfile) -> int:
    try:
        header = read_header(profile.model_path)
    except (OSError, GGUFError) as exc:
        log.warning("%s: cannot read its layer count for a partial offload: %s", profile.name, exc)
        return 0
    return int(header.arch_value("block_count", 0) or 0)


def dry_run(plan: Plan | None, profile: ResolvedProfile) -> dict[str, object]:
    """The answer to "where would this model go now, and what would it stop" (`GET /placement`,
    `llama-router check`), from the scheduler's plan; decides nothing."""
    answer: dict[str, object] = {
        "model": profile.name,
        "placed_by": "router" if profile.placement else "profile",
    }
    if profile.fixed_by:
        answer["fixed_by"] = profile.fixed_by
    if plan is None:
        answer["fits"] = False
        answer["why"] = "it cannot be held beside the pinned models"
        return answer
    stops = plan.stops
    answer["fits"] = True
    answer["now"] = plan.now
    answer["devices"] = sorted(
        device for device, amount in plan.footprint.items() if amount and device != "slots"
    )
    answer["footprint"] = {device: amount for device, amount in plan.footprint.items() if device != "slots"}
    answer["would_stop"] = stops
    if plan.placed is not None:  # a loaded model's is where it went, with what was stopped for it then
        placed = dataclasses.replace(plan.placed, stops=tuple(stops)) if stops else plan.placed
        answer["placement"] = placed.describe()
    return answer
