"""The tree's rules, read from the code's own imports (every import, at the top of a module
or inside a function): which wing may import which, the real model loaders know nothing of
the tiny and random builds, and no import circle anywhere."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (a `from pkg import mod` counts as mod)."""
    paths = [p for package in ("agent", "signaling") for p in (ROOT / package).rglob("*.py")]
    modules = {module_name(p): p for p in paths}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{anchor}.{base}" if base else anchor
                deps.add(base)
                deps.update(f"{base}.{a.name}" for a in node.names)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


GRAPH = import_graph()


def imports_of(prefix: str) -> set[tuple[str, str]]:
    return {(m, d) for m, deps in GRAPH.items() if m == prefix or m.startswith(prefix + ".") for d in deps}


def test_the_graph_is_read():
    assert "agent.engine.device" in GRAPH["agent.models.manager"]
    assert "agent.call.session" in GRAPH["signaling.webrtc.call"]


def test_the_engine_imports_no_model_call_or_transport():
    bad = {(m, d) for m, d in imports_of("agent.engine") if d.startswith(("agent.models", "agent.call", "signaling"))}
    assert not bad, bad


def test_models_import_no_call_or_transport():
    bad = {(m, d) for m, d in imports_of("agent.models") if d.startswith(("agent.call", "signaling"))}
    assert not bad, bad


def test_only_the_command_line_imports_the_transports():
    bad = {(m, d) for m, d in imports_of("agent") if d.startswith("signaling") and m != "agent.cli"}
    assert not bad, bad


def test_the_transports_import_no_model_or_engine():
    """Transports get a SessionFactory (agent/call/factory.py), never the model manager."""
    bad = {(m, d) for m, d in imports_of("signaling") if d.startswith(("agent.models", "agent.engine", "agent.bench"))}
    assert not bad, bad


def test_the_real_loaders_know_nothing_of_the_tiny_builds():
    for loader in ("agent.models.orpheus", "agent.models.voxtral", "agent.models.snac"):
        assert "agent.models.tiny" not in GRAPH[loader], loader


def test_no_import_circle():
    state: dict[str, int] = {}
    circles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(GRAPH[module]):
            if state.get(dep) == 1:
                circles.append(path[path.index(dep):] + [dep] if dep in path else [module, dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert not circles, circles
