"""The README's examples run as written, in order, as a newcomer would run them on a fresh clone.

Every fenced ```bash / ```sh / ```shell block of README.md (and every ```python block, run with the
venv's `python`) is taken from the file itself, so the README and this test cannot drift, and run in
order in one bash session (`set -e -o pipefail`; variables carry from block to block) in a working
directory that looks like the clone (links to its top-level entries; the files the examples write
land in the directory itself). The session starts as a fresh terminal would: no venv on PATH, no AWS
or SIF variables, so `source .venv/bin/activate` and `eval "$(sif env)"` in the README must do their
job. Instead of `make up` (which holds its terminal) the test starts the same stack with
`sif up --background` on free ports in a temporary state dir, and points `sif` at it with
SIF_STACK_JSON; it never touches a running `make up` or another test's stack.

A block that cannot run here is marked in the README, right before it, with a visible comment
`<!-- readme-test: skip (why) -->` and listed in SKIPPED below with the same first line; a new
block is picked up by itself. CHECKS name a few outputs a block must print.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from sif_emulator.moto_server import free_port
from sif_emulator.stack import models_dir_from_env

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
SHELL_LANGS = {"bash", "sh", "shell"}
RUN_LANGS = SHELL_LANGS | {"python"}
PROSE_LANGS = {"text", "json", "yaml", "http"}  # fences that show data, never commands
SKIP_MARK = re.compile(r"^<!--\s*readme-test:\s*skip\s*\((?P<why>.+)\)\s*-->\s*$")
FENCE = re.compile(r"^```(?P<lang>[\w+-]*)\s*$")
# A line that starts with one of these is a command a reader would type: it belongs in a fenced block.
COMMANDS = re.compile(r"^(sif|curl|make|aws|python3?|source|eval|export|sam|pip|\.venv/bin/\S+)\s")

# The blocks the test does not run (their first line), and why; the README says the same before each.
SKIPPED = {
    "make up     # creates .venv, installs, builds the models, starts the local stack, prints URL + demo key": (
        "`make up` holds its terminal and `make test` runs this test; the test starts the stack itself"
    ),
    "make package                      # build/package: layers and functions for python3.12 (x86_64)": (
        "deploys to a real AWS account with the SAM CLI"
    ),
}
# A block (found by a piece of its text) -> what its output must contain (regular expressions).
CHECKS = {
    'eval "$(sif env)"': [r'\{"status":\s*"ok"\}'],
    "ACME_KEY=$(sif tenant create acme": [r"created tenant 'acme'", r"revoked key", r"is disabled", r"is active"],
    "$API/v1/embeddings": [
        r'"object":\s*"embedding"',
        r'"labels":\s*\["sports"',
        r'"sfw":',
        r"(?m)^total\s+(\d+\s+){5}\d+\.\d{8}$",  # `sif usage`: costs as fixed decimals
    ],
    "client.embeddings.create": [r"(?m)^384 \d+$"],
    "aws s3 cp reviews.csv.gz": [
        r"predictions\.jsonl",
        r"manifest\.json",
        r"100\.0%\s+200/200 rows.*succeeded",
        r"saved predictions\.jsonl, errors\.jsonl, manifest\.json in rows-results",
    ],
    "sif callbacks listen": [r"callback /hook job\.succeeded \(signature ok\)"],
    "sif models publish wine.onnx": [
        r"published wine version 1",
        r'"label":\s*"barolo"',
        r"published wine version 2",
        r"wine: latest -> 2",
        r"(?m)^wine\s+2\s+2\s+tabular\s+public\s+latest=2$",
    ],
    "$API/v2/models/all-minilm-l6-v2/infer": [
        r'"name":\s*"sentence_embedding",\s*"shape":\s*\[2,\s*384\],\s*"datatype":\s*"FP32"',
        r'"model_version":\s*"2"',
        r"(?im)^x-sif-model-sha256: [0-9a-f]{64}",
    ],
    "--name my-topics": [
        r"published my-embedder version 1",
        r"published my-imagenet version 1",
        r'"object":"list","data":\[\{"object":"embedding"',
        r'"label":\s*"sports"',
    ],
    "sif models publish tiny.onnx": [r"task tensor", r'"predictions":\s*\[\{"y":\s*\[3\.0,\s*5\.0,\s*7\.0\]\}\]'],
    "client.batches.create": [r"completed BatchRequestCounts\(completed=3, failed=0, total=3\)", r"(?m)^req-0 384$"],
}


@dataclass
class Block:
    line: int  # where its code starts in README.md (1-based)
    lang: str
    code: str
    skip: str | None  # why, when marked

    @property
    def first_line(self) -> str:
        return next((ln for ln in self.code.splitlines() if ln.strip() and not ln.startswith("#")), "")


def readme_blocks(text: str) -> list[Block]:
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        skip = SKIP_MARK.match(prev.strip())
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        blocks.append(Block(i + 2, fence.group("lang"), "\n".join(lines[i + 1 : end]) + "\n", skip and skip["why"]))
        i = end + 1
    return blocks


def stray_commands(text: str) -> list[str]:
    """Commands outside the blocks this test runs: in indented code, or in untagged or other fences."""
    found = []
    lang: str | None = None  # the open fence's language; None outside fences
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            fence = FENCE.match(line)
            lang = None if lang is not None else (fence.group("lang") if fence else "")
            continue
        stray = line.startswith("    ") if lang is None else lang not in RUN_LANGS | PROSE_LANGS
        if stray and COMMANDS.match(line.strip()):
            found.append(f"README.md:{number}: {line.strip()}")
    return found


def test_readme_examples_are_fenced_and_only_the_listed_blocks_are_skipped() -> None:
    text = README.read_text()
    assert not stray_commands(text), (
        "commands outside a ```bash block are not run by tests/e2e/test_readme.py: fence them",
        stray_commands(text),
    )
    blocks = [b for b in readme_blocks(text) if b.lang in RUN_LANGS]
    assert len([b for b in blocks if not b.skip]) >= 5
    skipped = {b.first_line: b.skip for b in blocks if b.skip}
    assert set(skipped) == set(SKIPPED), (
        "the README's `readme-test: skip` blocks and SKIPPED in this test differ; a skip is for what truly "
        f"cannot run here: README {sorted(skipped)}, test {sorted(SKIPPED)}"
    )
    for first_line, why in skipped.items():
        print(f"skipped README block {first_line.split('#')[0].strip()!r}: {why}")
    for marker in re.finditer(r"<!--\s*readme-test[^>]*-->", text):
        assert SKIP_MARK.match(marker.group(0)), f"unknown README test marker {marker.group(0)!r}"
    runnable = "".join(b.code for b in blocks if not b.skip)
    # `cmd | head` ends the pipe before cmd has written everything: under pipefail that is a SIGPIPE or
    # curl's exit 23 on one machine and a pass on another, so the README cuts output with `cut` instead
    early_exit = [line for line in runnable.splitlines() if re.search(r"\|\s*head\b", line)]
    assert not early_exit, ("a README block pipes into head, which fails under pipefail by timing", early_exit)
    for piece in CHECKS:
        assert piece in runnable, f"CHECKS names a block with {piece!r}, and no README block has it"


def test_every_python_name_the_docs_give_exists() -> None:
    """`sif_x.module.name` in README.md, docs/ and events/README.md is importable (a renamed function or
    module makes the docs wrong; the README once named a `publish_model` that did not exist)."""
    import importlib

    texts = [README, *sorted((REPO / "docs").glob("*.md")), REPO / "events" / "README.md"]
    names = {m for path in texts for m in re.findall(r"\bsif_[a-z_]+(?:\.[A-Za-z_]+)+", path.read_text())}
    assert len(names) >= 5
    missing = []
    for dotted in sorted(names):
        parts = dotted.split(".")
        for cut in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            try:
                for attr in parts[cut:]:
                    obj = getattr(obj, attr)
            except AttributeError:
                missing.append(dotted)
            break
        else:
            missing.append(dotted)
    assert not missing, missing


# ---------------------------------------------------------------------- running the README
def _fresh_terminal_env(stack_json: Path) -> dict[str, str]:
    """The environment of a new terminal: no venv on PATH, no AWS_* or SIF_* settings."""
    venv_bins = {(REPO / ".venv" / "bin").resolve(), Path(sys.executable).parent.resolve()}
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "SIF_", "PYTEST_")) and k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")
    }
    path = [p for p in env.get("PATH", "/usr/bin:/bin").split(os.pathsep) if p and Path(p).resolve() not in venv_bins]
    env["PATH"] = os.pathsep.join(path)
    env["SIF_STACK_JSON"] = str(stack_json)  # `sif` finds the test's stack (a README reader's is .local/stack.json)
    return env


def _clone_like(workdir: Path) -> None:
    """A directory that looks like the clone: its top-level entries linked, the examples' outputs its own."""
    workdir.mkdir()
    for entry in REPO.iterdir():
        if entry.name not in (".git", ".local"):
            (workdir / entry.name).symlink_to(entry)


def _driver(blocks: list[Block], scripts: Path) -> Path:
    lines = ["set -e -o pipefail"]
    for n, block in enumerate(blocks):
        script = scripts / f"block_{n:02d}.sh"
        code = block.code
        if block.lang == "python":
            code = f"python - <<'SIF_README_PYTHON'\n{code}SIF_README_PYTHON\n"
        script.write_text(code)
        lines += [f"printf '\\n@@readme-block {n} start\\n'", f"source {shlex.quote(str(script))}"]
        lines += [f"printf '\\n@@readme-block {n} end\\n'"]
    driver = scripts / "driver.sh"
    driver.write_text("\n".join(lines) + "\n")
    return driver


def _outputs(log: str) -> tuple[dict[int, str], set[int]]:
    """Each block's output, and the blocks that ran to their end."""
    outputs: dict[int, str] = {}
    ended: set[int] = set()
    current = None
    for line in log.splitlines(keepends=True):
        mark = re.match(r"^@@readme-block (\d+) (start|end)$", line.strip())
        if mark:
            current = int(mark.group(1))
            if mark.group(2) == "end":
                ended.add(current)
                current = None
            else:
                outputs[current] = ""
            continue
        if current is not None:
            outputs[current] += line
    return outputs, ended


@pytest.mark.timeout(1500)
def test_readme_shell_blocks_run_in_order_against_a_fresh_stack(tmp_path: Path) -> None:
    blocks = [b for b in readme_blocks(README.read_text()) if b.lang in RUN_LANGS and not b.skip]
    state = tmp_path / "state"
    up_env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_ENDPOINT_URL")}
    up_env.update({"SIF_API_PORT": str(free_port()), "SIF_AWS_PORT": str(free_port())})
    sif = [sys.executable, "-m", "sif_cli.main"]
    started = time.monotonic()
    up = subprocess.run(
        [*sif, "up", "--background", "--state-dir", str(state), "--models-dir", str(models_dir_from_env())],
        env=up_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        workdir = tmp_path / "clone"
        _clone_like(workdir)
        scripts = tmp_path / "blocks"
        scripts.mkdir()
        log_path = tmp_path / "readme.log"
        ran_at = time.monotonic()
        with log_path.open("w") as log:
            result = subprocess.run(
                ["bash", str(_driver(blocks, scripts))],
                cwd=workdir,
                env=_fresh_terminal_env(state / "stack.json"),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=1200,
            )
        log_text = log_path.read_text(errors="replace")
        outputs, ended = _outputs(log_text)
        for n, block in enumerate(blocks):
            assert n in ended, (
                f"README block at line {block.line} failed (bash exit {result.returncode}):\n{block.code}\n"
                f"--- its output:\n{outputs.get(n, '(did not start)')[-6000:]}"
            )
        assert result.returncode == 0, log_text[-4000:]
        for piece, patterns in CHECKS.items():
            n, block = next((n, b) for n, b in enumerate(blocks) if piece in b.code)
            for pattern in patterns:
                assert re.search(pattern, outputs[n]), (
                    f"README block at line {block.line} did not print {pattern!r}:\n{outputs[n][-6000:]}"
                )
        print(
            f"README: {len(blocks)} blocks ran in {time.monotonic() - ran_at:.0f} s "
            f"(stack start included: {time.monotonic() - started:.0f} s); skipped: {len(SKIPPED)}"
        )
    finally:
        down = subprocess.run([*sif, "down", "--state-dir", str(state)], env=up_env, capture_output=True, text=True)
        assert down.returncode == 0, down.stderr
