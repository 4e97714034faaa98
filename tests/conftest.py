"""Shared fixtures: moto's server, the local stack created from template.yaml, sample events.

- `aws_server` (session): moto's server on a free 127.0.0.1 port; AWS_ENDPOINT_URL, dummy credentials
  and the region are set in the environment for the whole session.
- `local_stack` (session): every resource of template.yaml created in it, the models published from
  SIF_MODELS_DIR (default .cache/models) when that dir exists, a demo tenant, stack.json written to a
  temporary state dir (a running `make up` is never touched).
- `lambda_env` (function): os.environ as a function of the template sees it locally.
- `load_event(name)`: events/<name>.json as a dict.
- `models_dir`, `registry` (session): the built models and a registry over them, no AWS involved;
  `minilm_reference`, `nsfw_reference`: the reference vectors and scores in tests/data.

The emulator is imported inside the fixtures that start it, so unit tests, which never ask for them,
run without loading any emulator code (tests/unit/test_layout.py checks their imports).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from sif_inference import LocalDirSource, ModelRegistry

if TYPE_CHECKING:
    from sif_emulator.moto_server import AwsEmulator
    from sif_emulator.stack import LocalStack

REPO = Path(__file__).resolve().parents[1]
EVENTS_DIR = REPO / "events"
TEMPLATE = REPO / "template.yaml"
DATA = REPO / "tests" / "data"


def load_event(name: str) -> dict[str, Any]:
    """A sample event from events/ (`name` with or without `.json`)."""
    path = EVENTS_DIR / (name if name.endswith(".json") else f"{name}.json")
    data: dict[str, Any] = json.loads(path.read_text())
    return data


@pytest.fixture(name="load_event", scope="session")
def _load_event_fixture() -> Any:
    return load_event


@pytest.fixture(scope="session")
def aws_server() -> Iterator[AwsEmulator]:
    from sif_emulator.moto_server import AwsEmulator, aws_client_env

    emulator = AwsEmulator(port=0).start()
    patch = pytest.MonkeyPatch()
    for key, value in aws_client_env(emulator.endpoint_url).items():
        patch.setenv(key, value)
    patch.delenv("AWS_PROFILE", raising=False)
    try:
        yield emulator
    finally:
        patch.undo()
        emulator.stop()


@pytest.fixture(scope="session")
def local_stack(aws_server: AwsEmulator, tmp_path_factory: pytest.TempPathFactory) -> LocalStack:
    from sif_emulator.stack import LocalStack, models_dir_from_env

    stack = LocalStack(
        aws_server.endpoint_url,
        template_path=TEMPLATE,
        state_dir=tmp_path_factory.mktemp("local-state"),
        api_url="http://127.0.0.1:0",
    ).create()
    models_dir = models_dir_from_env()
    if models_dir.is_dir():
        stack.publish_models(models_dir)
    stack.create_demo_tenant()
    stack.write_stack_json()
    return stack


def _clear_settings_cache() -> None:
    try:
        from sif_core.settings import get_settings
    except ImportError:
        return
    get_settings.cache_clear()


@pytest.fixture
def lambda_env(local_stack: LocalStack, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """os.environ as a function of the template sees it locally (SIF_* names -> local resources)."""
    env = local_stack.function_env()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    _clear_settings_cache()  # settings are read once per process
    yield env
    _clear_settings_cache()


@pytest.fixture(scope="session")
def models_dir() -> Path:
    path = Path(os.environ.get("SIF_MODELS_DIR", REPO / ".cache" / "models"))
    if not (path / "all-minilm-l6-v2").is_dir():
        pytest.fail(f"models are not built in {path}: run `make models` first")
    return path


@pytest.fixture(scope="session")
def registry(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ModelRegistry:
    return ModelRegistry(LocalDirSource(models_dir), tmp_path_factory.mktemp("model-cache"))


@pytest.fixture(scope="session")
def minilm_reference() -> dict:
    return json.loads((DATA / "minilm_reference.json").read_text())


@pytest.fixture(scope="session")
def nsfw_reference() -> dict:
    return json.loads((DATA / "open_nsfw_reference.json").read_text())
