"""bench/__main__.py: the report section it writes into docs/performance.md."""

from __future__ import annotations

from pathlib import Path

from bench.__main__ import BEGIN, END, report_of, section, write


def test_the_report_starts_at_its_own_first_line_and_drops_progress() -> None:
    out = ("INFO 2026 serve -- started\n  run 1/2: raw 10 MB/s\nModel files, 500 MB\n"
           "path  best\nupload 1\n(vs raw: best / median)\nTarget: met\n")
    assert report_of(out, "Model files,") == (
        "Model files, 500 MB\npath  best\nupload 1\n(vs raw: best / median)\nTarget: met")


def test_the_section_is_inserted_once_then_replaced(tmp_path: Path) -> None:
    report = tmp_path / "performance.md"
    report.write_text("# Performance\n\nIntro.\n\n## REST\n\nHistory.\n")
    write(section({"rest": "first"}), report)
    first = report.read_text()
    assert first.startswith("# Performance\n\nIntro.\n") and first.count(BEGIN) == 1
    assert "### rest\n\nfirst" in first and first.index(END) < first.index("## REST")
    write(section({"rest": "second"}), report)
    second = report.read_text()
    assert second.count(BEGIN) == 1 and "first" not in second and "### rest\n\nsecond" in second
    assert second.endswith("## REST\n\nHistory.\n")  # the history is kept
