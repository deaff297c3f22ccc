"""The fixed-point building blocks of the graph, run on ONNX Runtime against exact Python."""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from optinfer.models import quant
from optinfer.models.graph_builder import GraphBuilder, RangeError
from optinfer.models.runtime import session_options


def run(builder: GraphBuilder, feeds: dict) -> list[np.ndarray]:
    sess = ort.InferenceSession(builder.model().SerializeToString(), session_options(1),
                                providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def test_isqrt_is_exact_on_hard_values():
    g = GraphBuilder("isqrt")
    n = g.input("n", np.int64, ["N", 1], 1, 2**62 - 1)  # as in RMSNorm: one value per row
    g.output(g.isqrt(n, "r"))
    squares = [k * k + d for k in (1, 2, 3, 1000, 2**20 + 7, 2**31 - 1) for d in (-1, 0, 1)]
    values = [1, 2, 3, 4, 5, 2**62 - 1, 2**61, 2**40 - 1] + [v for v in squares if v >= 1]
    rng = np.random.default_rng(0)
    values += [int(v) for v in rng.integers(1, 2**62 - 1, size=2000, dtype=np.int64)]
    values += [int(v) for v in rng.integers(1, 2**20, size=2000)]
    (got,) = run(g, {"n": np.asarray(values, np.int64).reshape(-1, 1)})
    assert got.ravel().tolist() == [math.isqrt(v) for v in values]


@settings(max_examples=60, deadline=None)
@given(
    xs=st.lists(st.integers(-(2**30), 2**30), min_size=1, max_size=40),
    m=st.integers(1, 2**24),
    shift=st.integers(1, 30),
    lo=st.integers(-(2**20), 0),
    width=st.integers(0, 2**21),
)
def test_rescale_rounds_half_up_and_clips(xs, m, shift, lo, width):
    hi = lo + width
    g = GraphBuilder("rescale")
    x = g.input("x", np.int64, ["N"], -(2**30), 2**30)
    g.output(g.rescale(x, m, shift, lo, hi, "y"))
    (got,) = run(g, {"x": np.asarray(xs, np.int64)})
    # floor(x*m/2**S + 1/2), clipped: exact rational arithmetic in Python.
    want = [min(max((v * m + (1 << (shift - 1))) >> shift, lo), hi) for v in xs]
    assert got.tolist() == want


def test_rescale_to_uint8_folds_the_zero_point():
    g = GraphBuilder("u8")
    x = g.input("x", np.int64, ["N"], -(2**20), 2**20)
    g.output(g.rescale(x, 3, 4, -128, 127, "y", np.uint8, zero_point=128))
    xs = np.asarray([-(2**20), -700, -6, -5, 0, 5, 6, 700, 2**20], np.int64)
    (got,) = run(g, {"x": xs})
    want = [min(max((int(v) * 3 + 8) >> 4, -128), 127) + 128 for v in xs]
    assert got.dtype == np.uint8 and got.tolist() == want
    assert not any(n.op_type == "Sub" for n in g.nodes), "zero point costs no node"


def test_range_analysis_rejects_overflow():
    g = GraphBuilder("overflow")
    x = g.input("x", np.int32, ["N"], -(2**30), 2**30)
    with pytest.raises(RangeError, match="does not fit int32"):
        g.mul(x, g.scalar(4, np.int32), "too_big")


def test_matmul_operand_must_keep_to_seven_bits():
    g = GraphBuilder("mm")
    a = g.input("a", np.uint8, ["T", 4], 0, 255)
    w = g.const("w", np.full((4, 2), -65, np.int8))
    with pytest.raises(RangeError, match="7 bits"):
        g.matmul_integer(a, w, 128, 4, "acc")


@given(m=st.floats(1e-9, 1e6), x_bound=st.integers(1, 2**40), out_bound=st.integers(1, 2**31))
def test_choose_multiplier_is_accurate_and_safe(m, x_bound, out_bound):
    big_m, shift = quant.choose_multiplier(m, x_bound, out_bound)
    assert int(big_m[0]) * x_bound < 2**62
    assert out_bound * 2**shift < 2**62
    approx = int(big_m[0]) / 2**shift
    # Either close to m, or m is so small relative to the bounds that rounding dominates.
    assert abs(approx - m) <= max(m * 1e-3, 2.0**-shift)


def test_weights_quantise_to_seven_bits_per_channel():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(8, 16)) * np.arange(1, 9)[:, None]
    ql = quant.quantize_linear(w)
    assert ql.weight.dtype == np.int8 and ql.weight.shape == (16, 8)
    assert ql.weight.min() >= -64 and ql.weight.max() <= 63
    np.testing.assert_allclose(ql.weight.T * ql.scale[:, None], w, atol=ql.scale.max() / 2)
