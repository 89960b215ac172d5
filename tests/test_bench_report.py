"""docs/benchmarks.md shows what bench/results holds: its tables are drawn from the benches' JSON lines."""

import importlib.util

from conftest import REPO


def _report():
    spec = importlib.util.spec_from_file_location("bench_report", REPO / "bench" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_tables_are_the_results():
    report = _report()
    page = report.PAGE.read_text(encoding="utf-8")
    assert "<!-- table:" in page
    assert report.render(page) == page, "docs/benchmarks.md is out of date: run python bench/report.py"


def test_every_results_file_is_shown():
    report = _report()
    page = report.PAGE.read_text(encoding="utf-8")
    for path in report.RESULTS.glob("*.jsonl"):
        assert f"<!-- table:{path.stem} -->" in page, f"{path.name} has no table in docs/benchmarks.md"
