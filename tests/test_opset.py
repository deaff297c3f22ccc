"""Every op of the verifiable op set: the numpy reference equals ONNX Runtime bit for bit.

Each case runs a one-node ONNX model on onnxruntime (optimizations off, sequential, 1 and 2
intra-op threads, CPU provider) and the op's numpy function, and demands the same dtype, shape
and bytes. Inputs mix uniform values with the dtype's extremes; the precondition cases check
that the reference refuses what ONNX Runtime would get wrong.
"""

from __future__ import annotations

import itertools
import platform
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from optinfer.models import opset
from optinfer.models.opset import OPS, OpSemanticsError

INT64_MAX = np.iinfo(np.int64).max
INT64_MIN = np.iinfo(np.int64).min
ARITH = [np.int32, np.int64]
STORAGE = [np.bool_, np.uint8, np.int8, np.int32, np.int64]
BROADCAST_SHAPES = [((3, 4), (3, 4)), ((2, 3, 4), (4,)), ((2, 1, 4), (1, 3, 1)), ((), (5,)),
                    ((1,), (2, 3)), ((3, 1), ())]


# ------------------------------------------------------------------------------ helpers


def one_node_model(op_type: str, inputs: list[np.ndarray | None], output_dtype: np.dtype,
                   **attributes) -> onnx.ModelProto:
    """A model whose graph inputs feed one node; None marks an omitted optional input."""
    names = ["" if x is None else f"in{i}" for i, x in enumerate(inputs)]
    graph_inputs = [
        helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(x.dtype), x.shape)
        for name, x in zip(names, inputs, strict=True) if x is not None
    ]
    output = helper.make_tensor_value_info(
        "out", helper.np_dtype_to_tensor_dtype(np.dtype(output_dtype)), None)
    node = helper.make_node(op_type, names, ["out"], **attributes)
    graph = helper.make_graph([node], f"one_{op_type}", graph_inputs, [output])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset.ONNX_OPSET)],
                             ir_version=10)


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray], threads: int) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(),
                                   opset.deterministic_session_options(threads),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def assert_identical(expected: np.ndarray, actual: np.ndarray) -> None:
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.tobytes() == expected.tobytes(), f"\nexpected {expected}\nactual   {actual}"


def check_against_ort(op_type: str, *inputs: np.ndarray | None, **attributes) -> np.ndarray:
    """Run the reference and ONNX Runtime (1 and 2 threads) on the same inputs; they must agree."""
    expected = OPS[op_type].function(*inputs, **attributes)
    assert isinstance(expected, np.ndarray)
    model = one_node_model(op_type, list(inputs), expected.dtype, **attributes)
    feeds = {f"in{i}": x for i, x in enumerate(inputs) if x is not None}
    for threads in (1, 2):
        assert_identical(expected, run_ort(model, feeds, threads))
    return expected


def mixed_ints(rng: np.random.Generator, dtype, shape, low=None, high=None) -> np.ndarray:
    """Uniform values in [low, high] (default: the whole dtype), a third replaced by the
    range's edges (min, min+1, -1, 0, 1, max-1, max where inside)."""
    info = np.iinfo(dtype)
    low = info.min if low is None else low
    high = info.max if high is None else high
    values = rng.integers(low, high, size=shape, dtype=dtype, endpoint=True)
    edges = np.array([e for e in (low, low + 1, -1, 0, 1, high - 1, high) if low <= e <= high],
                     dtype=dtype)
    use_edge = rng.random(shape) < 0.35
    return np.where(use_edge, rng.choice(edges, size=shape), values).astype(dtype)


def random_tensor(rng: np.random.Generator, dtype, shape) -> np.ndarray:
    if np.dtype(dtype) == np.bool_:
        return np.asarray(rng.random(shape) < 0.5)
    return mixed_ints(rng, dtype, shape)


def seed_of(*parts) -> int:
    """A seed that is stable across runs (str hashes are salted per process)."""
    return zlib.crc32(repr(parts).encode())


def i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


# ------------------------------------------------------------------------------ registry


def test_ops_registry_is_the_documented_op_set():
    assert set(OPS) == {
        "MatMulInteger", "Cast", "Add", "Sub", "Mul", "Div", "Clip", "Min", "Max", "Greater",
        "ReduceSum", "ReduceMax", "ArgMax", "Gather", "GatherElements", "Reshape", "Transpose",
        "Concat", "Slice", "Shape", "Range",
    }
    assert set(opset.OP_ORDER) == set(OPS) and len(opset.OP_ORDER) == len(OPS)
    assert (opset.OPSET_VERSION, opset.ONNX_OPSET) == (2, 21)
    for op_type, spec in OPS.items():
        assert spec.op_type == op_type
        assert spec.function.__doc__ and op_type in spec.function.__doc__


def test_bit_shift_is_unsigned_only_so_the_op_set_rounds_with_div():
    allowed = {t for c in onnx.defs.get_schema("BitShift", opset.ONNX_OPSET).type_constraints
               for t in c.allowed_type_strs}
    assert allowed == {"tensor(uint8)", "tensor(uint16)", "tensor(uint32)", "tensor(uint64)"}
    assert "BitShift" not in OPS


# ------------------------------------------------------------------------------ MatMulInteger


@pytest.mark.parametrize(("a_shape", "b_shape"), [
    ((3, 16), (16, 5)), ((2, 3, 4, 7), (2, 1, 7, 6)), ((7,), (7, 3)), ((4, 7), (7,)),
    ((5, 6), (2, 6, 3)), ((1, 3, 2, 9), (9, 4)),
])
@pytest.mark.parametrize("zero_point", [None, np.array(128, np.uint8), np.array([7], np.uint8)])
def test_matmul_integer_matches_ort(a_shape, b_shape, zero_point):
    rng = np.random.default_rng(seed_of(a_shape, b_shape))
    a = mixed_ints(rng, np.uint8, a_shape)
    b = mixed_ints(rng, np.int8, b_shape, -64, 63)
    result = check_against_ort("MatMulInteger", a, b, zero_point)
    zp = 0 if zero_point is None else int(zero_point.reshape(()))
    exact = np.matmul(a.astype(np.int64) - zp, b.astype(np.int64))
    assert np.array_equal(result, exact)


@pytest.mark.parametrize("k", [1, 1536, 8960])
def test_matmul_integer_extreme_values_match_ort(k):
    """A in {0, 255} against B in {-64, 63}: the largest pair sums that cannot saturate."""
    rng = np.random.default_rng(k)
    a = rng.choice(np.array([0, 255], np.uint8), size=(4, k))
    a[0] = 255  # row 0 x column 0 reaches -K * 255 * 64, the most negative possible sum
    b = rng.choice(np.array([-64, 63], np.int8), size=(k, 3))
    b[:, 0] = -64
    for zero_point in (np.array(0, np.uint8), np.array(255, np.uint8)):
        result = check_against_ort("MatMulInteger", a, b, zero_point)
        assert np.array_equal(result, (a.astype(np.int64) - int(zero_point)) @ b)
    assert result.dtype == np.int32


def test_matmul_integer_refuses_b_outside_seven_bits():
    a = np.full((1, 4), 255, np.uint8)
    for bad in (-65, 64, -128, 127):
        with pytest.raises(OpSemanticsError, match=r"\[-64, 63\]"):
            opset.matmul_integer(a, np.full((4, 1), bad, np.int8), np.array(0, np.uint8))
    with pytest.raises(OpSemanticsError):
        opset.matmul_integer(a.astype(np.int8), np.zeros((4, 1), np.int8))
    with pytest.raises(OpSemanticsError, match="zero_point"):
        opset.matmul_integer(a, np.zeros((4, 1), np.int8), np.array([1, 2], np.uint8))


def _cpu_has_vnni() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    return any(flag in flags for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or _cpu_has_vnni(),
                    reason="the int16 pair saturation is specific to x86 without VNNI")
def test_ort_saturates_u8_s8_pairs_without_vnni():
    """Why B is kept to 7 bits: 255 * -128 * 2 does not fit int16 and ORT clamps each pair."""
    a = np.full((1, 64), 255, np.uint8)
    b = np.full((64, 1), -128, np.int8)
    model = one_node_model("MatMulInteger", [a, b], np.int32)
    result = run_ort(model, {"in0": a, "in1": b}, 1)
    assert int(result[0, 0]) == 32 * -32768 != 64 * 255 * -128


# ------------------------------------------------------------------------------ Cast


@pytest.mark.parametrize(("source", "target"), list(itertools.product(STORAGE, STORAGE)))
def test_cast_wraps_like_ort(source, target):
    rng = np.random.default_rng(7)
    edges = np.array([0, 1, -1, 127, 128, -128, -129, 255, 256, 300, 2**31 - 1, -2**31, 2**31,
                      2**32 + 5, INT64_MAX, INT64_MIN], dtype=np.int64)
    values = np.concatenate([edges, random_tensor(rng, np.int64, (40,))])
    x = values.astype(source)  # numpy's own wrap is what is being tested, so compare to ORT
    code = opset.NUMPY_TO_ONNX[np.dtype(target)]
    result = check_against_ort("Cast", x, to=code)
    assert result.dtype == np.dtype(target)


def test_cast_examples():
    assert opset.cast(np.array([300, -1, 255], np.int32), TensorProto.UINT8).tolist() == [
        44, 255, 255]
    assert opset.cast(np.array([255, 128], np.int64), np.int8).tolist() == [-1, -128]
    assert opset.cast(np.array([2**31], np.int64), TensorProto.INT32).tolist() == [-2**31]
    assert opset.cast(np.array([0, 7, -3], np.int8), TensorProto.BOOL).tolist() == [
        False, True, True]
    with pytest.raises(OpSemanticsError):
        opset.cast(np.array([1], np.int32), TensorProto.FLOAT)


# ------------------------------------------------------------------------------ element-wise


@pytest.mark.parametrize("op_type", ["Add", "Sub", "Mul", "Min", "Max", "Greater"])
@pytest.mark.parametrize("dtype", ARITH)
@pytest.mark.parametrize(("shape_a", "shape_b"), BROADCAST_SHAPES)
def test_binary_ops_match_ort(op_type, dtype, shape_a, shape_b):
    rng = np.random.default_rng(seed_of(op_type, shape_a, shape_b))
    a, b = mixed_ints(rng, dtype, shape_a), mixed_ints(rng, dtype, shape_b)
    check_against_ort(op_type, a, b)


@pytest.mark.parametrize("dtype", ARITH)
def test_add_sub_mul_wrap_around(dtype):
    info = np.iinfo(dtype)
    top, bottom = np.array([info.max], dtype), np.array([info.min], dtype)
    one, two = np.array([1], dtype), np.array([2], dtype)
    assert check_against_ort("Add", top, one).tolist() == [info.min]
    assert check_against_ort("Sub", bottom, one).tolist() == [info.max]
    assert check_against_ort("Mul", top, two).tolist() == [-2]
    assert check_against_ort("Mul", bottom, np.array([-1], dtype)).tolist() == [info.min]


@pytest.mark.parametrize("dtype", ARITH)
@pytest.mark.parametrize(("shape_a", "shape_b"), BROADCAST_SHAPES)
def test_div_matches_ort(dtype, shape_a, shape_b):
    rng = np.random.default_rng(seed_of("Div", shape_a, shape_b))
    info = np.iinfo(dtype)
    a = mixed_ints(rng, dtype, shape_a)
    b = mixed_ints(rng, dtype, shape_b)
    # Divisors are never 0, and -1 only meets dividends above INT_MIN (both refused, below).
    b = np.where((b == 0) | (b == -1), dtype(3), b).astype(dtype)
    check_against_ort("Div", a, b)
    small = mixed_ints(rng, dtype, shape_b, -9, 9)
    small = np.where(small == 0, dtype(-7), small).astype(dtype)
    check_against_ort("Div", np.where(a == info.min, dtype(-5), a).astype(dtype), small)


@pytest.mark.parametrize("dtype", ARITH)
def test_div_truncates_toward_zero(dtype):
    a = np.repeat(np.arange(-9, 10), 8).astype(dtype)
    b = np.tile(np.array([-4, -3, -2, -1, 1, 2, 3, 4]), 19).astype(dtype)
    result = check_against_ort("Div", a, b)
    for x, y, q in zip(a.tolist(), b.tolist(), result.tolist(), strict=True):
        assert q == (abs(x) // abs(y)) * (1 if (x < 0) == (y < 0) else -1)
    info = np.iinfo(dtype)
    assert check_against_ort("Div", np.array([info.min], dtype), np.array([2], dtype)).tolist() \
        == [info.min // 2]
    assert check_against_ort("Div", np.array([info.min], dtype), np.array([info.max], dtype)) \
        .tolist() == [-1]


@pytest.mark.parametrize("dtype", ARITH)
def test_div_by_zero_is_refused_by_both(dtype):
    a, b = np.array([5, 6], dtype), np.array([1, 0], dtype)
    with pytest.raises(OpSemanticsError, match="zero"):
        opset.div(a, b)
    model = one_node_model("Div", [a, b], np.dtype(dtype))
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.Fail, match="division by zero"):
        run_ort(model, {"in0": a, "in1": b}, 1)


@pytest.mark.parametrize("dtype", ARITH)
def test_div_int_min_by_minus_one_is_refused(dtype):
    info = np.iinfo(dtype)
    with pytest.raises(OpSemanticsError, match="overflows"):
        opset.div(np.array([info.min], dtype), np.array([-1], dtype))


@pytest.mark.skipif(sys.platform != "linux" or platform.machine() != "x86_64",
                    reason="the SIGFPE is the x86 idiv trap")
def test_ort_dies_on_int_min_divided_by_minus_one():
    """Why the reference refuses INT_MIN / -1: ONNX Runtime kills the process (SIGFPE)."""
    script = textwrap.dedent("""
        import numpy as np, onnxruntime as ort
        from onnx import helper, TensorProto as T
        g = helper.make_graph([helper.make_node("Div", ["a", "b"], ["y"])], "g",
            [helper.make_tensor_value_info(n, T.INT32, [1]) for n in "ab"],
            [helper.make_tensor_value_info("y", T.INT32, [1])])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
        s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        s.run(None, {"a": np.array([-2**31], np.int32), "b": np.array([-1], np.int32)})
    """)
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert completed.returncode == -8  # SIGFPE


@pytest.mark.parametrize("dtype", ARITH)
@pytest.mark.parametrize(("low", "high"), [(-5, 7), (None, 3), (-2, None), (None, None),
                                           (4, -4), (0, 0), ("min", "max")])
@pytest.mark.parametrize("bound_shape", [(), (1,)])
def test_clip_matches_ort(dtype, low, high, bound_shape):
    info = np.iinfo(dtype)
    rng = np.random.default_rng(11)
    x = np.concatenate([np.arange(-8, 9), mixed_ints(rng, dtype, (20,))]).astype(dtype)
    named = {"min": info.min, "max": info.max}

    def bound(value):
        if value is None:
            return None
        return np.full(bound_shape, named.get(value, value), dtype)

    result = check_against_ort("Clip", x, bound(low), bound(high))
    if low == 4 and high == -4:
        assert np.all(result == -4)  # min > max: everything becomes max


# ------------------------------------------------------------------------------ reductions


def _axes_cases(rank: int) -> list[np.ndarray | None]:
    subsets = [list(c) for r in range(1, rank + 1) for c in itertools.combinations(range(rank), r)]
    cases: list[np.ndarray | None] = [None, i64()]
    for subset in subsets:
        cases.append(i64(*subset))
        cases.append(i64(*[a - rank for a in reversed(subset)]))  # negative, unsorted
    return cases


@pytest.mark.parametrize("op_type", ["ReduceSum", "ReduceMax"])
@pytest.mark.parametrize("dtype", ARITH)
@pytest.mark.parametrize("keepdims", [0, 1])
@pytest.mark.parametrize("noop_with_empty_axes", [0, 1])
def test_reductions_match_ort(op_type, dtype, keepdims, noop_with_empty_axes):
    rng = np.random.default_rng(5)
    # ReduceSum's precondition (n * max|x| <= 2**53, sum fits the dtype) holds at these bounds.
    bound = 2**26 if dtype == np.int32 else 2**46
    data = mixed_ints(rng, dtype, (3, 4, 5), -bound, bound)
    for axes in _axes_cases(data.ndim):
        check_against_ort(op_type, data, axes, keepdims=keepdims,
                          noop_with_empty_axes=noop_with_empty_axes)


@pytest.mark.parametrize("dtype", ARITH)
def test_reduce_max_full_range_and_reduce_sum_at_its_limits(dtype):
    info = np.iinfo(dtype)
    rng = np.random.default_rng(9)
    check_against_ort("ReduceMax", mixed_ints(rng, dtype, (6, 7)), i64(-1))
    # Sums that land exactly on the dtype's edges are still exact.
    if dtype == np.int32:
        edges = np.array([[info.max - 1, 1], [info.min + 1, -1]], dtype)
    else:
        edges = np.array([[2**52, 2**52], [-2**52, -2**52]], dtype)
    check_against_ort("ReduceSum", edges, i64(1), keepdims=0)


def test_reduce_sum_refuses_what_ort_saturates_or_rounds():
    top = np.iinfo(np.int32).max
    overflowing = np.array([top, 1], np.int32)
    with pytest.raises(OpSemanticsError, match="leaves int32"):
        opset.reduce_sum(overflowing, i64(0))
    model = one_node_model("ReduceSum", [overflowing, i64(0)], np.dtype(np.int32), keepdims=0)
    saturated = run_ort(model, {"in0": overflowing, "in1": i64(0)}, 1)
    assert int(saturated) == top  # ONNX Runtime saturates; it does not wrap

    beyond_double = np.array([2**53, 1], np.int64)
    with pytest.raises(OpSemanticsError, match="2\\*\\*53"):
        opset.reduce_sum(beyond_double, i64(0))
    model = one_node_model("ReduceSum", [beyond_double, i64(0)], np.dtype(np.int64), keepdims=0)
    rounded = run_ort(model, {"in0": beyond_double, "in1": i64(0)}, 1)
    assert int(rounded) == 2**53 != 2**53 + 1  # accumulated in double


def test_reduce_max_refuses_an_empty_group():
    empty = np.zeros((2, 0), np.int64)
    with pytest.raises(OpSemanticsError, match="empty"):
        opset.reduce_max(empty, i64(1))
    model = one_node_model("ReduceMax", [empty, i64(1)], np.dtype(np.int64))
    assert run_ort(model, {"in0": empty, "in1": i64(1)}, 1).tolist() == [[INT64_MIN]] * 2
    assert opset.reduce_sum(np.zeros((2, 0), np.int64), i64(1)).tolist() == [[0], [0]]


@pytest.mark.parametrize("dtype", ARITH)
@pytest.mark.parametrize("axis", [0, 1, 2, -1, -3])
@pytest.mark.parametrize("keepdims", [0, 1])
def test_arg_max_matches_ort_and_takes_the_first_tie(dtype, axis, keepdims):
    rng = np.random.default_rng(3)
    ties = rng.integers(0, 3, size=(4, 5, 6)).astype(dtype)  # few values: many ties
    check_against_ort("ArgMax", ties, axis=axis, keepdims=keepdims)
    check_against_ort("ArgMax", mixed_ints(rng, dtype, (4, 5, 6)), axis=axis, keepdims=keepdims)
    info = np.iinfo(dtype)
    row = np.array([info.min, info.max, 7, info.max, info.max], dtype)
    assert check_against_ort("ArgMax", row, axis=0, keepdims=keepdims).tolist() in (1, [1])
    with pytest.raises(OpSemanticsError):
        opset.arg_max(row, select_last_index=1)


# ------------------------------------------------------------------------------ indexing


@pytest.mark.parametrize("dtype", STORAGE)
@pytest.mark.parametrize("axis", [0, 1, 2, -1, -2])
@pytest.mark.parametrize("indices_shape", [(), (3,), (2, 3)])
def test_gather_matches_ort(dtype, axis, indices_shape):
    rng = np.random.default_rng(13)
    data = random_tensor(rng, dtype, (5, 4, 3))
    dim = data.shape[axis]
    indices = rng.integers(-dim, dim, size=indices_shape, dtype=np.int64)  # negatives included
    check_against_ort("Gather", data, indices, axis=axis)


def test_gather_refuses_out_of_range_indices():
    data = np.arange(5, dtype=np.int32)
    assert opset.gather(data, i64(-5, -1, 0, 4)).tolist() == [0, 4, 0, 4]
    for bad in (5, -6):
        with pytest.raises(OpSemanticsError, match="outside"):
            opset.gather(data, i64(bad))
    with pytest.raises(OpSemanticsError, match="indices"):
        opset.gather(data, np.array([1], np.int8))  # indices are int32 or int64


@pytest.mark.parametrize("op", ["Gather", "GatherElements"])
def test_int32_indices_match_ort_and_int64(op):
    # Op-set version 2: a lookup indexed by an int32 tensor needs no Cast to int64.
    rng = np.random.default_rng(19)
    data = random_tensor(rng, np.int32, (6, 5))
    indices = rng.integers(-5, 5, size=(6, 3), dtype=np.int64)
    got = check_against_ort(op, data, indices.astype(np.int32), axis=1)
    np.testing.assert_array_equal(got, opset.OPS[op].function(data, indices, axis=1))


def test_parameters_stay_int64_only():
    with pytest.raises(OpSemanticsError, match="shape"):
        opset.reshape(np.arange(6, dtype=np.int32), np.array([2, 3], np.int32))
    with pytest.raises(OpSemanticsError, match="axes"):
        opset.reduce_sum(np.ones((2, 3), np.int32), np.array([1], np.int32))


@pytest.mark.parametrize("dtype", STORAGE)
@pytest.mark.parametrize("axis", [0, 1, 2, -1])
@pytest.mark.parametrize("indices_shape", [(4, 5, 3), (2, 3, 1), (1, 1, 6)])
def test_gather_elements_matches_ort(dtype, axis, indices_shape):
    rng = np.random.default_rng(17)
    data = random_tensor(rng, dtype, (4, 5, 3))
    axis_index = axis % data.ndim
    shape = [min(n, data.shape[d]) if d != axis_index else n
             for d, n in enumerate(indices_shape)]
    dim = data.shape[axis]
    indices = rng.integers(-dim, dim, size=shape, dtype=np.int64)
    check_against_ort("GatherElements", data, indices, axis=axis)


# ------------------------------------------------------------------------------ data movement


@pytest.mark.parametrize(("data_shape", "target"), [
    ((2, 3, 4), [0, -1]), ((2, 3, 4), [-1]), ((2, 3, 4), [4, 0, 2]), ((2, 3, 4), [0, 0, -1, 1]),
    ((2, 3, 4), [24]), ((2, 3, 4), [2, -1, 2]), ((2, 0, 3), [0, -1]), ((2, 0, 3), [0, 0, 3]),
    ((), [1, 1]), ((6,), [-1, 1, 2]),
])
@pytest.mark.parametrize("dtype", [np.bool_, np.uint8, np.int64])
def test_reshape_matches_ort(data_shape, target, dtype):
    data = random_tensor(np.random.default_rng(1), dtype, data_shape)
    check_against_ort("Reshape", data, i64(*target))


def test_reshape_refuses_bad_shapes():
    data = np.zeros((2, 3), np.int32)
    for bad in ([-1, -1], [4, -1], [0, 0, 0], [-2, 3], [7], [-1, 1, 0]):
        with pytest.raises(OpSemanticsError):
            opset.reshape(data, i64(*bad))
    with pytest.raises(OpSemanticsError):
        opset.reshape(data, i64(0, 3), allowzero=1)


@pytest.mark.parametrize("dtype", STORAGE)
def test_transpose_matches_ort(dtype):
    rng = np.random.default_rng(19)
    data = random_tensor(rng, dtype, (2, 3, 4, 5))
    for perm in itertools.permutations(range(4)):
        check_against_ort("Transpose", data, perm=list(perm))
    check_against_ort("Transpose", data)  # default: reversed axes
    check_against_ort("Transpose", random_tensor(rng, dtype, ()))


@pytest.mark.parametrize("dtype", STORAGE)
@pytest.mark.parametrize("axis", [0, 1, -1, -2])
@pytest.mark.parametrize("count", [1, 2, 3])
def test_concat_matches_ort(dtype, axis, count):
    rng = np.random.default_rng(23)
    inputs = []
    for i in range(count):
        shape = [2, 3]
        shape[axis] = i + 1
        inputs.append(random_tensor(rng, dtype, tuple(shape)))
    check_against_ort("Concat", *inputs, axis=axis)


SLICE_BOUNDS = [INT64_MIN, -100, -7, -6, -5, -1, 0, 1, 2, 4, 5, 6, 7, 100, INT64_MAX]
SLICE_STEPS = [1, 2, 3, -1, -2, -4, INT64_MAX, INT64_MIN]


@pytest.mark.parametrize("dtype", STORAGE)
def test_slice_matches_ort(dtype):
    rng = np.random.default_rng(29)
    data = random_tensor(rng, dtype, (6, 5, 4))
    for case in range(80):
        count = int(rng.integers(1, 4))
        starts = i64(*rng.choice(SLICE_BOUNDS, count))
        ends = i64(*rng.choice(SLICE_BOUNDS, count))
        steps = None if case % 4 == 0 else i64(*rng.choice(SLICE_STEPS, count))
        if steps is not None:  # a negative step with end INT64_MAX is refused (tested below)
            ends = np.where((steps < 0) & (ends == INT64_MAX), INT64_MIN, ends)
        if case % 5 == 0 and steps is None:
            axes = None  # default axes 0..count-1
        else:
            axes = i64(*[a - 3 if rng.random() < 0.5 else a
                         for a in rng.permutation(3)[:count].tolist()])
        check_against_ort("Slice", data, starts, ends, axes, steps)


def test_slice_examples():
    data = np.arange(10, dtype=np.int32)
    assert opset.slice_(data, i64(2), i64(INT64_MAX)).tolist() == list(range(2, 10))
    assert opset.slice_(data, i64(-1), i64(INT64_MIN), i64(0), i64(-3)).tolist() == [9, 6, 3, 0]
    assert opset.slice_(data, i64(100), i64(-100), i64(0), i64(-1)).tolist() == list(
        range(9, -1, -1))
    assert opset.slice_(data, i64(3), i64(3)).tolist() == []
    with pytest.raises(OpSemanticsError, match="step"):
        opset.slice_(data, i64(0), i64(1), i64(0), i64(0))
    for sentinel in (INT64_MAX, 2**31 - 1):
        with pytest.raises(OpSemanticsError, match="ambiguous"):
            opset.slice_(data, i64(5), i64(sentinel), i64(0), i64(-1))
        # Why: ONNX Runtime reads such an end as "to the start", where the ONNX text clamps it
        # to d-1 = 9 and so selects nothing.
        model = one_node_model("Slice", [data, i64(5), i64(sentinel), i64(0), i64(-1)],
                               np.dtype(np.int32))
        feeds = {"in0": data, "in1": i64(5), "in2": i64(sentinel), "in3": i64(0), "in4": i64(-1)}
        assert run_ort(model, feeds, 1).tolist() == [5, 4, 3, 2, 1, 0]
    with pytest.raises(OpSemanticsError, match="duplicates"):
        opset.slice_(np.zeros((2, 2), np.int8), i64(0, 0), i64(1, 1), i64(0, -2))


@pytest.mark.parametrize(("start", "end"), [(None, None), (-2, None), (1, 2), (-100, 100),
                                            (2, 1), (0, -1), (3, None)])
@pytest.mark.parametrize("data_shape", [(2, 3, 4), (), (0, 5)])
def test_shape_matches_ort(start, end, data_shape):
    attributes = {k: v for k, v in (("start", start), ("end", end)) if v is not None}
    result = check_against_ort("Shape", np.zeros(data_shape, np.uint8), **attributes)
    assert result.tolist() == list(data_shape[slice(start, end)])


@pytest.mark.parametrize(("start", "limit", "delta"), [
    (3, 9, 3), (10, 4, -2), (5, 5, 1), (5, 0, 1), (-3, 10, 4), (0, 1, INT64_MAX),
    (7, -8, -5), (-2**52, 2**52 - 1, 2**51), (INT64_MAX - 3, INT64_MAX, 1),
    # Spans beyond 2**53, and beyond int64: the count is still exact.
    (0, 2**60 + 1, 2**59), (0, 2**53 + 1, 2**52), (-2**62, 2**62 + 2**61, 2**62),
    (INT64_MIN, INT64_MAX, 2**62), (INT64_MAX, INT64_MIN, -2**62),
])
@pytest.mark.parametrize("scalar_shape", [(), (1,)])
def test_range_matches_ort(start, limit, delta, scalar_shape):
    def scalar(v):
        return np.full(scalar_shape, v, np.int64)

    result = check_against_ort("Range", scalar(start), scalar(limit), scalar(delta))
    if abs(delta) < 2**40:
        assert result.tolist() == list(range(start, limit, delta))


def test_range_refuses_zero_delta():
    with pytest.raises(OpSemanticsError, match="delta"):
        opset.range_(i64(0), i64(5), i64(0))


# ------------------------------------------------------------------------------ fan-in


def test_fan_in_bytes():
    def fan_in(op_type, shapes, dtypes, values=None, **attributes):
        node = helper.make_node(op_type, [f"x{i}" for i in range(len(shapes))], ["y"],
                                **attributes)
        return OPS[op_type].fan_in_bytes(node, shapes, dtypes, values)

    assert fan_in("MatMulInteger", [(7, 1536), (1536, 8960), ()],
                  [np.uint8, np.int8, np.uint8]) == 1536 * 2 + 1
    assert fan_in("MatMulInteger", [(7, 1536), (1536, 8960)], [np.uint8, np.int8]) == 1536 * 2
    assert fan_in("Add", [(4, 5), (5,)], [np.int32, np.int32]) == 8
    assert fan_in("Greater", [(4,), ()], [np.int64, np.int64]) == 16
    assert fan_in("Cast", [(4,)], [np.int64], to=TensorProto.UINT8) == 8
    assert fan_in("Clip", [(4,), None, ()], [np.int32, None, np.int32]) == 8
    shape = [(256, 1536), (1,)]
    assert fan_in("ReduceSum", shape, [np.int64, np.int64], [None, i64(-1)]) == 1536 * 8
    assert fan_in("ReduceMax", [(2, 3, 4), (2,)], [np.int32, np.int64],
                  [None, i64(0, 2)]) == 8 * 4
    assert fan_in("ReduceSum", shape, [np.int64, np.int64]) == 256 * 1536 * 8  # axes unknown
    assert fan_in("ArgMax", [(1, 151936)], [np.int32], axis=-1) == 151936 * 4
    assert fan_in("Gather", [(151936, 1536), (7,)], [np.uint8, np.int64]) == 1 + 8
    assert fan_in("GatherElements", [(4, 9), (4, 1)], [np.int32, np.int64], axis=1) == 4 + 8
    assert fan_in("Reshape", [(4, 6), (2,)], [np.int32, np.int64]) == 4
    assert fan_in("Concat", [(2, 3), (2, 5)], [np.int64, np.int64], axis=1) == 8
    assert fan_in("Slice", [(6, 5), (1,), (1,)], [np.uint8, np.int64, np.int64]) == 1
    assert fan_in("Shape", [(6, 5)], [np.int8]) == 0
    assert fan_in("Range", [(), (), ()], [np.int64] * 3) == 24


# ------------------------------------------------------------------------------ check_supported


def _model(nodes, inputs, outputs, initializers=(), opset_version=opset.ONNX_OPSET):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset_version)],
                             ir_version=10)


def _vi(name, elem_type=TensorProto.INT32, shape=(4,)):
    return helper.make_tensor_value_info(name, elem_type, list(shape))


def test_check_supported_accepts_a_conforming_graph():
    model = _model([helper.make_node("Add", ["x", "c"], ["y"]),
                    helper.make_node("ArgMax", ["y"], ["z"], axis=0, keepdims=1)],
                   [_vi("x")], [_vi("z", TensorProto.INT64, (1,))],
                   [numpy_helper.from_array(np.arange(4, dtype=np.int32), "c")])
    assert opset.check_supported(model) == []


def _violations(nodes, inputs=None, outputs=None, initializers=(), **kwargs) -> str:
    model = _model(nodes, inputs if inputs is not None else [_vi("x")],
                   outputs if outputs is not None else [_vi("y")], initializers, **kwargs)
    return "\n".join(opset.check_supported(model))


def test_check_supported_reports_violations():
    float_weight = numpy_helper.from_array(np.ones(4, np.float32), "w")
    found = _violations([helper.make_node("Add", ["x", "w"], ["y"])], initializers=[float_weight])
    assert "float tensor: initializer 'w'" in found

    assert "Softmax is not in the op set" in _violations([helper.make_node("Softmax", ["x"],
                                                                           ["y"])])
    assert "float tensor: input 'x'" in _violations([helper.make_node("Cast", ["x"], ["y"],
                                                                      to=TensorProto.INT32)],
                                                    inputs=[_vi("x", TensorProto.FLOAT)])
    assert "to=FLOAT16 is not allowed" in _violations(
        [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT16)], outputs=[
            helper.make_tensor_value_info("y", TensorProto.UNDEFINED, None)])
    assert "select_last_index=1" in _violations(
        [helper.make_node("ArgMax", ["x"], ["y"], select_last_index=1)],
        outputs=[_vi("y", TensorProto.INT64, (1,))])
    assert "at most 2 inputs" in _violations([helper.make_node("Min", ["x", "x", "x"], ["y"])])
    assert "opset is [20]" in _violations([helper.make_node("Add", ["x", "x"], ["y"])],
                                          opset_version=20)
    assert "disallowed dtype int8" in _violations(
        [helper.make_node("Add", ["x", "x"], ["y"])], inputs=[_vi("x", TensorProto.INT8)],
        outputs=[_vi("y", TensorProto.INT8)])
    assert "before they are produced" in _violations([helper.make_node("Add", ["x", "t"], ["y"]),
                                                      helper.make_node("Add", ["x", "x"], ["t"])])
    assert _violations([helper.make_node("Transpose", ["x"], ["y"], perm=[0])]) == ""
    assert "allowzero=1 is not allowed" in _violations(
        [helper.make_node("Reshape", ["x", "s"], ["y"], allowzero=1)],
        initializers=[numpy_helper.from_array(np.array([4], np.int64), "s")])
    assert "com.microsoft.Add is not in the op set" in _violations(
        [helper.make_node("Add", ["x", "x"], ["y"], domain="com.microsoft")])
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(np.array([5], np.int32), "v"),
                                       numpy_helper.from_array(np.array([1], np.int64), "i"),
                                       [4])
    sparse_model = _model([helper.make_node("Add", ["x", "v"], ["y"])], [_vi("x")], [_vi("y")])
    sparse_model.graph.sparse_initializer.append(sparse)
    assert any("sparse initializer 'v'" in v for v in opset.check_supported(sparse_model))
    assert "attribute 'alpha'" in _violations([helper.make_node("Transpose", ["x"], ["y"],
                                                                alpha=1.0)])
