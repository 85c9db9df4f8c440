"""pyproject.toml: the project installs into a fresh virtual environment, adds nothing at the top of
site-packages but its own names, and its commands and modules work from a user's folder whose own
data.py, plan.py and translate.py (and an installed package named translate) change nothing."""

import json
import shutil
import sys
import tomllib

import pytest
from helpers import ENV, REPO, run_command

from mdcompress.data import write_pairs

pytestmark = pytest.mark.slow

USER_SCRIPT = """
import sys
import compress_model, decomposition, distillation.knowledge_distillation
from matrix_decomposition import load_compressed_model
print(compress_model.__file__, flush=True)
sys.exit(compress_model.main(["--config", "config.json"]))
"""


def test_installed_in_a_fresh_virtual_environment(tmp_path):
    pytest.importorskip("setuptools", reason="the build backend, needed offline (--no-build-isolation)")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    modules = project["tool"]["setuptools"]["py-modules"]
    assert {"compress_model", "decomposition", "matrix_decomposition"} <= set(modules)
    assert project["project"]["scripts"]["matrix-decomposition"] == "compress_model:main"
    env = {k: v for k, v in ENV.items() if k != "PYTHONPATH"}  # nothing of the checkout on the path

    # build from a copy: an in-tree build would leave build/ and *.egg-info in the checkout
    source = tmp_path / "source"
    source.mkdir()
    for name in ["pyproject.toml", "README.md", *(f"{m}.py" for m in modules)]:
        if (REPO / name).is_file():  # modules still being added on another branch are listed but absent
            shutil.copy(REPO / name, source / name)
    for package in project["tool"]["setuptools"]["packages"]:
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))

    # a fresh environment that sees this one's packages (torch, transformers, ...), with a package named translate
    venv = tmp_path / "venv"
    run_command([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], env=env)
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    site = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    (site / "translate").mkdir()
    (site / "translate" / "__init__.py").write_text("raise ImportError('the installed package translate was imported')\n")
    before = {p.name for p in site.iterdir()}
    run_command([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
                 "--no-build-isolation", str(source)], env={**env, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    added = {p.name for p in site.iterdir()} - before
    dist_info = {name for name in added if name.endswith(".dist-info")}
    assert [name.split("-")[0] for name in dist_info] == ["matrix_decomposition"], added
    assert added - dist_info - {"__pycache__"} == {"mdcompress", "distillation", *(f"{m}.py" for m in modules)}
    assert {p.name.split(".")[0] for p in (site / "__pycache__").glob("*")} <= set(modules)  # their bytecode only

    # a user's folder with modules of the names the tool used to have, and a run that names a missing teacher
    user = tmp_path / "user"
    user.mkdir()
    for name in ("data", "plan", "translate"):
        (user / f"{name}.py").write_text(f"raise ImportError(\"the user's {name}.py was imported\")\n")
    write_pairs(user / "train.csv", [("Hello.", "Hallo."), ("Thank you.", "Danke.")])
    (user / "config.json").write_text(json.dumps({"teacher_model_path": "no-such-teacher", "dataset_path": "train.csv",
                                                  "eval_dataset_path": "train.csv"}))
    for command, words in (("md-translate", ["--model", "--backend"]), ("md-export-onnx", ["--model", "--int8"]),
                           ("matrix-decomposition", ["--resume", "teacher_model_path"])):
        result = run_command([str(bin_dir / command), "--help"], cwd=user, env=env, timeout=120)
        assert all(word in result.stdout for word in words), (command, result.stdout[-2000:])

    # the console command names itself as the user typed it, not compress_model.py
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_command([str(bin_dir / "matrix-decomposition")], cwd=empty, env=env, timeout=120, check=False)
    assert (result.returncode, result.stderr) == (2, "matrix-decomposition: error: config file 'config.json' not found\n")

    (user / "run.py").write_text(USER_SCRIPT)
    result = run_command([str(python), "run.py"], cwd=user, env=env, timeout=120, check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stdout.splitlines()[0] == str(site / "compress_model.py")  # the installed copy, not the checkout's
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("compress_model.py: error: teacher_model_path"), err
    assert "no-such-teacher" in err
    assert sorted(p.name for p in user.iterdir()) == ["config.json", "data.py", "plan.py", "run.py", "train.csv",
                                                      "translate.py"]  # nothing written
