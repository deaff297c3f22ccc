"""The numpy reference executor: runs an integer ONNX graph node by node with the op set's numpy
functions (`optinfer.models.opset`), which are the spec.

Nodes run in the graph's list order, which must already be topological; node k (1-based) is
the k-th entry of `graph.node`, the same numbering as the trace T_1..T_N. Initializers are loaded
lazily and every tensor is dropped after its last reader, so the working set stays near the
largest live activations plus the weight in use.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from optinfer.models.opset import ONNX_TO_NUMPY, OPS

#: Trace hook: on_node(k, node, outputs) after node k (1-based) has run.
NodeHook = Callable[[int, onnx.NodeProto, list[np.ndarray]], None]


class GraphError(ValueError):
    """The graph cannot be executed as given: order, missing tensors, unsupported ops, feeds."""


@dataclass(frozen=True)
class NodeResult:
    """What node k produced: its outputs in the order of node.output."""

    k: int
    node: onnx.NodeProto
    outputs: list[np.ndarray]


def check_topological_order(graph: onnx.GraphProto) -> None:
    """Raise GraphError unless every node reads only graph inputs, initializers or outputs of
    earlier nodes, each tensor name is produced once, and every graph output exists."""
    available = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    for k, node in enumerate(graph.node, start=1):
        for name in node.input:
            if name and name not in available:
                raise GraphError(f"node {k} ({node.op_type} {node.name!r}) reads {name!r} "
                                 "before any node produces it: nodes are not topologically sorted")
        for name in node.output:
            if name in available:
                raise GraphError(f"node {k} ({node.op_type} {node.name!r}) produces {name!r} "
                                 "a second time")
            available.add(name)
    for value in graph.output:
        if value.name not in available:
            raise GraphError(f"graph output {value.name!r} is never produced")


def load_initializer(tensor: TensorProto, base_dir: Path | None = None) -> np.ndarray:
    """The value of an initializer. Data stored in a side file (external data: location,
    offset, length relative to the model's folder) is read from `base_dir`; a tensor whose
    external data onnx.load already resolved is converted directly."""
    if tensor.data_location != TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor)
    if base_dir is None:
        raise GraphError(f"initializer {tensor.name!r} lives in external data: pass base_dir "
                         "(the model's folder) or load the model with onnx.load(path)")
    info = {entry.key: entry.value for entry in tensor.external_data}
    root = Path(base_dir).resolve()
    path = (root / info["location"]).resolve()
    if not path.is_relative_to(root):
        raise GraphError(f"initializer {tensor.name!r} points outside {root}: {path}")
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    shape = tuple(tensor.dims)
    count = int(np.prod(shape, dtype=np.int64))
    if "length" in info and int(info["length"]) != count * dtype.itemsize:
        raise GraphError(f"initializer {tensor.name!r}: external length {info['length']} is not "
                         f"{count} x {dtype.itemsize} bytes")
    # ONNX stores tensors little-endian.
    values = np.fromfile(path, dtype=dtype.newbyteorder("<"), count=count,
                         offset=int(info.get("offset", 0)))
    if values.size != count:
        raise GraphError(f"initializer {tensor.name!r}: {path} is too short")
    return values.astype(dtype, copy=False).reshape(shape)


def _check_feed(value: onnx.ValueInfoProto, array: np.ndarray) -> None:
    tensor_type = value.type.tensor_type
    expected = ONNX_TO_NUMPY.get(tensor_type.elem_type)
    if array.dtype != expected:
        raise GraphError(f"feed {value.name!r} has dtype {array.dtype}, the graph wants {expected}")
    if tensor_type.HasField("shape"):
        dims = tensor_type.shape.dim
        if len(dims) != array.ndim or any(
            d.HasField("dim_value") and d.dim_value != n for d, n in zip(dims, array.shape,
                                                                         strict=False)
        ):
            wanted = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]
            raise GraphError(f"feed {value.name!r} has shape {array.shape}, the graph wants "
                             f"{wanted}")


def iter_node_outputs(
    model: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    *,
    base_dir: Path | None = None,
    keep_all: bool = False,
) -> Iterator[NodeResult]:
    """Run the graph and yield NodeResult(k, node, outputs) for k = 1..N in order.

    feeds: one array per graph input that is not an initializer (an initializer that is also
    a graph input may be overridden), exact dtype and static dims. Unless keep_all, a tensor
    is released once no later node reads it and it is no graph output, so hold on to yielded
    outputs yourself if you need them later.
    """
    graph = model.graph
    check_topological_order(graph)
    constants = {tensor.name: tensor for tensor in graph.initializer}
    env: dict[str, np.ndarray] = {}
    for value in graph.input:
        if value.name in feeds:
            array = np.asarray(feeds[value.name])
            _check_feed(value, array)
            env[value.name] = array
        elif value.name not in constants:
            raise GraphError(f"no feed for graph input {value.name!r}")
    unknown_feeds = set(feeds) - {v.name for v in graph.input}
    if unknown_feeds:
        raise GraphError(f"feeds {sorted(unknown_feeds)} are no graph inputs")

    pinned = {value.name for value in graph.output}
    last_reader: dict[str, int] = {}
    for k, node in enumerate(graph.node, start=1):
        for name in node.input:
            last_reader[name] = k

    for k, node in enumerate(graph.node, start=1):
        spec = OPS.get(node.op_type)
        if spec is None or node.domain not in ("", "ai.onnx"):
            raise GraphError(f"node {k}: op {node.op_type!r} is not in the op set")
        inputs: list[np.ndarray | None] = []
        for name in node.input:
            if not name:
                inputs.append(None)  # an omitted optional input
                continue
            if name not in env:
                env[name] = load_initializer(constants[name], base_dir)
            inputs.append(env[name])
        while inputs and inputs[-1] is None:
            inputs.pop()
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        unsupported = set(attributes) - set(spec.attributes)
        if unsupported:
            raise GraphError(f"node {k} ({node.op_type}): attributes {sorted(unsupported)} "
                             "are not supported")
        if len(node.output) != 1:
            raise GraphError(f"node {k} ({node.op_type}) must have exactly one output")
        output = spec.function(*inputs, **attributes)
        del inputs
        env[node.output[0]] = output
        yield NodeResult(k, node, [output])

        if not keep_all:
            for name in [*node.input, *node.output]:
                if name and name not in pinned and last_reader.get(name, 0) <= k:
                    env.pop(name, None)


def run_graph(
    model: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    *,
    base_dir: Path | None = None,
    on_node: NodeHook | None = None,
    keep_all: bool = False,
) -> dict[str, np.ndarray]:
    """Execute `model` on `feeds` with the numpy reference ops; return tensors by name.

    The result holds the graph outputs in graph order, or with keep_all=True every node output
    in node order (plus graph outputs no node produces); without keep_all, intermediates are
    freed after their last reader. on_node(k, node, outputs) is called after
    each node k = 1..N. base_dir is the model's folder, needed when the model was loaded with
    load_external_data=False. Raises GraphError for a graph it cannot run and
    opset.OpSemanticsError when an op's precondition fails.
    """
    graph = model.graph
    graph_outputs = {value.name for value in graph.output}
    results: dict[str, np.ndarray] = {}
    for result in iter_node_outputs(model, feeds, base_dir=base_dir, keep_all=keep_all):
        if on_node is not None:
            on_node(result.k, result.node, result.outputs)
        for name, output in zip(result.node.output, result.outputs, strict=True):
            if keep_all or name in graph_outputs:
                results[name] = output
    constants = {tensor.name: tensor for tensor in graph.initializer}
    for value in graph.output:
        if value.name in results:
            continue
        if value.name in feeds:
            results[value.name] = np.asarray(feeds[value.name])
        elif value.name in constants:
            results[value.name] = load_initializer(constants[value.name], base_dir)
    if keep_all:
        return results
    return {value.name: results[value.name] for value in graph.output}
