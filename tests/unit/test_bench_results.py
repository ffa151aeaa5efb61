from __future__ import annotations

import json
from pathlib import Path

from recsys.bench.results import (
    BenchResult,
    Headline,
    finite,
    format_value,
    load_results,
    machine_info,
    render_readme,
    render_table,
    to_document,
    write_readme,
    write_result,
)


def _result(name: str = "lookup", value: float = 34.56, met: bool | None = True) -> BenchResult:
    return BenchResult(
        name=name,
        title="one ANY query vs single-id queries",
        inputs={"ids_per_lookup": 500},
        figures={"any": {"p50_ms": 3.0}, "ratio": float("inf")},
        headlines=[Headline("single ÷ ANY", value, "×", "≥ 20×", met), Headline("p50 | single", 105.3, "ms")],
        plots=[f"{name}.png"],
        notes=["measured on a busy machine"],
        servers={"postgresql": "18.6"},
    )


def _document(result: BenchResult) -> dict[str, object]:
    return to_document(result, command=f"python -m recsys bench {result.name}", started_at="2026-01-01T00:00:00+00:00",
                       duration_s=12.345, machine={"cpu_count": 2, "cpu_model": "AMD EPYC"})


def test_document_holds_inputs_machine_figures_and_is_strict_json() -> None:
    document = _document(_result())
    assert document["machine"] == {"cpu_count": 2, "cpu_model": "AMD EPYC", "servers": {"postgresql": "18.6"}}
    assert document["inputs"] == {"ids_per_lookup": 500}
    assert document["figures"] == {"any": {"p50_ms": 3.0}, "ratio": None}
    assert document["duration_s"] == 12.3
    json.dumps(document, allow_nan=False)


def test_finite_replaces_non_finite_numbers_at_any_depth() -> None:
    value = {"a": [1.0, float("nan"), {"b": float("-inf")}], "c": "x"}
    assert finite(value) == {"a": [1.0, None, {"b": None}], "c": "x"}


def test_write_result_then_load_in_the_given_order(tmp_path: Path) -> None:
    for name in ("overload", "connections", "lookup"):
        write_result(_document(_result(name)), tmp_path)
    (tmp_path / "broken.json").write_text("{")
    names = [d["name"] for d in load_results(tmp_path, order=["connections", "lookup", "overload"])]
    assert names == ["connections", "lookup", "overload"]
    assert not list(tmp_path.glob("*.tmp"))


def test_format_value() -> None:
    assert format_value(34.56, "×") == "34.6×"
    assert format_value(1234.5, "rows/s") == "1,234 rows/s"
    assert format_value(0.98765) == "0.988"
    assert format_value(3.0, "ms") == "3 ms"
    assert format_value(2.345, "ms") == "2.35 ms"
    assert format_value(None, "ms") == "—"
    assert format_value(float("inf"), "×") == "—"


def test_table_has_one_row_per_headline_with_goal_and_verdict() -> None:
    table = render_table([_document(_result(met=False))])
    lines = table.splitlines()
    assert lines[0] == "| benchmark | figure | value | goal | met |"
    assert lines[2] == "| lookup | single ÷ ANY | 34.6× | ≥ 20× | **no** |"
    assert lines[3] == "| lookup | p50 \\| single | 105 ms |  |  |"
    assert len(lines) == 4


def test_readme_names_every_benchmark_and_the_command_of_each_run(tmp_path: Path) -> None:
    write_result(_document(_result()), tmp_path / "results")
    readme = write_readme(tmp_path / "results", tmp_path / "README.md", {"connections": "pools", "lookup": "ANY"})
    text = readme.read_text()
    assert "- **connections**: pools" in text
    assert "`python -m recsys bench lookup`" in text
    assert "[lookup.png](results/lookup.png)" in text
    assert "measured on a busy machine" in text
    assert render_readme([], {"lookup": "ANY"}).count("| benchmark |") == 1


def test_machine_info_names_cpu_python_and_packages() -> None:
    info = machine_info({"note": "x"})
    assert info["cpu_count"] >= 1
    assert info["python"].count(".") == 2
    assert "psycopg" in info["packages"]
    assert info["note"] == "x"
