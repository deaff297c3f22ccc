"""The package as a user installs it: the wheel, built from the source tree and installed into
a clean virtual environment without the `convert` extra (no torch, transformers, safetensors
or gguf), holds every subpackage, imports every module the nodes use, runs the demo's honest
and fraud flows (provider, watchtower, contracts, store), and refuses a conversion with the
command that installs the extra."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from optinfer.services.cli import CONVERT_EXTRA_MODULES

# One worker builds the module fixtures once (a wheel and its venvs take about a minute).
pytestmark = pytest.mark.xdist_group("wheel")

REPO = Path(__file__).resolve().parent.parent
#: The folders that the `optinfer` namespace maps (pyproject.toml, [tool.setuptools]).
PACKAGE_FOLDERS = {"optinfer": "optinfer_root", "optinfer.models": "models",
                   "optinfer.prover": "prover", "optinfer.challenger": "challenger",
                   "optinfer.contracts": "contracts", "optinfer.services": "services"}
#: Modules that convert, train or run float models: they import the `convert` extra at import
#: time, and no node imports them.
CONVERSION_ONLY = {"optinfer.models.converter", "optinfer.models.float_reference"}

IMPORT_EVERY_MODULE = """
import importlib, json, sys, zipfile

failed = {}
for name in sorted(zipfile.ZipFile(sys.argv[1]).namelist()):
    if not name.endswith(".py") or "/migrations/" in name:
        continue
    module = name[:-3].replace("/", ".").removesuffix(".__init__")
    try:
        importlib.import_module(module)
    except Exception as error:
        failed[module] = f"{type(error).__name__}: {getattr(error, 'name', None) or error}"
print(json.dumps(failed))
"""


def _run(args, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, (args, proc.stdout[-2000:], proc.stderr[-3000:])
    return proc


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory) -> tuple[Path, Path]:
    """The wheel built from the tracked (and new, unignored) files, and a venv with it."""
    tmp = tmp_path_factory.mktemp("wheel")
    files = _run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO).stdout
    src = tmp / "src"
    for name in filter(None, files.split("\0")):
        path = REPO / name
        if path.is_file():  # a deleted file not yet staged is still listed
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes(path.read_bytes())
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(tmp / "dist"),
          str(src)], timeout=600)
    (wheel,) = (tmp / "dist").glob("optinfer-*.whl")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], timeout=300)
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(wheel)],
         timeout=900)
    return wheel, venv


def test_the_wheel_holds_every_subpackage_and_its_data(wheel_env):
    wheel, _ = wheel_env
    names = set(zipfile.ZipFile(wheel).namelist())
    for package, folder in PACKAGE_FOLDERS.items():
        for init in (REPO / folder).rglob("__init__.py"):
            relative = init.relative_to(REPO / folder).as_posix()
            assert f"{package.replace('.', '/')}/{relative}" in names, init
    for data in ("optinfer/models/tiny-r1/integer/manifest.json",
                 "optinfer/contracts/artifacts/InferenceCoordinator.json",
                 "optinfer/services/migrations/env.py"):
        assert data in names, data


def test_the_nodes_import_without_the_convert_extra(wheel_env):
    wheel, venv = wheel_env
    python = str(venv / "bin" / "python")
    probe = "import importlib.util as u; print([m for m in %r if u.find_spec(m)])"
    assert _run([python, "-c", probe % sorted(CONVERT_EXTRA_MODULES)]).stdout.strip() == "[]"
    failed = json.loads(_run([python, "-c", IMPORT_EVERY_MODULE, str(wheel)],
                             cwd=venv).stdout)
    assert set(failed) == CONVERSION_ONLY, failed
    assert all(reason.split(": ")[1] in CONVERT_EXTRA_MODULES for reason in failed.values())


def test_the_demo_runs_without_the_convert_extra(wheel_env, tmp_path):
    _, venv = wheel_env
    env = {**os.environ, "OPTINFER_TOOLS_DIR": str(REPO / ".tools"), "HOME": str(tmp_path)}
    proc = _run([str(venv / "bin" / "optinfer"), "demo", "--json"], cwd=tmp_path, env=env,
                timeout=300)
    result = json.loads(proc.stdout)
    assert result["ok"] and result["honest"]["answer"] == 46 and result["honest"]["finalized"]
    assert result["fraud"]["provider_slashed"] and result["fraud"]["winner"] == "challenger"


def test_a_conversion_without_the_extra_says_how_to_install_it(wheel_env, tmp_path):
    _, venv = wheel_env
    proc = subprocess.run([str(venv / "bin" / "optinfer"), "model", "random-r1", "--layers",
                           "1", "-o", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "pip install torch==2.13.0 'optinfer[convert]'" in proc.stderr
    assert "Traceback" not in proc.stderr
