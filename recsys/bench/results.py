"""Benchmark results: the JSON document of one run, and the table of ``bench/README.md``.

Pure apart from ``write_result``/``write_readme``/``machine_info``: the tests build documents
and tables from plain values.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = [
    "BenchResult",
    "Headline",
    "finite",
    "format_value",
    "load_results",
    "machine_info",
    "render_readme",
    "render_table",
    "to_document",
    "write_readme",
    "write_result",
]

#: Python packages whose versions a result records.
PACKAGES = ("psycopg", "psycopg-binary", "psycopg-pool", "pgvector", "numpy", "azure-functions", "uvicorn", "httpx")


@dataclass(frozen=True)
class Headline:
    """One figure of the README table: a value, its unit, and the goal it is read against."""

    label: str
    value: float | None
    unit: str = ""
    goal: str | None = None
    met: bool | None = None


@dataclass
class BenchResult:
    """What a benchmark returns: its inputs, every figure measured, and the headline figures."""

    name: str
    title: str
    inputs: dict[str, Any]
    figures: dict[str, Any]
    headlines: list[Headline]
    plots: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: Versions of the servers measured (PostgreSQL, pgvector, PgBouncer), recorded with the machine.
    servers: dict[str, str] = field(default_factory=dict)


def finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (strict JSON has no inf/NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def machine_info(extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """CPU count and model, OS, Python and package versions of this machine (plus ``extra``)."""
    model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions: dict[str, str] = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "packages": versions,
    }
    info.update(extra or {})
    return info


def to_document(
    result: BenchResult,
    *,
    command: str,
    started_at: str,
    duration_s: float,
    machine: Mapping[str, Any],
) -> dict[str, Any]:
    """The JSON document of one benchmark run (strict JSON: non-finite numbers become null)."""
    return finite({
        "name": result.name,
        "title": result.title,
        "command": command,
        "started_at": started_at,
        "duration_s": round(duration_s, 1),
        "machine": {**machine, "servers": result.servers},
        "inputs": result.inputs,
        "headlines": [asdict(h) for h in result.headlines],
        "figures": result.figures,
        "plots": result.plots,
        "notes": result.notes,
    })


def write_result(document: Mapping[str, Any], directory: Path) -> Path:
    """Write ``directory/NAME.json`` atomically (a reader never sees half a file); return its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{document['name']}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(document, indent=2, allow_nan=False, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def load_results(directory: Path, order: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Every ``*.json`` result in ``directory``: those named in ``order`` first, in that order."""
    documents = []
    for path in sorted(directory.glob("*.json")):
        try:
            documents.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    rank = {name: i for i, name in enumerate(order)}
    return sorted(documents, key=lambda d: (rank.get(d.get("name", ""), len(rank)), d.get("name", "")))


def format_value(value: float | None, unit: str = "") -> str:
    """A figure for a table: three significant digits, thousands separated, unit appended."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    magnitude = abs(value)
    if magnitude >= 1000:
        text = f"{value:,.0f}"
    elif magnitude >= 100 or float(value).is_integer():
        text = f"{value:.0f}"
    elif magnitude >= 10:
        text = f"{value:.1f}"
    elif magnitude >= 1:
        text = f"{value:.2f}"
    else:
        text = f"{value:.3f}"
    if not unit:
        return text
    return f"{text}{unit}" if unit in ("×", "%") else f"{text} {unit}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_table(documents: Iterable[Mapping[str, Any]]) -> str:
    """A Markdown table of every headline figure, one row each, grouped by benchmark."""
    lines = ["| benchmark | figure | value | goal | met |", "|---|---|---|---|---|"]
    for document in documents:
        name = document.get("name", "?")
        for headline in document.get("headlines", []):
            met = headline.get("met")
            lines.append(
                "| {} | {} | {} | {} | {} |".format(
                    _cell(name),
                    _cell(headline.get("label", "")),
                    _cell(format_value(headline.get("value"), headline.get("unit", ""))),
                    _cell(headline.get("goal") or ""),
                    "" if met is None else ("yes" if met else "**no**"),
                )
            )
    return "\n".join(lines)


def render_readme(documents: Sequence[Mapping[str, Any]], descriptions: Mapping[str, str]) -> str:
    """``bench/README.md``: how to run, what each benchmark measures, the latest figures."""
    parts = [
        "# Benchmarks",
        "",
        "Generated by `python -m recsys bench` (or `make bench`); do not edit by hand. Each benchmark",
        "starts its own ephemeral local stack (PostgreSQL + pgvector, PgBouncer in transaction mode,",
        "Azurite) on free ports, compares variants side by side in one run, and writes",
        "`bench/results/NAME.json` (inputs, machine, every figure) and, where a curve says more, a PNG.",
        "Absolute timings depend on the machine; the ratios are the point.",
        "",
        "```sh",
        "python -m recsys bench                 # every benchmark (a few minutes each on 2 cores)",
        "python -m recsys bench lookup recall   # some of them",
        "python -m recsys bench --quick         # tiny sizes, to check that they run",
        "```",
        "",
        "## What each measures",
        "",
    ]
    parts += [f"- **{name}**: {text}" for name, text in descriptions.items()]
    parts += ["", "## Latest figures", "", render_table(documents), "", "## Runs", ""]
    for document in documents:
        machine = document.get("machine", {})
        plots = ", ".join(f"[{p}](results/{p})" for p in document.get("plots", []))
        parts.append(
            f"- **{document.get('name')}** ({document.get('title', '')}): `{document.get('command', '')}`, "
            f"{document.get('started_at', '')}, {document.get('duration_s', '?')} s, "
            f"{machine.get('cpu_count', '?')} × {machine.get('cpu_model', '?')}"
            + (f"; plots: {plots}" if plots else "")
        )
        parts += [f"  - {note}" for note in document.get("notes", [])]
    return "\n".join(parts) + "\n"


def write_readme(directory: Path, readme: Path, descriptions: Mapping[str, str]) -> Path:
    """Regenerate ``readme`` from the results in ``directory``."""
    readme.write_text(render_readme(load_results(directory, order=list(descriptions)), descriptions))
    return readme
