#!/usr/bin/env python3
"""Writes docs/configuration.md from the config schema itself, so the reference cannot drift.

`python scripts/config_reference.py` rewrites the file; `--check` exits 1 if it is out of date
(the test suite runs that).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llama_router.config.schema import MemoryConfig, PeerConfig, Profile, ServerConfig  # noqa: E402

TARGET = ROOT / "docs" / "configuration.md"
INTRO = """# profiles.yaml reference

Generated from `llama_router/config/schema.py` by `scripts/config_reference.py`; do not edit by hand.
Sizes are MiB, times are seconds. Relative paths are relative to the file's own directory.
Every error names the file, the key path and the problem, and the router refuses to start with a
syntax or schema error (a live reload keeps the previous config instead); a profile whose binary or
model file is missing is served as failed while the others run, and `check` reports it.
"""


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if not hasattr(annotation, "__args__") else None
    text = text or str(annotation)
    text = text.replace("typing.", "").replace("pathlib.", "").replace("NoneType", "None")
    # A choice of words reads as the words: Literal['a', 'b'] -> 'a' | 'b'
    text = re.sub(r"Optional\[Literal\[(.*?)\]\]", r"Literal[\1, None]", text)
    text = re.sub(r"Literal\[(.*?)\]", lambda match: match[1].replace(", ", " | "), text)
    return text.replace("|", "\\|")


def _default(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        return "`" + (repr(value) if not isinstance(value, BaseModel) else "see below") + "`"
    if field.default is PydanticUndefined:
        return "required"
    return f"`{field.default!r}`" if field.default is not None else "—"


def table(model: type[BaseModel], prefix: str) -> str:
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for name, field in model.model_fields.items():
        description = (field.description or "").replace("|", "\\|")
        rows.append(
            f"| `{prefix}{name}` | {_type_name(field.annotation)} | {_default(field)} | {description} |"
        )
    return "\n".join(rows)


def render() -> str:
    return "\n".join(
        [
            INTRO,
            "## `server:`\n",
            table(ServerConfig, "server."),
            "\n## `server.memory:`\n",
            "Budgets per device. Configured numbers are the budget itself; detected ones (NVML for NVIDIA",
            "GPUs, psutil for RAM) keep the headroom free.\n",
            table(MemoryConfig, "server.memory."),
            "\n## `profiles.<name>:`\n",
            table(Profile, ""),
            "\n## `peers.<name>:`\n",
            "Other OpenAI-compatible servers whose models are asked for as `<peer>/<model>` (and by the",
            "bare name where no local profile has it and only one peer lists it).\n",
            table(PeerConfig, "peers.<name>."),
            "",
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/configuration.md is stale")
    args = parser.parse_args()
    text = render()
    if args.check:
        current = TARGET.read_text() if TARGET.exists() else ""
        if current != text:
            print(f"{TARGET} is out of date: run python scripts/config_reference.py", file=sys.stderr)
            return 1
        return 0
    TARGET.parent.mkdir(exist_ok=True)
    TARGET.write_text(text)
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
