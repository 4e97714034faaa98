"""`sif score` on a 10,000-row file, read through a pseudo-terminal as a person would see it.

The bar must move by rows (rows done / the total counted locally, not the file's bytes), show a rate
and an ETA while the batch runs, and read 100 % only once the batch has ended.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sif_emulator.batch import start_batch_executor
from sif_emulator.pollers import start_pollers
from sif_emulator.stack import LocalStack

pytestmark = pytest.mark.e2e

MODEL = "all-minilm-l6-v2"
ROWS = 10_000
BAR = re.compile(r"\[([#.]{30})\]\s+(\d+\.\d)%\s+([\d,]+)/([\d,]+) rows(.*)")


@pytest.fixture(scope="module")
def scoring(local_stack: LocalStack, api_url: str) -> Iterator[str]:
    pollers = start_pollers(local_stack, functions=["ScorerFunction"])
    executor = start_batch_executor(local_stack)
    try:
        yield api_url
    finally:
        executor.stop()
        for poller in pollers:
            poller.stop()


def run_in_pty(argv: list[str], cwd: Path, timeout_s: float) -> tuple[int, str]:
    """Run `argv` with a pseudo-terminal as its stdin, stdout and stderr; (exit status, all it wrote)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, close_fds=True)
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        else:
            proc.kill()
            raise AssertionError(f"{argv} did not finish within {timeout_s} s:\n{out.decode(errors='replace')}")
        return proc.wait(timeout=30), out.decode(errors="replace")
    finally:
        os.close(master)


def frames(output: str) -> list[str]:
    """What the terminal showed, one redraw at a time (the bar redraws its line after a carriage return)."""
    return [f.strip() for f in re.split(r"[\r\n]+", output) if f.strip()]


def test_sif_score_bar_moves_by_rows_with_rate_and_eta_and_ends_at_100_when_done(
    scoring: str, new_tenant: Callable[..., Any], tmp_path: Path
) -> None:
    client = new_tenant("score-progress")
    path = tmp_path / "reviews.jsonl"
    with path.open("w") as fh:
        for i in range(ROWS):
            fh.write(json.dumps({"id": f"r{i}", "text": f"review number {i}: the product works as described"}) + "\n")
    argv = [sys.executable, "-m", "sif_cli.main", "score", str(path), "--model", MODEL]
    argv += ["--api-url", client.url, "--key", client.key, "--out", str(tmp_path / "out")]
    code, output = run_in_pty(argv, tmp_path, timeout_s=540)
    assert code == 0, output

    assert "(10,000 rows, " in output  # counted before the upload
    bars = [(frame, BAR.search(frame)) for frame in frames(output)]
    bars = [(frame, m) for frame, m in bars if m]
    assert bars, output
    done_rows: list[int] = []
    for frame, m in bars:
        percent, rows, total = float(m.group(2)), int(m.group(3).replace(",", "")), int(m.group(4).replace(",", ""))
        assert total == ROWS, frame
        ended = "succeeded" in m.group(5)
        if percent == 100.0:
            assert ended, f"100 % before the batch ended: {frame}"
        if not ended:  # the bar is rows done over the rows counted, never the bytes read
            assert percent == pytest.approx(min(rows / total, 0.999) * 100, abs=0.051), frame
        done_rows.append(rows)
    assert done_rows == sorted(done_rows), done_rows  # never goes back
    moving = sorted({r for r in done_rows if 0 < r < ROWS})
    assert len(moving) >= 2, f"the bar did not move by rows while running: {sorted(set(done_rows))}"
    running = [frame for frame, m in bars if "running" in m.group(5) and 0 < int(m.group(3).replace(",", "")) < ROWS]
    assert any(re.search(r"[\d,]+ rows/s", f) and re.search(r"ETA \d+(s|m\d\ds|h\d\dm)", f) for f in running), running
    last_frame, last = bars[-1]
    assert last.group(2) == "100.0" and last.group(3) == "10,000" and "succeeded" in last.group(5), last_frame
    assert len((tmp_path / "out" / "predictions.jsonl").read_text().splitlines()) == ROWS
