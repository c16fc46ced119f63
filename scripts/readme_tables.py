#!/usr/bin/env python3
"""Writes the README's generated blocks from the code that enforces them, so they cannot drift:
the access table (llama_router/front/auth.py `ACCESS`) and the flags a model added over HTTP may carry
(llama_router/config/allowed_args.py `ALLOWED`).

`python scripts/readme_tables.py` rewrites them; `--check` exits 1 if one is out of date (the test
suite runs that).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llama_router.config.allowed_args import documented  # noqa: E402
from llama_router.front.auth import ACCESS, Access  # noqa: E402

README = ROOT / "README.md"
# Who may call a row, by its access, under each way keys can be configured.
CELLS = {
    Access.OPEN: ("anyone", "anyone", "anyone", "anyone"),
    Access.INFERENCE: ("anyone", "API or admin key", "anyone", "API or admin key"),
    Access.ADMIN: ("anyone", "nobody: 403 naming `admin_keys`", "admin key", "admin key (API key: 403)"),
}


def access_table() -> str:
    lines = [
        "| endpoint | what for | no keys | `api_keys` only | `admin_keys` only | both |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for rule in ACCESS:
        method = "any" if rule.method == "*" else rule.method
        endpoint = "any other request" if rule.path == "{path}" else f"{method} `{rule.shown}`"
        lines.append(f"| {endpoint} | {rule.what} | " + " | ".join(CELLS[rule.access]) + " |")
    return "\n".join(lines)


def allowed_args() -> str:
    return "\n".join(
        f"- {group}: " + "; ".join(f"`{flags}`" for flags in entries) for group, entries in documented()
    )


BLOCKS = {"access-table": access_table, "allowed-args": allowed_args}


def render(text: str) -> str:
    for name, make in BLOCKS.items():
        pattern = re.compile(rf"(<!-- {name} -->\n)(?:.*?\n)?(<!-- /{name} -->)", re.S)
        found = pattern.search(text)
        if found is None:
            raise SystemExit(f"README.md: no <!-- {name} --> block")
        text = text[: found.start()] + found.group(1) + make() + "\n" + found.group(2) + text[found.end() :]
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if the README is out of date")
    args = parser.parse_args()
    current = README.read_text(encoding="utf-8")
    wanted = render(current)
    if args.check:
        if wanted != current:
            print("README.md is out of date: run python scripts/readme_tables.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(wanted, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
