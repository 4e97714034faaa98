"""KServe v2 tensors <-> numpy (sif_api.tensors) and model references in paths: pure functions, no network."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from sif_api import tensors
from sif_api.catalog import model_ref, one_variant
from sif_api.schemas import MAX_TENSOR_DIM, V2RequestInput
from sif_inference.errors import BadInputError, BadModelRefError, InputLimitError
from sif_inference.manifest import TensorSpec


def tensor(**fields: object) -> V2RequestInput:
    return V2RequestInput.model_validate({"name": "x", "shape": [2, 2], "datatype": "FP32", **fields})


def test_decode_takes_flat_or_nested_data_row_major() -> None:
    flat = tensors.decode(tensor(data=[1, 2.5, 3, 4]))
    nested = tensors.decode(tensor(data=[[1, 2.5], [3, 4]]))
    assert flat.dtype == np.float32 and flat.shape == (2, 2)
    np.testing.assert_array_equal(flat, nested)
    assert tensors.decode(tensor(datatype="INT64", data=[1, 2, 3, 4])).dtype == np.int64
    assert tensors.decode(tensor(datatype="BOOL", shape=[1], data=[True])).tolist() == [True]
    assert tensors.flatten([[[1], [2]], [[3], [4]]]) == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"data": [1, 2, 3]}, "has 4 elements, data has 3"),
        ({"data": [1, 2, 3, "4"]}, "must be FP32 values"),
        ({"data": [1, 2, 3, True]}, "must be FP32 values"),
        ({"datatype": "INT32", "data": [1, 2, 3, 4.5]}, "must be INT32 values"),
        ({"datatype": "UINT8", "data": [1, 2, 3, 300]}, "does not fit UINT8"),
        ({"datatype": "BYTES", "data": ["a", "b", "c", 4]}, "must be strings"),
    ],
)
def test_decode_refuses_data_that_does_not_fit(fields: dict, message: str) -> None:
    with pytest.raises(BadInputError, match=message):
        tensors.decode(tensor(**fields))


def test_decode_bounds_the_elements() -> None:
    with pytest.raises(InputLimitError):
        tensors.decode(tensor(shape=[1 << 20, 1 << 20], data=[]))


def test_an_axis_past_the_bound_is_refused_and_an_empty_tensor_decodes() -> None:
    # schemathesis' fuzzing sent shape [4e34, 0]: 0 elements, and numpy's reshape overflowed (a 500)
    with pytest.raises(ValidationError):
        tensor(shape=[39822791473485222057891929700433920, 0], data=[])
    # and an input with no elements is a 400: onnxruntime aborted the process on an empty iris batch (a 502)
    for shape in ([MAX_TENSOR_DIM, 0], [0], [0, 4]):
        with pytest.raises(BadInputError, match="has no elements"):
            tensors.decode(tensor(shape=shape, data=[]))


def test_graph_types_in_v2_and_tf_serving_names() -> None:
    spec = TensorSpec(name="input:0", dtype="tensor(float)", shape=["batch", 224, 224, 3])
    assert tensors.v2_metadata(spec).model_dump() == {"name": "input:0", "datatype": "FP32", "shape": [-1, 224, 224, 3]}
    info = tensors.tf_tensor_info(TensorSpec(name="ids", dtype="int64", shape=[None, 8]))
    assert info.dtype == "DT_INT64" and [d.size for d in info.tensor_shape.dim] == ["-1", "8"]
    assert not tensors.is_tensor(TensorSpec(name="probs", dtype="seq(map(int64,tensor(float)))"))
    with pytest.raises(BadInputError, match="datatype FP64; the model takes FP32"):
        tensors.check_datatype(tensor(datatype="FP64", data=[0, 0, 0, 0]), spec)


def test_encode_gives_datatype_shape_and_flat_data() -> None:
    out = tensors.encode("y", np.arange(6, dtype=np.float32).reshape(2, 3))
    assert (out.datatype, out.shape, out.data) == ("FP32", [2, 3], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    assert tensors.encode("b", np.array([True, False])).datatype == "BOOL"
    assert tensors.encode("s", np.array(["a", "b"], dtype=object)).data == ["a", "b"]


def test_texts_are_one_bytes_input() -> None:
    texts = V2RequestInput(name="text", shape=[2], datatype="BYTES", data=["a", "b"])
    assert tensors.texts([texts]) == ["a", "b"]
    with pytest.raises(BadInputError, match="one BYTES input"):
        tensors.texts([tensor(data=[0, 0, 0, 0])])


def test_model_refs_in_paths_and_one_variant() -> None:
    assert (
        model_ref("m", version="2") == "m@2" and model_ref("m", alias="canary") == "m@canary" and model_ref("m") == "m"
    )
    for bad in [{"version": "x"}, {"version": "0"}, {"alias": "2"}, {"alias": "Bad!"}]:
        with pytest.raises(BadModelRefError):
            model_ref("m", **bad)
    with pytest.raises(BadModelRefError):
        model_ref("m@1", version="2")
    assert one_variant(None, "fp32", "fp32") == "fp32" and one_variant(None, None) is None
    with pytest.raises(Exception, match="two variants"):
        one_variant("int8", "fp32")
