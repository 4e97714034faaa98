"""Versions, aliases, canaries, visibility and a broken manifest, on a copy of the built models."""

from __future__ import annotations

import json
import shutil
import uuid
from collections import Counter
from pathlib import Path

import pytest

from sif_inference import LocalDirSource, ModelNotFoundError, ModelRegistry
from sif_inference.errors import BadModelRefError
from sif_inference.versions import ModelIndex, ModelRef, choose_version

NAME = "open-nsfw"


@pytest.fixture
def store(models_dir: Path, tmp_path: Path) -> Path:
    """open-nsfw as versions 1, 2 and 3 (the same files; each manifest says its own version)."""
    root = tmp_path / "models"
    for version in ("1", "2", "3"):
        dest = root / NAME / version
        shutil.copytree(models_dir / NAME / "1", dest)
        manifest = json.loads((dest / "manifest.json").read_text())
        manifest["version"] = version
        (dest / "manifest.json").write_text(json.dumps(manifest))
    return root


def write_index(root: Path, **index: object) -> None:
    (root / NAME / "aliases.json").write_text(json.dumps(index))


def registry(root: Path, tmp_path: Path, ttl: float = 30.0) -> ModelRegistry:
    return ModelRegistry(LocalDirSource(root), tmp_path / "cache", index_ttl_s=ttl)


def test_refs_parse_and_refuse() -> None:
    assert ModelRef.parse("m") == ModelRef("m")
    assert ModelRef.parse("m@12") == ModelRef("m", version="12")
    assert ModelRef.parse("m@stable") == ModelRef("m", alias="stable")
    for bad in ("", "M", "m@", "m@0", "m@Stable", "../m", "m@1@2", "m@a b"):
        with pytest.raises(BadModelRefError):
            ModelRef.parse(bad)


def test_latest_is_the_highest_live_version_unless_an_alias_says_otherwise(store: Path, tmp_path: Path) -> None:
    assert registry(store, tmp_path).resolve(NAME).version == "3"
    write_index(store, retired=["3"])
    assert registry(store, tmp_path).resolve(NAME).version == "2"
    write_index(store, aliases={"latest": {"1": 100}})
    reg = registry(store, tmp_path)
    assert reg.resolve(NAME).version == "1"
    assert reg.resolve(f"{NAME}@latest").version == "1"
    assert reg.resolve(f"{NAME}@2").version == "2"  # a version by number, whatever the aliases say


def test_unknown_or_retired_versions_and_aliases_are_not_found(store: Path, tmp_path: Path) -> None:
    write_index(store, retired=["2"])
    reg = registry(store, tmp_path)
    for ref in (f"{NAME}@9", f"{NAME}@2", f"{NAME}@stable", "no-such-model"):
        with pytest.raises(ModelNotFoundError):
            reg.resolve(ref)


def test_a_canary_splits_by_weight_and_is_stable_per_request(store: Path, tmp_path: Path) -> None:
    write_index(store, aliases={"latest": {"2": 90, "3": 10}})
    reg = registry(store, tmp_path)
    keys = [str(uuid.UUID(int=i)) for i in range(1000)]
    served = Counter(reg.resolve(NAME, routing_key=k).version for k in keys)
    assert abs(served["3"] - 100) <= 50 and served["2"] + served["3"] == 1000  # 10 % +- 5 % of 1,000
    assert all(reg.resolve(NAME, routing_key=k).version == reg.resolve(NAME, routing_key=k).version for k in keys)


def test_a_warm_registry_sees_an_alias_move_after_its_ttl(store: Path, tmp_path: Path) -> None:
    write_index(store, aliases={"latest": {"1": 1}})
    cached = registry(store, tmp_path, ttl=3600)
    fresh = registry(store, tmp_path, ttl=0)
    assert cached.resolve(NAME).version == fresh.resolve(NAME).version == "1"
    write_index(store, aliases={"latest": {"2": 1}})  # the alias moves (a rollout, or a rollback)
    assert fresh.resolve(NAME).version == "2"
    assert cached.resolve(NAME).version == "1"  # until its ttl runs out


def test_a_version_published_after_the_last_read_is_found_when_named(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sif_inference.registry as registry_module

    monkeypatch.setattr(registry_module, "MISS_REFRESH_S", 0.0)
    moved = shutil.move(str(store / NAME / "3"), str(tmp_path / "held-back"))
    cached = registry(store, tmp_path, ttl=3600)
    assert cached.resolve(NAME).version == "2"
    shutil.move(moved, str(store / NAME / "3"))  # published while the registry is warm
    assert cached.resolve(f"{NAME}@3").version == "3"  # named: re-read at once
    assert cached.resolve(NAME).version == "3"  # the re-read index is the one every reference uses now
    with pytest.raises(ModelNotFoundError):
        cached.resolve(f"{NAME}@9")


def test_a_private_model_is_unknown_to_other_tenants(store: Path, tmp_path: Path) -> None:
    path = store / NAME / "3" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["tenant"] = "t-owner"
    path.write_text(json.dumps(manifest))
    reg = registry(store, tmp_path)
    assert reg.resolve(NAME, tenant="t-owner").version == "3"
    with pytest.raises(ModelNotFoundError):
        reg.resolve(NAME, tenant="t-other")
    assert [m.name for m in reg.manifests(tenant="t-other")] == []
    assert [m.name for m in reg.manifests(tenant="t-owner")] == [NAME]


def test_an_unreadable_manifest_leaves_the_other_models_listed(store: Path, models_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(models_dir / "all-minilm-l6-v2", store / "all-minilm-l6-v2")
    broken = store / "broken-model" / "1"
    broken.mkdir(parents=True)
    (broken / "manifest.json").write_text("{not json")
    reg = registry(store, tmp_path)
    assert [m.name for m in reg.manifests()] == ["all-minilm-l6-v2", NAME]
    with pytest.raises(ModelNotFoundError, match="unreadable manifest"):
        reg.resolve("broken-model")


def test_choose_version_ignores_index_entries_for_missing_versions() -> None:
    index = ModelIndex(aliases={"latest": {"7": 50, "2": 50}})
    assert {choose_version(ModelRef("m"), ["1", "2"], index, str(k)) for k in range(50)} == {"2"}
