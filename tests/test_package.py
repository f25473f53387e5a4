"""What `pip install .` puts on a user's machine: the `sena` package and nothing else at the top level, and console
scripts that work where modules named evaluate, train and generate belong to someone else (Hugging Face's `evaluate`
is in most ML environments; a top-level `evaluate` of ours would shadow it, or be shadowed by it)."""

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("sena-train", "sena-generate", "sena-evaluate", "sena-build-theta0")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel pip builds from a copy of the repository (a build in place would leave build/ in it), offline and
    without build isolation: setuptools comes from requirements-test.txt."""
    d = tmp_path_factory.mktemp("wheel")
    src = d / "src"
    skip = (".git", "runs", "build", "dist", "*.egg-info", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache")
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*skip))  # the repository less what .gitignore lists
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "--wheel-dir", str(d / "dist"), str(src)], check=True, capture_output=True)
    (path,) = (d / "dist").glob("*.whl")
    return path


def test_wheel_installs_only_the_sena_package(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        entry_points = next(z.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert {n.split("/")[0] for n in names} == {"sena", "sena_pytorch-0.1.0.dist-info"}
    assert {"sena/scripts/train.py", "sena/scripts/evaluate.py", "sena/world/theta0/model.safetensors"} <= set(names)
    for script, module in [("sena-train", "sena.scripts.train"), ("sena-evaluate", "sena.scripts.evaluate"),
                           ("sena-generate", "sena.scripts.generate"), ("sena-build-theta0", "sena.world.build")]:
        assert f"{script} = {module}:cli_main" in entry_points


def test_console_scripts_work_beside_other_packages_named_evaluate_train_generate(wheel, tmp_path):
    """The wheel installed into a folder, and beside it packages named evaluate, train and generate that are not
    ours: every console script still runs (before, sena-evaluate died with `ImportError: cannot import name
    'cli_main' from 'evaluate'`)."""
    site, others = tmp_path / "site", tmp_path / "others"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(site),
                    str(wheel)], check=True, capture_output=True)
    (others / "evaluate").mkdir(parents=True)
    (others / "evaluate" / "__init__.py").write_text('"""Not ours: stands in for Hugging Face\'s evaluate."""\n')
    for name in ("train", "generate"):
        (others / f"{name}.py").write_text(f'"""Not ours: someone else\'s {name} module."""\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(others), str(site)]), "OMP_NUM_THREADS": "1"}
    fixture = os.path.join(ROOT, "tests", "fixtures", "amber")
    runs = [[s, "--help"] for s in SCRIPTS] + [["sena-evaluate", "amber", "--responses", f"{fixture}/responses.json",
                                                 "--annotations", f"{fixture}/annotations.json"]]
    procs = [subprocess.Popen([str(site / "bin" / argv[0]), *argv[1:]], cwd=tmp_path, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for argv in runs]
    for argv, proc in zip(runs, procs):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, (argv, err)
        assert out.startswith("usage:") if argv[1] == "--help" else "relation" in out, (argv, out)
    # The scripts ran from the installed copy, and the other packages were on the path first.
    probe = "import evaluate, sena; print(evaluate.__doc__); print(sena.__file__)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True).stdout
    assert out.splitlines() == ["Not ours: stands in for Hugging Face's evaluate.", str(site / "sena" / "__init__.py")]
