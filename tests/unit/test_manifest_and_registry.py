import json
import shutil
from pathlib import Path

import pytest

from sif_inference import IntegrityError, LocalDirSource, ModelManifest, ModelNotFoundError, ModelRegistry
from sif_inference.errors import UnknownVariantError, WrongTaskError
from sif_inference.integrity import sha256_file


@pytest.mark.parametrize("name", ["all-minilm-l6-v2", "open-nsfw"])
def test_built_manifest_lists_every_file_with_its_sha256(models_dir, name):
    version_dir = models_dir / name / "1"
    manifest = ModelManifest.model_validate(json.loads((version_dir / "manifest.json").read_text()))
    assert manifest.name == name
    assert manifest.files, "a manifest without files"
    for filename, entry in manifest.files.items():
        assert sha256_file(version_dir / filename) == entry.sha256
        assert (version_dir / filename).stat().st_size == entry.bytes
    for variant in manifest.variants:
        assert set(manifest.files_for(variant)) <= set(manifest.files)
    assert manifest.limits.max_inputs > 0
    assert manifest.route in ("cpu", "gpu")
    assert manifest.cost.cpu_ms_per_item > 0


def test_embedding_manifest_settings(models_dir):
    m = LocalDirSource(models_dir).read_manifest("all-minilm-l6-v2", "1")
    assert m.task == "embedding"
    assert m.output.dim == 384
    assert m.tokenizer is not None and m.tokenizer.max_length == 256
    assert m.default_variant == "int8"
    assert set(m.variants) == {"int8", "fp32"}


def test_image_manifest_settings(models_dir):
    m = LocalDirSource(models_dir).read_manifest("open-nsfw", "1")
    assert m.task == "image-classification"
    assert m.labels == ["sfw", "nsfw"]
    assert m.limits.max_image_bytes and m.limits.max_image_pixels


def test_unknown_model_and_variant(registry):
    with pytest.raises(ModelNotFoundError):
        registry.manifest("no-such-model")
    with pytest.raises(UnknownVariantError, match="has no variant 'fp16'"):
        registry.get("all-minilm-l6-v2", "fp16")  # the model exists: a 400 on the API, not a 404


def test_one_session_per_model_variant_per_process(registry):
    a = registry.get("all-minilm-l6-v2")
    b = registry.get("all-minilm-l6-v2")
    assert a is b
    assert registry.get("all-minilm-l6-v2", "fp32") is not a


def test_wrong_task_is_refused(registry):
    with pytest.raises(WrongTaskError):
        registry.embedder("open-nsfw")
    with pytest.raises(WrongTaskError):
        registry.classifier("all-minilm-l6-v2")


def copy_model(models_dir: Path, dest: Path, name: str) -> Path:
    shutil.copytree(models_dir / name, dest / name)
    return dest / name / "1"


def test_corrupted_model_file_is_refused(models_dir, tmp_path):
    version_dir = copy_model(models_dir, tmp_path / "src", "open-nsfw")
    with (version_dir / "open-nsfw.onnx").open("r+b") as fh:
        fh.seek(1000)
        fh.write(b"\x00\x01\x02\x03")
    registry = ModelRegistry(LocalDirSource(tmp_path / "src"), tmp_path / "cache")
    with pytest.raises(IntegrityError, match="refusing to serve"):
        registry.get("open-nsfw")
    # the bad file is not left in the cache to be served later
    assert not (tmp_path / "cache" / "open-nsfw" / "1" / "open-nsfw.onnx").exists()


def test_corrupted_cache_entry_is_never_served_but_replaced(models_dir, tmp_path):
    copy_model(models_dir, tmp_path / "src", "open-nsfw")
    cached = tmp_path / "cache" / "open-nsfw" / "1" / "open-nsfw.onnx"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"not the model")
    registry = ModelRegistry(LocalDirSource(tmp_path / "src"), tmp_path / "cache")
    assert registry.get("open-nsfw").classifier is not None
    manifest = registry.manifest("open-nsfw")
    assert sha256_file(cached) == manifest.files["open-nsfw.onnx"].sha256


def test_file_missing_from_manifest_is_refused(models_dir, tmp_path):
    version_dir = copy_model(models_dir, tmp_path / "src", "all-minilm-l6-v2")
    data = json.loads((version_dir / "manifest.json").read_text())
    del data["files"]["tokenizer.json"]
    (version_dir / "manifest.json").write_text(json.dumps(data))
    registry = ModelRegistry(LocalDirSource(tmp_path / "src"), tmp_path / "cache")
    with pytest.raises(IntegrityError, match="not listed"):
        registry.get("all-minilm-l6-v2")


def test_prefetch_hands_verified_bytes_to_get(models_dir, tmp_path):
    registry = ModelRegistry(LocalDirSource(models_dir), tmp_path / "cache")
    registry.prefetch("all-minilm-l6-v2")
    registry.prefetch("all-minilm-l6-v2")  # idempotent
    embedder = registry.embedder("all-minilm-l6-v2")
    assert embedder.embed(["hello"]).vectors.shape == (1, 384)
    assert (tmp_path / "cache" / "all-minilm-l6-v2" / "1" / "model.int8.onnx").is_file()


def test_prefetch_errors_surface_in_get(models_dir, tmp_path):
    version_dir = copy_model(models_dir, tmp_path / "src", "open-nsfw")
    (version_dir / "open-nsfw.onnx").write_bytes(b"tampered")
    registry = ModelRegistry(LocalDirSource(tmp_path / "src"), tmp_path / "cache")
    registry.prefetch("open-nsfw")
    with pytest.raises(IntegrityError):
        registry.get("open-nsfw")


def test_a_folder_without_a_manifest_is_not_listed(models_dir, tmp_path):
    copy_model(models_dir, tmp_path / "src", "open-nsfw")
    (tmp_path / "src" / "half-deleted" / "1").mkdir(parents=True)
    (tmp_path / "src" / "half-deleted" / "1" / "model.onnx").write_bytes(b"x")
    registry = ModelRegistry(LocalDirSource(tmp_path / "src"), tmp_path / "cache")
    assert [m.name for m in registry.manifests()] == ["open-nsfw"]
