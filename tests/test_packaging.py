"""pyproject.toml: the project installs, its modules import from any folder, the CLI has an entry point."""

import os
import shutil
import subprocess
import sys
import tomllib

import pytest
from helpers import REPO

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def test_installed_package_works_outside_the_checkout(tmp_path):
    pytest.importorskip("setuptools", reason="the build backend, needed offline (--no-build-isolation)")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    modules = project["tool"]["setuptools"]["py-modules"]
    assert {"compress_model", "decomposition", "matrix_decomposition"} <= set(modules)
    assert project["project"]["scripts"]["matrix-decomposition"] == "compress_model:main"

    # build from a copy: an in-tree build would leave build/ and *.egg-info in the checkout
    source = tmp_path / "source"
    source.mkdir()
    for name in ["pyproject.toml", "README.md", *(f"{m}.py" for m in modules)]:
        if (REPO / name).is_file():  # modules still being added on another branch are listed but absent
            shutil.copy(REPO / name, source / name)
    for package in project["tool"]["setuptools"]["packages"]:
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    site = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                             "--no-build-isolation", "--target", str(site), str(source)],
                            env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**ENV, "PYTHONPATH": str(site)}
    code = ("import compress_model, decomposition, distillation.knowledge_distillation\n"
            "from matrix_decomposition import load_compressed_model\n"
            "print(compress_model.__file__)")
    result = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == str(site / "compress_model.py")  # the installed copy, not the checkout's

    result = subprocess.run([sys.executable, str(site / "bin" / "matrix-decomposition"), "--help"], cwd=elsewhere,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--resume" in result.stdout and "teacher_model_path" in result.stdout
