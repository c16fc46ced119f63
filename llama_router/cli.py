"""The `llama-router` command: `serve`, `check`, `init`, `pull` and `status`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from llama_router import __version__
from llama_router.config.schema import (
    ConfigError,
    ResolvedProfile,
    RouterConfig,
    ServerConfig,
    read_yaml,
    validate_schema,
)
from llama_router.manage.logging_setup import FORMATS, setup_logging
from llama_router.sizing.memory import Device

if TYPE_CHECKING:
    from llama_router.manage.model_folders import Findings

DEFAULT_CONFIG = "profiles.yaml"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
API_KEY_ENV = "LLAMA_ROUTER_API_KEY"


def _load(
    args: argparse.Namespace,
    host: str | None = None,
    port: int | None = None,
    *,
    keep_unrunnable: bool = False,
) -> RouterConfig:
    return _load_found(args, host, port, keep_unrunnable=keep_unrunnable)[0]


def _load_found(
    args: argparse.Namespace,
    host: str | None = None,
    port: int | None = None,
    *,
    keep_unrunnable: bool = False,
) -> tuple[RouterConfig, Findings]:
    """The config of `-c`, with the models `--models-dir`, `--hf-cache` and the file's own
    `server.models_dir`/`server.hf_cache` find on disk, and what was found but not served."""
    from llama_router.manage.model_folders import load

    config, findings = load(
        args.config,
        models_dirs=[Path(folder) for folder in getattr(args, "models_dir", None) or []],
        hf_cache=getattr(args, "hf_cache", False),
        keep_unrunnable=keep_unrunnable,
    )
    if host is not None or port is not None:
        server = config.server.model_copy(
            update={k: v for k, v in (("host", host), ("port", port)) if v is not None}
        )
        config = config.model_copy(update={"server": server})
    return config, findings


# ------------------------------------------------------------------------------------------------ serve


def _serve(args: argparse.Namespace) -> int:
    from llama_router.app import serve

    # A profile whose files are missing is served as failed (with the reason) while the others run;
    # `check` still reports it as an error. A reload reads the same file with the same overrides.
    def load() -> RouterConfig:
        return _load(args, args.host, args.port, keep_unrunnable=True)

    config = load()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    try:
        asyncio.run(serve(config, loader=load))
    except OSError as exc:
        where = f"{config.server.host}:{config.server.port}"
        print(f"llama-router: cannot listen on {where}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------------------------------ check


def describe_profile(config: RouterConfig, name: str) -> list[tuple[str, str]]:
    """The `check` lines of one profile as (label, value) pairs, in display order."""
    profile = config.profiles[name]
    lines = [("binary", str(profile.binary)), ("model", str(profile.model_path))]
    if len(profile.model_files) > 1:
        lines.append(("shards", f"{len(profile.model_files)} files beside it"))
    if profile.hf:
        lines.append(("hf", profile.hf))
    if profile.mmproj_path is not None:
        lines.append(("mmproj", str(profile.mmproj_path)))
    command = " ".join(profile.shown_command()).replace(" --port 0", " --port <auto>")
    lines.append(("command", command))
    if profile.rpc:
        lines.append(("rpc", ", ".join(profile.rpc)))
    if profile.origin in ("models_dir", "cache"):
        lines.append(
            ("source", f"{profile.origin} (server.default_args: {' '.join(profile.args) or 'none'})")
        )
    elif profile.source is not None and profile.source != config.path:
        made = " (created by POST /models)" if profile.removable else ""
        lines.append(("file", f"{profile.source}{made}"))
    lines.extend(describe_context(profile))
    return lines


def describe_found(config: RouterConfig, findings: Findings) -> list[str]:
    """The `check` lines of the folders and cache searched for models, and of each file found there
    that is not served, with the reason."""
    lines = [f"models_dir: {folder}" for folder in config.server.models_dir]
    if config.server.hf_cache:
        from llama_router.config.hub import cache_dir

        lines.append(f"hf_cache: {cache_dir()} (models named <org>/<repo>:<quant>)")
    if findings.skipped:
        lines.append("not served:")
        lines += [f"  {skipped.path}: {skipped.reason}" for skipped in findings.skipped]
    return lines


def describe_context(profile: ResolvedProfile) -> list[tuple[str, str]]:
    """The `check` line of a profile's context window, and a warning when it is under `min_context`."""
    from llama_router.sizing.context_window import profile_window

    window = profile_window(profile)
    if window is None:
        return [("context", "the model's training length (not in its file): known once loaded")]
    if window.source == "configured":
        how = "context_length"
    elif window.slots == 1:
        how = "1 slot"
    else:
        how = f"{window.total} {'shared by' if window.unified else 'split between'} {window.slots} slots"
    lines = [("context", f"{window.per_request} tokens per request ({how})")]
    if profile.min_context is not None and window.per_request < profile.min_context:
        lines.append(
            (
                "warning",
                f"{window.per_request} tokens per request is under min_context {profile.min_context}: "
                "raise -c, lower --parallel or add --kv-unified",
            )
        )
    return lines


def describe_budgets(devices: list[Device], notes: list[str]) -> list[str]:
    """The `check` lines of the memory budgets: each device's, where it came from, and why there is
    no GPU budget when there is none."""
    from llama_router.core.devices import size_text

    lines = ["memory budgets:"]
    width = max(len(device.name) for device in devices)
    for device in devices:
        origin = f"{device.source}: {device.detail}" if device.detail else device.source
        if device.in_use is not None:
            origin += f", {size_text(device.in_use)} in use now"
        if device.unified:
            origin += "; the same memory as ram, so a model's GPU buffers count in both"
        budget = f"{size_text(device.budget)} of {size_text(device.total)}"
        lines.append(f"  {device.name:<{width}}  {budget}  ({origin})")
    if notes:
        lines.append(f"  no GPU budget: {'; '.join(notes)}")
    return lines


def describe_workers(config: RouterConfig) -> list[str]:
    """The `check` lines of the RPC workers: each one's budget, its models, and whether it answers
    (a TCP connection within a short timeout)."""
    from llama_router.upstream.rpc import probe_now

    workers = list(config.server.memory.rpc)
    if not workers:
        return []
    users: dict[str, list[str]] = {worker: [] for worker in workers}
    for name, profile in config.profiles.items():
        for worker in profile.rpc:
            users[worker].append(name)
    lines = ["rpc workers (each leased to one model at a time):"]
    width = max(len(worker) for worker in workers)
    for probe in probe_now(workers):
        models = ", ".join(users[probe.worker]) or "no profile"
        budget = config.server.memory.rpc[probe.worker]
        lines.append(f"  {probe.worker:<{width}}  {budget} MiB  for {models}; {probe.describe()}")
    return lines


def describe_peers(config: RouterConfig) -> list[str]:
    """The `check` lines of the peers: where each is and which models it is asked for."""
    if not config.peers:
        return []
    lines = ["peers (models asked for as <peer>/<model>):"]
    for name, peer in config.peers.items():
        models = ", ".join(peer.models) if peer.models is not None else "discovered from its /v1/models"
        key = "with its key" if peer.api_key is not None else "no key"
        caps = f"list read up to {peer.max_models} models / {peer.max_list_mb:g} MiB"
        lines.append(f"  {name}  {peer.url}  {key}; models: {models}; {caps}")
        if peer.url.startswith("https://"):
            trust = f"the CA in {peer.ca_file}" if peer.ca_file is not None else "the system's trusted CAs"
            lines.append(f"    tls: its certificate is verified against {trust}")
    return lines


def describe_listen(server: ServerConfig) -> list[str]:
    """The `check` lines of where the router listens and, with TLS, the certificate it serves
    (loaded as the router would: a bad pair is an error here too)."""
    from llama_router.config.tls import describe_certificate, server_context

    if server.tls_cert is None:
        return [f"listen: http://{server.host}:{server.port}"]
    server_context(server)  # ConfigError if the pair does not load
    about = describe_certificate(server.tls_cert)
    return [
        f"listen: https://{server.host}:{server.port}",
        f"tls: {server.tls_cert} with {server.tls_key}" + (f": {about}" if about else ""),
    ]


def describe_limits(server: ServerConfig) -> str:
    """The `check` line of what clients may hold."""
    return (
        f"limits: bodies up to {server.max_body_mb:g} MiB each, {server.max_body_total_mb:g} MiB in all, "
        f"each whole within {server.body_timeout:g}s"
    )


def describe_placement(answer: Mapping[str, Any]) -> str:
    """A dry run's answer in one line, for `check` (on an idle machine)."""
    if answer.get("fixed_by"):
        return f"where its profile says ({answer['fixed_by']})"
    if not answer.get("fits"):
        return f"nowhere: {answer.get('why')}"
    placement = answer.get("placement")
    if isinstance(placement, dict):
        return f"by the router at each start; on an idle machine: {placement['why']}"
    return "where llama-server puts it (no choice of GPU here, or no GPU part known before its first load)"


def _check(args: argparse.Namespace) -> int:
    from llama_router.core.devices import describe
    from llama_router.core.scheduler import Rules, Scheduler
    from llama_router.sizing.budgets import Sizing
    from llama_router.sizing.placement import dry_run

    config, findings = _load_found(args)
    sizing = Sizing(config)
    if config.path.exists():
        print(f"{config.path}: OK, {len(config.profiles)} profile(s)")
    else:  # the folders alone are the config
        print(f"no {config.path}; models from the folders: OK, {len(config.profiles)} profile(s)")
    try:
        listen = describe_listen(config.server)
    except ConfigError as exc:
        raise ConfigError(f"{config.path}: {exc}") from None
    for line in [*listen, describe_limits(config.server)]:
        print(f"  {line}")
    for line in describe_budgets(sizing.devices, sizing.notes):
        print(f"  {line}")
    for line in [*describe_workers(config), *describe_peers(config)]:
        print(f"  {line}")
    for line in describe_found(config, findings):
        print(f"  {line}")
    idle = Scheduler(
        [sizing.spec(profile) for profile in config.profiles.values()], sizing.budget(), Rules(0.0)
    )
    for name, profile in config.profiles.items():
        print(f"- {name}" + (f" (aliases: {', '.join(profile.aliases)})" if profile.aliases else ""))
        footprint, source = sizing.footprint_and_source(profile)
        for label, value in [
            *describe_profile(config, name),
            ("memory", f"{describe(footprint)} ({source})"),
            ("placed", describe_placement(dry_run(idle.where(name), profile))),
        ]:
            print(f"    {label + ':':<9}{value}")
    return 0


# ------------------------------------------------------------------------------------------------ init


def _init(args: argparse.Namespace) -> int:
    from llama_router.manage.init_config import render
    from llama_router.manage.model_folders import load
    from llama_router.sizing.budgets import Sizing

    output = Path(args.output)
    if str(output) != "-" and output.exists() and not args.force:
        raise ConfigError(f"{output}: already exists; give --force to replace it, or another -o")
    folders = [Path(folder) for folder in args.models_dir or ([] if args.hf_cache else ["."])]
    config, findings = load(
        output, models_dirs=folders, hf_cache=args.hf_cache, fresh=True, keep_unrunnable=True
    )
    if not config.profiles:
        searched = ", ".join(map(str, config.server.models_dir)) or "the Hugging Face cache"
        raise ConfigError(f"no GGUF model found in {searched}; nothing to write")
    sizing = Sizing(config)
    budgets = describe_budgets(sizing.devices, sizing.notes)
    text = render(config, findings, sizing.devices, budgets, describe_context)
    if str(output) == "-":
        sys.stdout.write(text)
        return 0
    temporary = output.with_name(f".{output.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(output)
    print(
        f"{output}: {len(config.profiles)} profile(s) written; check it with `llama-router check -c {output}`"
    )
    return 0


# ------------------------------------------------------------------------------------------------ pull


def _pull(args: argparse.Namespace) -> int:
    from llama_router.config import hub

    data, path = read_yaml(args.config)
    schema = validate_schema(data, path)  # structure only: the files may not exist yet
    unknown = [name for name in args.profiles if name not in schema.profiles]
    if unknown:
        known = ", ".join(schema.profiles)
        raise ConfigError(f"{path}: no profile named {', '.join(map(repr, unknown))}; profiles: {known}")
    names = args.profiles or [name for name, profile in schema.profiles.items() if profile.hf]
    if not names:
        print(f"{path}: no profile names a Hugging Face model (hf:); nothing to pull")
        return 0
    failed = 0
    for name in names:
        profile = schema.profiles[name]
        if profile.hf is None:
            print(f"{name}: local model {profile.model}; nothing to pull")
            continue
        ref = hub.HfRef.parse(profile.hf, profile.hf_file, profile.hf_revision, profile.mmproj)
        print(f"{name}: {ref.describe()}", flush=True)
        try:
            found = hub.pull(ref, progress_bars=not args.quiet)
        except hub.HubError as exc:
            print(f"llama-router: pull {name}: {exc}", file=sys.stderr)
            failed += 1
            continue
        print(f"    model:   {found.model_path}")
        if len(found.model_paths) > 1:
            print(f"    shards:  {len(found.model_paths)} files")
        if found.mmproj_path is not None:
            print(f"    mmproj:  {found.mmproj_path}")
    if failed:
        print(f"llama-router: {failed} of {len(names)} profile(s) could not be pulled", file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------------------------------ status


def _router_url(args: argparse.Namespace) -> tuple[str, str | None]:
    """The router's base URL and a key to present, from --url/--api-key or the config file."""
    key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if args.url:
        return args.url.rstrip("/"), key
    if args.config == DEFAULT_CONFIG and not Path(args.config).exists():
        server = ServerConfig()  # a router serving folders alone has no file: its defaults
    else:
        data, path = read_yaml(args.config)
        server = _server_section(data, path)
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(server.host, server.host)
    if ":" in host:
        host = f"[{host}]"
    if key is None:
        keys = [*server.admin_keys, *server.api_keys]
        for variable in (server.admin_keys_env, server.api_keys_env):
            if variable:
                keys += [part.strip() for part in os.environ.get(variable, "").split(",") if part.strip()]
        key = keys[0] if keys else None
    return f"{'https' if server.tls_cert is not None else 'http'}://{host}:{server.port}", key


def _server_section(data: Any, path: Path) -> ServerConfig:
    """Only the `server:` section: `status` needs the address and keys, not loadable profiles."""
    section = data.get("server") if isinstance(data, dict) else None
    try:
        return ServerConfig.model_validate(section or {})
    except ValidationError as exc:
        problems = "; ".join(
            f"server.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{path}: {problems}") from None


def _get(url: str, key: str | None, timeout: float) -> Any:
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read() or b"null")


def _status(args: argparse.Namespace) -> int:
    base, key = _router_url(args)
    try:
        health = _get(f"{base}/health", None, args.timeout)
        models = _get(f"{base}/v1/models", key, args.timeout)
        running = _get(f"{base}/running", key, args.timeout)
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace")
        with contextlib.suppress(ValueError, KeyError, TypeError):
            detail = json.loads(detail)["error"]["message"]
        print(f"llama-router: {exc.url} answered {exc.code}: {detail}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        print(f"llama-router: no router answering at {base}: {reason}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"url": base, "health": health, "models": models, "running": running}, indent=2))
        return 0
    print(f"router {base}: {health.get('status', '?') if isinstance(health, dict) else health}")
    reload_state = health.get("reload") if isinstance(health, dict) else None
    if isinstance(reload_state, dict):
        error = reload_state.get("last_error")
        if error:
            print(f"  last config reload FAILED (old config kept): {error.get('message')}")
    rows = {row.get("model"): row for row in running.get("running", [])} if isinstance(running, dict) else {}
    table = [("MODEL", "STATE", "PID", "PORT", "IN FLIGHT", "WAITING")]
    for entry in models.get("data", []) if isinstance(models, dict) else []:
        row = rows.get(entry.get("id"), {})
        status = entry.get("status") or {}  # our own word is in `detail` (`value`: router mode's)
        state = status.get("detail") or status.get("value") or row.get("state") or "?"
        table.append(
            (
                str(entry.get("id")),
                str(state),
                str(row.get("pid") or "-"),
                str(row.get("port") or "-"),
                str(row.get("in_flight", 0)),
                str(row.get("waiting", 0)),
            )
        )
    widths = [max(len(line[column]) for line in table) for column in range(len(table[0]))]
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())
    return 0


# ------------------------------------------------------------------------------------------------ parser


def _common(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """Options accepted before and after the command (`llama-router serve --log-format json`)."""
    default: Any = None if top else argparse.SUPPRESS
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        default="INFO" if top else default,
        help="DEBUG, INFO, WARNING or ERROR (default INFO)",
    )
    parser.add_argument(
        "--log-format",
        choices=FORMATS,
        default="text" if top else default,
        help="text for people, json (one object per line) for machines (default text)",
    )


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c", "--config", default=DEFAULT_CONFIG, help="profiles file (default: profiles.yaml)"
    )


def _models_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--models-dir",
        action="append",
        metavar="DIR",
        help="serve every GGUF model under DIR (repeatable; adds to server.models_dir; with it, "
        "no profiles file is needed)",
    )
    parser.add_argument(
        "--hf-cache",
        action="store_true",
        help="serve every GGUF model already in the Hugging Face cache as <org>/<repo>:<quant>",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama-router",
        description="One OpenAI-compatible endpoint in front of many llama-server processes.",
    )
    parser.add_argument("--version", action="version", version=f"llama-router {__version__}")
    _common(parser, top=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, description: str, run: Callable[[argparse.Namespace], int]) -> Any:
        sub = commands.add_parser(name, help=summary, description=description)
        _common(sub, top=False)
        sub.set_defaults(run=run)
        return sub

    serve = command(
        "serve",
        "run the router",
        "Run the router. SIGHUP (or a change of the config file) reloads the config; SIGTERM drains "
        "requests in flight (server.shutdown_timeout) and stops every model.",
        _serve,
    )
    _config_option(serve)
    _models_options(serve)
    serve.add_argument("--host", help="listen address (overrides server.host)")
    serve.add_argument("--port", type=int, help="listen port (overrides server.port)")

    check = command(
        "check",
        "validate the config and show each profile's command",
        "Validate the config; print each profile's binary, model file and full command line.",
        _check,
    )
    _config_option(check)
    _models_options(check)

    init = command(
        "init",
        "write a commented profiles.yaml for the models in folders",
        "Write a profiles.yaml with a profile for each GGUF model under --models-dir (default: the "
        "current folder) and, with --hf-cache, in the Hugging Face cache: estimated memory, context "
        "per request and --n-gpu-layers for this machine's budgets, the residency keys explained.",
        _init,
    )
    _models_options(init)
    init.add_argument("-o", "--output", default=DEFAULT_CONFIG, help="file to write ('-': print it)")
    init.add_argument("--force", action="store_true", help="replace the file if it exists")

    pull = command(
        "pull",
        "download the Hugging Face models the profiles name",
        "Download the files of profiles with 'hf:' into the Hugging Face cache (HF_HUB_CACHE / HF_HOME), "
        "shards and projector included. Tokens come from HF_TOKEN or `hf auth login`.",
        _pull,
    )
    _config_option(pull)
    pull.add_argument("profiles", nargs="*", metavar="PROFILE", help="only these profiles (default: all)")
    pull.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    status = command(
        "status",
        "show what a running router has loaded",
        "Ask a running router for its models and their state.",
        _status,
    )
    _config_option(status)
    status.add_argument("--url", help="router URL (default: from the config's server.host and port)")
    status.add_argument(
        "--api-key", help=f"key to send (default: ${API_KEY_ENV}, else the config's admin or API key)"
    )
    status.add_argument("--json", action="store_true", help="print the raw answers as JSON")
    status.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the router")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    try:
        return int(args.run(args))
    except ConfigError as exc:
        print(f"llama-router: config error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
