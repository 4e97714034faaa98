"""Property-based run of the whole API from its own /openapi.json: no input, valid or not, gives a 5xx.

Every operation gets its own examples (valid and invalid), and the routes with a model in the path
run once per real model as well as with generated names, so most calls reach the models. Then
schemathesis's own runner runs all its phases: the schema's examples, coverage (each boundary and each
constraint broken once: lengths, counts, enums, types, missing fields, ...), fuzzing and stateful (the
document's links), checking every answer against the document too: its status is one the operation
documents, and its content type, headers and body are the documented ones. The document's own
examples are valid requests the API accepts (Swagger's "Try it out" starts from them).
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
# schemathesis' runner draws from this seed, so `make test` runs the same cases every time (a red CI is a
# regression, not a draw); SIF_FUZZ_SEED=random (or any number) explores further
SEED = os.environ.get("SIF_FUZZ_SEED", "20261202")
# schemathesis's checks: no 5xx, and every answer as the document says (status, content type, headers, body)
CONFORMANCE = (
    "not_a_server_error,status_code_conformance,content_type_conformance,"
    "response_headers_conformance,response_schema_conformance"
)
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
            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                derandomize=SEED != "random",
                suppress_health_check=list(HealthCheck),
            )
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


def schemathesis_run(
    api_url: str, key: str, tmp_path: Path, *, phases: str, checks: str, model: str | None = None
) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "schemathesis.toml"
    config.write_text(f'[parameters]\n"path.name" = "{model}"\n' if model else "")
    cli = Path(sys.executable).parent / "schemathesis"
    run = [str(cli), "--no-color", "--config-file", str(config), "run", api_url + "/openapi.json"]
    run += ["--phases", phases, "--checks", checks, "--workers", "1", "--max-examples", str(EXAMPLES)]
    run += [] if SEED == "random" else ["--seed", SEED]
    run += ["-H", f"Authorization: Bearer {key}"]
    return subprocess.run(run, capture_output=True, text=True, timeout=400, check=False, cwd=tmp_path)  # its cache too


@pytest.mark.parametrize("model", MODELS, ids=["minilm", "open-nsfw", "generated"])
def test_all_phases_find_no_server_error_and_no_schema_violation(
    api_url: str, new_tenant: Callable[..., ApiClient], tmp_path: Path, model: str | None
) -> None:
    fuzzer = new_tenant("schemathesis-coverage", monthly_calls=0)
    # the stateful phase follows the document's links (create a job, batch or file, then read, cancel,
    # delete it); it does not depend on the model in the path, so it runs once
    phases = "examples,coverage,fuzzing" if model else "examples,coverage,fuzzing,stateful"
    done = schemathesis_run(api_url, fuzzer.key, tmp_path, phases=phases, checks=CONFORMANCE, model=model)
    summary = done.stdout[done.stdout.rfind("Test cases:") :]
    print(model, summary)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert " passed" in summary and "failed" not in summary
    if model is None:  # the stateful phase did follow links (create -> read / cancel / delete)
        assert re.search(r"API Links:\s+[1-9]\d* covered", done.stdout), done.stdout[-3000:]


def test_the_documents_examples_are_requests_the_api_accepts(
    api_url: str, new_tenant: Callable[..., ApiClient], tmp_path: Path
) -> None:
    """Swagger's "Try it out" sends an operation's examples: each is accepted (2xx; a made-up id is the
    documented 404), so a reader's first click works."""
    fuzzer = new_tenant("schemathesis-examples", monthly_calls=0)
    checks = "positive_data_acceptance," + CONFORMANCE
    done = schemathesis_run(api_url, fuzzer.key, tmp_path, phases="examples", checks=checks)
    summary = done.stdout[done.stdout.rfind("API Operations:") :]
    print(summary)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    tested = re.search(r"Tested:\s+(\d+)", summary)
    assert tested and int(tested.group(1)) >= 20, summary  # every operation with a parameter or a body
    assert "failed" not in summary[summary.find("Test cases:") :]
