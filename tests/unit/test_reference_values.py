"""Both models against values from their reference implementations (see sif_modelbuild.references)."""

import numpy as np
import pytest

from sif_inference import InputLimitError
from sif_inference.errors import ImageDecodeError
from sif_inference.images import decode_image
from sif_modelbuild.testimages import make_test_images


def test_fp32_embeddings_match_pytorch(registry, minilm_reference):
    result = registry.embedder("all-minilm-l6-v2", "fp32").embed(minilm_reference["texts"])
    ref = np.array(minilm_reference["embeddings"], dtype=np.float32)
    assert result.vectors.shape == (6, 384)
    np.testing.assert_allclose(result.vectors, ref, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(result.vectors, axis=1), 1.0, atol=1e-5)


def test_int8_embeddings_stay_close_to_pytorch(registry, minilm_reference):
    result = registry.embedder("all-minilm-l6-v2").embed(minilm_reference["texts"])
    ref = np.array(minilm_reference["embeddings"], dtype=np.float32)
    cos = (result.vectors * ref).sum(1)
    # The build gates 1,000 natural texts at mean 0.995, p1 0.99. Here: five natural texts, two of
    # them short (short texts lose most), and one word repeated up to the 256-token limit, the worst
    # case (7-bit weights, exact on every x86 CPU: 0.9884 for "hello", 0.9728 for the repeated word).
    natural, repeated = cos[:5], cos[5]
    assert natural.min() >= 0.985, cos
    assert natural.mean() >= 0.993, cos
    assert repeated >= 0.97, cos


def test_embeddings_come_back_in_input_order_whatever_the_batching(registry, minilm_reference):
    embedder = registry.embedder("all-minilm-l6-v2", "fp32")
    texts = minilm_reference["texts"]
    order = [3, 0, 5, 1, 4, 2]
    shuffled = embedder.embed([texts[i] for i in order]).vectors
    alone = np.stack([embedder.embed([texts[i]]).vectors[0] for i in order])
    np.testing.assert_allclose(shuffled, alone, atol=1e-5)
    np.testing.assert_allclose(shuffled, np.array(minilm_reference["embeddings"])[order], atol=2e-5)


def test_token_counts_and_truncation_are_reported(registry, minilm_reference):
    result = registry.embedder("all-minilm-l6-v2").embed(minilm_reference["texts"])
    assert result.tokens[1] == 3  # "hello"
    assert result.tokens[5] == 256
    assert result.truncated == [False, False, False, False, False, True]
    assert result.total_tokens == sum(result.tokens)


def test_embedder_limits(registry):
    embedder = registry.embedder("all-minilm-l6-v2")
    with pytest.raises(InputLimitError):
        embedder.check_limits(["x"] * 257)
    with pytest.raises(InputLimitError):
        embedder.check_limits(["x" * 20001])
    embedder.check_limits(["x"] * 256)
    assert embedder.embed([]).vectors.shape == (0, 384)


def test_open_nsfw_scores_match_the_package(registry, nsfw_reference):
    clf = registry.classifier("open-nsfw")
    images = make_test_images()
    scores = clf.classify([data for _, data in images]).scores
    ref = np.array([nsfw_reference["scores"][name] for name, _ in images])
    assert scores.shape == (len(images), 2)
    assert np.abs(scores - ref).max() <= 0.005
    np.testing.assert_allclose(scores.sum(1), 1.0, atol=1e-4)


def test_undecodable_and_oversize_images_are_clear_errors(registry):
    clf = registry.classifier("open-nsfw")
    with pytest.raises(ImageDecodeError, match="cannot decode"):
        clf.decode(b"this is not an image")
    with pytest.raises(ImageDecodeError, match="empty"):
        clf.decode(b"")
    with pytest.raises(InputLimitError, match="bytes"):
        decode_image(b"x" * 101, max_bytes=100, max_pixels=None)
    _, png = make_test_images()[0]  # 320x240
    with pytest.raises(InputLimitError, match="pixels"):
        decode_image(png, max_bytes=None, max_pixels=320 * 240 - 1)


def test_decompression_bomb_is_refused():
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buf, format="PNG")  # 100 Mpx in a few KB
    assert len(buf.getvalue()) < 100_000
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(buf.getvalue(), max_bytes=None, max_pixels=None)
