"""Property-based run of the whole API from its own /openapi.json: no input, valid or not, gives a 5xx.

Every operation gets its own examples (valid and invalid), and the routes with a model in the path
run once per real model as well as with generated names, so most calls reach the models. Then
schemathesis's own runner adds its deterministic phases: the schema's examples, and coverage (each
boundary and each constraint broken once: lengths, counts, enums, types, missing fields, ...).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode

if TYPE_CHECKING:
    from tests.e2e.conftest import ApiClient

pytestmark = pytest.mark.e2e

# Per operation and generation mode; the default keeps the run well under a minute
# (SIF_FUZZ_EXAMPLES=300 digs deeper).
EXAMPLES = int(os.environ.get("SIF_FUZZ_EXAMPLES", "25"))
MODELS = ["all-minilm-l6-v2", "open-nsfw", None]  # None: generated names


def known_variant(case: schemathesis.Case) -> schemathesis.Case:
    """A made-up `variant` (body or query) is a 400 whatever else the request holds, a made-up model a
    404 (tests/e2e/test_protocols.py checks both): valid cases keep only real ones, so the rest of
    their bodies reaches the models."""
    if isinstance(case.body, dict):
        if case.body.get("variant") not in (None, "int8", "fp32"):
            del case.body["variant"]
        if case.operation.label == "POST /v1/embeddings" and case.body.get("model") != "all-minilm-l6-v2":
            case.body["model"] = "all-minilm-l6-v2"
            case.body.pop("dimensions", None)
    if case.query and case.query.get("variant") not in (None, "int8", "fp32"):
        del case.query["variant"]
    return case


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_no_server_errors(api_url: str, new_tenant: Callable[..., ApiClient], mode: GenerationMode) -> None:
    fuzzer = new_tenant("schemathesis", monthly_calls=0)  # 0: no quota, so 429s hide nothing
    schema = schemathesis.openapi.from_url(api_url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 6
    statuses: Counter[tuple[str, int]] = Counter()

    for operation in operations:
        names: list[str | None] = MODELS if "{name}" in operation.path else [None]
        for name in names:
            kwargs: dict[str, Any] = {"generation_mode": mode, "headers": fuzzer.headers()}
            if name is not None:
                kwargs["path_parameters"] = {"name": name}

            strategy = operation.as_strategy(**kwargs)
            if mode == GenerationMode.POSITIVE:
                strategy = strategy.map(known_variant)

            @given(case=strategy)
            @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            def run(case: schemathesis.Case) -> None:
                response = case.call_and_validate(base_url=api_url, checks=[not_a_server_error], timeout=60)
                statuses[(case.operation.label, response.status_code)] += 1

            try:
                run()
            except Unsatisfiable:
                # Nothing to make invalid (no parameters, or all of them fixed): nothing to test there.
                assert mode == GenerationMode.NEGATIVE, operation.label

    print(sorted(statuses.items()))
    assert statuses and max(status for _, status in statuses) < 500
    if mode == GenerationMode.POSITIVE:  # valid inputs do reach the models
        assert statuses[("POST /v1/embeddings", 200)] + statuses[("POST /v1/models/{name}/predict", 200)] > 0


@pytest.mark.parametrize("model", MODELS, ids=["minilm", "open-nsfw", "generated"])
def test_examples_and_coverage_phases_find_no_server_errors(
    api_url: str, new_tenant: Callable[..., ApiClient], tmp_path: Path, model: str | None
) -> None:
    fuzzer = new_tenant("schemathesis-coverage", monthly_calls=0)
    config = tmp_path / "schemathesis.toml"
    config.write_text(f'[parameters]\n"path.name" = "{model}"\n' if model else "")
    cli = Path(sys.executable).parent / "schemathesis"
    run = [str(cli), "--no-color", "--config-file", str(config), "run", api_url + "/openapi.json"]
    # the stateful phase follows the document's links (create a job, batch or file, then read, cancel,
    # delete it); it does not depend on the model in the path, so it runs once
    phases = "examples,coverage" if model else "examples,coverage,stateful"
    run += ["--phases", phases, "--checks", "not_a_server_error", "--workers", "1"]
    run += ["-H", f"Authorization: Bearer {fuzzer.key}"]
    done = subprocess.run(run, capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path)  # its cache too
    summary = done.stdout[done.stdout.rfind("Test cases:") :]
    print(model, summary)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert " passed" in summary and "failed" not in summary
    if model is None:  # the stateful phase did follow links (create -> read / cancel / delete)
        assert re.search(r"API Links:\s+[1-9]\d* covered", done.stdout), done.stdout[-3000:]
