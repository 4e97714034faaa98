import numpy as np

from sif_inference.pooling import cosine, l2_normalize, mean_pooling


def test_mean_pooling_ignores_padding():
    tokens = np.array([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]], dtype=np.float32)
    mask = np.array([[1, 1, 0]])
    np.testing.assert_allclose(mean_pooling(tokens, mask), [[2.0, 3.0]])


def test_mean_pooling_all_masked_row_is_zero_not_nan():
    out = mean_pooling(np.ones((1, 2, 3), dtype=np.float32), np.zeros((1, 2)))
    assert np.all(out == 0)


def test_l2_normalize_and_cosine():
    v = l2_normalize(np.array([[3.0, 4.0], [0.0, 0.0]]))
    np.testing.assert_allclose(v, [[0.6, 0.8], [0.0, 0.0]])
    np.testing.assert_allclose(cosine(np.array([[1.0, 0.0]]), np.array([[1.0, 1.0]])), [np.sqrt(0.5)], rtol=1e-6)
