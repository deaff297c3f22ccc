"""The numpy reference executor runs a multi-node integer graph exactly as ONNX Runtime does."""

from __future__ import annotations

import weakref
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from optinfer.models import opset
from optinfer.models.opset import OpSemanticsError
from optinfer.models.reference import GraphError, iter_node_outputs, run_graph

INT64_MAX = np.iinfo(np.int64).max
T, K, N, VOCAB = 6, 16, 12, 50


def _const(name: str, value) -> TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def build_model(rng: np.random.Generator, weight: np.ndarray | None = None) -> onnx.ModelProto:
    """A small graph using every op of the op set: a requantised linear layer, a head split,
    max/argmax over a row, a causal mask from Range/Greater, slicing and an embedding lookup."""
    if weight is None:
        weight = rng.integers(-64, 64, size=(K, N), dtype=np.int8)
    initializers = [
        _const("W", weight),
        _const("zp", np.array(128, np.uint8)),
        _const("M", rng.integers(1, 2000, size=N, dtype=np.int64)),
        _const("lo", np.array(-(1 << 20), np.int64)),
        _const("hi", np.array(1 << 20, np.int64)),
        _const("offset", np.array((1 << 20) + (1 << 11), np.int64)),
        _const("unit", np.array(1 << 12, np.int64)),
        _const("heads_shape", np.array([0, 3, -1], np.int64)),
        _const("last_axis", np.array([-1], np.int64)),
        _const("time_axis", np.array([1], np.int64)),
        _const("zero", np.array(0, np.int64)),
        _const("one", np.array(1, np.int64)),
        _const("column", np.array([-1, 1], np.int64)),
        _const("starts", np.array([1], np.int64)),
        _const("ends", np.array([INT64_MAX], np.int64)),
        _const("axis0", np.array([0], np.int64)),
        _const("step2", np.array([2], np.int64)),
        _const("cap", np.arange(N, dtype=np.int32) * 1000 - 6000),
        _const("table", rng.integers(-(2**31), 2**31, size=(VOCAB, N), dtype=np.int32)),
    ]
    node = helper.make_node
    nodes = [
        node("MatMulInteger", ["x", "W", "zp"], ["acc"]),                        # (T, N) int32
        node("Cast", ["acc"], ["acc64"], to=TensorProto.INT64),
        node("Mul", ["acc64", "M"], ["scaled"]),
        node("Clip", ["scaled", "lo", "hi"], ["clipped"]),
        node("Add", ["clipped", "offset"], ["shifted"]),                       # >= 0
        node("Div", ["shifted", "unit"], ["rounded"]),                         # floor = trunc
        node("Cast", ["rounded"], ["q8"], to=TensorProto.UINT8),               # wraps above 255
        node("Reshape", ["q8", "heads_shape"], ["heads"]),                     # (T, 3, 4)
        node("Transpose", ["heads"], ["by_head"], perm=[1, 0, 2]),             # (3, T, 4)
        node("Cast", ["by_head"], ["by_head32"], to=TensorProto.INT32),
        node("ReduceMax", ["by_head32", "last_axis"], ["row_max"], keepdims=1),  # (3, T, 1)
        node("ArgMax", ["by_head32"], ["row_argmax"], axis=-1, keepdims=1),    # (3, T, 1)
        node("GatherElements", ["by_head32", "row_argmax"], ["picked"], axis=-1),
        node("Sub", ["picked", "row_max"], ["zeros"]),
        node("ReduceSum", ["by_head32", "time_axis"], ["head_sums"], keepdims=0),  # (3, 4)
        node("Shape", ["x"], ["x_shape"]),
        node("Gather", ["x_shape", "zero"], ["length"]),                       # scalar T
        node("Range", ["zero", "length", "one"], ["positions"]),               # (T,)
        node("Reshape", ["positions", "column"], ["positions_col"]),           # (T, 1)
        node("Greater", ["positions", "positions_col"], ["future"]),           # (T, T) bool
        node("Cast", ["future"], ["future64"], to=TensorProto.INT64),
        node("Slice", ["acc", "starts", "ends", "axis0", "step2"], ["odd_rows"]),
        node("Concat", ["odd_rows", "odd_rows"], ["doubled"], axis=0),
        node("Min", ["doubled", "cap"], ["capped"]),
        node("Reshape", ["picked", "column"], ["picked_col"]),                 # (3 T, 1)
        node("Slice", ["picked_col", "axis0", "starts", "axis0"], ["picked_one"]),  # (1, 1)
        node("Max", ["capped", "picked_one"], ["floored"]),
        node("Gather", ["table", "tokens"], ["embedded"]),                     # (T, N) int32
        node("Add", ["embedded", "acc"], ["residual"]),                        # wraps
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.UINT8, ["T", K]),
              helper.make_tensor_value_info("tokens", TensorProto.INT64, ["T"])]
    outputs = [helper.make_tensor_value_info(name, elem, None) for name, elem in (
        ("residual", TensorProto.INT32), ("future64", TensorProto.INT64),
        ("zeros", TensorProto.INT32), ("head_sums", TensorProto.INT32),
        ("floored", TensorProto.INT32))]
    graph = helper.make_graph(nodes, "every_op", inputs, outputs, initializer=initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset.ONNX_OPSET)],
                             ir_version=10)


def make_feeds(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"x": rng.integers(0, 256, size=(T, K), dtype=np.uint8),
            "tokens": rng.integers(-VOCAB, VOCAB, size=T, dtype=np.int64)}


def with_every_node_output(model: onnx.ModelProto, dtypes: dict[str, np.dtype]):
    """A copy of the model whose graph outputs are all node outputs, in node order."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    del exposed.graph.output[:]
    for node in model.graph.node:
        name = node.output[0]
        elem = helper.np_dtype_to_tensor_dtype(dtypes[name])
        exposed.graph.output.append(helper.make_tensor_value_info(name, elem, None))
    return exposed


def run_ort_all(model: onnx.ModelProto, feeds, results, threads: int) -> dict[str, np.ndarray]:
    exposed = with_every_node_output(model, {name: v.dtype for name, v in results.items()})
    session = ort.InferenceSession(exposed.SerializeToString(),
                                   opset.deterministic_session_options(threads),
                                   providers=["CPUExecutionProvider"])
    names = [o.name for o in exposed.graph.output]
    return dict(zip(names, session.run(names, feeds), strict=True))


def assert_same_tensors(expected: dict[str, np.ndarray], actual: dict[str, np.ndarray]) -> None:
    assert set(actual) == set(expected)
    for name, value in expected.items():
        other = actual[name]
        assert (other.dtype, other.shape) == (value.dtype, value.shape), name
        assert other.tobytes() == value.tobytes(), name


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(2024)


def test_the_graph_uses_every_op_and_conforms(rng):
    model = build_model(rng)
    assert {n.op_type for n in model.graph.node} == set(opset.OPS)
    assert opset.check_supported(model) == []


@pytest.mark.parametrize("threads", [1, 2])
def test_every_node_output_equals_onnxruntime(rng, threads):
    model = build_model(rng)
    for _ in range(3):
        feeds = make_feeds(rng)
        results = run_graph(model, feeds, keep_all=True)
        node_outputs = [n.output[0] for n in model.graph.node]
        assert list(results) == node_outputs
        assert_same_tensors(results, run_ort_all(model, feeds, results, threads))
    assert not np.any(results["zeros"])  # GatherElements at ArgMax picks each row's max
    assert np.array_equal(results["future64"], np.triu(np.ones((T, T), np.int64), 1))


def test_on_node_sees_nodes_in_order(rng):
    model = build_model(rng)
    feeds = make_feeds(rng)
    seen: list[tuple[int, str, bytes]] = []
    results = run_graph(model, feeds, keep_all=True,
                        on_node=lambda k, node, outputs: seen.append(
                            (k, node.output[0], outputs[0].tobytes())))
    assert [k for k, _, _ in seen] == list(range(1, len(model.graph.node) + 1))
    assert [(name, data) for _, name, data in seen] == [
        (name, value.tobytes()) for name, value in results.items()]
    streamed = [(r.k, r.node.output[0]) for r in iter_node_outputs(model, feeds)]
    assert streamed == [(k, name) for k, name, _ in seen]


def test_only_graph_outputs_are_returned_and_dead_tensors_are_freed(rng):
    model = build_model(rng)
    feeds = make_feeds(rng)
    # "acc64" (node 2) is read only by node 3: by node 4 nobody may hold it any more.
    refs: dict[str, weakref.ref] = {}
    alive_at_node_4: list[bool] = []

    def watch(k, node, outputs):
        if node.output[0] == "acc64":
            refs["acc64"] = weakref.ref(outputs[0])
        if k == 4:
            alive_at_node_4.append(refs["acc64"]() is not None)

    results = run_graph(model, feeds, on_node=watch)
    assert alive_at_node_4 == [False]
    assert list(results) == [o.name for o in model.graph.output]
    everything = run_graph(model, feeds, keep_all=True)
    for name, value in results.items():
        assert value.tobytes() == everything[name].tobytes()

    alive_at_node_4.clear()
    kept = run_graph(model, feeds, on_node=watch, keep_all=True)
    assert alive_at_node_4 == [True] and "acc64" in kept


@pytest.mark.parametrize("load_data", [True, False])
def test_external_data_initializers(rng, tmp_path: Path, load_data):
    model = build_model(rng)
    feeds = make_feeds(rng)
    expected = run_graph(model, feeds, keep_all=True)
    path = tmp_path / "model.onnx"
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="constants.bin", size_threshold=100)
    loaded = onnx.load(path, load_external_data=load_data)
    external = [t for t in loaded.graph.initializer
                if t.data_location == TensorProto.EXTERNAL]
    assert bool(external) != load_data  # the side file is really read by run_graph
    results = run_graph(loaded, feeds, base_dir=tmp_path, keep_all=True)
    assert_same_tensors(expected, results)
    # ONNX Runtime reads the same side file.
    session = ort.InferenceSession(str(path), opset.deterministic_session_options(1),
                                   providers=["CPUExecutionProvider"])
    names = [o.name for o in loaded.graph.output]
    for name, value in zip(names, session.run(names, feeds), strict=True):
        assert value.tobytes() == results[name].tobytes()
    if not load_data:
        with pytest.raises(GraphError, match="base_dir"):
            run_graph(loaded, feeds)


def test_graph_errors(rng):
    model = build_model(rng)
    feeds = make_feeds(rng)
    shuffled = onnx.ModelProto()
    shuffled.CopyFrom(model)
    first = onnx.NodeProto()
    first.CopyFrom(shuffled.graph.node[0])
    del shuffled.graph.node[0]
    shuffled.graph.node.append(first)
    with pytest.raises(GraphError, match="topologically"):
        run_graph(shuffled, feeds)
    with pytest.raises(GraphError, match="no feed"):
        run_graph(model, {"x": feeds["x"]})
    with pytest.raises(GraphError, match="dtype"):
        run_graph(model, {**feeds, "tokens": feeds["tokens"].astype(np.int32)})
    with pytest.raises(GraphError, match="shape"):
        run_graph(model, {**feeds, "x": np.zeros((T, K + 1), np.uint8)})
    with pytest.raises(GraphError, match="no graph inputs"):
        run_graph(model, {**feeds, "extra": np.zeros(1, np.int64)})
    unknown = onnx.ModelProto()
    unknown.CopyFrom(model)
    unknown.graph.node[2].op_type = "Softmax"
    with pytest.raises(GraphError, match="Softmax"):
        run_graph(unknown, feeds)


def test_a_failed_precondition_stops_the_run(rng):
    weight = np.full((K, N), -128, np.int8)  # ORT would saturate u8 x s8 pairs
    with pytest.raises(OpSemanticsError, match=r"\[-64, 63\]"):
        run_graph(build_model(rng, weight), make_feeds(rng))
