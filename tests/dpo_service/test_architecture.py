"""The package's layers, checked from its source (an AST scan of every import).

- every module imports on its own, in a fresh copy of the packages (no hidden order);
- there is no import cycle between modules (imports inside functions and under
  ``TYPE_CHECKING`` count: a cycle of type hints is still a cycle of ideas);
- imports point down: ``api`` → ``engine`` → ``models`` / ``state`` → ``modern_llm``, and the
  client needs only the wire contract.
"""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

SERVICE = Path(__file__).resolve().parents[2] / "service"
PACKAGES = ("dpo_service", "modern_llm")
GENERATED = "dpo_service.api.grpc.gen"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SERVICE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((SERVICE / package).rglob("*.py")):
            name = _module_name(path)
            if not name.startswith(GENERATED):
                found[name] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The project modules ``name`` imports (resolved to modules, not packages' names)."""
    out: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for target in targets:
            if target.startswith(GENERATED):
                continue  # the generated stubs (their packages' __init__ import nothing)
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name and not target.startswith(GENERATED):
                out.add(target)
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def test_the_cycle_finder_finds_a_planted_cycle() -> None:
    """The scan itself: a → b → c → a is reported, a DAG is not."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles() -> None:
    assert _cycle(GRAPH) is None, " → ".join(_cycle(GRAPH) or [])


# What each layer may import (besides itself and third-party code).
ALLOWED: dict[str, tuple[str, ...]] = {
    "modern_llm": (),
    "dpo_service.errors": (),
    "dpo_service.settings": (),
    "dpo_service.conversations": (),  # pure chat-message checks: server and client share them
    "dpo_service.schemas": ("modern_llm",),
    "dpo_service.schemas_sessions": ("dpo_service.schemas", "modern_llm"),  # issue 12
    "dpo_service.state": (),
    "dpo_service.models": ("modern_llm",),
    "dpo_service.engine": (
        "dpo_service.models",
        "dpo_service.state",
        "dpo_service.errors",
        "dpo_service.settings",
        "dpo_service.schemas",
        "dpo_service.conversations",
        "modern_llm",
    ),
    "dpo_service.api": (
        "dpo_service.engine",
        "dpo_service.errors",
        "dpo_service.settings",
        "dpo_service.schemas",
        "dpo_service.schemas_sessions",
    ),
    "dpo_service.client": (
        "dpo_service.api.grpc.convert",
        "dpo_service.api.grpc.gen",
        "dpo_service.errors",
        "dpo_service.conversations",
    ),
    "dpo_service.server": ("dpo_service.api", "dpo_service.engine", "dpo_service.settings"),
    "dpo_service.cli": (
        "dpo_service.settings",
        "dpo_service.server",
        "dpo_service.client",
        "dpo_service.engine.precompute",  # precompute-reference runs the engine offline
    ),
    "dpo_service.__main__": ("dpo_service.cli",),
    "dpo_service": (),
}


def _layer(name: str) -> str:
    return max((k for k in ALLOWED if name == k or name.startswith(k + ".")), key=len)


def _within(target: str, prefixes: tuple[str, ...]) -> bool:
    return any(target == p or target.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_down(name: str) -> None:
    layer = _layer(name)
    wrong = sorted(
        t
        for t in GRAPH[name]
        if not _within(t, (layer, *ALLOWED[layer]))
        and not (layer == "dpo_service" and t.startswith("dpo_service"))
    )
    assert not wrong, f"{name} ({layer}) imports {wrong}"


@pytest.mark.parametrize(
    "name", sorted(n for n in MODULES if n.startswith(("dpo_service.engine", "dpo_service.state")))
)
def test_the_domain_does_not_build_wire_objects(name: str) -> None:
    """Engine and state never name a response model, a protobuf module or pydantic's
    (de)serialisation in code (docstrings may mention them)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text("utf-8"))):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.alias):
            names.add(node.asname or node.name)
    wire = {"LossResponse", "ModelInfo", "pb", "model_dump", "model_validate", "BaseModel"}
    assert not names & wire, f"{name} uses {sorted(names & wire)}"


def _forget_project_modules() -> None:
    for mod in [m for m in sys.modules if m.split(".")[0] in PACKAGES]:
        del sys.modules[mod]


def test_every_module_imports_alone() -> None:
    """Each module imported first, in a fresh copy of both packages (third-party modules stay
    cached, so this is fast): no module depends on another having been imported before it."""
    saved = {m: sys.modules[m] for m in sys.modules if m.split(".")[0] in PACKAGES}
    failures = []
    try:
        for name in sorted(n for n in MODULES if not n.endswith("__main__")):  # a script
            _forget_project_modules()
            try:
                importlib.import_module(name)
            except Exception as exc:  # collect them all, report together
                failures.append(f"{name}: {type(exc).__name__}: {exc}")
    finally:
        _forget_project_modules()
        sys.modules.update(saved)
    assert not failures, "\n".join(failures)
