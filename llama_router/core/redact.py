"""Secrets kept out of what the router shows: one rule for every place a command line, an
environment or an upstream's output appears (`/config`, `/logs/<model>`, `/events`, failure
reasons and log tails on `/running` and `/overview`).

A flag or environment variable whose name says it holds a secret (`--api-key`, `--api-key-file`,
`--hf-token`, `--ssl-key-file`, `HF_TOKEN`, ...) has its value shown as `(hidden)`; the same values
are cut out of every line an upstream writes, in case it echoes them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

HIDDEN = "(hidden)"
_SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "AUTH", "CREDENTIAL")


def secret_name(name: str) -> bool:
    """Whether an environment variable or flag name looks like it holds a secret."""
    upper = name.upper()
    return any(word in upper for word in _SECRET_WORDS)


def _secret_positions(args: list[str]) -> list[tuple[int, str, str]]:
    """(index, flag prefix, value) of each secret value in a command line: `--api-key X` (prefix
    "") or `--hf-token=X` (prefix `--hf-token=`)."""
    found = []
    for index, arg in enumerate(args):
        flag, eq, value = arg.partition("=")
        if not (flag.startswith("-") and secret_name(flag)):
            continue
        if eq:
            found.append((index, flag + eq, value))
        elif index + 1 < len(args):
            found.append((index + 1, "", args[index + 1]))
    return found


def redacted_args(args: Iterable[str]) -> list[str]:
    """A command line with the values of secret-looking flags hidden."""
    out = list(args)
    for index, prefix, _ in _secret_positions(out):
        out[index] = prefix + HIDDEN
    return out


def redacted_env(env: Mapping[str, str], *, values: bool) -> dict[str, str]:
    """An environment for display: secret-looking values hidden; with `values` False, all of them
    (only an admin sees the others)."""
    return {key: value if values and not secret_name(key) else HIDDEN for key, value in env.items()}


def secret_values(args: Iterable[str], env: Mapping[str, str]) -> tuple[str, ...]:
    """The values `redacted_args` and `redacted_env` hide, longest first (cut out of output lines)."""
    found = {value for _, _, value in _secret_positions(list(args)) if value}
    found.update(value for key, value in env.items() if value and secret_name(key))
    return tuple(sorted(found, key=len, reverse=True))


def scrub(line: str, secrets: tuple[str, ...]) -> str:
    """`line` with every secret value in it replaced by `(hidden)`."""
    for secret in secrets:
        if secret in line:
            line = line.replace(secret, HIDDEN)
    return line
