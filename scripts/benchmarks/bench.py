#!/usr/bin/env python3
"""What the router costs, each figure beside its own baseline from the same run.

Sections (loopback only, each bounded in time; the whole run takes about two minutes):
- overhead: a small non-streamed chat to a loaded model, through the router versus straight to its
  upstream, at concurrency 1 and 32: median and p99 latency, requests/s;
- streaming: SSE events/s of a 2000-event stream through the router versus direct, and the time to
  first byte the router adds;
- swap: request for a model that is not loaded -> its answer, minus the upstream's own spawn-to-ready
  time (spawned by hand, /health polled every 1 ms), for upstreams that take 0, 0.5 and 2 s to load;
  both from nothing loaded (cold) and with the other model loaded (swap: it must be stopped first);
- thrash: two closed-loop clients on two models, one resident at a time, for 10 s;
- real: the swap figure with the real llama-server and two generated tiny models, and the overhead
  figures with it as the upstream.

The first four use scripts/benchmarks/fast_upstream.py, an upstream much faster than the router, so the router
is what gets measured; load comes from scripts/benchmarks/loadgen.py in a process of its own, the same client
for both paths. JSON goes to stdout (and --json-out), a short table with the targets to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from llama_router.config.schema import ServerConfig  # noqa: E402
from scripts.benchmarks.bench_swap import ARGS as REAL_ARGS  # noqa: E402
from scripts.benchmarks.bench_thrash import client as closed_loop_client  # noqa: E402
from scripts.benchmarks.benchlib import chat, latency_summary, running_router, swap_figures  # noqa: E402
from scripts.benchmarks.reference_proxies import find_nginx, forwarder_in_front, nginx_in_front, nginx_version  # noqa: E402
from tests.cdp import PAGE_MODES, page_open  # noqa: E402

FAST_UPSTREAM = ROOT / "scripts" / "benchmarks" / "fast_upstream.py"
LOADGEN = ROOT / "scripts" / "benchmarks" / "loadgen.py"
SMALL_CHAT = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
STREAM_CHAT = {**SMALL_CHAT, "stream": True}
STREAM_CHUNKS = 2000
LOAD_DELAYS = (0.0, 0.5, 2.0)
# `real` overhead: llama-server taking several requests at once, as a served model would.
REAL_LOAD_ARGS = ["--ctx-size", "2048", "--parallel", "4"]

TARGETS = {
    "added_median_ms_c1": ("added median latency at concurrency 1", "<=", 0.5, "ms"),
    "rps_ratio_c32": ("router requests/s at concurrency 32 / direct", ">=", 0.5, ""),
    "stream_ratio": ("router chunks/s / direct", ">=", 0.9, ""),
    "swap_overhead_ms": ("swap and cold start beyond upstream readiness, worst", "<=", 30.0, "ms"),
}


def fast_profiles(workdir: Path, *, load_delay: float = 0.0, chunks: int = STREAM_CHUNKS) -> dict[str, Any]:
    """Profiles `a` and `b` on the fast upstream (placeholder model files; footprints configured)."""
    profiles = {}
    for name in ("a", "b"):
        model = workdir / f"{name}.gguf"
        model.touch()
        profiles[name] = {
            "binary": sys.executable,
            "args": [str(FAST_UPSTREAM), "--load-delay", str(load_delay), "--chunks", str(chunks)],
            "model": str(model),
            "footprint": {"ram": 16},
        }
    return profiles


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def upstream_of(session: aiohttp.ClientSession, router_url: str, model: str) -> tuple[int, int]:
    """The port and pid of `model`'s running upstream, read from the router's `/running`."""
    async with session.get(router_url + "/running") as response:
        rows = (await response.json())["running"]
    row = next(row for row in rows if row["model"] == model)
    return int(row["port"]), int(row["pid"])


async def run_loadgen(mode: str, targets: dict[str, int], body: dict[str, Any], **options: Any) -> Any:
    """Run scripts/benchmarks/loadgen.py in its own process; its JSON result."""
    command = [sys.executable, str(LOADGEN), mode, "--body", json.dumps(body)]
    for name, port in targets.items():
        command += ["--target", f"{name}=127.0.0.1:{port}"]
    for key, value in options.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    process = await asyncio.create_subprocess_exec(*command, stdout=subprocess.PIPE)
    out, _ = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"loadgen failed with code {process.returncode}")
    return json.loads(out)


def _side(result: dict[str, Any]) -> dict[str, Any]:
    """Medians over the rounds, then each round's figures (they show how noisy the machine was)."""
    side = {key: value for key, value in result.items() if key != "rounds"}
    for key in list(side):
        side[f"{key}_by_round"] = [entry[key] for entry in result["rounds"]]
    return side


# ---------------------------------------------------------------------------------------- overhead


async def overhead_and_streaming(
    session: aiohttp.ClientSession, workdir: Path, args: argparse.Namespace, sections: set[str]
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    async with running_router(
        session,
        workdir,
        fast_profiles(workdir),
        log_level=args.router_log_level,
        log_file=workdir / "router-overhead.log",
        max_resident=1,
    ) as router:
        await chat(session, router.url, "a")
        upstream_port, upstream_pid = await upstream_of(session, router.url, "a")
        targets = {"direct": upstream_port, "router": port_of(router.url)}
        if "overhead" in sections:
            async with contextlib.AsyncExitStack() as references:
                described = {}
                measured = dict(targets)
                if args.references:
                    described = await _start_references(references, upstream_port, workdir, measured)
                async with page_open(router.url, args.page) as page:
                    results["overhead"] = await _overhead(measured, args)
                results["overhead"]["page"] = page
                if described:
                    results["overhead"]["references"] = described
        if "streaming" in sections:
            with pinned(upstream_pid, args.pin) as placement:
                client = {"cpu": placement["client_cpu"]} if placement else {}
                data = await run_loadgen(
                    "stream", targets, STREAM_CHAT, rounds=args.stream_rounds, count=args.streams, **client
                )
            direct, routed = data["direct"], data["router"]
            results["streaming"] = {
                "events_per_stream": data["router"]["rounds"][0]["events_per_stream"],
                "pinned": placement or None,
                "direct": _side(direct),
                "router": _side(routed),
                "chunks_per_s_ratio": round(routed["chunks_per_s"] / direct["chunks_per_s"], 3),
                "added_ttfb_ms": round(routed["ttfb_ms"] - direct["ttfb_ms"], 3),
            }
        if args.py_spy:
            await profile_router(router.process.pid, targets["router"], Path(args.py_spy))
    return results


async def _start_references(
    stack: contextlib.AsyncExitStack, upstream_port: int, workdir: Path, targets: dict[str, int]
) -> dict[str, str]:
    """Start the reference proxies in front of the upstream and add them to `targets`; what each is."""
    described = {}
    nginx = find_nginx()
    if nginx is not None:
        targets["nginx"] = await stack.enter_async_context(
            nginx_in_front(nginx, upstream_port, workdir / "nginx")
        )
        described["nginx"] = f"{nginx_version(nginx)}, worker_processes auto, access log to a file"
    else:
        described["nginx"] = "not installed: not measured"
    targets["python_forwarder"] = await stack.enter_async_context(forwarder_in_front(upstream_port))
    described["python_forwarder"] = "scripts/benchmarks/bare_forwarder.py: relays bytes, nothing else"
    return described


async def _overhead(targets: dict[str, int], args: argparse.Namespace) -> dict[str, Any]:
    """Closed-loop load at concurrency 1 and 32, every target in alternating rounds."""
    overhead: dict[str, Any] = {}
    for concurrency in (1, 32):
        data = await run_loadgen(
            "load",
            targets,
            SMALL_CHAT,
            concurrency=concurrency,
            rounds=args.rounds,
            seconds=args.seconds,
            warmup=args.warmup,
        )
        direct = data.pop("direct")
        row: dict[str, Any] = {"direct": _side(direct)}
        for name, side in data.items():
            figures = {
                "added_median_ms": round(side["median_ms"] - direct["median_ms"], 3),
                "added_p99_ms": round(side["p99_ms"] - direct["p99_ms"], 3),
                "rps_ratio": round(side["requests_per_s"] / direct["requests_per_s"], 3),
            }
            if name == "router":
                row.update({"router": _side(side), **figures})
            else:
                row[name] = {**_side(side), **figures}
        overhead[f"concurrency_{concurrency}"] = row
    return overhead


@contextlib.contextmanager
def pinned(upstream_pid: int, pin: bool) -> Iterator[dict[str, int]]:
    """Upstream on the last CPU, client on the first, router free; yields where each went.

    Unpinned, a stream's direct baseline flips from run to run between two modes: client and
    upstream on one core (the client reads only after the whole burst was written: ~1M events/s)
    or on two (it reads as tokens come, as a real client does: ~0.4M/s). Pinning keeps the second."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not pin or len(cpus) < 2:
        yield {}
        return
    before = os.sched_getaffinity(upstream_pid)
    os.sched_setaffinity(upstream_pid, {cpus[-1]})
    try:
        yield {"client_cpu": cpus[0], "upstream_cpu": cpus[-1]}
    finally:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(upstream_pid, before)


async def profile_router(pid: int, port: int, output: Path) -> None:
    """Record a py-spy flame graph of the router under concurrency-32 load."""
    py_spy = Path(sys.executable).parent / "py-spy"
    load = asyncio.ensure_future(
        run_loadgen("load", {"router": port}, SMALL_CHAT, concurrency=32, rounds=1, seconds=6, warmup=0.5)
    )
    await asyncio.sleep(1)
    record = await asyncio.create_subprocess_exec(
        str(py_spy), "record", "--pid", str(pid), "--duration", "4", "--rate", "500", "--nonblocking",
        "-o", str(output), "--format", "raw" if output.suffix == ".txt" else "flamegraph",
    )  # fmt: skip
    await record.wait()
    await load


# ---------------------------------------------------------------------------------------- swap


async def swap_section(
    session: aiohttp.ClientSession, workdir: Path, args: argparse.Namespace
) -> dict[str, Any]:
    results = {}
    for delay in LOAD_DELAYS:
        rounds = args.swap_rounds if delay < 1 else max(2, args.swap_rounds // 2)
        folder = workdir / f"swap-{delay:g}"
        folder.mkdir()
        figures = await swap_figures(
            session,
            folder,
            fast_profiles(folder, load_delay=delay),
            rounds,
            folder / "router.log",
            args.router_log_level,
        )
        figures.pop("binary")
        results[f"load_{delay:g}s"] = {"upstream_load_delay_s": delay, **figures}
    return results


async def real_section(
    session: aiohttp.ClientSession, workdir: Path, args: argparse.Namespace
) -> dict[str, Any]:
    from tests.make_tiny_models import make_model

    folder = workdir / "real"
    folder.mkdir()
    if args.models:
        models = [path.resolve() for path in args.models]
    else:
        models = [make_model(folder / "a.gguf", seed=1), make_model(folder / "b.gguf", seed=2)]
    upstream_args = shlex.split(args.upstream_args) if args.upstream_args is not None else REAL_ARGS
    profiles: dict[str, Any] = {
        name: {"model": str(path), "args": upstream_args}
        for name, path in zip(("a", "b"), models, strict=True)
    }
    if args.binary:
        for profile in profiles.values():
            profile["binary"] = args.binary
    figures = await swap_figures(
        session, folder, profiles, args.swap_rounds, folder / "router.log", args.router_log_level
    )
    result = {"models": [str(path) for path in models], "args": upstream_args, **figures}
    if args.rounds > 0:
        load_args = shlex.split(args.upstream_args) if args.upstream_args is not None else REAL_LOAD_ARGS
        result["overhead"] = await real_overhead(session, folder, profiles["a"], load_args, args)
    return result


async def real_overhead(
    session: aiohttp.ClientSession,
    folder: Path,
    profile: dict[str, Any],
    load_args: list[str],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """The overhead figures with the real llama-server as the upstream: what a user would see."""
    async with running_router(
        session,
        folder,
        {"a": {**profile, "args": load_args}},
        log_level=args.router_log_level,
        log_file=folder / "router-overhead.log",
    ) as router:
        await chat(session, router.url, "a")
        upstream_port, _ = await upstream_of(session, router.url, "a")
        targets = {"direct": upstream_port, "router": port_of(router.url)}
        return {"args": load_args, **await _overhead(targets, args)}


# ---------------------------------------------------------------------------------------- thrash


async def thrash_section(
    session: aiohttp.ClientSession, workdir: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """Two closed-loop clients, one per model, one model resident, default swap batching."""
    folder = workdir / "thrash"
    folder.mkdir()
    profiles = fast_profiles(folder, load_delay=args.thrash_load_delay)
    async with running_router(
        session,
        folder,
        profiles,
        log_level=args.router_log_level,
        log_file=folder / "router.log",
        max_resident=1,
    ) as router:
        until = time.perf_counter() + args.thrash_seconds
        a, b = await asyncio.gather(
            closed_loop_client(session, router.url, "a", until),
            closed_loop_client(session, router.url, "b", until),
        )
        async with session.get(router.url + "/metrics") as response:
            metrics = await response.text()
    return {
        "seconds": args.thrash_seconds,
        "upstream_load_delay_s": args.thrash_load_delay,
        "swap_delay_s": ServerConfig().swap_delay,
        "loads": int(_metric_sum(metrics, "llama_router_loads_total")),
        "swaps": int(_metric_sum(metrics, "llama_router_swaps_total")),
        "requests": {"a": len(a), "b": len(b), "total": len(a) + len(b)},
        "latency": latency_summary(a + b),
    }


def _metric_sum(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


# ---------------------------------------------------------------------------------------- report


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = match.group(1) if match else cpu
    try:
        import uvloop

        uvloop_version: str | None = uvloop.__version__
    except ImportError:
        uvloop_version = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "uvloop": uvloop_version,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def evaluate(results: dict[str, Any]) -> dict[str, Any]:
    """Each target with its number and whether it was met (sections not run are left out)."""
    values: dict[str, float] = {}
    if "overhead" in results:
        values["added_median_ms_c1"] = results["overhead"]["concurrency_1"]["added_median_ms"]
        values["rps_ratio_c32"] = results["overhead"]["concurrency_32"]["rps_ratio"]
    if "streaming" in results:
        values["stream_ratio"] = results["streaming"]["chunks_per_s_ratio"]
    if "swap" in results:
        values["swap_overhead_ms"] = max(
            figures[kind]["overhead_vs_healthy_ms"]
            for figures in results["swap"].values()
            for kind in ("cold_start", "swap")
        )
    compare: dict[str, Callable[[float, float], bool]] = {
        "<=": lambda a, b: a <= b,
        ">=": lambda a, b: a >= b,
    }
    verdicts = {}
    for key, value in values.items():
        label, op, limit, unit = TARGETS[key]
        verdicts[key] = {
            "what": label,
            "value": value,
            "target": f"{op} {limit:g}{unit}",
            "met": compare[op](value, limit),
        }
    return verdicts


def _overhead_rows(overhead: dict[str, Any]) -> Iterator[tuple[int, dict[str, Any]]]:
    for concurrency in (1, 32):
        row = overhead.get(f"concurrency_{concurrency}")
        if row:
            yield concurrency, row


def _overhead_line(label: str, concurrency: int, row: dict[str, Any], *, p99: bool) -> str:
    """Direct -> router at one concurrency: median (and p99) latency, requests/s and their ratio."""
    d, r = row["direct"], row["router"]
    tail = f"p99 {d['p99_ms']:.3f} -> {r['p99_ms']:.3f} ms, " if p99 else ""
    return (
        f"{label} c={concurrency:<3} median {d['median_ms']:.3f} -> {r['median_ms']:.3f} ms, {tail}"
        f"{d['requests_per_s']:.0f} -> {r['requests_per_s']:.0f} req/s (x{row['rps_ratio']:.3f})"
    )


def table(results: dict[str, Any]) -> str:
    lines = []
    for concurrency, row in _overhead_rows(results.get("overhead", {})):
        lines.append(_overhead_line("overhead", concurrency, row, p99=True))
        for name in ("nginx", "python_forwarder"):
            if name in row:
                x = row[name]
                lines.append(
                    f"  reference {name:<16} median {x['median_ms']:.3f} ms, "
                    f"{x['requests_per_s']:.0f} req/s (x{x['rps_ratio']:.3f})"
                )
    if "streaming" in results:
        s = results["streaming"]
        lines.append(
            f"streaming      {s['direct']['chunks_per_s']:.0f} -> {s['router']['chunks_per_s']:.0f} chunks/s "
            f"(x{s['chunks_per_s_ratio']:.3f}), ttfb +{s['added_ttfb_ms']:.3f} ms"
        )
    for key, figures in results.get("swap", {}).items():
        lines.append(
            f"swap {key:<9} cold +{figures['cold_start']['overhead_vs_healthy_ms']:.1f} ms, "
            f"swap +{figures['swap']['overhead_vs_healthy_ms']:.1f} ms beyond "
            f"{figures['swap']['bare_spawn_to_healthy_median_ms']:.1f} ms upstream readiness"
        )
    if "thrash" in results:
        t = results["thrash"]
        lines.append(
            f"thrash         {t['swaps']} swaps, {t['requests']['total']} requests in {t['seconds']:g}s, "
            f"median {t['latency'].get('median_ms', 0):.1f} ms"
        )
    if "real" in results:
        r = results["real"]
        lines.append(
            f"real           cold +{r['cold_start']['overhead_vs_healthy_ms']:.1f} ms, swap "
            f"+{r['swap']['overhead_vs_healthy_ms']:.1f} ms beyond "
            f"{r['swap']['bare_spawn_to_healthy_median_ms']:.1f} ms llama-server readiness"
        )
        for concurrency, row in _overhead_rows(r.get("overhead", {})):
            lines.append(_overhead_line("real     ", concurrency, row, p99=False))
    for verdict in results.get("targets", {}).values():
        mark = "MET   " if verdict["met"] else "MISSED"
        lines.append(f"{mark} {verdict['what']}: {verdict['value']} (target {verdict['target']})")
    return "\n".join(lines)


SECTIONS = ("overhead", "streaming", "swap", "thrash", "real")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    sections = set(args.sections or SECTIONS)
    workdir = Path(tempfile.mkdtemp(prefix="llama-router-bench-"))
    results: dict[str, Any] = {"machine": machine()}
    started = time.perf_counter()
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=120)
    ) as session:
        if sections & {"overhead", "streaming"}:
            results.update(await overhead_and_streaming(session, workdir, args, sections))
        if "swap" in sections:
            results["swap"] = await swap_section(session, workdir, args)
        if "thrash" in sections:
            results["thrash"] = await thrash_section(session, workdir, args)
        if "real" in sections:
            results["real"] = await real_section(session, workdir, args)
    results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["targets"] = evaluate(results)
    if args.keep:
        results["workdir"] = str(workdir)
    else:  # a failed run keeps its folder: the routers' logs are there
        shutil.rmtree(workdir, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "sections", nargs="*", metavar="SECTION", help=f"any of {', '.join(SECTIONS)} (default: all)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="alternating direct/router rounds (default 3)")
    parser.add_argument("--seconds", type=float, default=2.0, help="measured seconds per load round")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds before each load round")
    parser.add_argument("--streams", type=int, default=20, help="streams per streaming round")
    parser.add_argument(
        "--stream-rounds", type=int, default=5, help="alternating streaming rounds (default 5)"
    )
    parser.add_argument(
        "--no-pin", dest="pin", action="store_false", help="streaming: leave client and upstream unpinned"
    )
    parser.add_argument(
        "--no-references",
        dest="references",
        action="store_false",
        help="overhead: skip the reference proxies "
        "(nginx when installed, scripts/benchmarks/bare_forwarder.py)",
    )
    parser.add_argument("--swap-rounds", type=int, default=5, help="rounds per swap figure (half for 2 s)")
    parser.add_argument("--thrash-seconds", type=float, default=10.0)
    parser.add_argument("--thrash-load-delay", type=float, default=0.5, help="fast upstream's load time (s)")
    parser.add_argument("--binary", help="llama-server for `real` (default: found as the router finds it)")
    parser.add_argument(
        "--models", nargs=2, type=Path, metavar="GGUF", help="`real`: these two models (default: tiny ones)"
    )
    parser.add_argument(
        "--upstream-args", help=f"`real`: llama-server arguments (default: {' '.join(REAL_ARGS)!r})"
    )
    parser.add_argument("--router-log-level", default="INFO", help="the router's --log-level (default INFO)")
    parser.add_argument(
        "--page",
        choices=PAGE_MODES,
        default="none",
        help="overhead: follow the router as the dashboard does during the run: an SSE client on "
        "/events?requests=1, or the page itself in a headless Chromium (default: none)",
    )
    parser.add_argument("--json-out", type=Path, help="also write the JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (configs, router logs)")
    parser.add_argument("--py-spy", metavar="FILE", help="record the router under load (.svg, or .txt raw)")
    args = parser.parse_args(argv)
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    try:
        import uvloop

        results = uvloop.run(run(args))
    except ImportError:
        results = asyncio.run(run(args))
    text = json.dumps(results, indent=2)
    print(text)
    if args.json_out:
        args.json_out.write_text(text + "\n")
    print(table(results), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
