"""iris-species: a scikit-learn pipeline trained at build time on the bundled iris data -> ONNX (skl2onnx).

StandardScaler + LogisticRegression (fixed random_state) on a stratified 70/30 split of
`sklearn.datasets.load_iris` (shipped inside scikit-learn: nothing is downloaded). The targets are
the class names, so the graph's `label` output is the species itself (a string tensor) and
`probabilities` is a [N, 3] float tensor whose columns follow `labels` (no ZipMap). One named
[N, 1] float input per feature (`input_mode` named); skl2onnx joins them with a FeatureVectorizer.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from sif_modelbuild.common import fingerprint, is_current, load_spec, signature_of, write_manifest

log = logging.getLogger("sif_modelbuild.tabular")
NAME = "iris-species"
# sklearn's feature names ("sepal length (cm)", ...) as input names
FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
LABEL_OUTPUT = "label"
PROBABILITIES_OUTPUT = "probabilities"
SEED = 0
TEST_SIZE = 0.3
MAX_ABS_PROB_DIFF = 1e-5
MIN_TEST_ACCURACY = 0.9


def split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train X, train y, test X, test y): float32 features, class-name targets; deterministic."""
    from sklearn.datasets import load_iris
    from sklearn.model_selection import train_test_split

    data = load_iris()
    x = np.asarray(data.data, dtype=np.float32)
    y = np.asarray(data.target_names)[data.target]
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=TEST_SIZE, random_state=SEED, stratify=y)
    return x_train, y_train, x_test, y_test


def train() -> tuple[Any, Any]:
    """(the fitted Pipeline, its classifier step)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    x_train, y_train, _, _ = split()
    clf = LogisticRegression(max_iter=1000, random_state=SEED)
    pipe = Pipeline([("scale", StandardScaler()), ("clf", clf)]).fit(x_train, y_train)
    return pipe, clf


def convert(pipe: Any, clf: Any, out: Path) -> None:
    import onnx
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    model = convert_sklearn(
        pipe,
        initial_types=[(name, FloatTensorType([None, 1])) for name in FEATURES],
        target_opset={"": 17, "ai.onnx.ml": 3},
        options={id(clf): {"zipmap": False}},
    )
    # skl2onnx lists the default domain twice; keep one entry per domain (the highest version)
    versions: dict[str, int] = {}
    for imp in model.opset_import:
        versions[imp.domain] = max(versions.get(imp.domain, 0), imp.version)
    del model.opset_import[:]
    model.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in sorted(versions.items()))
    outputs = [o.name for o in model.graph.output]
    if outputs != [LABEL_OUTPUT, PROBABILITIES_OUTPUT]:
        raise SystemExit(f"{NAME}: the converted graph's outputs are {outputs}")
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(out))


def onnx_predict(model: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    feeds = {name: np.ascontiguousarray(x[:, [i]], dtype=np.float32) for i, name in enumerate(FEATURES)}
    labels, probs = session.run([LABEL_OUTPUT, PROBABILITIES_OUTPUT], feeds)
    return np.asarray(labels), np.asarray(probs)


def build(out_root: Path, *, force: bool = False) -> Path:
    spec = load_spec(NAME)
    out_dir = out_root / NAME / spec["version"]
    fp = fingerprint(spec, ["scikit-learn", "skl2onnx", "onnx", "onnxruntime"], [Path(__file__)])
    if not force and is_current(out_dir, fp):
        log.info("%s is up to date in %s", NAME, out_dir)
        return out_dir
    if [f["name"] for f in spec["features"]] != FEATURES:
        raise SystemExit(f"{NAME}: the spec's features are not {FEATURES}")
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe, clf = train()
    if list(clf.classes_) != spec["labels"]:
        raise SystemExit(f"{NAME}: the classifier's classes {list(clf.classes_)} are not the spec's labels")
    target = spec["variants"]["fp32"]
    convert(pipe, clf, out_dir / target)
    _, _, x_test, y_test = split()
    labels, probs = onnx_predict(out_dir / target, x_test)
    checks = {
        "test_rows": len(x_test),
        "labels_equal_predict": bool((labels == pipe.predict(x_test)).all()),
        "max_abs_prob_diff_vs_sklearn": float(np.abs(probs - pipe.predict_proba(x_test)).max()),
        "test_accuracy": float((labels == y_test).mean()),
    }
    log.info("vs scikit-learn on the test split: %s", checks)
    failures = []
    if not checks["labels_equal_predict"]:
        failures.append("ONNX labels differ from predict()")
    if checks["max_abs_prob_diff_vs_sklearn"] > MAX_ABS_PROB_DIFF:
        failures.append(
            f"max |ONNX - predict_proba| {checks['max_abs_prob_diff_vs_sklearn']:.2e} > {MAX_ABS_PROB_DIFF}"
        )
    if checks["test_accuracy"] < MIN_TEST_ACCURACY:
        failures.append(f"test accuracy {checks['test_accuracy']:.3f} < {MIN_TEST_ACCURACY}")
    if failures:
        raise SystemExit(f"{NAME}: check failed: " + "; ".join(failures))
    spec["signature"] = signature_of(out_dir / target)
    write_manifest(out_dir, spec, [target], {"fingerprint": fp, **checks})
    return out_dir
