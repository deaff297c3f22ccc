"""16-bit linear inputs (`convert(..., linear_input_bits=16)`): two uint8 planes stacked along
the rows of one MatMulInteger, recombined in int32.

The arithmetic against exact int64 sums (extremes, K where the sum leaves int32, large biases);
a random checkpoint converted with the option against the numpy reference, the KV cache, the
static bounds and the one-step verifier; and the default conversion, which must stay the graph
it always was (the committed tiny-r1, rebuilt from its recorded calibration).
"""

from __future__ import annotations

import json
import random

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from optinfer.errors import UserError
from optinfer.models import opset, reference
from optinfer.models.converter import convert, quantize
from optinfer.models.graph_builder import GraphBuilder, RangeError, Tensor
from optinfer.models.qwen2_graph import FINE_RESIDUAL_BITS
from optinfer.models.runtime import IntegerModel, session_options
from optinfer.prover.one_step import WrongClaim
from optinfer.prover.one_step_prover import CommittedModel, OneStepProver, TraceCommitment

from .conftest import TINY_CONTEXT

PROMPT = [3, 17, 42, 5, 8, 60, 2]

# ------------------------------------------------------------------------------ arithmetic


def _planes_graph(weights: np.ndarray, bias: np.ndarray | None) -> GraphBuilder:
    """u (R, K) int32 in [0, 2**16) -> planes -> matmul_integer_planes, with the planes'
    partial accumulators exposed."""
    g = GraphBuilder("planes")
    u = g.input("u", np.int32, ["R", weights.shape[0]], 0, 2**16 - 1)
    rows = g.input("rows", np.int64, [1], 0, 2**20)
    stack = g.planes(u, 0, "x")
    acc = g.matmul_integer_planes(stack, rows, g.const("W", weights), bias, "acc")
    g.output(acc)
    g.output(Tensor("acc.hi", np.dtype(np.int32), *g.bounds["acc.hi"]))
    g.output(Tensor("acc.lo", np.dtype(np.int32), *g.bounds["acc.lo"]))
    g.output(stack)
    return g


def _run(g: GraphBuilder, feeds: dict, threads: int = 1) -> list[np.ndarray]:
    sess = ort.InferenceSession(g.model().SerializeToString(), session_options(threads),
                                providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _cases():
    rng = np.random.default_rng(18)
    for k in (1, 7, 576, 8960):
        n = 5
        w_random = rng.integers(-64, 64, size=(k, n)).astype(np.int8)
        w_extreme = np.where(rng.integers(0, 2, size=(k, n)) == 1, 63, -64).astype(np.int8)
        w_extreme[:, 0], w_extreme[:, 1] = 63, -64  # one column of each sign only
        u_random = rng.integers(0, 2**16, size=(3, k)).astype(np.int32)
        u_extreme = np.stack([np.zeros(k), np.full(k, 2**16 - 1), np.full(k, 2**15),
                              np.full(k, 2**15 - 1),
                              np.where(np.arange(k) % 2 == 1, 2**16 - 1, 0)]).astype(np.int32)
        for w in (w_random, w_extreme):
            for bias in (None, rng.integers(-(2**28), 2**28, size=n),
                         np.array([-(2**30), 2**30 - 1, -1, 255, 256])):
                for u in (u_random, u_extreme):
                    yield w, bias, u


@pytest.mark.parametrize("case", range(48))
def test_planes_recombine_to_the_exact_int64_sum(case):
    w, bias, u = list(_cases())[case]
    g = _planes_graph(w, bias)
    feeds = {"u": u, "rows": np.array([u.shape[0]], np.int64)}
    acc, acc_hi, acc_lo, stack = _run(g, feeds)
    w64 = w.astype(np.int64)
    x = u.astype(np.int64) - 2**15  # the 16-bit activation
    s = x @ w64  # exact; leaves int32 for K = 8960 at the extremes
    b = np.zeros(w.shape[1], np.int64) if bias is None else bias.astype(np.int64)
    # The planes are u's bytes, high plane first ...
    rows = u.shape[0]
    assert np.array_equal(stack[:rows].astype(np.int64) * 256 + stack[rows:], u)
    # ... the identity S = 256 * acc_hi + acc_lo + 128 * colsum(W) holds exactly ...
    colsum = w64.sum(axis=0)
    assert np.array_equal(256 * acc_hi.astype(np.int64) + acc_lo + 128 * colsum, s)
    # ... and the graph's int32 result is floor((S + bias + 128) / 256), within its bounds.
    want = (s + b + 128) // 256
    assert acc.dtype == np.int32 and np.array_equal(acc, want)
    lo, hi = g.bounds["acc"]
    assert lo <= int(acc.min()) and int(acc.max()) <= hi
    # The numpy reference and two threads give the same bytes.
    values = reference.run_graph(g.model(), feeds, keep_all=True)
    assert np.array_equal(values["acc"], acc)
    assert _run(g, feeds, threads=2)[0].tobytes() == acc.tobytes()


def test_planes_are_the_bytes_of_a_16_bit_activation():
    g = GraphBuilder("planes")
    u = g.input("u", np.int64, ["R", 3], 0, 2**16 - 1)
    g.output(g.planes(u, 1, "x"))
    values = np.array([[0, 255, 256], [65535, 32768, 32767]], np.int64)
    (stack,) = _run(g, {"u": values})
    assert stack.dtype == np.uint8 and stack.shape == (2, 6)
    assert np.array_equal(stack[:, :3].astype(np.int64) * 256 + stack[:, 3:], values)
    with pytest.raises(RangeError, match="16-bit"):
        g.planes(g.input("v", np.int32, ["R"], -1, 10), 0, "bad")
    with pytest.raises(RangeError, match="16-bit"):
        g.planes(g.input("w", np.int32, ["R"], 0, 2**16), 0, "bad")


def test_a_bias_beyond_int32_is_refused_not_wrapped():
    w = np.ones((4, 2), np.int8)
    with pytest.raises(RangeError, match="do not fit int32"):
        _planes_graph(w, np.array([2**40, 0]))


def test_planes_need_constant_weights():
    g = GraphBuilder("planes")
    a = g.input("a", np.uint8, ["R2", 4], 0, 255)
    rows = g.input("rows", np.int64, [1], 0, 10)
    b = g.input("b", np.int8, [4, 2], -64, 63)
    with pytest.raises(TypeError, match="constant"):
        g.matmul_integer_planes(a, rows, b, None, "acc")


# ------------------------------------------------------------------------ converted model


@pytest.fixture(scope="module")
def wide_model(random_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("int16") / "model"
    convert(random_checkpoint, out, max_context=TINY_CONTEXT, linear_input_bits=16)
    return IntegerModel(out)


@pytest.fixture(scope="module")
def wide_trace(wide_model):
    tokens = wide_model.generate(PROMPT, 24)
    sequence, outputs = wide_model.trace(PROMPT, tokens)
    return tokens, sequence, outputs


def test_the_16_bit_graph_is_an_integer_graph_with_bounded_fan_in(wide_model, random_model):
    m, narrow = wide_model.manifest, json.loads((random_model / "manifest.json").read_text())
    assert m["linear_input_bits"] == 16 and "linear_input_bits" not in narrow
    assert m["residual_bits"] == FINE_RESIDUAL_BITS and "residual_bits" not in narrow
    assert m["float_tensors"] == 0 and 0 < m["max_fan_in_bytes"] <= 32 * 1024
    # The planes share one MatMulInteger per linear layer: as many as with 8 bits.
    assert m["ops"]["MatMulInteger"] == narrow["ops"]["MatMulInteger"] == 9 * 2 + 1
    for graph in ("model.onnx", "decode.onnx"):
        proto = onnx.load(str(wide_model.dir / graph), load_external_data=False)
        assert opset.check_supported(proto) == []
    names = {n.name: n.op_type for n in wide_model.verify_graph().graph.node}
    # Keys of 13 bits and probabilities of 14 as planes: one MatMulInteger each, as with 8.
    assert names["L0.attn.scores.planes"] == names["L0.attn.pv.planes"] == "MatMulInteger"
    assert names["L0.attn.k.cache"] == names["L0.attn.prob"] == "Concat"
    for linear in ("L0.attn.q", "L0.attn.o", "L1.mlp.gate", "L1.mlp.down", "lm_head"):
        assert names[f"{linear}.acc.planes"] == "MatMulInteger"
        assert names[f"{linear}.acc.hi"] == names[f"{linear}.acc.lo"] == "Slice"
    for planes in ("L0.attn_norm", "L0.attn.out.planes", "L0.mlp.act.planes", "final_norm"):
        assert names[planes] == "Concat" and names[f"{planes}.lo"] == "Cast"
    assert "L0.attn.out.u8" not in names and "L0.mlp.act.u8" not in names


def test_the_fine_residual_squares_each_rows_top_bits(wide_model, wide_trace):
    """Rows of the 28-bit residual past RMSNorm's exact sum of squares drop the fewest bits
    that bring them back: every row's top bits stay below 2**B and use at least B - 1 of them
    when a bit was dropped (tests/test_fixed_point.py checks the arithmetic row by row)."""
    from optinfer.models.qwen2_graph import residual_bits

    _, _, outputs = wide_trace
    names = [n.output[0] for n in wide_model.verify_graph().graph.node]
    b = residual_bits(wide_model.manifest["config"]["hidden_size"])
    shifted = 0
    for name in names:
        if not name.endswith("_norm.unit"):
            continue
        units = outputs[names.index(name)]  # (T, 1)
        top = np.abs(outputs[names.index(name.replace(".unit", ".top"))]).max(axis=1)
        assert set(np.unique(units).tolist()) <= {2**k for k in range(FINE_RESIDUAL_BITS + 1)}
        assert (top < 2**b).all(), name
        assert (top[units[:, 0] > 1] >= 2 ** (b - 2)).all(), name
        shifted += int((units > 1).sum())
    assert shifted > 0


def check_reference_on_every_node(model: IntegerModel, trace) -> None:
    """The numpy reference reproduces ONNX Runtime's every node output of `trace` (tokens,
    sequence, outputs), each inside its manifest bounds."""
    _, sequence, outputs = trace
    values = reference.run_graph(onnx.load(str(model.dir / "model.onnx")),
                                 {"sequence": sequence}, keep_all=True)
    names = [n.output[0] for n in model.verify_graph().graph.node]
    bounds = model.manifest["bounds"]
    for name, got in zip(names, outputs, strict=True):
        assert values[name].dtype == got.dtype and np.array_equal(values[name], got), name
        if got.size:
            assert bounds[name][0] <= int(got.min()) and int(got.max()) <= bounds[name][1], name


def check_long_runs(model: IntegerModel, seed: int) -> None:
    """Random half-context prompt and output: every node inside its static bounds, and the
    same bytes with 1 and 2 threads."""
    names = [n.output[0] for n in model.verify_graph().graph.node]
    bounds = model.manifest["bounds"]
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, model.vocab_size, size=TINY_CONTEXT // 2).tolist()
    output = rng.integers(0, model.vocab_size, size=TINY_CONTEXT // 2 + 1).tolist()
    _, outputs = model.trace(prompt, output)
    _, again = IntegerModel(model.dir, threads=2).trace(prompt, output)
    for name, tensor, other in zip(names, outputs, again, strict=True):
        assert tensor.tobytes() == other.tobytes(), name
        if tensor.size:
            assert bounds[name][0] <= int(tensor.min()) and int(tensor.max()) <= bounds[name][1]


def check_kv_cache(model: IntegerModel, tokens: list[int], seed: int) -> None:
    """`tokens` (generated after PROMPT) verify, a changed token fails at its index, and
    decoding with the KV cache predicts what one pass predicts for several prompt lengths."""
    assert model.verify(PROMPT, tokens).valid
    for i in (0, len(tokens) // 2, len(tokens) - 1):
        forged = list(tokens)
        forged[i] = (forged[i] + 1) % model.vocab_size
        assert model.verify(PROMPT, forged).first_mismatch == i
    rng = np.random.default_rng(seed)
    for length in (1, 2, 5, 17, 40):
        prompt = rng.integers(0, model.vocab_size, size=length).tolist()
        generated = model.generate(prompt, 12)
        assert model.predict(prompt, generated).tolist() == generated


def test_numpy_reference_equals_onnxruntime_on_every_node(wide_model, wide_trace):
    check_reference_on_every_node(wide_model, wide_trace)


def test_static_bounds_hold_on_long_sequences_and_threads_agree(wide_model):
    check_long_runs(wide_model, 5)


def test_kv_cache_decoding_equals_one_pass_and_lies_fail(wide_model, wide_trace):
    check_kv_cache(wide_model, wide_trace[0], 3)


def _added_nodes(names: list[str]) -> list[str]:
    """The nodes the 16-bit option adds (planes, their product, its split and recombination)
    or changes (the producers of the planes)."""
    markers = (".hi", ".lo", ".planes", ".acc", ".lo.biased", ".lo.shift", ".sum",
               ".out.u16", "final.length.1d",
               # 13-bit keys and 14-bit probabilities as planes (wide_scores, wide_pv)
               ".k.q13", ".k.heads", ".k.cache", ".q.rows", ".scores", ".prob", ".pdiv",
               ".pnum", ".pv")
    # The fine residual's norms square each row's top bits (`_Qwen2Builder.row_top_bits`).
    top_bits = {f"{norm}.{part}" for norm in ("L1.attn_norm", "L1.mlp_norm", "final_norm")
                for part in ("r2", "r2max", "r2max.above", "r2max.above.i64", "r2max.bitlen",
                             "excess", "excess.pos", "k", "unit", "top", "sq", "rms.scaled")}
    return [n for n in names if any(m in n for m in markers) or n in top_bits
            or n in {"L0.attn_norm", "L1.mlp_norm", "final_norm", "L0.attn_norm.clip",
                     "final_norm.offset", "L0.mlp.act.shift", "L0.mlp.act.clip"}]


def test_one_step_recomputes_every_added_node_and_convicts_a_changed_element(wide_model,
                                                                            wide_trace):
    _, sequence, outputs = wide_trace
    prover = OneStepProver(CommittedModel(wide_model), TraceCommitment(sequence, outputs))
    names = [node.name for node in wide_model.verify_graph().graph.node]
    added = _added_nodes(names)
    rng = random.Random(18)
    ops = set()
    for name in added:
        k = names.index(name) + 1
        tensor = outputs[k - 1]
        for index in {0, tensor.size - 1, rng.randrange(tensor.size)}:
            witness = prover.witness(k, index)
            assert prover.check(witness) == int(tensor.ravel()[index]), (name, index)
            ops.add(witness.node.op_type)
    assert {"MatMulInteger", "Slice", "Concat", "Cast", "Div", "Add", "Sub", "ReduceMax",
            "Greater", "ReduceSum", "Clip", "Gather", "Mul"} <= ops
    for name in ("L0.attn.q.acc.planes", "L0.attn.q.acc.lo", "L1.mlp.down.acc",
                 "L0.mlp.act.planes.hi", "L0.attn.out.planes", "lm_head.acc.hi",
                 "L0.attn.k.cache", "L1.attn.scores.planes", "L1.attn.scores",
                 "L0.attn.prob", "L1.attn.pv.planes", "L0.attn.pv"):
        k = names.index(name) + 1
        lie = outputs[k - 1].copy()
        index = rng.randrange(lie.size)
        lie.ravel()[index] ^= 1  # a changed element
        provider = prover.trace.with_output(k, lie)
        witness = prover.witness(k, index, provider=provider)
        with pytest.raises(WrongClaim) as caught:
            prover.check(witness, provider=provider)
        assert caught.value.recomputed == int(outputs[k - 1].ravel()[index]), name


def test_16_bit_inputs_bring_the_logits_closer_to_float(random_checkpoint, random_model,
                                                      wide_model):
    from optinfer.models.checkpoint import WeightReader
    from optinfer.models.fidelity import _probe_session, dequantization
    from optinfer.models.float_reference import FloatReference

    reader = WeightReader(random_checkpoint)
    tokens = [5, 17, 42, 8, 60, 2, 33, 90, 11, 4, 71]
    expected = FloatReference(reader).forward(tokens)
    errors = {}
    for model in (IntegerModel(random_model), wide_model):
        scale = dequantization(model, reader.lm_head()).logits
        logits = _probe_session(model, ["logits"]).run(
            ["logits"], {"sequence": np.asarray([1, *tokens], np.int64)})[0] * scale
        errors[model.manifest.get("linear_input_bits", 8)] = float(
            np.sqrt(((logits - expected) ** 2).mean() / (expected**2).mean()))
    # On an untrained model other roundings dominate (SmolLM2, docs/models.md, is the real
    # measure); the wider inputs must still not be worse.
    assert errors[16] < errors[8], errors


# ------------------------------------------------------------------ the default is unchanged


def test_the_default_conversion_is_the_committed_tiny_r1():
    """Rebuilt from the calibration its manifest records (a float forward on another CPU can
    differ in the last bits), the default and an explicit 8 give the committed model root and
    the committed decode graph's nodes."""
    from optinfer.models.checkpoint import WeightReader, read_spec
    from optinfer.models.float_reference import CalibrationStats
    from optinfer.models.manifest import model_commitment
    from optinfer.models.qwen2_graph import build_graph
    from optinfer.models.tiny_r1 import INTEGER_DIR

    manifest = json.loads((INTEGER_DIR / "manifest.json").read_text())
    assert "linear_input_bits" not in manifest
    float_dir = INTEGER_DIR.parent / "float"
    spec = read_spec(float_dir)
    stats = CalibrationStats(max_abs=manifest["calibration"]["max_abs"])
    committed_decode = onnx.load(str(INTEGER_DIR / "decode.onnx"), load_external_data=False)
    for kwargs in ({}, {"linear_input_bits": 8}):
        qmodel = quantize(spec, WeightReader(float_dir, spec), stats, manifest["max_context"],
                          **kwargs)
        verify = build_graph(qmodel, "verify")
        commitment = model_commitment(verify.model(), verify.constants)
        assert "0x" + commitment["model_root"].hex() == manifest["model_root"]
        decode = build_graph(qmodel, "decode").model()
        assert list(decode.graph.node) == list(committed_decode.graph.node)
        assert [t.name for t in decode.graph.initializer] == [
            t.name for t in committed_decode.graph.initializer]


def test_other_widths_are_refused(random_checkpoint, tmp_path):
    with pytest.raises(UserError, match="8 or 16"):
        convert(random_checkpoint, tmp_path / "x", linear_input_bits=12)
    assert not (tmp_path / "x").exists()


def test_the_command_takes_the_option(random_checkpoint, tmp_path):
    from tests.test_cli import cli, cli_json

    out = tmp_path / "int16"
    cli_json("model", "convert", random_checkpoint, "-o", out, "--max-context", 32,
             "--linear-input-bits", 16)
    assert json.loads((out / "manifest.json").read_text())["linear_input_bits"] == 16
    bad = cli("model", "convert", random_checkpoint, "-o", tmp_path / "bad",
              "--linear-input-bits", 4)
    assert bad.returncode == 2 and "8 or 16" in bad.stderr
    assert not (tmp_path / "bad").exists()
