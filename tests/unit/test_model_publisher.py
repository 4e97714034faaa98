"""The model publisher (sif_modelbuild.publish / catalog / stores) on a local folder laid out like the bucket.

Models the project does not ship are built here (tests/onnx_factory.py): every task is inferred from
the graph, probed through the real task layer and timed; broken ones are refused with nothing written.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from sif_cli import models as models_cli
from sif_inference import LocalDirSource, ModelRegistry
from sif_inference.manifest import TASK_NAMES
from sif_modelbuild import catalog
from sif_modelbuild import publish as publish_module
from sif_modelbuild.errors import CatalogError, PublishError
from sif_modelbuild.publish import publish
from sif_modelbuild.stores import LocalStore
from tests import onnx_factory as factory


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "models")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("onnx")
    return {
        "tokenizer": factory.tokenizer_json(d / "tokenizer.json"),
        "embedding": factory.text_model(d / "embedding.onnx"),
        "token-embedding": factory.text_model(d / "tokens.onnx", token_output=True),
        "text-classification": factory.text_model(d / "topic.onnx", classes=3),
        "image": factory.image_model(d / "image.onnx"),
        "image-nhwc": factory.image_model(d / "image_nhwc.onnx", layout="NHWC"),
        "tabular": factory.sklearn_model(d / "churn.onnx"),
        "tabular-zipmap": factory.sklearn_model(d / "churn_zipmap.onnx", zipmap=True, handle_unknown="error"),
        "tensor": factory.tensor_model(d / "tensor.onnx"),
        "unknown-op": factory.unknown_op_model(d / "custom.onnx"),
        "random": factory.random_bytes(d / "random.onnx"),
    }


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def registry_of(store: LocalStore, tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(LocalDirSource(store.root), tmp_path / "cache", index_ttl_s=0)


# ---------------------------------------------------------------------- tasks inferred from the graph
def test_embedding_inferred_signature_dim_and_measured_cost(built: dict[str, Path], store: LocalStore) -> None:
    m = publish(built["embedding"], name="tiny-embed", tokenizer=built["tokenizer"], dim=8, store=store)
    assert (m.task, m.version, m.output.name, m.output.dim) == ("embedding", "1", "sentence_embedding", 8)
    assert m.embedding is not None and m.embedding.pooling == "none"
    assert m.signature is not None and [t.name for t in m.signature.inputs] == ["input_ids", "attention_mask"]
    assert m.signature.inputs[0].dtype == "int64" and m.signature.inputs[0].shape[1] is not None  # a named axis
    assert m.cost.measured and m.cost.cpu_ms_per_item > 0 and m.route == "cpu"
    assert m.tokenizer is not None and m.tokenizer.file == "tokenizer.json"
    assert m.limits.max_tokens == m.tokenizer.max_length == 256
    assert set(m.files) == {"model.fp32.onnx", "tokenizer.json"}
    on_disk = json.loads((store.root / "tiny-embed" / "1" / "manifest.json").read_text())
    assert on_disk["files"]["model.fp32.onnx"]["sha256"] == m.sha256()
    assert on_disk["cost"]["measured"] is True and on_disk["published"]["timed_runs"] >= 3


def test_token_embeddings_get_mean_pooling(built: dict[str, Path], store: LocalStore) -> None:
    m = publish(built["token-embedding"], name="tiny-tokens", tokenizer=built["tokenizer"], store=store)
    assert m.embedding is not None and (m.embedding.pooling, m.embedding.normalize) == ("mean", True)
    assert m.output.dim == 8


def test_text_classification_when_labels_are_given(built: dict[str, Path], store: LocalStore, tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("sports\nweather\nfood\n")
    topic = built["text-classification"]
    m = publish(topic, name="tiny-topic", tokenizer=built["tokenizer"], labels=labels, store=store)
    assert (m.task, m.labels, m.output.dim) == ("text-classification", ["sports", "weather", "food"], 3)
    assert m.classification is not None and m.classification.activation == "softmax"  # the graph gives logits


def test_image_classification_layout_crop_and_probabilities(built: dict[str, Path], store: LocalStore) -> None:
    m = publish(built["image"], name="tiny-image", labels=["cat", "dog", "owl"], store=store)
    assert m.task == "image-classification" and m.preprocessing is not None
    assert (m.preprocessing.layout, m.preprocessing.crop) == ("NCHW", 16)
    assert m.classification is not None and m.classification.activation == "none"  # softmax inside the graph
    assert m.archive_route == "gpu"
    nhwc = publish(built["image-nhwc"], name="tiny-image-nhwc", store=store)
    assert nhwc.preprocessing is not None and nhwc.preprocessing.layout == "NHWC" and nhwc.labels == []


def test_tabular_features_outputs_and_graph_categories(built: dict[str, Path], store: LocalStore) -> None:
    m = publish(built["tabular"], name="churn", store=store)
    assert m.task == "tabular" and m.tabular is not None
    assert (m.tabular.label_output, m.tabular.probabilities_output, m.tabular.input_mode) == (
        "label",
        "probabilities",
        "named",
    )
    assert [(f.name, f.type) for f in m.features] == [
        ("age", "number"),
        ("monthly_spend", "number"),
        ("plan", "category"),
        ("region", "category"),
    ]
    # handle_unknown="ignore": the graph takes any plan, so no category list restricts callers
    assert all(f.categories is None for f in m.features) and m.labels == ["0", "1", "2"]
    strict = publish(built["tabular-zipmap"], name="churn-zipmap", store=store)
    assert strict.tabular is not None and strict.tabular.probabilities_output == "output_probability"
    assert {f.name: f.categories for f in strict.features}["plan"] == ["basic", "plus", "pro"]


def test_tensor_is_the_fallback(built: dict[str, Path], store: LocalStore) -> None:
    m = publish(built["tensor"], name="tiny-tensor", store=store)
    assert m.task == "tensor" and m.signature is not None
    assert [(t.name, t.dtype) for t in m.signature.outputs] == [("y", "float"), ("s", "float")]
    assert m.limits.max_tensor_elements == 1_000_000


def test_predictions_of_a_published_tensor_model_are_onnxruntimes(
    built: dict[str, Path], store: LocalStore, tmp_path: Path
) -> None:
    publish(built["tensor"], name="tiny-tensor", store=store)
    x = np.random.default_rng(1).normal(size=(4, 3)).astype(np.float32)
    result = registry_of(store, tmp_path).task("tiny-tensor").predict([{"x": row.tolist()} for row in x], strict=True)
    y, s = ort.InferenceSession(str(built["tensor"]), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for i in range(4):
        assert np.allclose(result.predictions[i]["y"], y[i], rtol=1e-6)
        assert np.allclose(result.predictions[i]["s"], s[i], rtol=1e-6)


# ---------------------------------------------------------------------- refusals: nothing written
REFUSALS: list[tuple[str, dict[str, Any], str]] = [
    ("random", {}, "is not an ONNX model"),
    ("unknown-op", {}, "cannot load this graph"),
    ("embedding", {"tokenizer": "@tokenizer", "dim": 384}, "has 8 dimensions, not --dim 384"),
    ("embedding", {}, "needs its tokenizer"),
    ("embedding", {"tokenizer": b"{not a tokenizer"}, "the tokenizer does not load"),
    ("image", {"labels": ["only-one"]}, "1 labels given, but the output probabilities has 3 classes"),
    ("image", {"task": "embedding"}, "an embedding model takes input_ids and attention_mask"),
    ("tensor", {"task": "image-classification"}, "an image-classification model takes one float input"),
    ("image", {"task": "text-classification", "labels": ["a", "b", "c"]}, "takes input_ids"),
    ("text-classification", {"tokenizer": "@tokenizer", "task": "text-classification"}, "needs its labels"),
    ("tabular", {"features": ["age", "plan"]}, "are not the graph's inputs"),
    ("tabular", {"features": [{"name": "age", "type": "category"}, "monthly_spend", "plan", "region"]}, "declared"),
    ("image", {"preprocessing": {"crop": 32, "resize": 40}}, "the graph takes 16x16"),
    ("tensor", {"labels": ["a"]}, "labels are for classifiers"),
]


@pytest.mark.parametrize(("model", "kwargs", "message"), REFUSALS, ids=[f"{r[0]}-{r[2][:24]}" for r in REFUSALS])
def test_broken_models_are_refused_with_nothing_written(
    built: dict[str, Path], store: LocalStore, model: str, kwargs: dict[str, Any], message: str
) -> None:
    kwargs = {k: built[v[1:]] if isinstance(v, str) and v.startswith("@") else v for k, v in kwargs.items()}
    with pytest.raises(PublishError, match=message.replace("(", r"\(").replace(")", r"\)")):
        publish(built[model], name="broken", store=store, **kwargs)
    assert tree(store.root) == []


def test_an_opset_newer_than_onnxruntime_is_refused(built: dict[str, Path], store: LocalStore, tmp_path: Path) -> None:
    model = onnx.load(str(built["tensor"]))
    model.opset_import[0].version = 99
    onnx.save(model, str(tmp_path / "future.onnx"))
    with pytest.raises(PublishError, match=r"onnxruntime .* cannot load this graph \(opsets: ai.onnx 99\)"):
        publish(tmp_path / "future.onnx", name="future", store=store)
    assert tree(store.root) == []


def test_size_limit_refuses_and_lambda_limit_routes_to_gpu(
    built: dict[str, Path], store: LocalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(publish_module, "MAX_VERSION_BYTES", 100)
    with pytest.raises(PublishError, match="a version may hold at most 100"):
        publish(built["tensor"], name="big", store=store)
    assert tree(store.root) == []
    monkeypatch.setattr(publish_module, "MAX_VERSION_BYTES", 2 * 1024**3)
    monkeypatch.setattr(publish_module, "LAMBDA_MODEL_BYTES", 100)
    assert publish(built["tensor"], name="big", store=store).route == "gpu"
    published = json.loads((store.root / "big" / "1" / "manifest.json").read_text())["published"]
    assert "over Lambda's 100" in published["route_reason"]


def test_slow_full_calls_route_to_gpu(
    built: dict[str, Path], store: LocalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(publish_module, "API_BUDGET_MS", 0.001)
    m = publish(built["tensor"], name="slow", store=store)
    assert m.route == "gpu" and m.cost.lambda_budget_ms == publish_module.LAMBDA_BUDGET_MS


# ---------------------------------------------------------------------- versions and the index
def test_versions_are_new_immutable_and_latest_moves(built: dict[str, Path], store: LocalStore, tmp_path: Path) -> None:
    first = publish(built["tensor"], name="t", store=store, description="one")
    second = publish(built["tensor"], name="t", store=store, description="two")
    assert (first.version, second.version) == ("1", "2")
    assert json.loads((store.root / "t" / "aliases.json").read_text())["aliases"] == {"latest": {"2": 1}}
    assert registry_of(store, tmp_path).manifest("t").description == "two"
    third = publish(built["tensor"], name="t", store=store, promote=False)
    assert third.version == "3"
    info = catalog.show("t", store=store)
    assert info.latest == "2" and [v.version for v in info.versions] == ["1", "2", "3"]
    assert not any((store.root / "t" / v / ".claim").exists() for v in ("1", "2", "3"))


def test_no_promote_on_a_model_without_an_index_pins_latest(built: dict[str, Path], store: LocalStore) -> None:
    publish(built["tensor"], name="t", store=store)
    (store.root / "t" / "aliases.json").unlink()  # as `make up` publishes: no index, latest = the highest
    publish(built["tensor"], name="t", store=store, promote=False)
    assert catalog.show("t", store=store).latest == "1"


def test_concurrent_publishers_get_different_versions(built: dict[str, Path], store: LocalStore) -> None:
    versions: list[str] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            versions.append(publish(built["tensor"], name="race", store=store).version)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and sorted(versions) == ["1", "2", "3"]
    assert catalog.show("race", store=store).latest in versions


def test_alias_canary_rollback_and_retire(built: dict[str, Path], store: LocalStore, tmp_path: Path) -> None:
    for _ in range(3):
        publish(built["tensor"], name="m", store=store)
    catalog.alias("m", "latest", catalog.parse_split(["2=90", "3=10"]), store=store)
    catalog.alias("m", "stable", {"1": 1}, store=store)
    index = json.loads((store.root / "m" / "aliases.json").read_text())
    assert index["aliases"] == {"latest": {"2": 90, "3": 10}, "stable": {"1": 1}}
    registry = registry_of(store, tmp_path)
    served = {registry.resolve("m", routing_key=f"req-{i}").version for i in range(200)}
    assert served == {"2", "3"}
    with pytest.raises(CatalogError, match="in use by alias latest"):
        catalog.retire("m", "3", store=store)
    with pytest.raises(CatalogError, match="in use by alias stable"):
        catalog.retire("m", "1", store=store)
    catalog.alias("m", "latest", {"2": 1}, store=store)  # rollback: latest back to 2 alone
    catalog.retire("m", "3", store=store)
    assert catalog.show("m", store=store).retired == ["3"]
    with pytest.raises(CatalogError, match="retired"):
        catalog.alias("m", "latest", {"3": 1}, store=store)
    with pytest.raises(CatalogError, match="has no version 9"):
        catalog.alias("m", "latest", {"9": 1}, store=store)
    catalog.remove_alias("m", "latest", store=store)
    with pytest.raises(CatalogError, match="what latest serves"):
        catalog.retire("m", "2", store=store)  # latest, implicit now, is the highest live version


@pytest.mark.parametrize(
    ("items", "message"),
    [(["x"], "positive integer"), (["1", "2=5"], "its weight"), (["1=-1"], "whole number"), (["1=0"], "positive")],
)
def test_alias_splits_are_checked(items: list[str], message: str) -> None:
    with pytest.raises(CatalogError, match=message):
        catalog.parse_split(items)


def test_private_models_are_listed_for_their_tenant_only(built: dict[str, Path], store: LocalStore) -> None:
    publish(built["tensor"], name="public-t", store=store)
    publish(built["tensor"], name="private-t", store=store, tenant="t_acme")
    everything = {m.name: m.tenant for m in catalog.list_models(store=store)}
    assert everything == {"public-t": None, "private-t": "t_acme"}
    assert {m.name for m in catalog.list_models(store=store, tenant="t_acme", all_tenants=False)} == set(everything)
    assert {m.name for m in catalog.list_models(store=store, tenant="t_other", all_tenants=False)} == {"public-t"}


def test_cli_task_names_are_the_manifests() -> None:
    assert models_cli.TASK_NAMES == TASK_NAMES


def test_cli_on_a_folder(built: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sif_cli.main import main

    where = ["--models-dir", str(tmp_path / "m")]
    assert main(["-q", "models", "publish", str(built["tensor"]), "--name", "cli-t", *where]) == 0
    assert "published cli-t version 1" in capsys.readouterr().out
    assert main(["-q", "models", "publish", str(built["random"]), "--name", "cli-t", *where]) == 1
    assert "is not an ONNX model" in capsys.readouterr().err
    assert main(["-q", "models", "show", "cli-t", "--json", *where]) == 0
    assert json.loads(capsys.readouterr().out)["latest"] == "1"
    assert main(["-q", "models", "retire", "cli-t", "1", *where]) == 1
    assert "in use by alias latest" in capsys.readouterr().err
