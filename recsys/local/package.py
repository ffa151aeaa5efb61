"""The deployment package: exactly the files a publish uploads, and azure-functions-doctor on them.

``func azure functionapp publish`` uploads the project folder less the paths ``.funcignore``
names (gitignore syntax). Here the same rules are applied to the files git tracks, which is what
a clean clone holds, so the package never depends on what happens to lie in a developer's folder
(``.venv/``, ``.stack/``, ``local.settings.json``). ``python -m recsys package`` writes that set
as a folder or a zip (for ``az functionapp deployment source config-zip`` where Core Tools is not
installed) and ``--doctor`` runs azure-functions-doctor on it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import pathspec

__all__ = [
    "ACCEPTED_DOCTOR_WARNINGS",
    "DEPLOYMENT_APP_SETTINGS",
    "build_package",
    "doctor_findings",
    "package_main",
    "publish_files",
    "tracked_files",
]

ROOT = Path(__file__).resolve().parents[2]

#: The app settings the README's Azure section gives the function app (placeholders for the
#: values). They live in Azure, never in the package; the doctor checks the bindings and
#: Application Insights against them, read from a local.settings.json in its copy of the package
#: (the file `func azure functionapp publish --publish-local-settings` would upload).
DEPLOYMENT_APP_SETTINGS: dict[str, str] = {
    "AzureWebJobsStorage__accountName": "STORAGE",
    "AzureWebJobsStorage__credential": "managedidentity",
    "AzureWebJobsStorage__clientId": "LOADER_CLIENT_ID",
    "APPLICATIONINSIGHTS_CONNECTION_STRING": "InstrumentationKey=KEY;IngestionEndpoint=https://REGION.in.applicationinsights.azure.com/",
    "APPLICATIONINSIGHTS_AUTHENTICATION_STRING": "Authorization=AAD;ClientId=LOADER_CLIENT_ID",
    "PYTHON_ENABLE_OPENTELEMETRY": "true",
    "RECSYS_QUEUE_NAME": "embedding-batches",
}

#: Doctor rules whose warning is expected on the package, each with the reason (README, Deploying).
ACCEPTED_DOCTOR_WARNINGS: dict[str, str] = {
    "check_func_cli": "Azure Functions Core Tools is not installed on this machine",
    "check_func_core_tools_version": "Azure Functions Core Tools is not installed on this machine",
    "check_native_dependency_risk": "numpy (needed by pgvector) has native code: publish with remote build",
    "check_programming_model_v2": "every handler is `async def`; the doctor's scan recognises only `def`",
}


def tracked_files(root: Path = ROOT) -> list[str]:
    """The files of a clean clone of ``root``: git's tracked paths that exist in the work tree.

    Raises ``RuntimeError`` when ``root`` is not a git work tree.
    """
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached"], cwd=root, check=True, capture_output=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise RuntimeError(f"cannot list the tracked files of {root}: {exc}") from exc
    return sorted(name for name in out.split("\0") if name and (root / name).is_file())


def publish_files(root: Path = ROOT, files: Sequence[str] | None = None) -> list[str]:
    """The subset of ``files`` (default: the tracked files) that ``.funcignore`` lets through."""
    ignore = root / ".funcignore"
    lines = ignore.read_text(encoding="utf-8").splitlines() if ignore.is_file() else []
    spec = pathspec.GitIgnoreSpec.from_lines(lines)
    return [name for name in (tracked_files(root) if files is None else files) if not spec.match_file(name)]


def build_package(dest: Path, root: Path = ROOT) -> list[str]:
    """Copy the publish set into the folder ``dest`` (created; must be empty) and return it."""
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise RuntimeError(f"{dest} is not empty")
    names = publish_files(root)
    for name in names:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, target)
    return names


def _write_zip(path: Path, root: Path = ROOT) -> list[str]:
    names = publish_files(root)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in names:
            archive.write(root / name, name)
    return names


def doctor_findings(package: Path, settings: Mapping[str, str] = DEPLOYMENT_APP_SETTINGS) -> list[dict[str, str]]:
    """Run azure-functions-doctor (every rule) on the folder ``package`` with the app settings.

    Writes ``local.settings.json`` into ``package``: pass a copy, not a folder to deploy.
    Returns every rule that did not pass or skip, as ``{"rule_id", "status", "value"}``.
    """
    local_settings = {"IsEncrypted": False, "Values": dict(settings)}
    (package / "local.settings.json").write_text(json.dumps(local_settings, indent=2), encoding="utf-8")
    env = dict(os.environ)
    if sys.prefix != sys.base_prefix:  # running from the project's virtualenv, activated or not
        env.setdefault("VIRTUAL_ENV", sys.prefix)
    doctor = Path(sys.executable).with_name("azure-functions-doctor")
    proc = subprocess.run(
        [str(doctor), "doctor", "--path", str(package), "--profile", "full", "--format", "json",
         "--hosting-plan", "flex-consumption"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError as exc:
        raise RuntimeError(f"azure-functions-doctor gave no report: {proc.stderr.strip()[-500:]}") from exc
    findings = []
    for section in report["results"]:
        for item in section["items"]:
            if item["status"] not in ("pass", "skip"):
                findings.append({"rule_id": item["rule_id"], "status": item["status"], "value": item["value"]})
    return findings


def package_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m recsys package",
        description="the files a publish uploads (.funcignore applied to the tracked files)",
    )
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--dir", help="write the package into this (new or empty) folder")
    target.add_argument("--zip", help="write the package as this zip file")
    parser.add_argument("--doctor", action="store_true",
                        help="run azure-functions-doctor on the package; fail on an unexpected finding")
    args = parser.parse_args(argv)
    if args.zip:
        names = _write_zip(Path(args.zip))
        print(f"{len(names)} files -> {args.zip}")
    elif args.dir:
        names = build_package(Path(args.dir))
        print(f"{len(names)} files -> {args.dir}")
    elif not args.doctor:
        print("\n".join(publish_files()))
    if not args.doctor:
        return 0
    with tempfile.TemporaryDirectory(prefix="recsys-package-") as tmp:
        build_package(Path(tmp))
        findings = doctor_findings(Path(tmp))
    unexpected = [f for f in findings if f["rule_id"] not in ACCEPTED_DOCTOR_WARNINGS or f["status"] != "warn"]
    for finding in findings:
        reason = ACCEPTED_DOCTOR_WARNINGS.get(finding["rule_id"]) if finding not in unexpected else None
        mark = f"accepted: {reason}" if reason else "UNEXPECTED"
        first_line = finding["value"].splitlines()[0]
        print(f"azure-functions-doctor {finding['status']} {finding['rule_id']}: {first_line} [{mark}]")
    print(f"azure-functions-doctor: {len(findings) - len(unexpected)} accepted, {len(unexpected)} unexpected")
    return 1 if unexpected else 0
