from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sif_inference import LocalDirSource, ModelRegistry

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"


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
