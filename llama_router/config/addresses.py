"""Addresses a config names, checked where they are read: a peer's URL, an RPC worker's host:port."""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass


@dataclass(frozen=True)
class PeerUrl:
    """Where a peer listens: scheme, host, port and the path its OpenAI API hangs under (`/v1/...` is
    added)."""

    host: str
    port: int
    prefix: str  # "" or "/some/path", never ending in "/"
    scheme: str = "http"

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.authority}{self.prefix}"


def parse_url(url: str) -> PeerUrl:
    """A peer's `url`, checked: `http://` or `https://host[:port][/path]`; ValueError otherwise."""
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{url!r}: expected http://host[:port][/path] or https://...")
    if not parts.hostname:
        raise ValueError(f"{url!r}: no host")
    if parts.username or parts.password:
        raise ValueError(f"{url!r}: put the peer's key in api_key or api_key_env, not in the URL")
    if parts.query or parts.fragment:
        raise ValueError(f"{url!r}: no query or fragment, only http://host[:port][/path]")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise ValueError(f"{url!r}: {exc}") from None
    return PeerUrl(parts.hostname, port, parts.path.rstrip("/"), parts.scheme)


def parse_worker(worker: str) -> tuple[str, int]:
    """(host, port) of a worker address (`10.0.0.2:50052`, `[::1]:50052`); ValueError otherwise."""
    host, colon, port = worker.rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{worker!r}: expected host:port (e.g. 10.0.0.2:50052)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{worker!r}: write an IPv6 address in brackets, [::1]:50052")
    return host, int(port)
