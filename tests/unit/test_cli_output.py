"""What the command-line tools print: `sif score`'s row count and bar, `sif usage`'s table, pip's condensed output."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import pytest

from sif_cli import usage as usage_cli
from sif_cli.score import ProgressBar, count_rows
from sif_tools import pip_progress


def test_rows_are_counted_as_the_scorer_reads_them(tmp_path: Path) -> None:
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"id": 1, "text": "a"}\n\n   \n{"id": 2, "text": "b"}\nnot json\n')
    assert count_rows(jsonl, "jsonl") == 3  # blank lines are not rows; a bad row is one
    csv_gz = tmp_path / "a.csv.gz"
    csv_gz.write_bytes(gzip.compress(b'id,text\n1,"two\nlines"\n\n2,plain\n'))
    assert count_rows(csv_gz, "csv.gz") == 2  # the header is not a row; a quoted newline is one row
    broken = tmp_path / "b.jsonl.gz"
    broken.write_bytes(b"not gzip")
    assert count_rows(broken, "jsonl.gz") is None


def test_the_bar_moves_by_rows_and_reads_100_only_once_the_batch_has_ended() -> None:
    bar = ProgressBar(io.StringIO(), total=10_000)
    assert "0/10,000 rows" in bar.render({"status": "queued", "rows": 0}, now=0.0)
    bar.render({"status": "running", "rows": 0, "progress": 0.0}, now=1.0)
    line = bar.render({"status": "running", "rows": 5_000, "progress": 0.9}, now=11.0)
    assert " 50.0%" in line and "5,000/10,000 rows" in line and "500 rows/s" in line and "ETA 10s" in line
    line = bar.render({"status": "running", "rows": 10_000, "progress": 0.99}, now=21.0)
    assert " 99.9%" in line and "100.0%" not in line  # every row read, but the batch has not ended
    line = bar.render({"status": "succeeded", "rows": 10_000, "progress": 1.0}, now=22.0)
    assert "100.0%" in line and "10,000/10,000 rows" in line and "succeeded" in line and "ETA" not in line


def test_sif_usage_prints_pixels_and_costs_as_fixed_decimals() -> None:
    row = {"calls": 2, "inputs": 2, "tokens": 6, "pixels": 4096, "compute_ms": 55, "cost_usd": 4.132e-05}
    table = usage_cli.render(
        {
            "tenant": "t_1",
            "period": {"from": "2026-12-01", "to": "2026-12-31"},
            "total": row,
            "by_model_day": [{"model": "open-nsfw", "day": "2026-12-01", **row}],
        }
    )
    assert "pixels" in table.splitlines()[2] and "4096" in table
    assert "0.00004132" in table and "e-05" not in table


@pytest.mark.parametrize("tty", [False, True])
def test_pip_output_is_condensed_and_what_a_person_must_read_passes_through(
    tty: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # the status line is cut to the terminal's width

    class Out(io.StringIO):
        def isatty(self) -> bool:
            return tty

    out, log = Out(), io.StringIO()
    condenser = pip_progress.Condenser(out, log)
    lines = [
        "Looking in indexes: https://pypi.org/simple\n",
        "Collecting torch==2.13.0\n",
        "  Downloading torch-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl (190.4 MB)\n",
        "Progress 95200000 of 190400000\n",
        "Requirement already satisfied: numpy in ./.venv/lib/python3.11/site-packages (2.4.6)\n",
        "ERROR: No matching distribution found for nothing-such\n",
        "Installing collected packages: torch, numpy\n",
        "Successfully installed torch-2.13.0\n",
    ]
    for line in lines:
        condenser.line(line)
    condenser.close()
    shown = out.getvalue()
    assert log.getvalue() == "".join(lines)  # the whole of it goes to the log
    assert "ERROR: No matching distribution found for nothing-such\n" in shown
    assert "  installing 2 packages ...\n" in shown and "  installed 1 package\n" in shown
    assert "Requirement already satisfied" not in shown and "Looking in" not in shown
    if tty:
        assert "downloading torch-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl (190.4 MB)  50%" in shown
    else:
        assert "\r" not in shown and "  downloading torch-2.13.0" in shown  # a line per large download
