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


# The command-line edge, where parsed flags are read and settings built: the scripts, and `python -m sena.world.build`.
EDGES = ("sena.scripts.", "sena.world.build:main")
SETTINGS_TYPES = ("Settings", "ImageSource", "Stages")  # sena.settings' classes (names ending so), selfplay.Stages


def settings_misuse(source, module="sena.x"):
    """Lines where library code reads a parsed namespace (`args.x`, argparse.Namespace) or treats a settings object as
    mutable: assigns or deletes one of its fields, setattr / delattr / object.__setattr__ on it, vars() or __dict__ of
    it, or a getattr with a default. A settings object is a parameter annotated with a settings class or named
    `settings`, or a local bound to one's field (`train = settings.train`)."""
    found = []
    for fn in ast.walk(ast.parse(source)):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Module)):
            continue
        if isinstance(fn, ast.Module):  # module-level statements (no settings parameter there)
            names, body = set(), [n for n in fn.body if not isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        else:
            if f"{module}:{fn.name}".startswith(EDGES) or module.startswith(EDGES):
                continue
            params = fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs
            names = {a.arg for a in params if a.arg == "settings" or (
                a.annotation is not None and ast.unparse(a.annotation).endswith(SETTINGS_TYPES))}
            body = fn.body
        nodes = [n for stmt in body for n in ast.walk(stmt)]
        for n in nodes:  # locals bound to a settings object's field are settings too
            if isinstance(n, ast.Assign) and isinstance(n.value, ast.Attribute) and root(n.value) in names:
                names |= {t.id for t in n.targets if isinstance(t, ast.Name)}
        for n in nodes:
            bad = None
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "args":
                bad = f"reads args.{n.attr}"
            elif isinstance(n, ast.Attribute) and n.attr in ("Namespace", "__dict__"):
                bad = f"uses {ast.unparse(n)}"
            elif isinstance(n, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
                targets = n.targets if isinstance(n, (ast.Assign, ast.Delete)) else [n.target]
                for e in (e for t in targets for e in ast.walk(t)):
                    if isinstance(e, (ast.Attribute, ast.Subscript)) and root(e) in names:
                        bad = f"sets {ast.unparse(e)}"
            elif isinstance(n, ast.Call) and n.args and root(n.args[0]) in names:
                call = ast.unparse(n.func)
                if call in ("setattr", "delattr", "object.__setattr__", "vars") or (call == "getattr" and len(
                        n.args) == 3):
                    bad = f"calls {call} on {ast.unparse(n.args[0])}"
            if bad:
                found.append(f"{n.lineno}: {bad}")
    return sorted(set(found), key=lambda s: int(s.split(":")[0]))


def root(node):
    """The name at the root of `a.b[c].d`, or None."""
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def test_library_reads_no_namespace_and_mutates_no_settings():
    """Settings are built once at the command-line edge and never changed after: library code takes them as values
    (sena/settings.py) and reads no `args.` namespace. The frozen dataclasses refuse an assignment when it runs; this
    finds one in code that no test runs."""
    mods = modules()
    problems = {}
    for m, path in mods.items():
        if m.startswith("sena") and not m.startswith(EDGES):
            with open(path, encoding="utf-8") as f:
                found = settings_misuse(f.read(), m)
            if found:
                problems[m] = found
    assert not problems, problems


def test_the_settings_check_can_fail():
    planted = '''
def f(settings, run: RunSettings, x):
    settings.seed = 1
    train = run.train
    train.lr += 1
    object.__setattr__(run, "base", "b")
    getattr(settings, "prefix_cache", None)
    vars(run)["x"] = 1
    return args.seed, argparse.Namespace(a=1), x.y
'''
    found = " | ".join(settings_misuse(planted))
    for what in ("sets settings.seed", "sets train.lr", "calls object.__setattr__ on run", "calls getattr on settings",
                 "calls vars on run", "reads args.seed", "uses argparse.Namespace"):
        assert what in found, (what, found)
    assert "x.y" not in found  # a parameter that is not settings may be anything
