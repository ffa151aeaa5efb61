"""The deployment package: what a publish uploads runs on requirements.txt alone.

The package is built as ``func azure functionapp publish`` would build it (``.funcignore`` applied
to the files of a clean clone), installed into a fresh virtualenv with nothing but
``requirements.txt``, and imported there: every function of the app must be listed, and every
module of the package must import, so no deployed code depends on dev-only code or packages.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from recsys.local.package import ROOT, build_package, publish_files

pytestmark = pytest.mark.integration

# Prints the functions of the app and imports every module of the package; run in the package.
PROBE = """
import importlib, json, pathlib, sys
import function_app
modules = sorted(
    ".".join(p.with_suffix("").parts) for p in pathlib.Path("recsys").rglob("*.py")
) if sys.argv[1:] == ["all"] else []
for name in modules:
    importlib.import_module(name)
functions = sorted(
    [f.get_function_name(), sorted(b.type for b in f.get_bindings()),
     sorted(str(getattr(b, "route", "") or getattr(b, "queue_name", "") or "") for b in f.get_bindings())]
    for f in function_app.app.get_functions()
)
dev_only = sorted(m for m in sys.modules if m.split(".")[0] in {"uvicorn", "pytest", "httpx", "pgserver", "tqdm"})
print(json.dumps({"functions": functions, "modules": modules, "dev_only": dev_only,
                  "function_app": function_app.__file__}))
"""


def run_probe(python: str, cwd: Path, env: dict[str, str], *args: str) -> dict[str, object]:
    proc = subprocess.run(
        [python, "-s", "-c", PROBE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout)
    return result


def clean_env() -> dict[str, str]:
    """The environment of a fresh process: no PYTHONPATH, no virtualenv, no app settings."""
    keep = ("PATH", "HOME", "LANG", "TMPDIR", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS",
            "PIP_CONFIG_FILE", "PIP_CACHE_DIR", "XDG_CACHE_HOME", "XDG_CONFIG_HOME")
    return {key: os.environ[key] for key in keep if key in os.environ}


def pip(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=800)


def wheelhouse(package: Path) -> Path:
    """The wheels ``requirements.txt`` of ``package`` resolves to, downloaded once per content."""
    requirements = (package / "requirements.txt").read_bytes()
    key = hashlib.sha256(requirements + sys.version.encode()).hexdigest()[:16]
    folder = ROOT / ".stack" / "wheelhouse" / key
    if not (folder / ".complete").exists():
        for stale in folder.parent.glob("*"):  # wheels of earlier requirements
            shutil.rmtree(stale, ignore_errors=True)
        download = pip("download", "--dest", str(folder), "-r", "requirements.txt", cwd=package, env=clean_env())
        assert download.returncode == 0, download.stderr[-2000:]
        (folder / ".complete").touch()
    return folder


def test_funcignore_keeps_only_what_runs_in_azure() -> None:
    files = [
        "function_app.py", "host.json", "requirements.txt", "recsys/http/items.py", "recsys/http/openapi.json",
        "recsys/ingest/loader.py", "recsys/local/host.py", "recsys/local/stack.py", "recsys/bench/recall.py",
        "recsys/__main__.py", "recsys/ingest/cli.py", "recsys/ingest/demo.py", "recsys/datasets.py",
        "tests/unit/test_config.py", "bench/results/recall.json", "docs/API.md", "README.md", "sql/002_items.sql",
        ".venv/bin/python", ".stack/postgres/PG_VERSION", ".tools/azurite/package.json",
        "local.settings.json", "local.settings.sample.json", "recsys/__pycache__/config.cpython-311.pyc",
        ".gitignore", ".ci/run", "Makefile", "pyproject.toml", "requirements-dev.txt",
    ]
    assert publish_files(ROOT, files) == [
        "function_app.py", "host.json", "requirements.txt", "recsys/http/items.py", "recsys/http/openapi.json",
        "recsys/ingest/loader.py",
    ]


# A cold wheelhouse downloads every wheel of requirements.txt; on a machine whose CPU is shared
# that alone took over five minutes once (about 30 s when the machine is quiet).
@pytest.mark.timeout(900)
def test_package_installs_and_lists_every_function(tmp_path: Path) -> None:
    env = clean_env()
    expected = run_probe(sys.executable, ROOT, env)

    package = tmp_path / "package"
    names = build_package(package)
    assert {"function_app.py", "host.json", "requirements.txt"} <= set(names)
    assert not [n for n in names if n.startswith(("tests/", "bench/", "recsys/local/", "recsys/bench/", "."))
                and n != ".funcignore"]

    # A fresh virtualenv with requirements.txt alone, as the remote build installs it: nothing
    # but the wheels that requirements.txt resolves to, and no index to fall back on.
    target = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(target)
    python = str(target / "bin" / "python")
    install = pip("--python", python, "install", "--no-index", "--find-links", str(wheelhouse(package)),
                  "-r", "requirements.txt", cwd=package, env=env)
    assert install.returncode == 0, install.stderr[-2000:]

    found = run_probe(python, package, env, "all")
    assert found["function_app"] == str(package / "function_app.py")
    assert found["functions"] == expected["functions"]
    assert len(found["functions"]) >= 9  # type: ignore[arg-type]
    assert found["dev_only"] == []
    assert "recsys.http.loader" in found["modules"]  # type: ignore[operator]
    assert not [m for m in found["modules"] if m.startswith(("recsys.local", "recsys.bench"))]  # type: ignore[attr-defined]
