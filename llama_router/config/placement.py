"""Whether a profile's GPUs are the router's to choose: the `placement:` setting and the command
lines and environments that fix a model's devices themselves (those run exactly where they say)."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# The variables by which a backend sees only some GPUs: CUDA, HIP, ROCr and Vulkan (ggml's own).
VISIBLE_DEVICE_VARIABLES = (
    "CUDA_VISIBLE_DEVICES",
    "HIP_VISIBLE_DEVICES",
    "ROCR_VISIBLE_DEVICES",
    "GGML_VK_VISIBLE_DEVICES",
)
# llama-server flags that choose devices, with the `LLAMA_ARG_*` variable each may come from.
_DEVICE_FLAGS = {
    ("-dev", "--device"): "LLAMA_ARG_DEVICE",
    ("-mg", "--main-gpu"): "LLAMA_ARG_MAIN_GPU",
    ("-ts", "--tensor-split"): "LLAMA_ARG_TENSOR_SPLIT",
    ("--rpc",): "LLAMA_ARG_RPC",
}
_GPU_NAME = re.compile(r"gpu\d+")


class PlacementOptions(BaseModel):
    """`placement: {gpus: [...], split: ..., ram: ...}`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gpus: tuple[str, ...] | None = Field(default=None, description="the GPUs it may go on (default: all)")
    split: bool = Field(default=True, description="may be split over GPUs when no single one can hold it")
    ram: bool = Field(default=False, description="may keep part of itself in RAM when no GPU can hold it")

    @field_validator("gpus")
    @classmethod
    def _gpu_names(cls, gpus: tuple[str, ...] | None) -> tuple[str, ...] | None:
        for gpu in gpus or ():
            if not _GPU_NAME.fullmatch(gpu):
                raise ValueError(f"unknown GPU {gpu!r}; use 'gpu0', 'gpu1', ...")
        if gpus is not None and not gpus:
            raise ValueError("an empty list leaves no GPU to place it on")
        return gpus


PlacementSetting = Literal["auto"] | list[str] | PlacementOptions


def options(setting: PlacementSetting | None) -> PlacementOptions:
    """The options a `placement:` value means (`auto` and unset: any GPU, split allowed, no RAM)."""
    if isinstance(setting, PlacementOptions):
        return setting
    if isinstance(setting, list):
        return PlacementOptions(gpus=tuple(setting))
    return PlacementOptions()


def _flag_values(args: Sequence[str], names: Sequence[str]) -> Iterator[str]:
    for index, arg in enumerate(args):
        flag, eq, inline = arg.partition("=")
        if flag in names:
            if eq:
                yield inline
            elif index + 1 < len(args):
                yield args[index + 1]


def fixed_by(args: Sequence[str], env: Mapping[str, str]) -> str | None:
    """What fixes a profile's devices (a flag or variable), or None when the router may place it."""
    for variable in VISIBLE_DEVICE_VARIABLES:
        if variable in env:
            return f"env {variable}"
    for names, variable in _DEVICE_FLAGS.items():
        if any(True for _ in _flag_values(args, names)):
            return names[-1]
        if variable in env:
            return f"env {variable}"
    modes = [*_flag_values(args, ("-sm", "--split-mode"))] + (
        [env["LLAMA_ARG_SPLIT_MODE"]] if "LLAMA_ARG_SPLIT_MODE" in env else []
    )
    if "none" in modes:
        return "--split-mode none"
    for value in _flag_values(args, ("-ot", "--override-tensor")):
        for item in value.split(","):
            _, eq, buffer = item.rpartition("=")
            if eq and not buffer.strip().upper().startswith("CPU"):
                return f"--override-tensor {item}"
    return None
