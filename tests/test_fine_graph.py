"""The fine graph (`convert(..., linear_input_bits=16, weight_bits=13)`): 13-bit weights as two
7-bit planes side by side in one MatMulInteger, recombined exactly in int64; 13-bit values,
12-bit queries and a 24-bit down-projection input (three planes).

The arithmetic against exact Python sums (extremes, K where the sum leaves int32, large
biases, two and three planes); a random checkpoint converted fine against the numpy
reference on every node, its static bounds, threads, the KV cache and the one-step verifier;
and the options' refusals. SmolLM2's fidelity with it is tests/test_smollm2.py.
"""

from __future__ import annotations

import json
import random

import numpy as np
import onnx
import pytest

from optinfer.errors import UserError
from optinfer.models import opset, qwen2_graph
from optinfer.models.converter import convert
from optinfer.models.graph_builder import GraphBuilder, RangeError, split_signed_planes
from optinfer.models.qwen2_graph import FINE_ACT_ZERO_POINT, FINE_QUERY_ZERO_POINT
from optinfer.models.runtime import IntegerModel
from optinfer.prover.one_step import WrongClaim
from optinfer.prover.one_step_prover import CommittedModel, OneStepProver, TraceCommitment

from .conftest import TINY_CONTEXT
from .test_linear16 import _run, check_kv_cache, check_long_runs, check_reference_on_every_node

PROMPT = [3, 17, 42, 5, 8, 60, 2]

# ------------------------------------------------------------------------------ arithmetic


def _wide_graph(weights: np.ndarray, bias, count: int, zero_point: int):
    """u (R, K) in [0, 256**count) -> `count` planes -> matmul_integer_wide; the graph and
    the product's static interval."""
    g = GraphBuilder("wide")
    dtype = np.int64 if count > 2 else np.int32
    u = g.input("u", dtype, ["R", weights.shape[0]], 0, 256**count - 1)
    stack = g.planes(u, 0, "x", count)
    acc = g.matmul_integer_wide(stack, count, weights, bias, zero_point, "acc")
    g.output(acc)
    g.output(stack)
    return g, (acc.lo, acc.hi)


def _wide_cases():
    rng = np.random.default_rng(13)
    for count, zero_point in ((2, 1 << 15), (2, FINE_QUERY_ZERO_POINT), (3, FINE_ACT_ZERO_POINT)):
        for k in (1, 9, 576, 8960):
            n = 4
            w_random = rng.integers(-(2**12), 2**12, size=(k, n))
            w_extreme = np.where(rng.integers(0, 2, size=(k, n)) == 1, 2**12 - 1, -(2**12))
            w_extreme[:, 0], w_extreme[:, 1] = 2**12 - 1, -(2**12)  # one sign per column
            top = 256**count - 1
            u_random = rng.integers(0, top + 1, size=(3, k))
            u_extreme = np.stack([np.zeros(k), np.full(k, top), np.full(k, zero_point),
                                  np.where(np.arange(k) % 2 == 1, top, 0)])
            for w in (w_random, w_extreme):
                for bias in (None, rng.integers(-(2**40), 2**40, size=n)):
                    for u in (u_random, u_extreme):
                        yield count, zero_point, w, bias, u


WIDE_CASES = list(_wide_cases())


@pytest.mark.parametrize("case", range(len(WIDE_CASES)))
def test_wide_weights_recombine_to_the_exact_sum(case):
    count, zero_point, w, bias, u = WIDE_CASES[case]
    g, (lo, hi) = _wide_graph(w, bias, count, zero_point)
    dtype = np.int64 if count > 2 else np.int32
    acc, stack = _run(g, {"u": u.astype(dtype)})
    x = u.astype(object) - zero_point  # Python integers: no wrap anywhere
    expected = x.dot(w.astype(object)) + (0 if bias is None else bias.astype(object))
    assert acc.dtype == np.int64 and (acc.astype(object) == expected).all()
    # The planes are u's bytes, most significant first, stacked along the rows.
    rows = u.shape[0]
    value = sum(stack[p * rows:(p + 1) * rows].astype(np.int64) * 256 ** (count - 1 - p)
                for p in range(count))
    assert np.array_equal(value, u)
    assert lo <= int(acc.min()) and int(acc.max()) <= hi


def test_signed_planes_split_every_13_bit_value():
    v = np.arange(-(2**12), 2**12)
    hi, lo = split_signed_planes(v)
    assert hi.min() == -64 and hi.max() == 63 and lo.min() == 0 and lo.max() == 63
    assert np.array_equal(64 * hi.astype(np.int64) + lo, v)


def test_wide_weights_outside_13_bits_and_a_fourth_plane_are_refused():
    g = GraphBuilder("bad")
    u = g.input("u", np.int32, ["R", 2], 0, 2**16 - 1)
    stack = g.planes(u, 0, "x")
    with pytest.raises(RangeError, match="13-bit"):
        g.matmul_integer_wide(stack, 2, np.array([[4096], [0]]), None, 1 << 15, "acc")
    big = g.input("big", np.int64, ["R", 2], 0, 2**32 - 1)
    with pytest.raises(ValueError, match="2 or 3 planes"):
        g.planes(big, 0, "y", 4)
    with pytest.raises(RangeError, match="24-bit"):
        g.planes(big, 0, "z", 3)


# ------------------------------------------------------------------------ converted model


#: The random checkpoint's 96-entry vocabulary in logit blocks of 40, 40 and 16 columns, so
#: that the blocked lm_head (`FINE_LOGIT_BLOCK`, 8,192 in a real model) is what these tests
#: check.
TEST_LOGIT_BLOCK = 40


def convert_fine(checkpoint, out, max_context: int = TINY_CONTEXT) -> IntegerModel:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(qwen2_graph, "FINE_LOGIT_BLOCK", TEST_LOGIT_BLOCK)
        convert(checkpoint, out, max_context=max_context, linear_input_bits=16, weight_bits=13)
    return IntegerModel(out)


@pytest.fixture(scope="module")
def fine_model(random_checkpoint, tmp_path_factory):
    return convert_fine(random_checkpoint, tmp_path_factory.mktemp("fine") / "model")


@pytest.fixture(scope="module")
def fine_trace(fine_model):
    tokens = fine_model.generate(PROMPT, 24)
    sequence, outputs = fine_model.trace(PROMPT, tokens)
    return tokens, sequence, outputs


def test_the_fine_graph_is_an_integer_graph_with_bounded_fan_in(fine_model, random_model):
    m, narrow = fine_model.manifest, json.loads((random_model / "manifest.json").read_text())
    assert m["weight_bits"] == 13 and m["linear_input_bits"] == 16
    assert "weight_bits" not in narrow
    assert m["float_tensors"] == 0 and 0 < m["max_fan_in_bytes"] <= 32 * 1024
    # Both weight planes and every activation plane share one MatMulInteger per linear layer
    # (the lm_head: per block of the vocabulary, three here).
    assert m["ops"]["MatMulInteger"] == narrow["ops"]["MatMulInteger"] + 2
    for graph in ("model.onnx", "decode.onnx"):
        proto = onnx.load(str(fine_model.dir / graph), load_external_data=False)
        assert opset.check_supported(proto) == []
    names = {n.name: n.op_type for n in fine_model.verify_graph().graph.node}
    for linear in ("L0.attn.q", "L0.attn.o", "L1.mlp.gate", "L1.mlp.down", "lm_head.b0",
                   "lm_head.b2"):
        assert names[f"{linear}.acc.planes"] == "MatMulInteger"
        assert names[f"{linear}.acc.exact"] == "Add"
    # The logits in three vocabulary blocks.
    assert names["logits"] == "Concat" and "lm_head.b3.acc.planes" not in names
    logits = next(n for n in fine_model.verify_graph().graph.node if n.name == "logits")
    assert list(logits.input) == ["logits.b0", "logits.b1", "logits.b2"]
    assert names["L0.mlp.act.planes.mid"] == "Cast"  # three planes into the down projection
    assert names["L0.attn.v.cache"] == names["L0.attn.q.planes"] == "Concat"
    decode = onnx.load(str(fine_model.dir / "decode.onnx"), load_external_data=False)
    shapes = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim]
              for i in decode.graph.input}
    assert shapes["past_k.0"][1] == shapes["past_v.0"][1] == 2


def test_numpy_reference_equals_onnxruntime_on_every_node(fine_model, fine_trace):
    check_reference_on_every_node(fine_model, fine_trace)


def test_static_bounds_hold_on_long_sequences_and_threads_agree(fine_model):
    check_long_runs(fine_model, 6)


def test_kv_cache_decoding_equals_one_pass_and_lies_fail(fine_model, fine_trace):
    check_kv_cache(fine_model, fine_trace[0], 4)


#: One node of each kind the fine graph adds: the weight planes' product, its int64
#: recombination, the value and query planes and their recombination, the 24-bit input.
FINE_NODES = (
    "L0.attn.q.acc.planes", "L0.attn.q.acc.by_plane", "L0.attn.q.acc.i64",
    "L0.attn.q.acc.whi", "L0.attn.q.acc.whi.scaled", "L0.attn.q.acc.wlo", "L0.attn.q.acc.z",
    "L0.attn.q.acc.z0", "L0.attn.q.acc.z0.scaled", "L0.attn.q.acc.sum1", "L0.attn.q.acc.rows",
    "L0.attn.q.acc.exact", "L0.attn.q.fix.mul", "L0.attn.v.q13", "L0.attn.q.q12.value",
    "L0.attn.v.cache.u.hi", "L0.attn.v.cache.lo.value", "L0.attn.v.cache",
    "L0.attn.q.planes.hi", "L0.attn.q.planes", "L0.attn.scores.planes", "L0.attn.scores.khi64",
    "L0.attn.scores.k", "L0.attn.q.group_rows", "L0.attn.scores.qhi", "L0.attn.scores.qlo",
    "L0.attn.scores.sum", "L1.attn.scores", "L0.attn.prob.rows", "L0.attn.pv.planes",
    "L0.attn.pv.vhi", "L0.attn.pv.v", "L0.attn.pv.groups", "L0.attn.pv.hi", "L0.attn.pv",
    "L0.mlp.act.q24", "L0.mlp.act.planes.mid.value", "L0.mlp.act.planes.mid",
    "L0.mlp.act.planes", "L0.mlp.down.acc.z1.scaled", "L0.mlp.down.acc.sum2",
    "L0.mlp.down.acc.exact", "lm_head.b0.acc.exact", "lm_head.b2.acc.planes", "logits.b1.mul",
    "logits.b2", "logits",
)


def test_one_step_recomputes_every_added_node_and_convicts_a_changed_element(fine_model,
                                                                            fine_trace):
    _, sequence, outputs = fine_trace
    prover = OneStepProver(CommittedModel(fine_model), TraceCommitment(sequence, outputs))
    names = [node.name for node in fine_model.verify_graph().graph.node]
    rng = random.Random(13)
    for name in FINE_NODES:
        k = names.index(name) + 1
        tensor = outputs[k - 1]
        for index in {0, tensor.size - 1, rng.randrange(tensor.size)}:
            witness = prover.witness(k, index)
            assert prover.check(witness) == int(tensor.ravel()[index]), (name, index)
        lie = tensor.copy()
        index = rng.randrange(lie.size)
        lie.ravel()[index] ^= 1  # a changed element
        provider = prover.trace.with_output(k, lie)
        witness = prover.witness(k, index, provider=provider)
        with pytest.raises(WrongClaim) as caught:
            prover.check(witness, provider=provider)
        assert caught.value.recomputed == int(tensor.ravel()[index]), name


def test_the_fine_graph_brings_the_logits_closer_to_float(random_checkpoint, tmp_path_factory,
                                                          fine_model):
    from optinfer.models.checkpoint import WeightReader
    from optinfer.models.fidelity import _probe_session, dequantization
    from optinfer.models.float_reference import FloatReference

    wide_dir = tmp_path_factory.mktemp("int16-for-fine") / "model"
    convert(random_checkpoint, wide_dir, max_context=TINY_CONTEXT, linear_input_bits=16)
    reader = WeightReader(random_checkpoint)
    tokens = [5, 17, 42, 8, 60, 2, 33, 90, 11, 4, 71]
    expected = FloatReference(reader).forward(tokens)
    errors = {}
    for model in (IntegerModel(wide_dir), fine_model):
        scale = dequantization(model, reader.lm_head()).logits
        logits = _probe_session(model, ["logits"]).run(
            ["logits"], {"sequence": np.asarray([1, *tokens], np.int64)})[0] * scale
        errors[model.manifest.get("weight_bits", 7)] = float(
            np.sqrt(((logits - expected) ** 2).mean() / (expected**2).mean()))
    assert errors[13] < errors[7] / 2, errors


def test_logits_in_blocks_equal_the_logits_of_one_block(random_checkpoint, tmp_path,
                                                        fine_model):
    from optinfer.models.fidelity import _probe_session

    convert(random_checkpoint, tmp_path / "one", max_context=TINY_CONTEXT, linear_input_bits=16,
            weight_bits=13)
    one_block = IntegerModel(tmp_path / "one")
    assert "lm_head.b0.acc.planes" not in {n.name for n in one_block.verify_graph().graph.node}
    feed = {"sequence": np.asarray([1, 5, 17, 42, 8, 60, 2, 33, 90, 11, 4, 71], np.int64)}
    blocked, single = (_probe_session(m, ["logits"]).run(["logits"], feed)[0]
                       for m in (fine_model, one_block))
    assert blocked.shape == (11, 96) and blocked.dtype == np.int32
    assert np.array_equal(blocked, single)


def test_weight_widths_are_checked(random_checkpoint, tmp_path):
    with pytest.raises(UserError, match="7 or 13"):
        convert(random_checkpoint, tmp_path / "x", linear_input_bits=16, weight_bits=8)
    with pytest.raises(UserError, match="16-bit linear inputs"):
        convert(random_checkpoint, tmp_path / "y", weight_bits=13)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_the_command_takes_the_option_and_inspect_reports_it(random_checkpoint, tmp_path):
    from tests.test_cli import cli, cli_json

    out = tmp_path / "fine"
    cli_json("model", "convert", random_checkpoint, "-o", out, "--max-context", 32,
             "--linear-input-bits", 16, "--weight-bits", 13)
    info = cli_json("model", "inspect", out)
    assert (info["linear_input_bits"], info["weight_bits"]) == (16, 13)
    for args, message in ((("--weight-bits", 13), "16-bit linear inputs"),
                          (("--linear-input-bits", 16, "--weight-bits", 9), "7 or 13")):
        bad = cli("model", "convert", random_checkpoint, "-o", tmp_path / "bad", *args)
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr
        assert "Traceback" not in bad.stderr and not (tmp_path / "bad").exists()
