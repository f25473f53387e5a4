"""The shape of the code base: scripts are thin CLIs over the library, and the library's imports form no cycle.

The scripts are train.py, generate.py and evaluate.py at the top, each of which only runs its sena.scripts module
(the code pip installs as a console script), and those modules.

Every import statement is read with `ast`, the ones inside functions included, so a lazy import counts as an edge.
"""

import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIMS = {"train", "generate", "evaluate"}
SCRIPTS = SHIMS | {f"sena.scripts.{s}" for s in SHIMS}


def modules():
    """{dotted name: path} of the scripts, the library, the benchmarks and the tests."""
    out = {s: os.path.join(ROOT, f"{s}.py") for s in SHIMS}
    for top in ("sena", "benchmarks", "tests"):
        for d, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(d, f), ROOT)[:-3].replace(os.sep, ".")
                    out[rel.removesuffix(".__init__")] = os.path.join(d, f)
    return out


def imports(path, mods):
    """First-party modules a file imports (`from a import b` counts as a.b when that is a module)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module
                     for a in node.names]
        else:
            continue
        found |= {n for n in names if n in mods}
    return found


def graph():
    mods = modules()
    return {m: imports(p, mods) for m, p in mods.items()}


def test_scripts_are_imported_by_no_library_benchmark_or_script():
    g = graph()
    assert {"sena.rounds", "sena.selfplay", "sena.trainer", "sena.flags"} <= set(g)  # the walk found the library
    for m, deps in g.items():
        if m.startswith("tests"):
            continue  # tests drive the scripts' main(), as a user's command line does
        own = {f"sena.scripts.{m}"} if m in SHIMS else set()  # train.py runs sena.scripts.train, nothing else
        assert not (deps & SCRIPTS) - own, f"{m} imports the script(s) {sorted((deps & SCRIPTS) - own)}"
        if m in SHIMS:
            assert deps == own, f"{m}.py should only run sena.scripts.{m}, not import {sorted(deps - own)}"
        if m.startswith(("sena", "benchmarks")):
            assert not any(d.startswith("tests") for d in deps), f"{m} imports tests: {sorted(deps)}"


def test_library_imports_have_no_cycle():
    g = {m: {d for d in deps if d.startswith("sena")} for m, deps in graph().items() if m.startswith("sena")}
    # A module importing its own package (sena.world.x -> sena.world) is Python's parent import, not a cycle.
    g = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in g.items()}
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(g.get(m, ())):
            if state.get(d) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m)
    assert len(state) == len(g) > 30


def test_the_cycle_check_can_fail(monkeypatch):
    """A made-up edge sena.losses -> sena.trainer closes a cycle (trainer imports losses), and the check says so."""
    real = imports

    def with_edge(path, mods):
        got = real(path, mods)
        return got | {"sena.trainer"} if path.endswith(os.path.join("sena", "losses.py")) else got

    monkeypatch.setattr(sys.modules[__name__], "imports", with_edge)
    try:
        test_library_imports_have_no_cycle()
    except AssertionError as e:
        assert "sena.trainer -> sena.losses -> sena.trainer" in str(e) or "sena.losses -> sena.trainer" in str(e)
    else:
        raise AssertionError("the cycle check missed a cycle")
