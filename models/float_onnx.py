"""A float32 ONNX graph of the same Qwen2 architecture, for benchmarks only.

It is the baseline `optinfer bench inference` compares the integer graph against: same
checkpoint, same KV-cache decoding scheme, ONNX Runtime with all its float optimisations on.
It is never used to prove anything (float kernels differ between CPUs).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from optinfer.models.checkpoint import Qwen2Spec, WeightReader
from optinfer.models.opset import ONNX_OPSET

FLOAT_GRAPH = "float32.onnx"


class _FloatGraph:
    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0

    def const(self, name: str, value) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], **attrs) -> str:
        self.n += 1
        out = f"{op_type.lower()}_{self.n}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], **attrs))
        return out


def build_float_graph(spec: Qwen2Spec, reader: WeightReader, max_context: int) -> onnx.ModelProto:
    """Decode graph: tokens, positions, past K/V per layer -> last token's argmax, present K/V."""
    g = _FloatGraph()
    n, kv, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
    grp = n // kv
    f32 = np.float32
    shape = lambda name, dims: g.const(name, np.asarray(dims, np.int64))  # noqa: E731
    axes_last = shape("axes_last", [-1])
    eps = g.const("eps", np.asarray(spec.rms_norm_eps, f32))
    inv_sqrt = g.const("inv_sqrt_hd", np.asarray(1 / np.sqrt(hd), f32))

    def rmsnorm(x: str, gamma: np.ndarray, name: str) -> str:
        ms = g.op("ReduceMean", [g.op("Mul", [x, x]), axes_last], keepdims=1)
        inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [ms, eps])])])
        return g.op("Mul", [g.op("Mul", [x, inv]), g.const(name, np.asarray(gamma, f32))])

    def linear(x: str, w: np.ndarray, b: np.ndarray | None, name: str) -> str:
        y = g.op("MatMul", [x, g.const(f"{name}.W", np.asarray(w, f32).T)])
        return y if b is None else g.op("Add", [y, g.const(f"{name}.b", np.asarray(b, f32))])

    half = hd // 2
    inv_freq = 1.0 / (spec.rope_theta ** (np.arange(0, half, dtype=np.float64) * 2.0 / hd))
    angles = np.arange(max_context, dtype=np.float64)[:, None] * inv_freq[None, :]
    cos = np.concatenate([np.cos(angles)] * 2, axis=1)[:, None, :].astype(f32)
    sin = np.concatenate([-np.sin(angles), np.sin(angles)], axis=1)[:, None, :].astype(f32)
    swap = g.const("swap", np.concatenate([np.arange(half, hd), np.arange(half)]).astype(np.int64))

    inputs = [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["T"]),
              helper.make_tensor_value_info("positions", TensorProto.INT64, ["T"])]
    outputs = []
    cos_t = g.op("Gather", [g.const("cos", cos), "positions"])
    sin_t = g.op("Gather", [g.const("sin", sin), "positions"])

    def rope(x: str, heads: int) -> str:
        x3 = g.op("Reshape", [x, shape(f"heads{heads}", [0, heads, hd])])
        swapped = g.op("Gather", [x3, swap], axis=2)
        return g.op("Add", [g.op("Mul", [x3, cos_t]), g.op("Mul", [swapped, sin_t])])

    for i in range(spec.num_layers):
        inputs += [helper.make_tensor_value_info(f"past_{kind}.{i}", TensorProto.FLOAT,
                                                 [kv, 1, "P", hd]) for kind in "kv"]
    # Causal mask, shared by all layers: keys are positions 0..P+T-1.
    new = g.op("Shape", ["tokens"])
    old = g.op("Gather", [g.op("Shape", ["past_k.0"]), shape("dim2", [2])])
    keys = g.op("Range", [g.const("zero", np.asarray(0, np.int64)),
                          g.op("Reshape", [g.op("Add", [new, old]), shape("scalar", [])]),
                          g.const("one", np.asarray(1, np.int64))])
    hidden = g.op("Greater", [g.op("Reshape", [keys, shape("row", [1, -1])]),
                              g.op("Reshape", ["positions", shape("col", [-1, 1])])])
    mask = g.op("Mul", [g.op("Cast", [hidden], to=TensorProto.FLOAT),
                        g.const("neg", np.asarray(-1e9, f32))])

    x = g.op("Gather", [g.const("embed", np.asarray(reader.embed_tokens(), f32)), "tokens"])
    for i in range(spec.num_layers):
        w = reader.layer(i)
        a = rmsnorm(x, w["input_norm"], f"L{i}.n1")
        q = rope(linear(a, w["q_w"], w["q_b"], f"L{i}.q"), n)
        k = rope(linear(a, w["k_w"], w["k_b"], f"L{i}.k"), kv)
        v = g.op("Reshape", [linear(a, w["v_w"], w["v_b"], f"L{i}.v"), shape("kvh", [0, kv, hd])])
        q = g.op("Transpose", [g.op("Reshape", [q, shape("qg", [0, kv, grp, hd])])],
                 perm=[1, 2, 0, 3])  # (kv, grp, T, hd)
        k = g.op("Reshape", [g.op("Transpose", [k], perm=[1, 0, 2]), shape("c", [kv, 1, -1, hd])])
        v = g.op("Reshape", [g.op("Transpose", [v], perm=[1, 0, 2]), shape("c", [kv, 1, -1, hd])])
        k = g.op("Concat", [f"past_k.{i}", k], axis=2)
        v = g.op("Concat", [f"past_v.{i}", v], axis=2)
        outputs += [k, v]
        scores = g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])])
        scores = g.op("Add", [g.op("Mul", [scores, inv_sqrt]), mask])
        att = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])  # (kv, grp, T, hd)
        att = g.op("Reshape", [g.op("Transpose", [att], perm=[2, 0, 1, 3]),
                               shape("flat", [-1, n * hd])])
        x = g.op("Add", [x, linear(att, w["o_w"], None, f"L{i}.o")])
        m = rmsnorm(x, w["post_norm"], f"L{i}.n2")
        gate = linear(m, w["gate_w"], None, f"L{i}.gate")
        act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]),
                           linear(m, w["up_w"], None, f"L{i}.up")])
        x = g.op("Add", [x, linear(act, w["down_w"], None, f"L{i}.down")])
    last = g.op("Slice", [x, shape("m1", [-1]), shape("big", [2**62]), shape("ax0", [0])])
    logits = linear(rmsnorm(last, reader.final_norm(), "final"), reader.lm_head(), None, "head")
    token = g.op("ArgMax", [logits], axis=-1, keepdims=0)
    # Shared shape constants were registered once per name; drop repeats.
    seen, inits = set(), []
    for t in g.inits:
        if t.name not in seen:
            seen.add(t.name)
            inits.append(t)
    out_info = [helper.make_tensor_value_info(token, TensorProto.INT64, None)] + [
        helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
    graph = helper.make_graph(g.nodes, "qwen2-float32", inputs, out_info, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)])
    model.ir_version = 10
    return model


def write_float_model(checkpoint_dir: Path, out_dir: Path, max_context: int) -> Path:
    """Write the float32 twin of a checkpoint (weights in an external file)."""
    from optinfer.models.checkpoint import read_spec

    spec = read_spec(checkpoint_dir)
    model = build_float_graph(spec, WeightReader(checkpoint_dir, spec), max_context)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / FLOAT_GRAPH
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=FLOAT_GRAPH + ".data", size_threshold=1024)
    return path
