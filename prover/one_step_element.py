"""One element of one node from opened values: the pure layer of the one-step.

`parse_node_description` decodes a node's committed description, `element_dependencies` names
the input element ranges one output element needs, `recompute_element` computes the element
from those opened values alone (the exact integer semantics of `optinfer.models.opset`), and
`expected_output` gives the dtype and shape the node's output must have. Functions of a node
and opened values, no I/O. A complete submission and the contract's checks of it are in
`optinfer.prover.one_step` (`Witness`, `check_witness`); building a witness from a converted
model and a trace in `optinfer.prover.one_step_prover`.

Openings never depend on anything but the node, the element index, the opened tensors' shapes
and values opened before them: parameters (Reshape's shape, reduction axes, Slice's
starts/ends/axes/steps, Range's scalars, Clip's bounds, the zero point) are opened in full;
Gather and GatherElements first open their index element, then the data element it selects;
Slice opens its parameters, then the data element. `element_dependencies` therefore takes the
values known so far and returns every opening it can determine; calling it again with the
values of those openings gives the rest (two rounds at most: parameters or Gather's index
first, the data second).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from optinfer.models import opset
from optinfer.models.manifest import ATTRIBUTE_CODES, INPUT_ABSENT, INPUT_CONSTANT, INPUT_LEAF
from optinfer.prover import commitments
from optinfer.prover.commitments import ProofError

#: Layout of an opening: the tensor's own C order, or (MatMulInteger's B only) the rows of its
#: column source, i.e. B with its last two axes swapped.
NATURAL = "natural"
COLUMNS = "columns"

_CODE_TO_ATTRIBUTE = {code: name for name, code in ATTRIBUTE_CODES.items()}
_INT64 = commitments.DTYPE_CODES["int64"]
_INT32 = commitments.DTYPE_CODES["int32"]
_INDEX_CODES = frozenset(commitments.dtype_code(d) for d in opset.INDEX_DTYPES)
_PARAMETER_CODES = frozenset(commitments.dtype_code(d) for d in opset.PARAMETER_DTYPES)
_BOOL = commitments.DTYPE_CODES["bool"]
#: Ops whose inputs at these positions are parameters, opened in full (they are tiny).
_PARAMETER_POSITIONS: dict[str, tuple[int, ...]] = {
    "Clip": (1, 2),
    "ReduceSum": (1,),
    "ReduceMax": (1,),
    "Reshape": (1,),
    "Slice": (1, 2, 3, 4),
    "Range": (0, 1, 2),
    "MatMulInteger": (2,),
}
#: Inputs that must have a parameter dtype (shapes, axes, Slice and Range parameters), an
#: index dtype (Gather's indices), single elements (scalars) and 1-D vectors, by op.
_PARAMETER_DTYPE_POSITIONS = {"ReduceSum": (1,), "ReduceMax": (1,), "Reshape": (1,),
                              "Slice": (1, 2, 3, 4), "Range": (0, 1, 2)}
_INDEX_POSITIONS = {"Gather": (1,), "GatherElements": (1,)}
_SCALAR_POSITIONS = {"Clip": (1, 2), "Range": (0, 1, 2), "MatMulInteger": (2,)}
_VECTOR_POSITIONS = {"ReduceSum": (1,), "ReduceMax": (1,), "Reshape": (1,),
                     "Slice": (1, 2, 3, 4)}
_ELEMENTWISE = ("Add", "Sub", "Mul", "Div", "Min", "Max", "Greater")
_ELEMENTWISE_FUNCTIONS = {op: opset.OPS[op].function for op in _ELEMENTWISE}


# ------------------------------------------------------------------------------------------------
# Node descriptions
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorRef:
    """A tensor a node reads: state leaf `index` (kind INPUT_LEAF: 0 is the graph input, j the
    output of node j) or constant `index` (kind INPUT_CONSTANT, graph initializer order)."""

    kind: int
    index: int

    def __str__(self) -> str:
        return f"{'leaf' if self.kind == INPUT_LEAF else 'constant'} {self.index}"


@dataclass(frozen=True)
class StepNode:
    """A parsed node description (docs/protocol.md, "Nodes"): what the one-step knows of k.

    `inputs[p]` is None for an absent optional input. `attributes` maps attribute names to
    their int64 values (a tuple; one value for scalar attributes). `column_source` is set for
    MatMulInteger only.
    """

    op_type: str
    inputs: tuple[TensorRef | None, ...]
    attributes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    column_source: TensorRef | None = None

    def attribute(self, name: str, default: int | None = None) -> int | None:
        """A scalar attribute's value, or `default` when the description omits it."""
        values = self.attributes.get(name)
        return default if values is None else values[0]

    def present(self, position: int) -> bool:
        return position < len(self.inputs) and self.inputs[position] is not None


def parse_node_description(description: bytes) -> StepNode:
    """Decode `optinfer.models.manifest.node_description` bytes; ProofError when malformed
    (unknown op or input kind, attribute codes out of order, missing or trailing bytes)."""
    reader = _Reader(description)
    code = reader.unpack(">H")
    if not 1 <= code <= len(opset.OP_ORDER):
        raise ProofError(f"op code {code} is not in the op set")
    op_type = opset.OP_ORDER[code - 1]
    inputs = tuple(reader.reference() for _ in range(reader.unpack(">B")))
    attributes: dict[str, tuple[int, ...]] = {}
    previous = 0
    for _ in range(reader.unpack(">B")):
        attribute_code = reader.unpack(">B")
        if attribute_code not in _CODE_TO_ATTRIBUTE or attribute_code <= previous:
            raise ProofError(f"attribute code {attribute_code} is unknown or out of order")
        previous = attribute_code
        count = reader.unpack(">B")
        if count == 0 and _CODE_TO_ATTRIBUTE[attribute_code] != "perm":
            raise ProofError(f"attribute code {attribute_code} is a scalar without a value")
        attributes[_CODE_TO_ATTRIBUTE[attribute_code]] = tuple(
            reader.unpack(">q") for _ in range(count))
    column_source = reader.reference() if op_type == "MatMulInteger" else None
    if op_type == "MatMulInteger" and column_source is None:
        raise ProofError("a MatMulInteger description names no column source")
    reader.finish()
    return StepNode(op_type, inputs, attributes, column_source)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.offset = bytes(data), 0

    def unpack(self, fmt: str) -> int:
        size = struct.calcsize(fmt)
        if self.offset + size > len(self.data):
            raise ProofError("node description is truncated")
        (value,) = struct.unpack_from(fmt, self.data, self.offset)
        self.offset += size
        return value

    def reference(self) -> TensorRef | None:
        kind, index = self.unpack(">B"), self.unpack(">I")
        if kind == INPUT_ABSENT:
            return None
        if kind not in (INPUT_LEAF, INPUT_CONSTANT):
            raise ProofError(f"input kind {kind} is unknown")
        return TensorRef(kind, index)

    def finish(self) -> None:
        if self.offset != len(self.data):
            raise ProofError("node description has trailing bytes")


# ------------------------------------------------------------------------------------------------
# Which elements one output element needs
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Opening:
    """A contiguous range of `count` elements, starting at flat (C-order) element
    `start_element`, of the tensor at input `input_position` of the node. `layout` COLUMNS
    (MatMulInteger's B only) means the range is in the column source `tensor_ref`, whose row j
    is column j of B; NATURAL means the input tensor itself."""

    input_position: int
    tensor_ref: TensorRef
    start_element: int
    count: int
    layout: str = NATURAL


def parameter_openings(node: StepNode,
                       in_shapes: Sequence[tuple[int, ...] | None]) -> list[Opening]:
    """The node's parameters, each opened in full: Clip's bounds, the reduction axes, Reshape's
    shape, Slice's starts/ends/axes/steps, Range's three scalars, MatMulInteger's zero point.
    An empty parameter tensor has nothing to open: its header already says it is empty."""
    return [Opening(p, node.inputs[p], 0, math.prod(in_shapes[p]))
            for p in _PARAMETER_POSITIONS.get(node.op_type, ())
            if node.present(p) and math.prod(in_shapes[p]) > 0]


def parameter_values(node: StepNode, in_shapes: Sequence[tuple[int, ...] | None],
                     known: Mapping[int, np.ndarray]) -> dict[int, np.ndarray] | None:
    """Every present parameter's values (flat; empty for an empty tensor), or None while one
    is not yet in `known`."""
    values = {}
    for p in _PARAMETER_POSITIONS.get(node.op_type, ()):
        if not node.present(p):
            continue
        if math.prod(in_shapes[p]) == 0:
            values[p] = np.zeros(0, np.int64)
        elif p in known:
            values[p] = np.asarray(known[p]).ravel()
        else:
            return None
    return values


def element_dependencies(
    node: StepNode,
    out_index: int,
    in_shapes: Sequence[tuple[int, ...] | None],
    out_shape: tuple[int, ...],
    known: Mapping[int, np.ndarray] | None = None,
) -> list[Opening]:
    """The input element ranges that element `out_index` (flat, C order) of the node's output
    needs, in the order the verifier opens them: first the parameters (`parameter_openings`),
    then the data.

    `in_shapes[p]` is input p's shape (None when absent); MatMulInteger's B is given in ONNX
    layout (K, N) even though it is opened from its column source. `out_shape` is the node's
    output shape. `known[p]` holds the values, flattened, of input p's first opening when
    already opened: parameters (opened in full) and Gather/GatherElements' index element.
    Openings that depend on a value not in `known` are left out; call again with the values of
    the returned openings to get them: data openings wait for the parameters (Slice's start
    may be a state leaf), Gather's data element waits for its index element.
    """
    known = known or {}
    openings = parameter_openings(node, in_shapes)
    parameters = parameter_values(node, in_shapes, known)
    if parameters is None:
        return openings
    return [*openings, *_data_openings(node, out_index, in_shapes, out_shape, parameters, known)]


def _data_openings(node: StepNode, out_index: int, in_shapes, out_shape, parameters,
                   known) -> list[Opening]:
    out_multi = _unravel(out_index, out_shape)
    op = node.op_type

    def single(position: int, flat: int) -> Opening:
        return Opening(position, node.inputs[position], flat, 1)

    if op in _ELEMENTWISE:
        return [single(p, _broadcast_flat(out_multi, out_shape, in_shapes[p])) for p in (0, 1)]
    if op in ("Clip", "Cast", "Reshape"):
        return [single(0, out_index)]  # same shape, or (Reshape) the same flat order
    if op == "Transpose":
        perm = node.attributes.get("perm", tuple(reversed(range(len(out_shape)))))
        source = [0] * len(out_shape)
        for out_axis, in_axis in enumerate(perm):
            source[in_axis] = out_multi[out_axis]
        return [single(0, _ravel(source, in_shapes[0]))]
    if op == "Concat":
        axis = _axis(node.attribute("axis"), len(out_shape))
        offset = out_multi[axis]
        for position, shape in enumerate(in_shapes):
            if offset < shape[axis]:
                source = list(out_multi)
                source[axis] = offset
                return [single(position, _ravel(source, shape))]
            offset -= shape[axis]
        raise ProofError("Concat: the element lies past every input")
    if op == "Slice":
        windows = _slice_windows(node, in_shapes, parameters)
        source = [start + i * step for i, (start, step, _) in zip(out_multi, windows, strict=True)]
        return [single(0, _ravel(source, in_shapes[0]))]
    if op in ("ReduceSum", "ReduceMax"):
        reduced = _reduced_axes(parameters.get(1), len(in_shapes[0]))
        keepdims = bool(node.attribute("keepdims", 1))
        return _runs(0, node.inputs[0], _group(out_multi, in_shapes[0], reduced, keepdims))
    if op == "ArgMax":
        axis = _axis(node.attribute("axis", 0), len(in_shapes[0]))
        keepdims = bool(node.attribute("keepdims", 1))
        return _runs(0, node.inputs[0], _group(out_multi, in_shapes[0], (axis,), keepdims))
    if op == "Gather":
        axis = _axis(node.attribute("axis", 0), len(in_shapes[0]))
        index_rank = len(in_shapes[1])
        first = [single(1, _ravel(out_multi[axis : axis + index_rank], in_shapes[1]))]
        if 1 not in known:
            return first
        position = _index_value(int(known[1][0]), in_shapes[0][axis])
        source = [*out_multi[:axis], position, *out_multi[axis + index_rank :]]
        return [*first, single(0, _ravel(source, in_shapes[0]))]
    if op == "GatherElements":
        axis = _axis(node.attribute("axis", 0), len(in_shapes[0]))
        first = [single(1, out_index)]  # the output has the indices' shape
        if 1 not in known:
            return first
        source = list(out_multi)
        source[axis] = _index_value(int(known[1][0]), in_shapes[0][axis])
        return [*first, single(0, _ravel(source, in_shapes[0]))]
    if op in ("Shape", "Range"):
        return []  # Shape: the input's header; Range: its parameters alone
    if op == "MatMulInteger":
        return _matmul_dependencies(node, out_multi, in_shapes)
    raise ProofError(f"op {op} has no one-step")


def _matmul_dependencies(node: StepNode, out_multi: Sequence[int],
                         in_shapes: Sequence[tuple[int, ...]]) -> list[Opening]:
    """Row i of A and row j of the column source (= column j of B), with numpy matmul's batch
    broadcasting: a size-1 batch axis of A or B reads index 0."""
    a_shape, b_shape = in_shapes[0], in_shapes[1]
    if len(b_shape) < 2:
        raise ProofError("MatMulInteger: a 1-D B has no column source")
    k = a_shape[-1]
    batch_out = out_multi[: len(out_multi) - (2 if len(a_shape) > 1 else 1)]
    row = out_multi[-2] if len(a_shape) > 1 else None
    column = out_multi[-1]
    batch_shape = _broadcast_batch(a_shape[:-2], b_shape[:-2])
    a_batch = _broadcast_index(batch_out, batch_shape, a_shape[:-2])
    b_batch = _broadcast_index(batch_out, batch_shape, b_shape[:-2])
    a_start = _ravel([*a_batch, row, 0], a_shape) if row is not None else 0
    columns_shape = (*b_shape[:-2], b_shape[-1], b_shape[-2])
    b_start = _ravel([*b_batch, column, 0], columns_shape)
    return [Opening(0, node.inputs[0], a_start, k),
            Opening(1, node.column_source, b_start, k, COLUMNS)]


def _broadcast_batch(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(np.broadcast_shapes(a, b))


def _broadcast_index(out_multi: Sequence[int], out_shape: Sequence[int],
                     in_shape: Sequence[int]) -> list[int]:
    """numpy broadcasting backwards: the input index of an output index (right-aligned axes,
    a size-1 input axis always reads index 0)."""
    skip = len(out_shape) - len(in_shape)
    return [0 if dim == 1 else out_multi[skip + d] for d, dim in enumerate(in_shape)]


def _broadcast_flat(out_multi, out_shape, in_shape) -> int:
    return _ravel(_broadcast_index(out_multi, out_shape, in_shape), in_shape)


def _unravel(flat: int, shape: Sequence[int]) -> list[int]:
    count = math.prod(shape)
    if not 0 <= flat < count:
        raise ProofError(f"element {flat} outside a tensor of {count} elements")
    multi = []
    for dim in reversed(shape):
        flat, index = divmod(flat, dim)
        multi.append(index)
    return multi[::-1]


def _ravel(multi: Sequence[int], shape: Sequence[int]) -> int:
    flat = 0
    for index, dim in zip(multi, shape, strict=True):
        flat = flat * dim + index
    return flat


def _axis(axis: int | None, rank: int) -> int:
    if axis is None or not -rank <= axis < rank:
        raise ProofError(f"axis {axis} out of range for rank {rank}")
    return axis + rank if axis < 0 else axis


def _index_value(index: int, dim: int) -> int:
    """ONNX's index rule, with the op set's precondition: i in [-dim, dim) means i (+ dim)."""
    if not -dim <= index < dim:
        raise opset.OpSemanticsError(f"index {index} is outside [-{dim}, {dim})")
    return index + dim if index < 0 else index


def _reduced_axes(axes: np.ndarray | None, rank: int) -> tuple[int, ...]:
    """Normalized reduced axes; absent or empty axes reduce everything (noop_with_empty_axes
    cannot be encoded in a description, so it is 0)."""
    if axes is None or axes.size == 0:
        return tuple(range(rank))
    normalized = sorted(_axis(int(a), rank) for a in axes)
    if len(set(normalized)) != len(normalized):
        raise opset.OpSemanticsError("axes has duplicates")
    return tuple(normalized)


def _group(out_multi: Sequence[int], in_shape: Sequence[int], reduced: Sequence[int],
           keepdims: bool) -> list[int]:
    """Flat input indices, increasing, of the group an output element of a reduction (or
    ArgMax) reads: the output index on the kept axes, every index on the reduced ones."""
    kept = iter(out_multi)
    base = []
    for axis in range(len(in_shape)):
        if axis in reduced:
            base.append(None)
            if keepdims:
                next(kept)
        else:
            base.append(next(kept))
    flats = []
    for combo in np.ndindex(*(in_shape[a] for a in reduced)):
        multi = list(base)
        for axis, index in zip(reduced, combo, strict=True):
            multi[axis] = index
        flats.append(_ravel(multi, in_shape))
    return flats


def _runs(position: int, ref: TensorRef, flats: Sequence[int]) -> list[Opening]:
    """Increasing flat indices as maximal contiguous openings (one for a last-axis row)."""
    runs: list[Opening] = []
    for flat in flats:
        if runs and runs[-1].start_element + runs[-1].count == flat:
            last = runs[-1]
            runs[-1] = Opening(position, ref, last.start_element, last.count + 1)
        else:
            runs.append(Opening(position, ref, flat, 1))
    return runs


def _slice_windows(node: StepNode, in_shapes, known) -> list[tuple[int, int, int]]:
    """(start, step, count) per data axis after ONNX's clamping (opset.slice_'s rule)."""
    rank = len(in_shapes[0])
    starts = [int(v) for v in known[1]]
    ends = [int(v) for v in known[2]]
    axes = [int(v) for v in known[3]] if node.present(3) else list(range(len(starts)))
    steps = [int(v) for v in known[4]] if node.present(4) else [1] * len(starts)
    if not len(starts) == len(ends) == len(axes) == len(steps):
        raise opset.OpSemanticsError("Slice: parameters differ in length")
    windows = [(0, 1, dim) for dim in in_shapes[0]]
    seen = set()
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        axis = _axis(axis, rank)
        if axis in seen or step == 0:
            raise opset.OpSemanticsError("Slice: duplicate axis or zero step")
        if step < 0 and end in (2**31 - 1, 2**63 - 1):
            raise opset.OpSemanticsError("Slice: ambiguous end with a negative step")
        seen.add(axis)
        dim = in_shapes[0][axis]
        start, end = opset.slice_bounds(start, end, step, dim)
        windows[axis] = (start, step, len(range(start, end, step)) if dim else 0)
    return windows


# ------------------------------------------------------------------------------------------------
# The element's value, and the output's dtype and shape
# ------------------------------------------------------------------------------------------------


def recompute_element(
    node: StepNode,
    opened: Mapping[Opening, np.ndarray],
    out_index: int,
    in_shapes: Sequence[tuple[int, ...] | None],
    out_shape: tuple[int, ...],
) -> int:
    """Element `out_index` of the node's output from the opened values alone.

    `opened` maps every opening of `element_dependencies` (all rounds) to its values (1-D, the
    input's dtype; a column source row in B's dtype). The arithmetic is `optinfer.models.opset`
    applied to the opened elements as tiny arrays, so it has exactly the op set's semantics
    and preconditions (OpSemanticsError where ONNX Runtime would not give a defined result).
    Returns a Python int (bool as 0/1).
    """
    by_position: dict[int, list[np.ndarray]] = {}
    for opening, values in opened.items():
        by_position.setdefault(opening.input_position, []).append(np.asarray(values).ravel())
    values = {p: np.concatenate(parts) for p, parts in by_position.items()}
    op = node.op_type

    def element(position: int) -> np.ndarray:
        return values[position][:1].reshape(())

    if op in _ELEMENTWISE:
        return _as_int(_ELEMENTWISE_FUNCTIONS[op](element(0), element(1)))
    if op == "Clip":
        low = values[1] if node.present(1) and 1 in values else None
        high = values[2] if node.present(2) and 2 in values else None
        return _as_int(opset.clip(element(0), low, high))
    if op == "Cast":
        return _as_int(opset.cast(element(0), int(node.attribute("to"))))
    if op in ("Reshape", "Transpose", "Concat", "Slice", "Gather", "GatherElements"):
        # Data movement: the value is the one opened data element (Concat's from whichever
        # input holds it; the index and parameters were only needed to locate it).
        data_position = next(iter(values)) if op == "Concat" else 0
        return _as_int(values[data_position][-1:].reshape(()))
    if op == "ReduceSum":
        return _as_int(opset.reduce_sum(values[0], np.array([0], np.int64)))
    if op == "ReduceMax":
        return _as_int(opset.reduce_max(values[0], np.array([0], np.int64)))
    if op == "ArgMax":
        return _as_int(opset.arg_max(values[0], axis=0))
    if op == "Shape":
        return int(in_shapes[0][out_index])
    if op == "Range":
        start, limit, delta = (_as_int(values[p][:1].reshape(())) for p in (0, 1, 2))
        return start + out_index * delta
    if op == "MatMulInteger":
        a = values[0].reshape(1, -1)
        column = values[1].reshape(-1, 1)
        zero_point = values.get(2)
        return _as_int(opset.matmul_integer(a, column, zero_point))
    raise ProofError(f"op {op} has no one-step")


def _as_int(value: np.ndarray) -> int:
    return int(np.asarray(value).reshape(()))


def expected_output(
    node: StepNode,
    in_shapes: Sequence[tuple[int, ...] | None],
    in_dtypes: Sequence[int | None],
    parameters: Mapping[int, np.ndarray],
) -> tuple[int, tuple[int, ...]]:
    """The dtype code and shape node k's output must have, from its inputs' (authenticated)
    dtypes and shapes and its parameters (`parameter_values`).

    Also checks what the element recomputation alone cannot see: index and parameter tensors
    have the dtypes and ranks the op set requires, MatMulInteger's inner dimensions agree,
    shapes broadcast. Raises OpSemanticsError where the op set refuses the inputs.
    """
    try:
        return _expected_output(node, list(in_shapes), list(in_dtypes), parameters)
    except ValueError as error:  # np.broadcast_shapes, dtype_code
        if isinstance(error, opset.OpSemanticsError):
            raise
        raise opset.OpSemanticsError(f"{node.op_type}: {error}") from None


def _names(codes: frozenset[int]) -> str:
    """'int32 or int64' for the dtype codes of int32 and int64."""
    return " or ".join(sorted(name for name, code in commitments.DTYPE_CODES.items()
                              if code in codes))


def _expected_output(node, in_shapes, in_dtypes, parameters) -> tuple[int, tuple[int, ...]]:
    op = node.op_type
    shape0, dtype0 = in_shapes[0], in_dtypes[0]
    for p in _PARAMETER_DTYPE_POSITIONS.get(op, ()):
        if node.present(p) and in_dtypes[p] not in _PARAMETER_CODES:
            raise opset.OpSemanticsError(f"{op}: input {p} must be {_names(_PARAMETER_CODES)}")
    for p in _INDEX_POSITIONS.get(op, ()):
        if in_dtypes[p] not in _INDEX_CODES:
            raise opset.OpSemanticsError(f"{op}: input {p} must be {_names(_INDEX_CODES)}")
    for p in _SCALAR_POSITIONS.get(op, ()):
        if node.present(p) and (len(in_shapes[p]) > 1 or math.prod(in_shapes[p]) != 1):
            raise opset.OpSemanticsError(f"{op}: input {p} must be a single element")
    for p in _VECTOR_POSITIONS.get(op, ()):
        if node.present(p) and len(in_shapes[p]) != 1:
            raise opset.OpSemanticsError(f"{op}: input {p} must be 1-D")
    if op in _ELEMENTWISE:
        shape = tuple(np.broadcast_shapes(in_shapes[0], in_shapes[1]))
        return (_BOOL if op == "Greater" else dtype0), shape
    if op == "Clip":
        return dtype0, shape0
    if op == "Cast":
        if node.attribute("to") is None:
            raise opset.OpSemanticsError("Cast: no target type")
        return commitments.dtype_code(node.attribute("to")), shape0
    if op in ("ReduceSum", "ReduceMax", "ArgMax"):
        if op == "ArgMax":
            if node.attribute("select_last_index", 0) != 0:
                raise opset.OpSemanticsError("ArgMax: select_last_index must be 0")
            reduced = (_axis(node.attribute("axis", 0), len(shape0)),)
        else:
            reduced = _reduced_axes(parameters.get(1), len(shape0))
        keepdims = bool(node.attribute("keepdims", 1))
        shape = tuple(1 if a in reduced else d for a, d in enumerate(shape0)
                      if keepdims or a not in reduced)
        return (_INT64 if op == "ArgMax" else dtype0), shape
    if op == "Gather":
        axis = _axis(node.attribute("axis", 0), len(shape0))
        return dtype0, (*shape0[:axis], *in_shapes[1], *shape0[axis + 1 :])
    if op == "GatherElements":
        axis = _axis(node.attribute("axis", 0), len(shape0))
        indices = in_shapes[1]
        if len(indices) != len(shape0) or any(
                indices[d] > shape0[d] for d in range(len(shape0)) if d != axis):
            raise opset.OpSemanticsError("GatherElements: indices do not fit the data")
        return dtype0, tuple(indices)
    if op == "Reshape":
        return dtype0, _reshape_target(shape0, [int(v) for v in parameters[1]])
    if op == "Transpose":
        perm = node.attributes.get("perm", tuple(reversed(range(len(shape0)))))
        if sorted(perm) != list(range(len(shape0))):
            raise opset.OpSemanticsError(f"Transpose: {perm} is not a permutation")
        return dtype0, tuple(shape0[p] for p in perm)
    if op == "Concat":
        axis = _axis(node.attribute("axis"), len(shape0))
        ranks_differ = any(len(s) != len(shape0) for s in in_shapes)
        if ranks_differ or len({(*s[:axis], *s[axis + 1 :]) for s in in_shapes}) != 1 \
                or len(set(in_dtypes)) != 1:
            raise opset.OpSemanticsError("Concat: inputs differ off the axis or in dtype")
        return dtype0, tuple(sum(s[axis] for s in in_shapes) if a == axis else d
                             for a, d in enumerate(shape0))
    if op == "Slice":
        return dtype0, tuple(count for _, _, count in _slice_windows(node, in_shapes, parameters))
    if op == "Shape":
        return _INT64, (len(shape0),)
    if op == "Range":
        start, limit, delta = (int(parameters[p][0]) for p in (0, 1, 2))
        if delta == 0:
            raise opset.OpSemanticsError("Range: delta is 0")
        return _INT64, (max(-((start - limit) // delta), 0),)
    if op == "MatMulInteger":
        a, b = shape0, in_shapes[1]
        if a[-1] != b[-2]:
            raise opset.OpSemanticsError(f"MatMulInteger: inner dimensions {a[-1]} != {b[-2]}")
        rows = (a[-2],) if len(a) > 1 else ()
        return _INT32, (*_broadcast_batch(a[:-2], b[:-2]), *rows, b[-1])
    raise ProofError(f"op {op} has no one-step")


def _reshape_target(shape: Sequence[int], target: list[int]) -> tuple[int, ...]:
    """opset.reshape's rule: 0 copies the input dim, one -1 is inferred, count kept."""
    count = math.prod(shape)
    for i, d in enumerate(target):
        if d == 0:
            if i >= len(shape):
                raise opset.OpSemanticsError("Reshape: 0 past the input's rank")
            target[i] = shape[i]
        elif d < -1:
            raise opset.OpSemanticsError(f"Reshape: {d} is invalid")
    if target.count(-1) > 1:
        raise opset.OpSemanticsError("Reshape: more than one -1")
    if -1 in target:
        known = math.prod(d for d in target if d != -1)
        if known == 0 or count % known:
            raise opset.OpSemanticsError("Reshape: -1 cannot be inferred")
        target[target.index(-1)] = count // known
    if math.prod(target) != count:
        raise opset.OpSemanticsError(f"Reshape: {tuple(shape)} cannot become {target}")
    return tuple(target)


def output_signature(node: StepNode, inputs: Sequence[np.ndarray | None]
                     ) -> tuple[int, tuple[int, ...]]:
    """`expected_output` from the input arrays themselves (ONNX layout): the dtype code and
    shape the node's output must have. OpSemanticsError where the op set refuses them."""
    in_shapes = [None if x is None else tuple(np.shape(x)) for x in inputs]
    in_dtypes = [None if x is None else commitments.dtype_code(np.asarray(x).dtype)
                 for x in inputs]
    parameters = {p: np.asarray(inputs[p]).ravel()
                  for p in _PARAMETER_POSITIONS.get(node.op_type, ()) if node.present(p)}
    return expected_output(node, in_shapes, in_dtypes, parameters)


def element_from_inputs(node: StepNode, inputs: Sequence[np.ndarray | None],
                        out_index: int) -> int:
    """Open and recompute element `out_index` straight from the input arrays (ONNX layout;
    MatMulInteger's B is read through its transpose, as the column source). The helper the
    Solidity golden tests use to produce openings from plain arrays."""
    in_shapes = [None if x is None else tuple(np.shape(x)) for x in inputs]
    _, out_shape = output_signature(node, inputs)

    def read(opening: Opening) -> np.ndarray:
        array = np.asarray(inputs[opening.input_position])
        if opening.layout == COLUMNS:
            array = np.swapaxes(array, -1, -2)
        flat = np.ascontiguousarray(array).ravel()
        return flat[opening.start_element : opening.start_element + opening.count]

    opened = _open_all(node, out_index, in_shapes, out_shape, read)
    return recompute_element(node, opened, out_index, in_shapes, out_shape)


def _open_all(node, out_index, in_shapes, out_shape, read) -> dict[Opening, np.ndarray]:
    """Run element_dependencies to a fixed point, reading each new opening with `read`."""
    opened: dict[Opening, np.ndarray] = {}
    while True:
        known = first_values(opened)
        new = [o for o in element_dependencies(node, out_index, in_shapes, out_shape, known)
               if o not in opened]
        if not new:
            return opened
        for opening in new:
            opened[opening] = read(opening)


def first_values(opened: Mapping[Opening, np.ndarray]) -> dict[int, np.ndarray]:
    """Per input position, the values of its first opening (parameters and Gather's index are
    opened first: what the later openings depend on)."""
    known: dict[int, np.ndarray] = {}
    for opening, values in opened.items():
        known.setdefault(opening.input_position, np.asarray(values).ravel())
    return known
