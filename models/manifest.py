"""The manifest of a converted model, and the model root that commits graph and constants.

The model root (docs/protocol.md, "Model root") commits every node's description and every
constant of the verify graph, so that a one-step proof can open "what node k computes, from
which tensors" and "the weights it reads" against one registered hash.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx

from optinfer.models import opset
from optinfer.models.chat import CHAT_TEMPLATE_FILE
from optinfer.models.graph_builder import COLUMN_SOURCES_KEY
from optinfer.prover import commitments

# Attribute codes of the node description encoding; attributes not listed are not allowed.
ATTRIBUTE_CODES = {"axis": 1, "keepdims": 2, "perm": 3, "to": 4, "select_last_index": 5}
INPUT_LEAF, INPUT_CONSTANT, INPUT_ABSENT = 0, 1, 2
ORT_VERSION = "1.32.0"


def op_code(op_type: str) -> int:
    """Stable code of an op in the node description: its 1-based position in opset.OP_ORDER."""
    try:
        return opset.OP_ORDER.index(op_type) + 1
    except ValueError:
        raise ValueError(f"op {op_type} is not in the verifiable op set") from None


def _attribute_values(attr: onnx.AttributeProto) -> list[int]:
    if attr.type == onnx.AttributeProto.INT:
        return [attr.i]
    if attr.type == onnx.AttributeProto.INTS:
        return list(attr.ints)
    raise ValueError(f"attribute {attr.name} is not an integer attribute")


def _reference(name: str, leaf_of: dict[str, int], constant_of: dict[str, int]) -> bytes:
    """uint8 kind | uint32 index of a tensor the node reads."""
    if name == "":
        return struct.pack(">BI", INPUT_ABSENT, 0)
    if name in constant_of:
        return struct.pack(">BI", INPUT_CONSTANT, constant_of[name])
    return struct.pack(">BI", INPUT_LEAF, leaf_of[name])


def node_description(node: onnx.NodeProto, leaf_of: dict[str, int],
                     constant_of: dict[str, int], column_source: str | None = None) -> bytes:
    """Canonical bytes of one node: op, inputs (state leaf or constant index), attributes.

    uint16 op code | uint8 n_inputs | n_inputs x (uint8 kind, uint32 index) |
    uint8 n_attrs | per attribute, by code: uint8 code, uint8 n_values, n_values x int64 |
    MatMulInteger only: uint8 kind, uint32 index of its column source.
    All integers big-endian.
    """
    out = bytearray(struct.pack(">HB", op_code(node.op_type), len(node.input)))
    for name in node.input:
        out += _reference(name, leaf_of, constant_of)
    attrs = []
    for attr in node.attribute:
        if attr.name not in ATTRIBUTE_CODES:
            raise ValueError(f"node {node.name}: attribute {attr.name} has no code")
        attrs.append((ATTRIBUTE_CODES[attr.name], _attribute_values(attr)))
    out += struct.pack(">B", len(attrs))
    for code, values in sorted(attrs):
        out += struct.pack(">BB", code, len(values))
        out += b"".join(struct.pack(">q", v) for v in values)
    if node.op_type == "MatMulInteger":
        if column_source is None:
            raise ValueError(f"MatMulInteger {node.name} has no column source")
        out += _reference(column_source, leaf_of, constant_of)
    return bytes(out)


def column_sources(model: onnx.ModelProto) -> dict[str, str]:
    """MatMulInteger output -> the tensor whose rows are its B operand's columns."""
    props = {p.key: p.value for p in model.metadata_props}
    return json.loads(props.get(COLUMN_SOURCES_KEY, "{}"))


def committed_constant(array: np.ndarray, transposed: bool) -> np.ndarray:
    """A constant as the model root commits it: B operands of MatMulInteger transposed."""
    return np.ascontiguousarray(np.swapaxes(array, -1, -2)) if transposed else array


def model_commitment(model: onnx.ModelProto, constants: dict[str, np.ndarray]) -> dict:
    """nodes_root, constants_root and model_root of a verify graph (constants in graph order)."""
    graph = model.graph
    if len(graph.input) != 1:
        raise ValueError("the verify graph has exactly one input (leaf 0)")
    leaf_of = {graph.input[0].name: 0}
    for k, node in enumerate(graph.node, 1):
        leaf_of[node.output[0]] = k
    names = [t.name for t in graph.initializer]
    constant_of = {name: i for i, name in enumerate(names)}
    sources = column_sources(model)
    node_leaves = [commitments.ZERO] + [
        hashlib.sha256(node_description(n, leaf_of, constant_of,
                                        sources.get(n.output[0]))).digest()
        for n in graph.node
    ]
    nodes_root = commitments.merkle_root(node_leaves, commitments.STATE_DEPTH)
    matmul_weights = {n.input[1] for n in graph.node if n.op_type == "MatMulInteger"}
    constants_root = commitments.merkle_root(
        [commitments.tensor_root(committed_constant(constants[name], name in matmul_weights))
         for name in names])
    model_root = commitments.model_root(nodes_root, constants_root, opset.OPSET_VERSION,
                                        len(graph.node))
    return {"model_root": model_root, "nodes_root": nodes_root,
            "constants_root": constants_root, "constants": names}


def _static_shapes(model: onnx.ModelProto, max_len: int) -> dict[str, tuple[list[int], int]]:
    """Shape (every dynamic dim bounded by max_len) and ONNX dtype of every value."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    shapes = {}
    values = list(inferred.graph.value_info) + list(inferred.graph.input) + list(
        inferred.graph.output)
    for vi in values:
        t = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else max_len for d in t.shape.dim]
        shapes[vi.name] = (dims, t.elem_type)
    for init in model.graph.initializer:
        shapes[init.name] = (list(init.dims), init.data_type)
    return shapes


def graph_statistics(model: onnx.ModelProto, max_len: int,
                     constants: dict[str, np.ndarray]) -> dict:
    """Op counts, float tensor count and the largest per-element fan-in of a graph."""
    violations = opset.check_supported(model)
    shapes = _static_shapes(model, max_len)
    max_fan_in, worst = 0, None
    for node in model.graph.node:
        in_shapes = [shapes[n][0] if n else None for n in node.input]
        in_types = [onnx.helper.tensor_dtype_to_np_dtype(shapes[n][1]) if n else None
                    for n in node.input]
        in_values = [constants.get(n) for n in node.input]
        fan_in = opset.OPS[node.op_type].fan_in_bytes(node, in_shapes, in_types, in_values)
        if fan_in > max_fan_in:
            max_fan_in, worst = fan_in, node.name
    floats = sum(1 for _, elem in shapes.values()
                 if elem in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE,
                             onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16))
    return {
        "nodes": len(model.graph.node),
        "ops": dict(sorted(Counter(n.op_type for n in model.graph.node).items())),
        "float_tensors": floats,
        "max_fan_in_bytes": max_fan_in,
        "max_fan_in_node": worst,
        "op_set_violations": violations,
    }


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, as the manifest's `files` records it (hex)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def build_manifest(spec, max_context: int, verify: onnx.ModelProto, builder, out_dir: Path,
                   calibration: dict, stats) -> dict:
    """Everything a runtime or a verifier needs to know about the converted model.

    `verify` is the saved verify graph (its large constants already external, so shape
    inference does not serialise the weights); `builder.constants` holds their values.
    """
    from optinfer.models.converter import (
        CONSTANTS_FILE,
        DECODE_GRAPH,
        MANIFEST_FORMAT,
        VERIFY_GRAPH,
    )

    commitment = model_commitment(verify, builder.constants)
    statistics = graph_statistics(verify, max_context + 1, builder.constants)
    if statistics["op_set_violations"]:
        raise ValueError("graph outside the op set: " + "; ".join(
            statistics["op_set_violations"][:5]))
    # The chat template is listed like the tokenizer: the model id binds both, and a fetched
    # model formats chat prompts as its publisher's does.
    files = [VERIFY_GRAPH, DECODE_GRAPH, CONSTANTS_FILE, "tokenizer.json", CHAT_TEMPLATE_FILE]
    return {
        "format": MANIFEST_FORMAT,
        "model_root": "0x" + commitment["model_root"].hex(),
        "nodes_root": "0x" + commitment["nodes_root"].hex(),
        "constants_root": "0x" + commitment["constants_root"].hex(),
        "opset_version": opset.OPSET_VERSION,
        "onnx_opset": opset.ONNX_OPSET,
        "onnxruntime": ORT_VERSION,
        "max_context": max_context,
        "config": asdict(spec),
        "graphs": {"verify": VERIFY_GRAPH, "decode": DECODE_GRAPH},
        "constants_file": CONSTANTS_FILE,
        "constants": commitment["constants"],
        **{k: v for k, v in statistics.items() if k != "op_set_violations"},
        "range_analysis": {
            "tensors": len(builder.bounds),
            "widest": max(max(abs(lo), abs(hi)) for lo, hi in builder.bounds.values()),
            "assumptions": sorted(set(builder.assumptions.values())),
        },
        "bounds": {name: [lo, hi] for name, (lo, hi) in builder.bounds.items()},
        "calibration": {**calibration, "max_abs": {k: float(v) for k, v in
                                                   sorted(stats.max_abs.items())}},
        "files": {name: file_sha256(out_dir / name) for name in files
                  if (out_dir / name).is_file()},
    }
