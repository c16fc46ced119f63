"""Reads a GGUF file's header: metadata key/values and tensor descriptions, never the weights.

The router needs a model's context length and an estimate of its memory use before it loads it; both
come from the header. This is a small reader of its own so that start-up imports no numpy; results are
cached per (path, size, mtime).
"""

from __future__ import annotations

import functools
import itertools
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

_MAGIC = b"GGUF"
_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9
# ggml types: (elements per block, bytes per block), for the size a tensor's data must have.
_BLOCKS = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 9: (32, 36),
    10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292),
    16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18), 21: (256, 110),
    22: (256, 82), 23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8),
    29: (256, 56), 30: (1, 2), 34: (256, 54), 35: (256, 66), 39: (32, 17),
}  # fmt: skip
# Arrays longer than this (token lists, merges) are skipped, not kept: nobody here needs them.
_KEEP_ARRAY_MAX = 64


class GGUFError(ValueError):
    """The file is not a GGUF model this reader understands."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int
    nbytes: int


@dataclass(frozen=True)
class GGUFHeader:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: tuple[TensorInfo, ...]
    file_size: int
    data_start: int = 0  # where the tensor data begins (after the header, aligned)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def missing_bytes(self) -> int:
        """How many bytes the tensor data lacks to be whole (0: complete, as far as the types of its
        tensors are known): a file still being written, or cut short, lacks some."""
        end = self.data_start
        for tensor in self.tensors:
            block = _BLOCKS.get(tensor.ggml_type)
            elements = 1
            for dim in tensor.shape:
                elements *= dim
            size = elements // block[0] * block[1] if block else 0
            end = max(end, self.data_start + tensor.offset + size)
        return max(0, end - self.file_size)

    def arch_value(self, key: str, default: Any = None) -> Any:
        """A `<architecture>.<key>` metadata value, e.g. `context_length`."""
        return self.metadata.get(f"{self.architecture}.{key}", default)


class _Reader:
    def __init__(self, stream: BinaryIO, *, wide: bool) -> None:
        self.stream = stream
        self.count_format = "<Q" if wide else "<I"

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        data = self.stream.read(size)
        if len(data) != size:
            raise GGUFError("unexpected end of file in the header")
        return struct.unpack(fmt, data)[0]

    def count(self) -> int:
        return int(self.unpack(self.count_format))

    def string(self) -> str:
        length = self.count()
        data = self.stream.read(length)
        if len(data) != length:
            raise GGUFError("unexpected end of file in a string")
        return data.decode("utf-8", "replace")

    def skip_string(self) -> None:
        self.stream.seek(self.count(), os.SEEK_CUR)

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item_kind = self.unpack("<I")
            length = self.count()
            if length > _KEEP_ARRAY_MAX:
                self.skip_array(item_kind, length)
                return _SkippedArray(length)
            return [self.value(item_kind) for _ in range(length)]
        raise GGUFError(f"unknown metadata value type {kind}")

    def skip_array(self, item_kind: int, length: int) -> None:
        if item_kind in _SCALARS:
            self.stream.seek(struct.calcsize(_SCALARS[item_kind]) * length, os.SEEK_CUR)
        elif item_kind == _STRING:
            for _ in range(length):
                self.skip_string()
        else:
            for _ in range(length):
                self.value(item_kind)


class _SkippedArray(list[Any]):
    """Stands for a long array that was skipped; only its length is known."""

    def __init__(self, length: int) -> None:
        super().__init__()
        self.length = length

    def __len__(self) -> int:
        return self.length


def read_header(path: str | Path) -> GGUFHeader:
    """The metadata and tensor table of a GGUF file (cached while the file is unchanged)."""
    path = Path(path)
    stat = path.stat()
    return _read_header_cached(str(path), stat.st_size, stat.st_mtime_ns)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Just the metadata key/values of a GGUF file."""
    return read_header(path).metadata


@functools.lru_cache(maxsize=64)
def _read_header_cached(path: str, size: int, mtime_ns: int) -> GGUFHeader:
    with open(path, "rb") as stream:
        if stream.read(4) != _MAGIC:
            raise GGUFError(f"{path}: not a GGUF file")
        version = _Reader(stream, wide=True).unpack("<I")
        if version not in (1, 2, 3):
            raise GGUFError(f"{path}: unsupported GGUF version {version}")
        reader = _Reader(stream, wide=version >= 2)
        tensor_count = reader.count()
        kv_count = reader.count()
        metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key = reader.string()
            metadata[key] = reader.value(reader.unpack("<I"))
        raw: list[tuple[str, tuple[int, ...], int, int]] = []
        for _ in range(tensor_count):
            name = reader.string()
            dims = reader.unpack("<I")
            shape = tuple(reader.count() for _ in range(dims))
            raw.append((name, shape, reader.unpack("<I"), reader.unpack("<Q")))
        alignment = int(metadata.get("general.alignment", 32))
        data_start = -(-stream.tell() // alignment) * alignment
    # Sizes from the gaps between offsets: exact up to alignment padding, and needs no type table.
    ends = sorted({offset for _, _, _, offset in raw} | {size - data_start})
    next_offset = dict(itertools.pairwise(ends))
    tensors = tuple(
        TensorInfo(name, shape, kind, offset, max(0, next_offset.get(offset, offset) - offset))
        for name, shape, kind, offset in raw
    )
    return GGUFHeader(Path(path), version, metadata, tensors, size, data_start)
