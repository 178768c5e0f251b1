"""The package's import structure, read from its own source: commands side by side, a run layer below them,
no import circle. Every import counts, including those inside functions (a lazy import is still a dependency)."""
import ast
import os

import pytest

import betanas_fast

ROOT = os.path.dirname(betanas_fast.__file__)
COMMANDS = ("betanas_fast.search", "betanas_fast.train", "betanas_fast.evaluate", "betanas_fast.export",
            "betanas_fast.latency")


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
    return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def _modules():
    for folder, _, names in os.walk(ROOT):
        for n in names:
            if n.endswith(".py"):
                yield os.path.join(folder, n)


def _imports(path: str):
    """The betanas_fast modules `path` imports (absolute names; `from pkg import mod` names the module)."""
    name = _module_name(path)
    package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    with open(path) as f:
        tree = ast.parse(f.read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("betanas_fast")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("betanas_fast"):
                continue
            submodules = {f"{target}.{a.name}" for a in node.names} & MODULES
            out |= submodules
            if len(submodules) < len(node.names):  # some name is defined in the module (package) itself
                out.add(target)
    return {m for m in out if m in MODULES}


MODULES = {_module_name(p) for p in _modules()}
GRAPH = {_module_name(p): _imports(p) for p in _modules()}


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


@pytest.mark.parametrize("command", COMMANDS)
def test_no_command_imports_another(command):
    others = [c for c in COMMANDS if c != command]
    offending = {(m, t) for m, targets in GRAPH.items() if _under(m, command)
                 for t in targets if any(_under(t, o) for o in others)}
    assert not offending, f"{command} imports another command: {sorted(offending)}"


def test_the_run_layer_stands_below_everything_it_serves():
    above = COMMANDS + ("betanas_fast.study", "betanas_fast.scoring", "betanas_fast.nn", "betanas_fast.data",
                        "betanas_fast.cost", "betanas_fast.plots")
    offending = {(m, t) for m, targets in GRAPH.items() if _under(m, "betanas_fast.runs")
                 for t in targets if any(_under(t, a) for a in above)}
    assert not offending, f"the run layer imports what stands on it: {sorted(offending)}"


def test_below_the_commands_nothing_imports_a_command_or_a_study():
    below = [m for m in MODULES if not any(_under(m, c) for c in COMMANDS + ("betanas_fast.study",))]
    offending = {(m, t) for m in below for t in GRAPH[m]
                 if any(_under(t, c) for c in COMMANDS + ("betanas_fast.study",))}
    assert not offending, f"imports that run back up: {sorted(offending)}"


def test_no_import_circle():
    """Between modules, package faces (__init__) included."""
    def edges(m):
        return GRAPH[m] - {m}

    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in edges(m):
            if state.get(t) == "open":
                raise AssertionError(f"import circle: {' -> '.join(stack[stack.index(t):] + [t])}")
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(MODULES):
        if m not in state:
            visit(m)


def test_the_checks_see_imports():
    """The reading of imports works (a check that sees none could not fail)."""
    assert "betanas_fast.runs.files" in GRAPH["betanas_fast.train"]
    assert "betanas_fast.scoring" in GRAPH["betanas_fast.search.engine"]
    assert "betanas_fast.train" in GRAPH["betanas_fast.study.common"]  # a lazy import inside a function
