"""The package's modules form a tree: no import cycle among more_fast modules (function-level
imports included, since they only hide a cycle), and kernels/ never imports more_fast."""
import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parent.parent


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: pathlib.Path, name: str) -> set[str]:
    """Every module of the project that `path` imports, wherever the import statement stands."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)  # `from . import cam`
    return found


def _graph(package: str) -> dict[str, set[str]]:
    files = {_module_name(p): p for p in (REPO / package).rglob("*.py")}
    graph = {}
    for name, path in files.items():
        deps = set()
        for target in _imports(path, name):
            while target and target not in files:  # `from x import function` -> the module x
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):  # a package's own __init__
                deps.add(target)
        graph[name] = deps
    return graph


def _cycle(graph: dict[str, set[str]]):
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep, stack + [dep])
                if found:
                    return found
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [node])
            if found:
                return found
    return None


def test_more_fast_modules_form_a_tree():
    graph = _graph("more_fast")
    for name in list(graph):  # a package __init__ that re-exports its submodules is not a cycle
        if (REPO / name.replace(".", "/") / "__init__.py").exists():
            graph[name] = {d for d in graph[name] if not d.startswith(name + ".")}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_checker_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_kernels_never_import_more_fast():
    graph = _graph("kernels")
    assert not [(m, d) for m, deps in graph.items() for d in deps if d.startswith("more_fast")]
    for path in (REPO / "kernels").rglob("*.py"):
        assert not any(t.startswith("more_fast") for t in _imports(path, _module_name(path))), path
