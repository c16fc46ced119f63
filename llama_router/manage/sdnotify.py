"""systemd's notify protocol, in the few lines it takes: READY, RELOADING, STOPPING, WATCHDOG, STATUS.

`Type=notify` units learn from these datagrams when the router really listens (so `systemctl start`
returns only then and ordering works), when a reload runs, and that the event loop is alive
(`WatchdogSec=`). No dependency: one `AF_UNIX` datagram per message to `$NOTIFY_SOCKET`.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("llama_router.sdnotify")

_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    """Sends notify messages to systemd; every method is a silent no-op outside systemd."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec
        self._warned = False

    @classmethod
    def from_environment(cls, *, unset: bool = True) -> Notifier:
        """Read `$NOTIFY_SOCKET` and the watchdog settings.

        With `unset` (the default) the variables are removed from `os.environ`, so the llama-server
        processes the router spawns do not inherit them and cannot speak for the service.
        """
        address = os.environ.get("NOTIFY_SOCKET") or None
        watchdog: int | None = None
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            watchdog = int(usec)
        if unset:
            for name in _ENV:
                os.environ.pop(name, None)
        return cls(address, watchdog)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings: half the configured timeout, as systemd advises."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec else None

    def send(self, *fields: str) -> bool:
        """Send one message made of `KEY=value` lines; False (logged once) if it could not be sent."""
        if self.address is None:
            return False
        address = self.address
        if address.startswith("@"):
            address = "\0" + address[1:]  # Linux abstract namespace
        elif not address.startswith("/"):
            self._warn(f"unsupported NOTIFY_SOCKET address {self.address!r}")
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(address)
                sock.sendall("\n".join(fields).encode())
        except OSError as exc:
            self._warn(f"cannot notify systemd at {self.address!r}: {exc}")
            return False
        return True

    def _warn(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning("%s", message)

    def ready(self, status: str | None = None) -> bool:
        """The router listens and serves (also ends a RELOADING phase)."""
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> bool:
        """A config reload started; systemd shows `reloading` until the next READY=1."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown started (draining requests, then stopping upstreams)."""
        return self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> bool:
        """The event loop is alive."""
        return self.send("WATCHDOG=1")

    def status(self, text: str) -> bool:
        """Free-form status line shown by `systemctl status`."""
        return self.send(f"STATUS={text}")
