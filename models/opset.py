"""The verifiable op set: the exact integer semantics of every ONNX op the integer model may use.

This module is the readable spec. Three implementations must agree on it bit for bit: ONNX
Runtime 1.32 (the fast path), the numpy functions below (the reference, run by
`optinfer.models.reference`), and the Solidity one-step verifier, which recomputes one output
element. Each function's docstring states the semantics; where ONNX Runtime departs from plain
integer arithmetic (saturation, crashes, double-precision shortcuts), the function states a
precondition and raises `OpSemanticsError` when it does not hold, so that no silently different
result can ever be claimed.

Conventions for every function:
- Inputs are numpy arrays; an omitted optional ONNX input is `None`; attributes are keyword
  arguments named and defaulted as in ONNX (opset 21).
- "Broadcasting" means numpy (= ONNX multidirectional) broadcasting.
- Integer arithmetic is two's complement: "wraps" means the exact result reduced modulo 2**w into
  the dtype's range. All listed dtypes are stored little-endian.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto, helper

if TYPE_CHECKING:
    import onnxruntime

#: Version of optinfer's op set (this module's semantics), recorded in model manifests. Bump it
#: whenever any semantics, precondition or allowed dtype below changes.
OPSET_VERSION = 2
#: The ONNX opset of the default domain that integer models import.
ONNX_OPSET = 21

BOOL = np.dtype(np.bool_)
UINT8 = np.dtype(np.uint8)
INT8 = np.dtype(np.int8)
INT32 = np.dtype(np.int32)
INT64 = np.dtype(np.int64)

#: Every dtype a tensor of the model may have.
STORAGE_DTYPES = frozenset({BOOL, UINT8, INT8, INT32, INT64})
#: Dtypes of arithmetic (Add ... ArgMax). ONNX Runtime's CPU kernels for int8/uint8/int16 miss
#: several of these ops, so arithmetic happens in int32/int64 only.
ARITHMETIC_DTYPES = frozenset({INT32, INT64})
#: Gather's and GatherElements' indices (version 2 added int32: a table lookup indexed by an
#: int32 tensor then needs no Cast, which ONNX Runtime runs on one thread).
INDEX_DTYPES = frozenset({INT32, INT64})
#: Shapes, axes and the parameters of Slice and Range.
PARAMETER_DTYPES = frozenset({INT64})

#: ONNX TensorProto element type <-> numpy dtype, for the allowed dtypes only.
ONNX_TO_NUMPY: dict[int, np.dtype] = {
    TensorProto.BOOL: BOOL,
    TensorProto.UINT8: UINT8,
    TensorProto.INT8: INT8,
    TensorProto.INT32: INT32,
    TensorProto.INT64: INT64,
}
NUMPY_TO_ONNX: dict[np.dtype, int] = {dtype: code for code, dtype in ONNX_TO_NUMPY.items()}

#: MatMulInteger's weights must lie in [-64, 63]: x86 without VNNI multiplies u8 x s8 with
#: `vpmaddubsw`, which saturates each pair sum a0*b0 + a1*b1 at int16; 2 * 255 * 64 = 32640 fits.
MATMUL_B_MIN = -64
MATMUL_B_MAX = 63
#: Largest K for which |sum_k (A - zp) * B| <= K * 255 * 64 cannot leave int32.
MATMUL_MAX_K = (2**31 - 1) // (255 * 64)
#: Integers up to 2**53 are exact in double, in which ONNX Runtime's ReduceSum accumulates.
DOUBLE_EXACT_LIMIT = 2**53


class OpSemanticsError(ValueError):
    """An op's precondition does not hold: ONNX Runtime would saturate, crash or round there, so
    no implementation may claim a result."""


def _require(condition: bool | np.bool_, message: str) -> None:
    if not condition:
        raise OpSemanticsError(message)


def _check_dtype(op: str, array: np.ndarray, allowed: frozenset[np.dtype], what: str) -> None:
    _require(
        array.dtype in allowed,
        f"{op}: {what} has dtype {array.dtype}, allowed: {sorted(str(d) for d in allowed)}",
    )


def _check_same_arithmetic_dtype(op: str, *arrays: np.ndarray) -> np.dtype:
    for array in arrays:
        _check_dtype(op, array, ARITHMETIC_DTYPES, "an input")
    dtypes = {array.dtype for array in arrays}
    _require(len(dtypes) == 1, f"{op}: inputs must share one dtype, got {sorted(map(str, dtypes))}")
    return arrays[0].dtype


def _scalar_value(op: str, array: np.ndarray, what: str) -> int:
    """The value of a single-element tensor of rank 0 or 1 (what ONNX Runtime calls a scalar)."""
    _require(array.ndim <= 1 and array.size == 1, f"{op}: {what} must be a single element")
    return int(array.reshape(()))


def _normalize_axis(op: str, axis: int, rank: int) -> int:
    _require(-rank <= axis < rank, f"{op}: axis {axis} out of range for rank {rank}")
    return axis + rank if axis < 0 else axis


def _normalize_indices(op: str, indices: np.ndarray, dim: int) -> np.ndarray:
    """ONNX index rule: an index i in [-dim, dim) means i, or i + dim when negative."""
    _check_dtype(op, indices, INDEX_DTYPES, "indices")
    _require(
        bool(np.all((indices >= -dim) & (indices < dim))),
        f"{op}: an index is outside [-{dim}, {dim})",
    )
    return np.where(indices < 0, indices + dim, indices)


# --------------------------------------------------------------------------- matrix product


def check_matmul_operands(
    a: np.ndarray, b: np.ndarray, a_zero_point: np.ndarray | None = None
) -> None:
    """Raise OpSemanticsError unless MatMulInteger's preconditions hold: A uint8, B int8 with
    every value in [-64, 63], a_zero_point absent or one uint8, 1 <= K <= 131586."""
    _check_dtype("MatMulInteger", a, frozenset({UINT8}), "A")
    _check_dtype("MatMulInteger", b, frozenset({INT8}), "B")
    if a_zero_point is not None:
        _check_dtype("MatMulInteger", a_zero_point, frozenset({UINT8}), "a_zero_point")
        _scalar_value("MatMulInteger", a_zero_point, "a_zero_point")
    _require(a.ndim >= 1 and b.ndim >= 1, "MatMulInteger: operands must have rank >= 1")
    k = a.shape[-1]
    k_of_b = b.shape[0] if b.ndim == 1 else b.shape[-2]
    _require(k == k_of_b, f"MatMulInteger: inner dimensions differ ({k} vs {k_of_b})")
    _require(1 <= k <= MATMUL_MAX_K, f"MatMulInteger: K={k} outside [1, {MATMUL_MAX_K}]")
    if b.size:
        low, high = int(b.min()), int(b.max())
        _require(
            low >= MATMUL_B_MIN and high <= MATMUL_B_MAX,
            f"MatMulInteger: B has values in [{low}, {high}], outside [-64, 63]"
            " (x86 without VNNI would saturate u8 x s8 pair sums)",
        )


def matmul_integer(
    a: np.ndarray, b: np.ndarray, a_zero_point: np.ndarray | None = None
) -> np.ndarray:
    """MatMulInteger(A uint8, B int8, a_zero_point uint8) -> int32.

    Y[..., i, j] = sum_k (A[..., i, k] - zp) * B[..., k, j], exact, where zp is the single
    a_zero_point value (0 when omitted); there is no b_zero_point. Shapes follow numpy matmul:
    a 1-D A is a row, a 1-D B a column (that dimension is dropped from Y), batch dimensions
    broadcast, e.g. (2,3,T,K) x (2,1,K,S) -> (2,3,T,S).
    Preconditions (`check_matmul_operands`): B in [-64, 63] and K <= 131586, so every pair sum
    fits int16 and the total fits int32.
    """
    check_matmul_operands(a, b, a_zero_point)
    zero_point = 0 if a_zero_point is None else _scalar_value("MatMulInteger", a_zero_point, "zp")
    # float64 BLAS is exact here: every product and every partial sum is an integer of magnitude
    # <= K * 255 * 64 < 2**31 < 2**53, so no addition rounds whatever order BLAS picks.
    centered = a.astype(np.float64) - zero_point
    product = np.matmul(centered, b.astype(np.float64))
    return np.asarray(product).astype(INT32)


# --------------------------------------------------------------------------- element-wise


def cast(x: np.ndarray, to: int | np.dtype | type) -> np.ndarray:
    """Cast(to) between bool, uint8, int8, int32, int64.

    Integer to integer keeps the low bits (two's-complement wrap: int32 300 -> uint8 44, int64
    255 -> int8 -1). To bool: x != 0. From bool: 1 or 0. `to` is an ONNX TensorProto element
    type or a numpy dtype.
    """
    target = ONNX_TO_NUMPY.get(to) if isinstance(to, int) else np.dtype(to)
    _require(target in STORAGE_DTYPES, f"Cast: target type {to!r} is not allowed")
    _check_dtype("Cast", x, STORAGE_DTYPES, "input")
    return np.asarray(x.astype(target))


def add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Add(A, B), int32 or int64 (same dtype), broadcasting: A + B, wrapping on overflow."""
    _check_same_arithmetic_dtype("Add", a, b)
    with np.errstate(over="ignore"):
        return np.asarray(np.add(a, b))


def sub(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Sub(A, B), int32 or int64 (same dtype), broadcasting: A - B, wrapping on overflow."""
    _check_same_arithmetic_dtype("Sub", a, b)
    with np.errstate(over="ignore"):
        return np.asarray(np.subtract(a, b))


def mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mul(A, B), int32 or int64 (same dtype), broadcasting: A * B, wrapping on overflow (the low
    32 or 64 bits of the exact product)."""
    _check_same_arithmetic_dtype("Mul", a, b)
    with np.errstate(over="ignore"):
        return np.asarray(np.multiply(a, b))


def div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Div(A, B), int32 or int64 (same dtype), broadcasting: the quotient truncated toward zero,
    as in C (-7 / 2 = -3, 7 / -2 = -3; numpy's // would give -4).

    Preconditions: B != 0 (ONNX Runtime fails the run) and never A = INT_MIN with B = -1 (the
    quotient overflows; ONNX Runtime dies with SIGFPE on x86).
    """
    dtype = _check_same_arithmetic_dtype("Div", a, b)
    _require(not np.any(b == 0), "Div: division by zero")
    int_min = np.iinfo(dtype).min
    _require(
        not np.any((a == int_min) & (b == -1)), f"Div: {int_min} / -1 overflows {dtype}"
    )
    floor = np.floor_divide(a, b)
    # Floor and truncation differ by one exactly when the division is inexact and the operands'
    # signs differ; floor * b cannot overflow because |floor * b| <= |a| in that case.
    inexact = np.multiply(floor, b) != a
    signs_differ = (a < 0) != (b < 0)
    return np.asarray(floor + (inexact & signs_differ).astype(dtype))


def clip(
    x: np.ndarray, low: np.ndarray | None = None, high: np.ndarray | None = None
) -> np.ndarray:
    """Clip(X, min, max), int32 or int64: Y = min(max(X, min), max) element-wise.

    min and max are optional single-element tensors of X's dtype; an omitted bound does not
    apply. When min > max every element becomes max.
    """
    dtype = _check_same_arithmetic_dtype("Clip", x)
    result = x
    if low is not None:
        _check_same_arithmetic_dtype("Clip", x, low)
        result = np.maximum(result, dtype.type(_scalar_value("Clip", low, "min")))
    if high is not None:
        _check_same_arithmetic_dtype("Clip", x, high)
        result = np.minimum(result, dtype.type(_scalar_value("Clip", high, "max")))
    return np.array(result, dtype=dtype)


def min_(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Min(A, B): exactly two inputs, int32 or int64 (same dtype), broadcasting, element-wise
    minimum."""
    _check_same_arithmetic_dtype("Min", a, b)
    return np.asarray(np.minimum(a, b))


def max_(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Max(A, B): exactly two inputs, int32 or int64 (same dtype), broadcasting, element-wise
    maximum."""
    _check_same_arithmetic_dtype("Max", a, b)
    return np.asarray(np.maximum(a, b))


def greater(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Greater(A, B) -> bool: A > B element-wise, int32 or int64 (same dtype), broadcasting."""
    _check_same_arithmetic_dtype("Greater", a, b)
    return np.asarray(np.greater(a, b))


# --------------------------------------------------------------------------- reductions


def _reduced_axes(
    op: str, data: np.ndarray, axes: np.ndarray | None, noop_with_empty_axes: int
) -> tuple[int, ...] | None:
    """The axes to reduce, normalized and sorted; None means "no reduction" (identity)."""
    if axes is None or axes.size == 0:
        return None if noop_with_empty_axes else tuple(range(data.ndim))
    _check_dtype(op, axes, PARAMETER_DTYPES, "axes")
    _require(axes.ndim == 1, f"{op}: axes must be 1-D")
    normalized = sorted(_normalize_axis(op, int(axis), data.ndim) for axis in axes)
    _require(len(set(normalized)) == len(normalized), f"{op}: axes has duplicates")
    return tuple(normalized)


def reduce_sum(
    data: np.ndarray,
    axes: np.ndarray | None = None,
    *,
    keepdims: int = 1,
    noop_with_empty_axes: int = 0,
) -> np.ndarray:
    """ReduceSum(data, axes int64), int32 or int64: exact sum over the listed axes.

    axes: 1-D int64, negative counts from the end, no duplicates; omitted or empty reduces all
    axes, or nothing when noop_with_empty_axes=1. keepdims=1 keeps reduced axes with length 1.
    An empty group sums to 0.
    Preconditions, per output element over its n reduced inputs: n * max|x| <= 2**53, and the
    sum fits the dtype. ONNX Runtime accumulates integers in double and saturates the result,
    so outside these bounds it neither wraps nor is exact.
    """
    _check_same_arithmetic_dtype("ReduceSum", data)
    reduced = _reduced_axes("ReduceSum", data, axes, noop_with_empty_axes)
    if reduced is None:
        return data.copy()
    keep = bool(keepdims)
    group_size = math.prod(data.shape[axis] for axis in reduced)
    if group_size and data.size:
        bound = DOUBLE_EXACT_LIMIT // group_size
        largest = np.max(data, axis=reduced, keepdims=keep)
        smallest = np.min(data, axis=reduced, keepdims=keep)
        _require(
            bool(np.all((largest <= bound) & (smallest >= -bound))),
            f"ReduceSum: a group of {group_size} has an element beyond 2**53 / {group_size}",
        )
    # Exact in int64: by the precondition every partial sum is at most 2**53 in magnitude.
    total = np.sum(data, axis=reduced, keepdims=keep, dtype=np.int64)
    info = np.iinfo(data.dtype)
    _require(
        bool(np.all((total >= info.min) & (total <= info.max))),
        f"ReduceSum: a sum leaves {data.dtype}",
    )
    return np.asarray(total.astype(data.dtype))


def reduce_max(
    data: np.ndarray,
    axes: np.ndarray | None = None,
    *,
    keepdims: int = 1,
    noop_with_empty_axes: int = 0,
) -> np.ndarray:
    """ReduceMax(data, axes int64), int32 or int64: maximum over the listed axes (axes and
    keepdims as in ReduceSum). Precondition: no reduced group is empty."""
    _check_same_arithmetic_dtype("ReduceMax", data)
    reduced = _reduced_axes("ReduceMax", data, axes, noop_with_empty_axes)
    if reduced is None:
        return data.copy()
    _require(
        all(data.shape[axis] > 0 for axis in reduced), "ReduceMax: a reduced axis is empty"
    )
    return np.asarray(np.max(data, axis=reduced, keepdims=bool(keepdims)))


def arg_max(
    data: np.ndarray, *, axis: int = 0, keepdims: int = 1, select_last_index: int = 0
) -> np.ndarray:
    """ArgMax(data) -> int64, int32 or int64 data: the index along `axis` (negative counts from
    the end) of the maximum; ties resolve to the FIRST such index (select_last_index must be 0).
    keepdims=1 keeps the axis with length 1. Precondition: the axis is not empty."""
    _check_same_arithmetic_dtype("ArgMax", data)
    _require(select_last_index == 0, "ArgMax: select_last_index must be 0")
    axis = _normalize_axis("ArgMax", axis, data.ndim)
    _require(data.shape[axis] > 0, "ArgMax: the axis is empty")
    return np.asarray(np.argmax(data, axis=axis, keepdims=bool(keepdims)).astype(INT64))


# --------------------------------------------------------------------------- indexing


def gather(data: np.ndarray, indices: np.ndarray, *, axis: int = 0) -> np.ndarray:
    """Gather(data, indices int32 or int64), any allowed data dtype:
    Y[a..., j..., b...] = data[a..., idx(indices[j...]), b...] where a spans the axes before
    `axis` and b those after; idx(i) = i + dim for negative i. Y's shape is
    data.shape[:axis] + indices.shape + data.shape[axis+1:].
    Precondition: every index in [-dim, dim) (ONNX Runtime fails the run otherwise)."""
    _check_dtype("Gather", data, STORAGE_DTYPES, "data")
    axis = _normalize_axis("Gather", axis, data.ndim)
    positions = _normalize_indices("Gather", indices, data.shape[axis])
    return np.asarray(np.take(data, positions, axis=axis))


def gather_elements(data: np.ndarray, indices: np.ndarray, *, axis: int = 0) -> np.ndarray:
    """GatherElements(data, indices int32 or int64), any allowed data dtype, indices of data's
    rank:
    Y[p] = data[p with p[axis] replaced by idx(indices[p])], Y has indices' shape.
    idx(i) = i + dim for negative i. Preconditions: every index in [-dim, dim) and
    indices.shape[d] <= data.shape[d] for d != axis."""
    _check_dtype("GatherElements", data, STORAGE_DTYPES, "data")
    _require(indices.ndim == data.ndim, "GatherElements: indices and data ranks differ")
    axis = _normalize_axis("GatherElements", axis, data.ndim)
    _require(
        all(indices.shape[d] <= data.shape[d] for d in range(data.ndim) if d != axis),
        "GatherElements: indices is larger than data outside the axis",
    )
    positions = _normalize_indices("GatherElements", indices, data.shape[axis])
    window = tuple(
        slice(None) if d == axis else slice(0, indices.shape[d]) for d in range(data.ndim)
    )
    return np.asarray(np.take_along_axis(data[window], positions, axis=axis))


# --------------------------------------------------------------------------- data movement


def reshape(data: np.ndarray, shape: np.ndarray, *, allowzero: int = 0) -> np.ndarray:
    """Reshape(data, shape int64 1-D), any allowed dtype, row-major element order kept.

    shape[i] = 0 copies data.shape[i] (allowzero must be 0); one entry may be -1 and is
    inferred so that the element count is unchanged; other entries must be positive.
    """
    _check_dtype("Reshape", data, STORAGE_DTYPES, "data")
    _check_dtype("Reshape", shape, PARAMETER_DTYPES, "shape")
    _require(allowzero == 0, "Reshape: allowzero must be 0")
    _require(shape.ndim == 1, "Reshape: shape must be 1-D")
    target = [int(d) for d in shape]
    for i, d in enumerate(target):
        if d == 0:
            _require(i < data.ndim, f"Reshape: shape[{i}] = 0 but data has rank {data.ndim}")
            target[i] = data.shape[i]
        else:
            _require(d >= -1, f"Reshape: shape[{i}] = {d} is invalid")
    _require(target.count(-1) <= 1, "Reshape: more than one -1")
    if -1 in target:
        known = math.prod(d for d in target if d != -1)
        _require(known > 0 and data.size % known == 0, "Reshape: -1 cannot be inferred")
        target[target.index(-1)] = data.size // known
    _require(math.prod(target) == data.size, f"Reshape: {data.shape} cannot become {target}")
    return data.reshape(target)


def transpose(data: np.ndarray, *, perm: Sequence[int] | None = None) -> np.ndarray:
    """Transpose(data), any allowed dtype: Y.shape[i] = data.shape[perm[i]] and
    Y[i_0, ..., i_{r-1}] = data[j] with j[perm[k]] = i_k; perm defaults to reversed axes."""
    _check_dtype("Transpose", data, STORAGE_DTYPES, "data")
    perm = list(reversed(range(data.ndim))) if perm is None else [int(p) for p in perm]
    _require(sorted(perm) == list(range(data.ndim)), f"Transpose: {perm} is not a permutation")
    return np.array(np.transpose(data, perm), order="C")


def concat(*inputs: np.ndarray, axis: int) -> np.ndarray:
    """Concat(inputs..., axis), any allowed dtype (all the same): the inputs joined in order
    along `axis` (negative counts from the end); all other dimensions must match."""
    _require(len(inputs) >= 1, "Concat: no input")
    for array in inputs:
        _check_dtype("Concat", array, STORAGE_DTYPES, "an input")
    _require(len({a.dtype for a in inputs}) == 1, "Concat: inputs must share one dtype")
    _require(len({a.ndim for a in inputs}) == 1, "Concat: inputs must share one rank")
    axis = _normalize_axis("Concat", axis, inputs[0].ndim)
    _require(
        len({a.shape[:axis] + a.shape[axis + 1 :] for a in inputs}) == 1,
        "Concat: dimensions other than the axis differ",
    )
    return np.concatenate(inputs, axis=axis)


#: Ends that ONNX Runtime's Slice special-cases as "through the end in the step's direction".
_ORT_END_SENTINELS = frozenset({2**31 - 1, 2**63 - 1})


def slice_bounds(start: int, end: int, step: int, dim: int) -> tuple[int, int]:
    """Slice's start and end on one axis of length dim, after ONNX's clamping (see slice_)."""
    start = start + dim if start < 0 else start
    end = end + dim if end < 0 else end
    if step > 0:
        return min(max(start, 0), dim), min(max(end, 0), dim)
    return min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)


def slice_(
    data: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
    axes: np.ndarray | None = None,
    steps: np.ndarray | None = None,
) -> np.ndarray:
    """Slice(data, starts, ends, axes, steps), any allowed data dtype, int64 parameters (1-D,
    one entry per sliced axis; axes default 0..n-1 and may be negative, no duplicates; steps
    default 1, never 0). Per sliced axis of length d, with s = start, e = end:
      negative s or e gets + d; then for step > 0: s, e clamped to [0, d];
      for step < 0: s clamped to [0, d-1], e clamped to [-1, d-1].
    The axis keeps indices s, s+step, ... while < e (step > 0) or > e (step < 0). So
    INT64_MAX as an end means "to the end", INT64_MIN with a negative step "to the start".
    Precondition: with a negative step, no end is INT32_MAX or INT64_MAX (ONNX Runtime reads
    these as "to the start", the ONNX text as "clamp to d-1"); use INT64_MIN there.
    """
    _check_dtype("Slice", data, STORAGE_DTYPES, "data")
    count = starts.size
    if axes is None:
        axes = np.arange(count, dtype=INT64)
    if steps is None:
        steps = np.ones(count, dtype=INT64)
    for name, array in (("starts", starts), ("ends", ends), ("axes", axes), ("steps", steps)):
        _check_dtype("Slice", array, PARAMETER_DTYPES, name)
        _require(array.ndim == 1 and array.size == count, f"Slice: {name} must be 1-D of {count}")
    window = [slice(None)] * data.ndim
    seen: set[int] = set()
    for start, end, axis, step in zip(
        starts.tolist(), ends.tolist(), axes.tolist(), steps.tolist(), strict=True
    ):
        axis = _normalize_axis("Slice", axis, data.ndim)
        _require(axis not in seen, "Slice: axes has duplicates")
        seen.add(axis)
        _require(step != 0, "Slice: a step is 0")
        _require(
            step > 0 or end not in _ORT_END_SENTINELS,
            f"Slice: end {end} with a negative step is ambiguous, use INT64_MIN",
        )
        dim = data.shape[axis]
        start, end = slice_bounds(start, end, step, dim)
        # Python reads a stop of -1 as "the last element"; here it means "past index 0".
        window[axis] = slice(start, end if end >= 0 else None, step) if dim else slice(0, 0)
    return np.array(data[tuple(window)], order="C")


def shape(data: np.ndarray, *, start: int = 0, end: int | None = None) -> np.ndarray:
    """Shape(data) -> int64 1-D, any allowed dtype: data's dimensions[start:end], where a
    negative start/end gets + rank and both are then clamped to [0, rank]."""
    _check_dtype("Shape", data, STORAGE_DTYPES, "data")
    # Python list slicing applies exactly this rule.
    return np.array(data.shape[start:end], dtype=INT64)


def range_(start: np.ndarray, limit: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """Range(start, limit, delta) -> int64 1-D, single-element int64 inputs:
    n = max(ceil((limit - start) / delta), 0) computed exactly (no int64 overflow in the
    difference), Y[i] = start + i * delta. Precondition: delta != 0."""
    values = []
    for name, array in (("start", start), ("limit", limit), ("delta", delta)):
        _check_dtype("Range", array, PARAMETER_DTYPES, name)
        values.append(_scalar_value("Range", array, name))
    first, last, step = values
    _require(step != 0, "Range: delta is 0")
    count = max(-((first - last) // step), 0)  # exact ceil((last - first) / step)
    return np.arange(count, dtype=INT64) * step + first


# --------------------------------------------------------------------------- fan-in

#: fan-in function: (node, input shapes, input dtypes, constant input values or None) -> bytes
FanIn = Callable[
    [
        onnx.NodeProto,
        Sequence[tuple[int, ...] | None],
        Sequence[np.dtype | None],
        Sequence[np.ndarray | None],
    ],
    int,
]


def _attribute(node: onnx.NodeProto, name: str, default: object) -> object:
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _one_element_of_each_input(node, shapes, dtypes, values) -> int:
    return sum(dtype.itemsize for dtype in dtypes if dtype is not None)


def _one_element_of_first_input(node, shapes, dtypes, values) -> int:
    return dtypes[0].itemsize


def _matmul_fan_in(node, shapes, dtypes, values) -> int:
    k = shapes[0][-1]
    has_zero_point = len(dtypes) > 2 and dtypes[2] is not None
    return k * (UINT8.itemsize + INT8.itemsize) + (UINT8.itemsize if has_zero_point else 0)


def _reduce_fan_in(node, shapes, dtypes, values) -> int:
    data_shape = shapes[0]
    axes = values[1] if len(values) > 1 else None
    has_axes_input = len(shapes) > 1 and shapes[1] is not None and math.prod(shapes[1]) > 0
    if has_axes_input and axes is None:
        # The axes are not known statically: the whole tensor is a safe upper bound.
        return math.prod(data_shape) * dtypes[0].itemsize
    if not has_axes_input:
        if _attribute(node, "noop_with_empty_axes", 0):
            return dtypes[0].itemsize
        return math.prod(data_shape) * dtypes[0].itemsize
    rank = len(data_shape)
    reduced = {int(a) + rank if int(a) < 0 else int(a) for a in np.asarray(axes).reshape(-1)}
    return math.prod(data_shape[a] for a in reduced) * dtypes[0].itemsize


def _arg_max_fan_in(node, shapes, dtypes, values) -> int:
    axis = int(_attribute(node, "axis", 0))
    return shapes[0][axis] * dtypes[0].itemsize


def _gather_fan_in(node, shapes, dtypes, values) -> int:
    return dtypes[0].itemsize + dtypes[1].itemsize


def _shape_fan_in(node, shapes, dtypes, values) -> int:
    # Shape reads no element of its input: its output is a function of the input's shape alone,
    # which every tensor commitment binds, so it needs no input bytes.
    return 0


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class OpSpec:
    """One op of the verifiable op set.

    function: the numpy reference, called as function(*inputs, **attributes) with None for an
    omitted optional input. input_dtypes: allowed dtypes per input position (with `variadic`,
    the last entry covers all further inputs). required_inputs / max_inputs: how many inputs
    must / may be present. attributes: accepted attribute names, each mapped to its allowed
    values or None for any value. same_dtype: input positions that must share one dtype.
    """

    op_type: str
    function: Callable[..., np.ndarray]
    input_dtypes: tuple[frozenset[np.dtype], ...]
    required_inputs: int
    fan_in: FanIn
    attributes: Mapping[str, frozenset | None] = field(default_factory=dict)
    same_dtype: tuple[int, ...] = ()
    variadic: bool = False

    @property
    def max_inputs(self) -> int | None:
        return None if self.variadic else len(self.input_dtypes)

    def allowed_dtypes(self, position: int) -> frozenset[np.dtype]:
        return self.input_dtypes[min(position, len(self.input_dtypes) - 1)]

    def fan_in_bytes(
        self,
        node: onnx.NodeProto,
        input_shapes: Sequence[tuple[int, ...]],
        input_dtypes: Sequence[np.dtype],
        input_values: Sequence[np.ndarray | None] | None = None,
    ) -> int:
        """Bytes of input that one output element depends on (constant shape/axes/bounds
        parameters aside for data movement; see docs/opset.md). Shapes and dtypes are given
        per node input in order, None for an omitted optional input; input_values holds the
        values of constant inputs where known (ReduceSum/ReduceMax need their axes, else the
        whole input is assumed, a safe upper bound)."""
        values = list(input_values) if input_values is not None else [None] * len(input_shapes)
        shapes = [None if s is None else tuple(s) for s in input_shapes]
        dtypes = [None if d is None else np.dtype(d) for d in input_dtypes]
        return self.fan_in(node, shapes, dtypes, values)


_ARITH = ARITHMETIC_DTYPES
_ANY = STORAGE_DTYPES
_IDX = INDEX_DTYPES
_PARAM = PARAMETER_DTYPES
_BINARY = {"input_dtypes": (_ARITH, _ARITH), "required_inputs": 2, "same_dtype": (0, 1)}
_REDUCE_ATTRIBUTES = {"keepdims": frozenset({0, 1}), "noop_with_empty_axes": frozenset({0, 1})}
_ONNX_CODES = frozenset(ONNX_TO_NUMPY)

OPS: dict[str, OpSpec] = {
    spec.op_type: spec
    for spec in (
        OpSpec("MatMulInteger", matmul_integer, (frozenset({UINT8}), frozenset({INT8}),
               frozenset({UINT8})), 2, _matmul_fan_in),
        OpSpec("Cast", cast, (_ANY,), 1, _one_element_of_each_input,
               attributes={"to": _ONNX_CODES, "saturate": None}),
        OpSpec("Add", add, fan_in=_one_element_of_each_input, **_BINARY),
        OpSpec("Sub", sub, fan_in=_one_element_of_each_input, **_BINARY),
        OpSpec("Mul", mul, fan_in=_one_element_of_each_input, **_BINARY),
        OpSpec("Div", div, fan_in=_one_element_of_each_input, **_BINARY),
        OpSpec("Min", min_, fan_in=_one_element_of_each_input, **_BINARY),
        OpSpec("Max", max_, fan_in=_one_element_of_each_input, **_BINARY),
        OpSpec("Greater", greater, fan_in=_one_element_of_each_input, **_BINARY),
        OpSpec("Clip", clip, (_ARITH, _ARITH, _ARITH), 1, _one_element_of_each_input,
               same_dtype=(0, 1, 2)),
        OpSpec("ReduceSum", reduce_sum, (_ARITH, _PARAM), 1, _reduce_fan_in,
               attributes=_REDUCE_ATTRIBUTES),
        OpSpec("ReduceMax", reduce_max, (_ARITH, _PARAM), 1, _reduce_fan_in,
               attributes=_REDUCE_ATTRIBUTES),
        OpSpec("ArgMax", arg_max, (_ARITH,), 1, _arg_max_fan_in,
               attributes={"axis": None, "keepdims": frozenset({0, 1}),
                           "select_last_index": frozenset({0})}),
        OpSpec("Gather", gather, (_ANY, _IDX), 2, _gather_fan_in, attributes={"axis": None}),
        OpSpec("GatherElements", gather_elements, (_ANY, _IDX), 2, _gather_fan_in,
               attributes={"axis": None}),
        OpSpec("Reshape", reshape, (_ANY, _PARAM), 2, _one_element_of_first_input,
               attributes={"allowzero": frozenset({0})}),
        OpSpec("Transpose", transpose, (_ANY,), 1, _one_element_of_first_input,
               attributes={"perm": None}),
        OpSpec("Concat", concat, (_ANY,), 1, _one_element_of_first_input,
               attributes={"axis": None}, same_dtype=(0,), variadic=True),
        OpSpec("Slice", slice_, (_ANY, _PARAM, _PARAM, _PARAM, _PARAM), 3,
               _one_element_of_first_input),
        OpSpec("Shape", shape, (_ANY,), 1, _shape_fan_in,
               attributes={"start": None, "end": None}),
        OpSpec("Range", range_, (_PARAM, _PARAM, _PARAM), 3, _one_element_of_each_input,
               same_dtype=(0, 1, 2)),
    )
}

#: Frozen order of the ops; an op's code in node descriptions is its 1-based position here.
#: Append only: reordering changes every model root (and must bump OPSET_VERSION).
OP_ORDER: tuple[str, ...] = (
    "MatMulInteger", "Cast", "Add", "Sub", "Mul", "Div", "Min", "Max", "Greater", "Clip",
    "ReduceSum", "ReduceMax", "ArgMax", "Gather", "GatherElements", "Reshape", "Transpose",
    "Concat", "Slice", "Shape", "Range",
)


# --------------------------------------------------------------------------- model checks


def _dtype_name(elem_type: int) -> str:
    try:
        return TensorProto.DataType.Name(elem_type)
    except ValueError:
        return str(elem_type)


def _is_float(elem_type: int) -> bool:
    name = _dtype_name(elem_type)
    return "FLOAT" in name or "DOUBLE" in name


def _without_large_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` for shape inference, cheap even for a model of several GB: large
    initializers become typed graph inputs; the small ones (shapes, axes) keep their values."""
    graph = model.graph
    small, stand_ins = [], []
    for tensor in graph.initializer:
        if math.prod(tensor.dims) <= 4096:
            small.append(tensor)
        else:
            stand_ins.append(helper.make_tensor_value_info(tensor.name, tensor.data_type,
                                                           list(tensor.dims)))
    initialized = {t.name for t in graph.initializer}
    inputs = [v for v in graph.input if v.name not in initialized] + stand_ins
    light_graph = helper.make_graph(list(graph.node), graph.name, inputs, list(graph.output),
                                    initializer=small, value_info=list(graph.value_info))
    return helper.make_model(light_graph, opset_imports=list(model.opset_import),
                             ir_version=model.ir_version)


def _declared_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type per tensor name, from the graph's declarations plus ONNX shape inference
    where it succeeds (on a failure the declarations alone are used)."""
    graph = model.graph
    try:
        inferred = onnx.shape_inference.infer_shapes(_without_large_constants(model)).graph
    except Exception:  # noqa: BLE001 - inference only adds information
        inferred = graph
    types: dict[str, int] = {}
    for value in [*inferred.value_info, *graph.value_info, *graph.input, *graph.output]:
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
            types[value.name] = value.type.tensor_type.elem_type
    for tensor in graph.initializer:
        types[tensor.name] = tensor.data_type
    return types


def check_supported(model: onnx.ModelProto) -> list[str]:
    """Human-readable violations of the op set in `model`; empty when it conforms.

    Checks: the default-domain opset is 21 and no other domain is used; every node's op is in
    OPS with an accepted input count, attribute names and values (Cast targets included);
    input dtypes where statically known (declared or inferred), including same-dtype groups;
    no float (or otherwise disallowed) dtype on any initializer, graph input or output or
    value_info; no sparse initializer; nodes in topological order.
    """
    violations: list[str] = []
    graph = model.graph
    default_opsets = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if default_opsets != [ONNX_OPSET]:
        violations.append(f"default-domain opset is {default_opsets}, expected [{ONNX_OPSET}]")

    def check_tensor_type(kind: str, name: str, elem_type: int) -> None:
        if elem_type not in ONNX_TO_NUMPY:
            what = "float tensor" if _is_float(elem_type) else "disallowed dtype"
            violations.append(f"{what}: {kind} {name!r} has type {_dtype_name(elem_type)}")

    for tensor in graph.initializer:
        check_tensor_type("initializer", tensor.name, tensor.data_type)
    for tensor in graph.sparse_initializer:
        violations.append(f"sparse initializer {tensor.values.name!r} is not supported")
    for kind, values in (("input", graph.input), ("output", graph.output),
                         ("value_info", graph.value_info)):
        for value in values:
            if not value.type.HasField("tensor_type"):
                violations.append(f"{kind} {value.name!r} is not a tensor")
            elif value.type.tensor_type.elem_type:
                check_tensor_type(kind, value.name, value.type.tensor_type.elem_type)

    types = _declared_types(model)
    available = {v.name for v in graph.input} | {t.name for t in graph.initializer} | {""}
    for k, node in enumerate(graph.node, start=1):
        label = f"node {k} {node.op_type} {node.name!r}"
        missing = [name for name in node.input if name not in available]
        if missing:
            violations.append(f"{label}: reads {missing} before they are produced")
        available.update(node.output)
        spec = OPS.get(node.op_type)
        if node.domain not in ("", "ai.onnx") or spec is None:
            violations.append(f"{label}: op {node.domain or 'ai.onnx'}.{node.op_type} is not in "
                              "the op set")
            continue
        violations.extend(f"{label}: {problem}" for problem in _check_node(spec, node, types))
    return violations


def _check_node(spec: OpSpec, node: onnx.NodeProto, types: Mapping[str, int]) -> list[str]:
    problems: list[str] = []
    inputs = list(node.input)
    while inputs and not inputs[-1]:
        inputs.pop()  # trailing empty names are omitted optional inputs
    if len(inputs) < spec.required_inputs or any(not n for n in inputs[: spec.required_inputs]):
        problems.append(f"needs {spec.required_inputs} inputs, has {len(inputs)}")
    if spec.max_inputs is not None and len(inputs) > spec.max_inputs:
        problems.append(f"takes at most {spec.max_inputs} inputs, has {len(inputs)}")
    if len(node.output) != 1:
        problems.append(f"must have exactly one output, has {len(node.output)}")
    for attribute in node.attribute:
        if attribute.name not in spec.attributes:
            problems.append(f"attribute {attribute.name!r} is not supported")
            continue
        allowed = spec.attributes[attribute.name]
        value = helper.get_attribute_value(attribute)
        if allowed is not None and value not in allowed:
            shown = _dtype_name(value) if attribute.name == "to" else value
            problems.append(f"attribute {attribute.name}={shown} is not allowed")
    positions = [p for p, name in enumerate(inputs) if name and name in types]
    for position in positions:
        dtype = ONNX_TO_NUMPY.get(types[inputs[position]])
        if dtype is None:
            continue  # reported as a disallowed tensor dtype already, or untyped
        if dtype not in spec.allowed_dtypes(position):
            problems.append(f"input {position} ({inputs[position]!r}) has disallowed dtype {dtype}")
    group = [p for p in positions if spec.variadic or p in spec.same_dtype]
    if spec.same_dtype and len({types[inputs[p]] for p in group}) > 1:
        problems.append("inputs that must share one dtype differ")
    return problems


def deterministic_session_options(
    intra_op_num_threads: int = 1,
) -> onnxruntime.SessionOptions:
    """ONNX Runtime settings under which the integer graph runs as specified: graph
    optimizations off (no fusion or constant folding rewrites the frozen graph), sequential
    execution, a fixed intra-op thread count (integer results do not depend on it; the tests
    run 1 and 2). Use with providers=["CPUExecutionProvider"]."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = intra_op_num_threads
    options.inter_op_num_threads = 1
    return options
