"""The package's layout is its architecture: wings that import only the wings below them.

llama_router/<wing>/ for each wing of `WINGS`, lowest first; app.py, cli.py and __main__.py on top
wire them. An import of a wing above is refused, so a rule cannot drift upwards unseen, and `core`
(the scheduler, its events, device names, the error shape) imports the standard library only: what it
needs from above reaches it as plain data.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = "llama_router"
WINGS = ("core", "config", "sizing", "upstream", "relay", "front", "manage")
TOP = len(WINGS)  # app, cli: wiring only
ROOT = Path(__file__).resolve().parent.parent / PACKAGE


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def rank(module: str) -> int:
    """The wing's place from the bottom; the top for the wiring modules. The package itself holds
    only its version, below everything."""
    parts = module.split(".")
    if parts == [PACKAGE]:
        return -1
    return WINGS.index(parts[1]) if len(parts) > 1 and parts[1] in WINGS else TOP


def is_module(name: str) -> bool:
    path = ROOT.parent.joinpath(*name.split("."))
    return path.is_dir() or path.with_suffix(".py").is_file()


def imported(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in a module's source, relative ones resolved, those
    inside functions and `TYPE_CHECKING` included."""
    found = []
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            submodules = [f"{target}.{alias.name}" for alias in node.names]  # `from package import module`
            found += [(node.lineno, name) for name in submodules if is_module(name)]
    return sorted(found)


def upward(module: str, source: str, is_package: bool = False) -> list[str]:
    """The imports of a wing above this module's own."""
    own = rank(module)
    return [
        f"{module}:{line} imports {target} ({WINGS[rank(target)] if rank(target) < TOP else 'the top'})"
        for line, target in imported(source, module, is_package)
        if target.split(".")[0] == PACKAGE and rank(target) > own
    ]


def modules() -> list[tuple[str, Path]]:
    return [(module_name(path), path) for path in sorted(ROOT.rglob("*.py"))]


def test_imports_only_go_down() -> None:
    refused = [
        refusal
        for module, path in modules()
        for refusal in upward(module, path.read_text(), path.name == "__init__.py")
    ]
    assert refused == [], "wings import only the wings below them:\n" + "\n".join(refused)


def test_core_imports_only_the_standard_library() -> None:
    outside = [
        f"{module}:{line} imports {target}"
        for module, path in modules()
        if rank(module) == 0
        for line, target in imported(path.read_text(), module, path.name == "__init__.py")
        if target.split(".")[0] not in sys.stdlib_module_names
        and target != "__future__"
        and not target.startswith(f"{PACKAGE}.core")
    ]
    assert outside == [], "core is the standard library only:\n" + "\n".join(outside)


def test_every_module_sits_in_a_wing_or_wires_them() -> None:
    loose = [m for m, _ in modules() if rank(m) == TOP and m.split(".")[-1] not in ("app", "cli", "__main__")]
    assert loose == [], f"modules outside every wing: {loose}"
    assert imported((ROOT / "__init__.py").read_text(), PACKAGE, True) == [], (
        "the package holds its version only"
    )
    assert sorted(
        path.name for path in ROOT.iterdir() if path.is_dir() and path.name != "__pycache__"
    ) == sorted(WINGS)


def test_an_import_of_a_wing_above_is_refused() -> None:
    """The check itself: the imports the layout forbids are seen, in every spelling."""
    source = (
        "from llama_router.relay.request_rules import SlotWatch\n"
        "from ..front import access_log\n"
        "def late():\n"
        "    import llama_router.manage.api\n"
        "from llama_router import cli\n"
        "from llama_router.sizing.memory import MIB\n"
    )
    assert upward("llama_router.upstream.controller", source) == [
        "llama_router.upstream.controller:1 imports llama_router.relay.request_rules (relay)",
        "llama_router.upstream.controller:2 imports llama_router.front (front)",
        "llama_router.upstream.controller:2 imports llama_router.front.access_log (front)",
        "llama_router.upstream.controller:4 imports llama_router.manage.api (manage)",
        "llama_router.upstream.controller:5 imports llama_router.cli (the top)",
    ]


# The implementations of a lease's target (upstream/target.py): a process of ours, a peer.
TARGETS = frozenset({"LocalTarget", "PeerTarget", "PeerLink", "Upstream"})


def target_questions(source: str) -> list[int]:
    """The lines of `isinstance(..., <an implementation of Target>)` in a module's source."""
    return [
        node.lineno
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "isinstance"
        and len(node.args) == 2
        and TARGETS & {name.id for name in ast.walk(node.args[1]) if isinstance(name, ast.Name)}
    ]


def test_no_module_asks_which_target_a_lease_holds() -> None:
    """A lease's target is one interface: the relay and the controller send through it and are told
    what became of it, and nobody tells a process of ours from a peer by its class."""
    asked = [f"{module}:{line}" for module, path in modules() for line in target_questions(path.read_text())]
    assert asked == [], "isinstance on a lease's target:\n" + "\n".join(asked)
    assert target_questions("if isinstance(lease.target, (PeerTarget, int)):\n    pass\n") == [1]
    assert target_questions("isinstance(upstream, PeerLink)\nisinstance(exc, TimeoutError)\n") == [1]
