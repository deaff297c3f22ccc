"""The fixed-point building blocks of the graph, run on ONNX Runtime against exact Python."""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from optinfer.models import quant
from optinfer.models.graph_builder import GraphBuilder, RangeError, Tensor
from optinfer.models.runtime import session_options
from tests.profiles import examples


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


@settings(max_examples=examples(60), deadline=None)
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


@settings(max_examples=examples(60), deadline=None)
@given(
    rows=st.lists(st.lists(st.integers(-(2**24), 2**24), min_size=3, max_size=3), min_size=1,
                  max_size=20),
    ms=st.lists(st.integers(0, 2**14), min_size=3, max_size=3),
    shift=st.integers(1, 14),
    lo=st.integers(-(2**15), 0),
    hi=st.integers(0, 2**15),
    zero_point=st.integers(0, 2**15),
)
def test_rescale_int32_equals_the_exact_rounding_and_clip(rows, ms, shift, lo, hi, zero_point):
    g = GraphBuilder("rescale32")
    x = g.input("x", np.int32, ["N", 3], -(2**24), 2**24)
    ms = [m % (4 << shift) for m in ms]  # multipliers below 4 (those of 1 or more step past
    # the saturation point, and a Clip of the result takes them back)
    g.output(g.rescale_int32(x, np.asarray(ms), shift, lo, hi, "y", zero_point=zero_point))
    xs = np.asarray(rows, np.int32)
    (got,) = run(g, {"x": xs})
    # Per channel: floor(x*m/2**S + 1/2) clipped to [lo, hi], plus the zero point.
    want = [[min(max((int(v) * m + (1 << (shift - 1))) >> shift, lo), hi) + zero_point
             for v, m in zip(row, ms, strict=True)] for row in rows]
    assert got.dtype == np.int32 and got.tolist() == want


def test_rescale_int32_scalar_multiplier_and_overflow_guard():
    g = GraphBuilder("rescale32")
    x = g.input("x", np.int32, ["N"], -(2**31), 2**31 - 1)
    g.output(g.rescale_int32(x, 3000, 12, 0, 4096, "y"))
    xs = np.asarray([-(2**31), -1, 0, 1, 1365, 1366, 2**22, 2**31 - 1], np.int32)
    (got,) = run(g, {"x": xs})
    assert got.tolist() == [min(max((int(v) * 3000 + 2048) >> 12, 0), 4096) for v in xs]
    with pytest.raises(RangeError, match="overflows int32"):
        GraphBuilder("too_wide").rescale_int32(x, 3, 16, -(2**15), 2**15, "y")
    with pytest.raises(ValueError, match=r"\[0, 2\*\*31\)"):
        GraphBuilder("wraps").rescale_int32(x, 2**31, 1, 0, 1, "y")


def test_choose_multiplier_int32_keeps_the_graph_in_int32():
    m = np.array([0.01, 0.025, 0.0])
    big_m, shift = quant.choose_multiplier_int32(m, -(2**15), 2**15)
    assert shift == 14 and big_m.tolist() == [164, 410, 0]  # (2**16 + 2) * 2**14 < 2**31
    with pytest.raises(ValueError, match="fewer than 6 bits"):
        quant.choose_multiplier_int32(np.array([1e-6]), -(2**15), 2**15)
    big_m, shift = quant.choose_multiplier_int32(np.array([0.37]), 0, 4096)
    assert 4098 * 2**shift < 2**31 <= 4098 * 2 ** (shift + 1)
    assert np.allclose(big_m / 2.0**shift, [0.37], rtol=1e-4)
    # Two channels 7.4x apart: two bits of shift given up for one shared clip.
    big_m, shift = quant.choose_multiplier_int32(np.array([0.37, 0.05]), 0, 4096)
    assert 4098 * 2 ** (shift + 2) < 2**31 <= 4098 * 2 ** (shift + 3)
    assert quant.shared_clip(big_m, shift, 0, 4096) is not None
    assert np.allclose(big_m / 2.0**shift, [0.37, 0.05], rtol=1e-3)
    # Multipliers of 1 or more: the headroom also holds the step past saturation.
    big_m, shift = quant.choose_multiplier_int32(np.array([3.2, 1.0]), 0, 4096)
    assert (4097 + 4) * 2**shift < 2**31 and big_m.tolist() == [round(3.2 * 2**shift), 2**shift]


@settings(max_examples=examples(60), deadline=None)
@given(
    xs=st.lists(st.integers(-(2**31), 2**31 - 1), min_size=1, max_size=12),
    base=st.integers(2**8, 2**12),
    spread=st.lists(st.floats(1.0, 2.9), min_size=3, max_size=3),
    zero_channel=st.booleans(),
    zero_point=st.sampled_from([0, 2**15]),
)
def test_rescale_int32_with_one_shared_clip_equals_the_exact_rounding(xs, base, spread,
                                                                        zero_channel,
                                                                        zero_point):
    # Multipliers within a factor 3 of each other share one scalar Clip at shift 14 over a
    # +-2**15 range; every int32 input still gets each channel's exact result.
    ms = [0 if zero_channel and c == 1 else round(base * f) for c, f in enumerate(spread)]
    shift, lo, hi = 14, -(2**15), 2**15
    assert quant.shared_clip(np.asarray(ms), shift, lo, hi) is not None
    g = GraphBuilder("shared")
    x = g.input("x", np.int32, ["N", 3], -(2**31), 2**31 - 1)
    g.output(g.rescale_int32(x, np.asarray(ms), shift, lo, hi, "y", zero_point=zero_point))
    assert {n.op_type for n in g.nodes} & {"Max", "Min"} == set()
    rows = np.asarray([[v, -v - 1, v // 3] for v in xs], np.int32)
    (got,) = run(g, {"x": rows})
    want = [[min(max((int(v) * m + (1 << (shift - 1))) >> shift, lo), hi) + zero_point
             for v, m in zip(row, ms, strict=True)] for row in rows]
    assert got.tolist() == want


def test_shared_clip_needs_multipliers_that_spread_little():
    lo, hi = -(2**15), 2**15
    assert quant.shared_clip(np.array([1000, 2900]), 14, lo, hi) is not None
    assert quant.shared_clip(np.array([1000, 4000]), 14, lo, hi) is None  # 2**29 * 4 > 2**31
    assert quant.shared_clip(np.array([1000, 4000]), 13, lo, hi) is not None
    assert quant.shared_clip(np.array([0, 0]), 14, lo, hi) is None
    # choose_multiplier_int32 gives up shift for it while every M keeps 8 bits ...
    big_m, shift = quant.choose_multiplier_int32(np.array([0.05, 0.2]), lo, hi)
    assert shift == 13 and big_m.min() >= 2**8
    assert quant.shared_clip(big_m, shift, lo, hi) is not None
    # ... and not where that would cost more: a spread of 100 keeps the per-channel bounds.
    big_m, shift = quant.choose_multiplier_int32(np.array([0.05, 5.0]), lo, hi)
    assert shift == 14 and quant.shared_clip(big_m, shift, lo, hi) is None


def test_lookup_is_the_table_at_every_index_of_any_shape():
    table = np.arange(100, 0, -1, dtype=np.int32) * 7
    g = GraphBuilder("lookup")
    idx = g.input("idx", np.int32, ["A", "B", "C"], 0, 99)
    g.output(g.lookup(g.const("table", table), idx, "values"))
    xs = np.random.default_rng(1).integers(0, 100, (2, 3, 5)).astype(np.int32)
    (got,) = run(g, {"idx": xs})
    assert got.shape == xs.shape and np.array_equal(got, table[xs])
    with pytest.raises(RangeError, match="leaves the table"):
        g.lookup(g.const("table", table), g.input("far", np.int32, ["N"], 0, 100), "far")


def test_silu_table_is_silu_in_the_gates_fixed_point():
    table = quant.silu_table(frac_bits=10, half_range=2**15)
    assert table.dtype == np.int32 and table.shape == (2**16 + 1,)
    x = (np.arange(table.size) - 2**15) / 2**10
    silu = x / (1 + np.exp(-x))
    assert np.abs(table / 2**10 - silu).max() <= 2**-11  # rounded to the nearest unit
    assert table[2**15] == 0 and table[-1] == 2**15  # silu(32) = 32 to within 2**-10


def test_rescale_int32_by_one_is_a_rounding_shift_without_a_product():
    g = GraphBuilder("shift32")
    x = g.input("x", np.int32, ["N"], -(2**30), 2**30)
    g.output(g.rescale_int32(x, 1, 21, -128, 127, "y", np.uint8, zero_point=128))
    assert "Mul" not in {node.op_type for node in g.nodes}
    xs = np.asarray([-(2**30), -(2**28) - 1, -(2**20) - 1, -(2**20), 0, 2**20 - 1, 2**20,
                     127 * 2**21, 2**30], np.int32)
    (got,) = run(g, {"x": xs})
    assert got.tolist() == [min(max((int(v) + 2**20) >> 21, -128), 127) + 128 for v in xs]


@settings(max_examples=examples(40), deadline=None)
@given(
    rows=st.lists(st.lists(st.integers(-(2**21), 2**21), min_size=8, max_size=8), min_size=1,
                  max_size=6),
    gains=st.lists(st.integers(-(2**24), 2**24), min_size=8, max_size=8),
    shift=st.integers(1, 31),
    eps_q=st.integers(1, 1000),
    wide=st.booleans(),
)
def test_rmsnorm_rounds_once_per_element(rows, gains, shift, eps_q, wide):
    """uint8 (zero point 128), or with 16-bit linear inputs two uint8 planes of a value with
    zero point 2**15 (high bytes first)."""
    from types import SimpleNamespace

    from optinfer.models.qwen2_graph import Norm, _Qwen2Builder

    builder = _Qwen2Builder.__new__(_Qwen2Builder)  # the norm needs only the graph and width
    builder.g, builder.m = GraphBuilder("norm"), SimpleNamespace(hidden_size=8)
    builder.wide = wide
    builder.rows = builder.g.input("rows", np.int64, [1], 0, 64)
    if wide:
        shift = min(shift, 23)  # the converter's largest for 16 bits: (2**16 + 1) * 2**S * rms
    r = builder.g.input("r", np.int32, ["T", 8], -(2**21), 2**21)
    norm = Norm(G=np.asarray(gains, np.int64), shift=shift, eps_q=eps_q)
    out = builder.rmsnorm(r, norm, "n")
    builder.g.output(out.stack if wide else out)
    (got,) = run(builder.g, {"r": np.asarray(rows, np.int32),
                             "rows": np.array([len(rows)], np.int64)})
    zp, top = (2**15, 2**16 - 1) if wide else (128, 255)
    want = []
    for row in rows:
        rms = math.isqrt(sum(v * v for v in row) // 8 + eps_q)
        den = rms << shift  # round(r * G / den) + zp, clipped, in exact integers
        want.append([min(max((2 * v * gain + (2 * zp + 1) * den) // (2 * den), 0), top)
                     for v, gain in zip(row, gains, strict=True)])
    assert got.dtype == np.uint8
    if wide:
        got = got[:len(rows)].astype(np.int64) * 256 + got[len(rows):]
    assert got.tolist() == want


def _norm_builder(hidden: int, wide: bool):
    from types import SimpleNamespace

    from optinfer.models.qwen2_graph import _Qwen2Builder

    builder = _Qwen2Builder.__new__(_Qwen2Builder)  # the norm needs only the graph and width
    builder.g, builder.m = GraphBuilder("norm"), SimpleNamespace(hidden_size=hidden)
    builder.wide = wide
    builder.rows = builder.g.input("rows", np.int64, [1], 0, 64)
    return builder


@settings(max_examples=examples(40), deadline=None)
@given(
    rows=st.lists(st.lists(st.one_of(st.integers(-(2**28), 2**28), st.integers(-300, 300)),
                           min_size=8, max_size=8), min_size=1, max_size=6),
    gains=st.lists(st.integers(-(2**20), 2**20), min_size=8, max_size=8),
    shift=st.integers(1, 15),
    eps_q=st.integers(1, 1000),
)
def test_rmsnorm_of_a_fine_residual_squares_each_rows_top_bits(rows, gains, shift, eps_q):
    """A residual past 2**residual_bits(H) (here 2**25 for H = 8): each row's sum of squares
    is taken over r / 2**k, k the fewest bits that bring its largest |r| below 2**25, so a row
    of small values keeps every bit and a large row's rms keeps 24 bits of precision."""
    from optinfer.models.qwen2_graph import Norm, residual_bits

    b = residual_bits(8)
    builder = _norm_builder(8, wide=True)
    r = builder.g.input("r", np.int32, ["T", 8], -(2**28), 2**28)
    out = builder.rmsnorm(r, Norm(G=np.asarray(gains, np.int64), shift=shift, eps_q=eps_q), "n")
    builder.g.output(out.stack)
    lo, hi = builder.g.bounds["n.rms.scaled"]
    builder.g.output(Tensor("n.rms.scaled", np.dtype(np.int64), lo, hi))
    got, rms_got = run(builder.g, {"r": np.asarray(rows, np.int32),
                                   "rows": np.array([len(rows)], np.int64)})
    zp, top = 2**15, 2**16 - 1
    want, want_rms = [], []
    for row in rows:
        k = max(0, -(-(max(v * v for v in row).bit_length() - 2 * b) // 2))
        top_bits = [int(v / 2**k) for v in row]  # truncated toward zero, as ONNX Div
        assert max(abs(c) for c in top_bits) < 2**b
        rms = math.isqrt(sum(c * c for c in top_bits) // 8 + eps_q) << k
        if k:  # the rms of a large row is within 2**-(b-3) of the exact one
            exact = math.sqrt(sum(v * v for v in row) / 8)
            assert abs(rms - exact) <= exact * 2.0 ** -(b - 3)
        want_rms.append([rms])
        den = rms << shift
        want.append([min(max((2 * v * gain + (2 * zp + 1) * den) // (2 * den), 0), top)
                     for v, gain in zip(row, gains, strict=True)])
    assert rms_got.tolist() == want_rms
    got = got[:len(rows)].astype(np.int64) * 256 + got[len(rows):]
    assert got.tolist() == want


def test_a_residual_that_squares_exactly_keeps_the_plain_norm():
    from optinfer.models.qwen2_graph import Norm, residual_bits

    builder = _norm_builder(8, wide=False)
    r = builder.g.input("r", np.int32, ["T", 8], -(2 ** residual_bits(8)), 2 ** residual_bits(8))
    builder.rmsnorm(r, Norm(G=np.ones(8, np.int64), shift=4, eps_q=1), "n")
    assert "n.top" not in builder.g.bounds and "n.unit" not in builder.g.bounds


def test_bit_length_power_of_two_and_a_clip_outside_its_interval():
    g = GraphBuilder("bits")
    n = g.input("n", np.int64, ["N", 1], 0, 2**62 - 1)  # one value per row, as in RMSNorm
    g.output(g.bit_length(n, "len"))
    k = g.input("k", np.int64, ["N"], 0, 62)
    g.output(g.power_of_two(k, "pow"))
    values = [0, 1, 2, 3, 4, 255, 256, 2**40, 2**62 - 1]
    exponents = [0, 1, 5, 31, 32, 62, 3, 2, 61]
    got_len, got_pow = run(g, {"n": np.asarray(values, np.int64).reshape(-1, 1),
                               "k": np.asarray(exponents, np.int64)})
    assert got_len.ravel().tolist() == [v.bit_length() for v in values]
    assert got_pow.tolist() == [2**e for e in exponents]
    below = g.input("below", np.int64, ["N"], -50, -10)
    assert (lambda t: (t.lo, t.hi))(g.clip(below, 0, 62, "c")) == (0, 0)
    with pytest.raises(RangeError):
        g.power_of_two(below, "p")


def test_signed_planes_are_the_two_7_bit_halves_of_a_13_bit_value():
    g = GraphBuilder("signed planes")
    v = g.input("v", np.int32, ["N", 1], -(2**12), 2**12 - 1)
    planes = g.signed_planes(v, 1, "p")
    assert planes.dtype == np.int8 and (planes.lo, planes.hi) == (-64, 63)
    g.output(planes)
    values = np.arange(-(2**12), 2**12, dtype=np.int32).reshape(-1, 1)
    (got,) = run(g, {"v": values})
    hi, lo = got[:, 0].astype(np.int64), got[:, 1].astype(np.int64)
    assert (64 * hi + lo == values[:, 0]).all()
    assert hi.min() == -64 and hi.max() == 63 and lo.min() == 0 and lo.max() == 63
    with pytest.raises(RangeError):
        g.signed_planes(g.input("w", np.int32, ["N", 1], 0, 2**12), 1, "q")
