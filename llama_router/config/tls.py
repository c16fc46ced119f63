"""TLS: the certificate the router serves HTTPS with, and the checks made of an https:// peer's.

The server's context is made once, when the router starts listening; a reload loads the certificate
files into that same context again, so a renewed certificate is served to every new connection
without a restart (connections already open keep theirs). Turning TLS on or off changes what the
port speaks, so that takes a restart, as a new port does.
"""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path
from typing import Any

from llama_router.config.schema import ConfigError, ServerConfig


def server_context(server: ServerConfig) -> ssl.SSLContext | None:
    """A context serving `server.tls_cert` with `server.tls_key`, or None when TLS is off."""
    if server.tls_cert is None or server.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    load_certificate(context, server)
    return context


def load_certificate(context: ssl.SSLContext, server: ServerConfig) -> None:
    """(Re-)read the certificate files into `context`; ConfigError naming the keys if they do not load."""
    assert server.tls_cert is not None and server.tls_key is not None
    try:
        # A throwaway context first: a broken pair must not leave the served one half replaced.
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(server.tls_cert, server.tls_key)
        context.load_cert_chain(server.tls_cert, server.tls_key)
    except (ssl.SSLError, OSError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(
            f"server.tls_cert/server.tls_key: cannot serve {server.tls_cert} with {server.tls_key}: {why}"
        ) from None


def peer_context(ca_file: Path | None) -> ssl.SSLContext:
    """How an https:// peer is checked: its certificate must chain to `ca_file` (or, without one,
    to the system's trusted CAs) and name the host in its URL."""
    try:
        return ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"ca_file {ca_file}: not a PEM CA certificate: {exc}") from None


def describe_certificate(path: Path) -> str:
    """A certificate's subject, names and expiry in a few words, for `check` ("" if unreadable)."""
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if decode is None:
        return ""
    try:
        cert: dict[str, Any] = decode(str(path))
    except (ssl.SSLError, OSError, ValueError):
        return ""
    subject = ", ".join(f"{k}={v}" for part in cert.get("subject", ()) for k, v in part)
    names = ", ".join(value for _, value in cert.get("subjectAltName", ()))
    words = [subject or "no subject"]
    if names:
        words.append(f"names {names}")
    expires = cert.get("notAfter")
    if expires:
        when = datetime.datetime.fromtimestamp(ssl.cert_time_to_seconds(expires), datetime.UTC)
        left = (when - datetime.datetime.now(datetime.UTC)).days
        words.append(f"valid until {when:%Y-%m-%d}" + (" (EXPIRED)" if left < 0 else f" ({left} days)"))
    return "; ".join(words)
