"""The task layer (sif_inference.tasks) with the real models: what every caller (API, files, jobs) gets."""

from __future__ import annotations

import base64
import json
from dataclasses import replace

import numpy as np
import pytest

from sif_core.rows import Row
from sif_core.scoring import TaskFileModel, file_model
from sif_inference.b64 import decode_b64
from sif_inference.errors import (
    BadInputError,
    ImageDecodeError,
    InferenceError,
    InputLimitError,
    WrongTaskError,
)
from sif_inference.rounding import compact_json, format_vectors, round_significant
from sif_inference.tasks import (
    IMAGE,
    TASKS,
    TEXT_CPU,
    TEXT_GPU,
    ImageClassification,
    LabelCache,
    TensorTask,
    TextEmbedding,
    ZeroShot,
    task_for,
)
from sif_modelbuild.testimages import make_test_images

MODEL = "all-minilm-l6-v2"
NSFW = "open-nsfw"


@pytest.fixture(scope="module")
def fp32(registry):
    return registry.task(MODEL, "fp32")


@pytest.fixture(scope="module")
def int8(registry):
    return registry.task(MODEL)


@pytest.fixture(scope="module")
def images(registry):
    return registry.task(NSFW)


@pytest.fixture(scope="module")
def test_images():
    return make_test_images()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def significant_digits(x: float) -> int:
    return len(repr(abs(x)).split("e")[0].replace(".", "").strip("0"))


# ---------------------------------------------------------------------- the catalogue
def test_the_factory_picks_the_task_from_the_manifest_kind_and_labels(registry, fp32, int8, images):
    assert set(TASKS) == {"embedding", "zero-shot", "text-classification", "image-classification", "tabular", "tensor"}
    assert type(fp32) is TextEmbedding and (fp32.variant, int8.variant) == ("fp32", "int8")
    assert type(images) is ImageClassification and images.field == "b64" and fp32.field == "text"
    zero_shot = registry.task(MODEL, labels=["a", "b"], template="about {}")
    assert type(zero_shot) is ZeroShot and zero_shot.labels == ["a", "b"] and zero_shot.template == "about {}"
    with pytest.raises(WrongTaskError, match="does image-classification, not embedding"):
        registry.task(NSFW, kind="embedding")
    with pytest.raises(WrongTaskError, match="not zero-shot"):
        registry.task(NSFW, labels=["a"])
    with pytest.raises(WrongTaskError, match="does embedding, not tabular"):
        registry.task(MODEL, kind="tabular")
    with pytest.raises(WrongTaskError, match="unknown task"):
        registry.task(MODEL, kind="regression")
    # every model also serves raw tensors (KServe v2)
    assert type(registry.task(MODEL, kind="tensor")) is TensorTask is type(registry.task(NSFW, kind="tensor"))
    assert registry.task(MODEL, kind="tensor").field == "inputs"
    with pytest.raises(BadInputError, match="duplicates"):
        registry.task(MODEL, labels=["a", "a"])
    with pytest.raises(BadInputError, match="template"):
        registry.task(MODEL, labels=["a"], template="no slot")


def test_the_batch_profile_follows_the_provider(registry):
    class CudaSession:
        def get_providers(self):
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    text, image = registry.get(MODEL), registry.get(NSFW)
    assert task_for(text).profile == TEXT_CPU and task_for(image).profile == IMAGE
    on_gpu = replace(text, session=CudaSession())
    assert task_for(on_gpu).profile == TEXT_GPU
    assert TaskFileModel(task_for(on_gpu)).window_rows == TEXT_GPU.window_rows == 4096
    assert (TEXT_GPU.max_items, TEXT_GPU.max_tokens) == (256, 256 * 128)
    assert file_model(registry, MODEL).window_rows == 1024 and file_model(registry, NSFW).window_rows == 32


# ---------------------------------------------------------------------- reference values
def test_embeddings_match_the_reference_and_count_usage_exactly(fp32, int8, minilm_reference):
    texts = minilm_reference["texts"]
    ref = np.array(minilm_reference["embeddings"], dtype=np.float32)
    result = fp32.predict(texts, strict=True)
    assert sorted(result.predictions) == list(range(6)) and result.errors == {}
    vectors = np.stack([result.predictions[i] for i in range(6)])
    assert vectors.dtype == np.float32 and vectors.shape == (6, 384)
    np.testing.assert_allclose(vectors, ref, atol=2e-5)
    np.testing.assert_allclose(np.array([fp32.to_json(v) for v in vectors]), ref, atol=2e-5)
    direct = fp32.embedder.embed(texts)
    assert (result.inputs, result.tokens, result.pixels) == (6, direct.total_tokens, 0)
    assert result.truncated == [5]  # the one text over 256 tokens
    assert fp32.predict(["hello"]).tokens == 3

    cos = (np.stack(list(int8.predict(texts).predictions.values())) * ref).sum(1)
    assert cos.min() >= 0.97


def test_image_scores_match_the_package_and_count_pixels_exactly(images, nsfw_reference, test_images):
    result = images.predict([{"b64": b64(data)} for _, data in test_images], strict=True)
    ref = np.array([nsfw_reference["scores"][name] for name, _ in test_images])
    got = np.array([[result.predictions[i]["sfw"], result.predictions[i]["nsfw"]] for i in range(len(test_images))])
    assert np.abs(got - ref).max() <= 0.005
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-4)
    pixels = 0
    for _, data in test_images:
        img = images.classifier.decode(data)
        pixels += img.width * img.height
    assert (result.inputs, result.pixels, result.tokens, result.truncated) == (len(test_images), pixels, 0, [])


# ---------------------------------------------------------------------- base64
def test_the_one_base64_decoder_takes_what_clients_send():
    assert decode_b64("aGVsbG8=") == b"hello"
    assert decode_b64("aGVsbG8") == b"hello"  # padding missing
    assert decode_b64("aGVs\nbG8=\r\n ") == b"hello"  # wrapped lines
    assert decode_b64("data:image/png;base64,aGVsbG8=") == b"hello"
    assert decode_b64("DATA:text/plain;charset=utf-8;BASE64,aGVsbG8") == b"hello"
    assert decode_b64("-_8=") == b"\xfb\xff" == decode_b64("+/8=")  # URL-safe and standard alphabets
    for bad, why in [
        ("@@@@", "not valid base64"),
        ("aGVsb", "not valid base64"),  # 5 characters: one too many for any padding
        ("", "empty"),
        ("data:image/png;base64,", "empty"),
        ("data:text/plain,hello", "data: URL"),
        ("aGVsbG8é", "not valid base64"),
    ]:
        with pytest.raises(BadInputError, match=why):
            decode_b64(bad)
    assert issubclass(BadInputError, ValueError) and issubclass(BadInputError, InferenceError)


# ---------------------------------------------------------------------- per-row errors
def test_image_rows_fail_alone_and_every_base64_form_scores(images, test_images):
    data = test_images[0][1]
    standard = b64(data)
    inputs = [
        standard,  # 0: a file row's value
        "@@@ not base64",  # 1
        "data:image/png;base64," + standard,  # 2: a data: URL
        base64.urlsafe_b64encode(data).decode(),  # 3: URL-safe
        standard.rstrip("="),  # 4: no padding
        b64(b"plain text, not an image"),  # 5
        12345,  # 6: wrong type
        {"text": "a text"},  # 7: a text instance
        {"b64": standard},  # 8: the API's form
        data,  # 9: raw bytes
        b64(b"x" * (images.manifest.limits.max_image_bytes + 1)),  # 10: over the byte limit
    ]
    result = images.predict(inputs)
    assert sorted(result.predictions) == [0, 2, 3, 4, 8, 9]
    assert len({images.dumps(p) for p in result.predictions.values()}) == 1  # the same image every time
    assert result.errors[1].startswith("b64 is not valid base64")
    assert result.errors[5].startswith("undecodable image: cannot decode image")
    assert result.errors[6] == "model 'open-nsfw' takes images (bytes, base64 or {\"b64\": ...}), not int"
    assert result.errors[7].endswith("not texts")
    assert result.errors[10] == f"image is 4000001 bytes; the limit is {images.manifest.limits.max_image_bytes}"
    img = images.classifier.decode(data)
    assert (result.inputs, result.pixels) == (6, 6 * img.width * img.height)


def test_text_rows_fail_alone(int8):
    limit = int8.manifest.limits.max_text_chars
    long_words = " ".join(["word"] * 600)  # over 256 tokens: truncated, not an error
    inputs = ["fine", "\ud800 lone surrogate", "x" * (limit + 1), 42, long_words, {"b64": "aGVsbG8="}, "", "ok"]
    result = int8.predict(inputs)
    assert sorted(result.predictions) == [0, 4, 7]
    assert result.errors == {
        1: "text is not valid Unicode (a lone surrogate, U+D800 at character 0)",
        2: f"text has {limit + 1} characters; the limit is {limit}",
        3: "model 'all-minilm-l6-v2' takes texts (strings), not int",
        5: "model 'all-minilm-l6-v2' takes texts (strings), not images",
        6: "text is empty",  # as the file reader refuses an empty field
    }
    assert result.inputs == 3 and result.truncated == [4]  # input indices, not positions among the good ones
    good = int8.embedder.embed(["fine", long_words, "ok"])
    assert result.tokens == good.total_tokens


def test_a_window_of_only_bad_rows_costs_nothing(registry, images):
    zero_shot = registry.task(MODEL, labels=["a", "b"])
    for task, bad in [(zero_shot, ["\udfff", 1]), (images, ["@@@@", "bm90IGFuIGltYWdl"])]:
        result = task.predict(bad)
        assert (result.inputs, result.tokens, result.pixels, result.predictions) == (0, 0, 0, {})
        assert sorted(result.errors) == [0, 1]
    assert images.predict([]).errors == {} and images.predict([]).inputs == 0


# ---------------------------------------------------------------------- strict mode (the API)
def test_strict_mode_raises_the_first_bad_input_with_its_index(int8, images, test_images):
    limit = int8.manifest.limits.max_text_chars
    cases = [
        (int8, ["x"] * 257, InputLimitError, "257 inputs; all-minilm-l6-v2 takes at most 256 per call"),
        (int8, ["ok", "ok", "y" * (limit + 1)], InputLimitError, f"input 2: text has {limit + 1} characters"),
        (int8, ["ok", "a\ud800"], BadInputError, "input 1: text is not valid Unicode"),
        (int8, [{"b64": "aGVsbG8="}], WrongTaskError, "input 0: model 'all-minilm-l6-v2' takes texts"),
        (images, [{"b64": "@@@@"}], BadInputError, "input 0: b64 is not valid base64"),
        (images, [{"text": "a text"}], WrongTaskError, "input 0: .* not texts"),
        (images, [{"b64": b64(b"not an image")}], ImageDecodeError, "input 0: undecodable image"),
        (images, [{"b64": b64(test_images[0][1])}] * 17, InputLimitError, "17 inputs; open-nsfw takes at most 16"),
    ]
    for task, inputs, error, message in cases:
        with pytest.raises(error, match=message):
            task.predict(inputs, strict=True)
    ok = int8.predict(["x"] * 256, strict=True)
    assert ok.inputs == 256 and ok.errors == {}


# ---------------------------------------------------------------------- numbers out
def test_round_significant_keeps_seven_digits_and_agrees_with_the_text_form():
    values = np.array([0.0123456789, -0.98765432109, 0.0, 1.5e-9, -3.0e12, 123456.789], dtype=np.float64)
    assert round_significant(values).tolist() == [0.01234568, -0.9876543, 0.0, 1.5e-09, -3.0e12, 123456.8]
    rng = np.random.default_rng(7)
    vectors = (rng.standard_normal((200, 384)) * 0.05).astype(np.float32)
    vectors[:, :8] *= np.float32(1e-5)  # values under 1e-6 and exact zeros take the slow path
    vectors[0, 0], vectors[1, 1], vectors[2, 2] = 0.0, 3.4e7, -1.25e-8
    vectors[3, :4] = [33 / 256, 0.5, 1.2345675, 0.00012345675]  # exact and near decimal ties
    rounded = round_significant(vectors).tolist()
    assert rounded == [json.loads(line) for line in format_vectors(vectors)]
    # the text is each value's format(x, ".7g"), whatever the row formatting does to be fast
    assert format_vectors(vectors) == ["[" + ",".join(format(x, ".7g") for x in row) + "]" for row in vectors.tolist()]
    assert format_vectors(np.zeros((0, 384), dtype=np.float32)) == []
    assert max(significant_digits(x) for row in rounded for x in row) <= 7
    np.testing.assert_allclose(np.array(rounded), vectors, rtol=5e-7)


def test_the_json_text_is_the_same_through_the_api_form_and_the_file_form(fp32, images, test_images):
    texts = ["The quick brown fox", "hello", "Le chat est assis sur le tapis."]
    api = fp32.predict([{"text": t} for t in texts], strict=True)
    file = TaskFileModel(fp32).score([Row(i, i + 1, f"r{i}", t) for i, t in enumerate(texts)])
    assert file.predictions == {i: fp32.dumps(api.predictions[i]) for i in range(3)}
    assert fp32.dumps_all(api.predictions) == file.predictions
    for i in range(3):  # the API's numbers are the file's numbers
        assert json.loads(file.predictions[i]) == fp32.to_json(api.predictions[i])
    assert (file.tokens, file.truncated) == (api.tokens, 0)

    data = test_images[1][1]
    api = images.predict([{"b64": b64(data)}], strict=True)
    file = TaskFileModel(images).score([Row(0, 1, "img", "data:image/jpeg;base64," + b64(data))])
    assert file.predictions == {0: images.dumps(api.predictions[0])}
    assert json.loads(file.predictions[0]) == images.to_json(api.predictions[0]) == api.predictions[0]
    assert file.pixels == api.pixels
    assert compact_json(api.predictions[0]) == file.predictions[0] and " " not in file.predictions[0]


def test_predictions_are_rounded_to_seven_significant_digits(int8, images, registry, test_images):
    vector = int8.predict(["a short text"]).predictions[0]
    line = int8.dumps(vector)
    assert json.loads(line) == int8.to_json(vector) and len(line) < 384 * 13
    odd = np.array([0.0, -0.0, 1e-5, 0.5, 1234567.0, 3.4e-9], dtype=np.float32)  # one text form, whatever the path
    assert int8.dumps(odd) == int8.dumps_all({7: odd})[7] == "[0,-0,1e-05,0.5,1234567,3.4e-09]"
    assert json.loads(int8.dumps(odd)) == int8.to_json(odd)
    scores = images.predict([test_images[0][1]]).predictions[0]
    zero_shot = registry.task(MODEL, labels=["sports", "finance", "cooking"]).predict(["a goal"]).predictions[0]
    for number in [*int8.to_json(vector), *scores.values(), *zero_shot["scores"]]:
        assert significant_digits(number) <= 7


# ---------------------------------------------------------------------- zero-shot
def test_zero_shot_orders_labels_and_bills_label_tokens(registry):
    cache = LabelCache()
    labels = ["sports", "finance", "cooking"]
    task = ZeroShot(registry.get(MODEL), labels=labels, template="This text is about {}.", cache=cache)
    texts = ["The striker scored twice in the cup final.", "The central bank raised interest rates."]
    first = task.predict(texts, strict=True)
    assert [p["label"] for p in first.predictions.values()] == ["sports", "finance"]
    for p in first.predictions.values():
        assert sorted(p["labels"]) == sorted(labels) and p["label"] == p["labels"][0]
        assert p["scores"] == sorted(p["scores"], reverse=True) and sum(p["scores"]) == pytest.approx(1.0, abs=1e-5)
    text_tokens = task.embedder.embed(texts).total_tokens
    label_tokens = task.embedder.embed([f"This text is about {label}." for label in labels]).total_tokens
    assert first.tokens == text_tokens + label_tokens and first.inputs == 2
    again = task.predict(texts, strict=True)  # labels from the cache now: billed the same
    assert again.tokens == first.tokens and again.predictions == first.predictions
    assert len(cache._items) == 3
