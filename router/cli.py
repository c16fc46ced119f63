"""The `llama-router` command: `serve` and `check`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from . import __version__
from .config import ConfigError, RouterConfig, load_config

DEFAULT_CONFIG = "profiles.yaml"


def _load(path: str, host: str | None = None, port: int | None = None) -> RouterConfig:
    config = load_config(path)
    if host is not None or port is not None:
        server = config.server.model_copy(
            update={k: v for k, v in (("host", host), ("port", port)) if v is not None}
        )
        config = config.model_copy(update={"server": server})
    return config


def _serve(args: argparse.Namespace) -> int:
    from .app import serve

    config = _load(args.config, args.host, args.port)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(config))
    return 0


def _check(args: argparse.Namespace) -> int:
    config = _load(args.config)
    print(f"{config.path}: OK, {len(config.profiles)} profile(s)")
    print(f"  listen: http://{config.server.host}:{config.server.port}")
    for name, profile in config.profiles.items():
        print(f"- {name}" + (f" (aliases: {', '.join(profile.aliases)})" if profile.aliases else ""))
        print(f"    binary:  {profile.binary}")
        print(f"    model:   {profile.model_path}")
        print(
            f"    command: {' '.join(profile.command('127.0.0.1', 0)).replace(' --port 0', ' --port <auto>')}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama-router",
        description="One OpenAI-compatible endpoint in front of many llama-server processes.",
    )
    parser.add_argument("--version", action="version", version=f"llama-router {__version__}")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the router", description="Run the router.")
    serve.add_argument(
        "-c", "--config", default=DEFAULT_CONFIG, help="profiles file (default: profiles.yaml)"
    )
    serve.add_argument("--host", help="listen address (overrides server.host)")
    serve.add_argument("--port", type=int, help="listen port (overrides server.port)")
    serve.set_defaults(run=_serve)

    check = commands.add_parser(
        "check",
        help="validate the config and show each profile's command",
        description="Validate the config.",
    )
    check.add_argument(
        "-c", "--config", default=DEFAULT_CONFIG, help="profiles file (default: profiles.yaml)"
    )
    check.set_defaults(run=_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.run(args))
    except ConfigError as exc:
        print(f"llama-router: config error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
