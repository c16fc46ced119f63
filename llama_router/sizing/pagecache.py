"""How much of a file the kernel holds in its page cache (mincore(2)), for the read-ahead display.

The router reads ahead the files of likely-next models (`memory.page_in`); this says whether it
worked: a model whose file is all in the page cache restarts at memory speed. Where mincore is not
available (not Linux or macOS), the answer is None.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import sys

_PROT_READ = 1
_MAP_SHARED = 1
_MAP_FAILED = ctypes.c_void_p(-1).value


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith(("linux", "darwin")):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return libc


_LIBC = _libc()


def cached_bytes(path: str | os.PathLike[str]) -> int | None:
    """Bytes of the file at `path` now in the page cache (to the page), or None if it cannot be told.
    Maps the file without reading it, so asking changes nothing."""
    if _LIBC is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 0
        address = _LIBC.mmap(None, size, _PROT_READ, _MAP_SHARED, fd, 0)
        if address is None or address == _MAP_FAILED:
            return None
        try:
            pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vector = (ctypes.c_ubyte * pages)()
            if _LIBC.mincore(address, size, vector) != 0:
                return None
            resident = pages - bytes(vector).count(0)
        finally:
            _LIBC.munmap(address, size)
    finally:
        os.close(fd)
    return min(size, resident * mmap.PAGESIZE)
