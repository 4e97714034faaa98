"""pip's output for `make venv`, condensed: what it is doing now, not a page per package.

    pip install --progress-bar raw ... 2>&1 | python pip_progress.py LOGFILE

On a terminal one status line is redrawn (packages collected so far, the file being downloaded and
how far it is); elsewhere (CI) a line per large download and a count every 30 s. Installing and
"installed N packages" get a line each. Lines it does not know (errors, warnings, a build's output)
pass through as they are, and the whole output goes to LOGFILE. Standard library only: it runs
before anything is installed.
"""

from __future__ import annotations

import re
import shutil
import sys
import time
from typing import IO

# pip's chatter: each line is counted or summarised, never shown as is
_COLLECTING = re.compile(r"^Collecting (\S+)")
_DOWNLOADING = re.compile(r"^\s*Downloading (\S+)(?: \(([^)]+)\))?")
_PROGRESS = re.compile(r"^Progress (\d+) of (\d+)$")
_SATISFIED = re.compile(r"^Requirement already satisfied")
_INSTALLING = re.compile(r"^Installing collected packages: (.*)$")
_INSTALLED = re.compile(r"^Successfully installed (.*)$")
_QUIET = re.compile(
    r"^(\s*Using cached |Processing |Looking in |WARNING: Location .* is ignored|\[notice\]|\s*Obtaining |"
    r"\s*(Installing|Checking|Getting|Preparing|Building)( editable)? .*: (started|finished with status)|"
    r"Building wheels? for collected|\s*Created wheel |\s*Stored in directory|Successfully built |"
    r"\s*Attempting uninstall|\s*Found existing installation|\s*Uninstalling |\s*Successfully uninstalled |"
    r"\s*$)"
)
BIG_DOWNLOAD_MB = 10.0
CI_EVERY_S = 30.0


def _megabytes(size: str | None) -> float:
    match = re.match(r"([\d.]+) (kB|MB|GB)", size or "")
    if not match:
        return 0.0
    return float(match.group(1)) * {"kB": 1e-3, "MB": 1.0, "GB": 1e3}[match.group(2)]


def _packages(n: int) -> str:
    return f"{n} package{'' if n == 1 else 's'}"


class Condenser:
    def __init__(self, out: IO[str], log: IO[str]) -> None:
        self.out, self.log = out, log
        self.tty = out.isatty()
        self.collected = self.satisfied = 0
        self.download = ""  # the file being downloaded, and its size
        self.fraction: float | None = None
        self.status_shown = False
        self.last_note = time.monotonic()

    def _say(self, text: str) -> None:
        self._clear()
        self.out.write(text + "\n")
        self.out.flush()

    def _clear(self) -> None:
        if self.status_shown:
            self.out.write("\r\033[K")
            self.status_shown = False

    def _status(self) -> None:
        here = f" ({self.satisfied} already here)" if self.satisfied else ""
        done = f"{_packages(self.collected)} collected{here}"
        now = f"  downloading {self.download}" if self.download else ""
        if self.download and self.fraction is not None:
            now += f" {self.fraction:4.0%}"
        if self.tty:
            width = shutil.get_terminal_size((100, 20)).columns - 1
            self.out.write(f"\r\033[K  {done}{now}"[: width + 4])
            self.out.flush()
            self.status_shown = True
        elif time.monotonic() - self.last_note >= CI_EVERY_S:
            self._say(f"  {done}")
            self.last_note = time.monotonic()

    def line(self, raw: str) -> None:
        self.log.write(raw)
        text = raw.rstrip("\n")
        if m := _PROGRESS.match(text):
            self.fraction = int(m.group(1)) / max(int(m.group(2)), 1)
        elif m := _COLLECTING.match(text):
            self.collected += 1
            self.download, self.fraction = "", None
        elif m := _DOWNLOADING.match(text):
            self.download, self.fraction = f"{m.group(1)} ({m.group(2) or '?'})", None
            if not self.tty and _megabytes(m.group(2)) >= BIG_DOWNLOAD_MB:
                self._say(f"  downloading {self.download}")
        elif _SATISFIED.match(text):
            self.satisfied += 1
            self.collected += 1
            self.download, self.fraction = "", None
        elif m := _INSTALLING.match(text):
            self.download = ""
            self._say(f"  installing {_packages(len(m.group(1).split(',')))} ...")
            return
        elif m := _INSTALLED.match(text):
            self._say(f"  installed {_packages(len(m.group(1).split()))}")
            return
        elif not _QUIET.match(text):
            self._say(text)  # something pip wants a person to read: an error, a warning, a build's output
            return
        self._status()

    def close(self) -> None:
        self._clear()
        self.out.flush()


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: pip ... 2>&1 | python pip_progress.py LOGFILE", file=sys.stderr)
        return 2
    with open(argv[1], "a", encoding="utf-8") as log:
        condenser = Condenser(sys.stdout, log)
        try:
            for raw in sys.stdin:
                condenser.line(raw)
        finally:
            condenser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
