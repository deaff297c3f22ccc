"""A small builder for integer-only ONNX graphs that proves, as it goes, that nothing overflows.

Every tensor the builder hands out carries its dtype and a static interval [lo, hi] that holds
for every input the graph accepts (sequence lengths up to the model's max context). Each op
propagates the intervals of its inputs; an interval that leaves its dtype is a build error. That
is the static range analysis (docs/models.md): constants bound the weights, clips bound the
activations, so the bounds are tight enough to be useful and cheap to compute.

Every node has exactly one output, so node k of the graph is leaf k of the state tree.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from optinfer.models.opset import DOUBLE_EXACT_LIMIT, INDEX_DTYPES, ONNX_OPSET
from optinfer.models.quant import saturation_inputs, shared_clip

_ONNX_TYPE = {
    np.dtype(np.bool_): TensorProto.BOOL,
    np.dtype(np.uint8): TensorProto.UINT8,
    np.dtype(np.int8): TensorProto.INT8,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.int64): TensorProto.INT64,
}
_LIMITS = {
    np.dtype(np.bool_): (0, 1),
    np.dtype(np.uint8): (0, 255),
    np.dtype(np.int8): (-128, 127),
    np.dtype(np.int32): (-(2**31), 2**31 - 1),
    np.dtype(np.int64): (-(2**63), 2**63 - 1),
}
INT64_MAX = 2**63 - 1
ACT_ZERO_POINT = 128  # MatMulInteger's zero point for uint8 activations (and planes)
PLANE_BASE = 256  # a 16-bit activation u = x + 2**15 is 256 * hi + lo
PLANE_ZERO_POINT = 1 << 15  # the 16-bit activation's zero point
PLANE_TOP = (1 << 16) - 1
SIGNED_PLANE_BASE = 64  # a 13-bit B operand v is 64 * hi + lo, hi in [-64, 63], lo in [0, 63]
SIGNED_PLANE_HALF = 1 << 12  # v in [-2**12, 2**12)
COLUMN_SOURCES_KEY = "optinfer.column_sources"  # model metadata: MatMulInteger -> B columns


class RangeError(ValueError):
    """A tensor's static interval does not fit its dtype: the graph could overflow."""


@dataclass(frozen=True)
class Tensor:
    """A value in the graph under construction: its name, dtype and static interval."""

    name: str
    dtype: np.dtype
    lo: int
    hi: int

    @property
    def magnitude(self) -> int:
        return max(abs(self.lo), abs(self.hi))


def _as_int32(values: np.ndarray, hint: str) -> np.ndarray:
    """int64 constants as int32, refused where they would wrap."""
    values = np.asarray(values, np.int64)
    if values.size and (values.min() < -(2**31) or values.max() >= 2**31):
        raise RangeError(f"{hint}: constants [{values.min()}, {values.max()}] do not fit int32")
    return values.astype(np.int32)


def split_signed_planes(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """13-bit signed integers v in [-2**12, 2**12) as two int8 planes, v = 64 * hi + lo with
    hi = floor(v / 64) in [-64, 63] and lo = v mod 64 in [0, 63] (`signed_planes` computes
    the same inside a graph)."""
    hi, lo = np.divmod(np.asarray(v, np.int64), SIGNED_PLANE_BASE)
    return hi.astype(np.int8), lo.astype(np.int8)


def vocabulary_chunk(vocab_size: int, chunk_bytes: int) -> int:
    """The largest divisor of the vocabulary whose int32 chunk fits `chunk_bytes`: reductions
    over the vocabulary run over such chunks, then over the chunk sums or maxima, so that one
    output element's one-step opens at most a chunk."""
    limit = chunk_bytes // 4
    if vocab_size <= limit:
        return vocab_size
    best = max(d for d in range(1, limit + 1) if vocab_size % d == 0)
    if best < 64:
        raise ValueError(f"vocabulary size {vocab_size} has no divisor usable as a chunk of "
                         f"at most {chunk_bytes} bytes")
    return best


def _trunc_div(a: int, b: int) -> int:
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


@dataclass
class GraphBuilder:
    """Collects nodes, constants and per-tensor intervals; `model()` returns the ONNX graph."""

    name: str
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    constants: dict[str, np.ndarray] = field(default_factory=dict)
    inputs: list[onnx.ValueInfoProto] = field(default_factory=list)
    outputs: list[onnx.ValueInfoProto] = field(default_factory=list)
    bounds: dict[str, tuple[int, int]] = field(default_factory=dict)
    assumptions: dict[str, str] = field(default_factory=dict)
    column_sources: dict[str, str] = field(default_factory=dict)  # MatMulInteger -> B columns
    _names: set[str] = field(default_factory=set)

    # ----------------------------------------------------------------- values

    def _fresh(self, hint: str) -> str:
        name, n = hint, 1
        while name in self._names:
            n += 1
            name = f"{hint}.{n}"
        self._names.add(name)
        return name

    def _tensor(self, name: str, dtype, lo: int, hi: int) -> Tensor:
        dtype = np.dtype(dtype)
        lo, hi = int(lo), int(hi)
        dmin, dmax = _LIMITS[dtype]
        if lo < dmin or hi > dmax:
            raise RangeError(f"{name}: interval [{lo}, {hi}] does not fit {dtype}")
        self.bounds[name] = (lo, hi)
        return Tensor(name, dtype, lo, hi)

    def input(self, name: str, dtype, shape: list, lo: int, hi: int) -> Tensor:
        self._names.add(name)
        self.inputs.append(helper.make_tensor_value_info(name, _ONNX_TYPE[np.dtype(dtype)], shape))
        return self._tensor(name, dtype, lo, hi)

    def output(self, t: Tensor, shape: list | None = None) -> None:
        self.outputs.append(helper.make_tensor_value_info(t.name, _ONNX_TYPE[t.dtype], shape))

    def const(self, name: str, value) -> Tensor:
        """A constant tensor (an initializer); identical re-registrations return the same tensor."""
        arr = np.ascontiguousarray(value)
        if arr.dtype not in _ONNX_TYPE:
            raise TypeError(f"constant {name}: dtype {arr.dtype} is not in the integer op set")
        if name in self.constants:
            old = self.constants[name]
            if old.dtype != arr.dtype or old.shape != arr.shape or not np.array_equal(old, arr):
                raise ValueError(f"constant {name} registered twice with different values")
        else:
            self._names.add(name)
            self.constants[name] = arr
        lo = int(arr.min()) if arr.size else 0
        hi = int(arr.max()) if arr.size else 0
        return self._tensor(name, arr.dtype, lo, hi)

    def scalar(self, value: int, dtype=np.int64) -> Tensor:
        """A shared scalar constant, named after its value."""
        dt = np.dtype(dtype)
        return self.const(f"c.{dt.name}.{value}", np.array(value, dtype=dt))

    def ints(self, values, name: str | None = None) -> Tensor:
        """A small shared int64 vector constant (shapes, axes, indices)."""
        arr = np.asarray(values, dtype=np.int64)
        label = name or "c.i64[" + ",".join(str(v) for v in arr.ravel()) + "]"
        return self.const(label, arr)

    def assume(self, t: Tensor, lo: int, hi: int, why: str) -> Tensor:
        """Narrow t's interval to [lo, hi] for a reason interval arithmetic cannot see.

        Each use states the invariant that justifies it; `why` is kept in `self.assumptions`.
        """
        if lo < t.lo or hi > t.hi:
            lo, hi = max(lo, t.lo), min(hi, t.hi)
        self.assumptions[t.name] = why
        return self._tensor(t.name, t.dtype, lo, hi)

    def _node(self, op: str, inputs: list[Tensor], hint: str, dtype, lo, hi, **attrs) -> Tensor:
        out = self._fresh(hint)
        self.nodes.append(helper.make_node(op, [t.name for t in inputs], [out], name=out, **attrs))
        return self._tensor(out, dtype, lo, hi)

    # ------------------------------------------------------------ arithmetic

    def matmul_integer(self, a: Tensor, b: Tensor, a_zero_point: int, k: int, hint: str,
                       columns: Tensor | None = None) -> Tensor:
        """(A - zp) @ B in int32; k is the (maximum) length of the contracted axis.

        `columns` names an earlier tensor equal to B with its last two axes swapped, whose
        rows are B's columns: a one-step proof opens a row there instead of a strided column
        of B (docs/protocol.md, "Column sources"). A constant B is its own column source (it
        is committed transposed).
        """
        if a.dtype != np.uint8 or b.dtype != np.int8:
            raise TypeError(f"{hint}: MatMulInteger takes uint8 x int8, got {a.dtype} x {b.dtype}")
        if b.lo < -64 or b.hi > 63:
            raise RangeError(f"{hint}: B operand [{b.lo}, {b.hi}] exceeds 7 bits (pair saturation)")
        zp = self.scalar(a_zero_point, np.uint8)
        a_mag = max(abs(a.lo - a_zero_point), abs(a.hi - a_zero_point))
        bound = k * a_mag * b.magnitude
        weights = self.constants.get(b.name)
        if weights is not None and weights.ndim == 2:
            # A constant B bounds each output column by its own absolute sum.
            bound = a_mag * int(np.abs(weights.astype(np.int64)).sum(axis=0).max())
        out = self._node("MatMulInteger", [a, b, zp], hint, np.int32, -bound, bound)
        if weights is not None:
            self.column_sources[out.name] = b.name
        elif columns is not None:
            self.column_sources[out.name] = columns.name
        return out

    def swap_last_axes(self, x: Tensor, rank: int, hint: str) -> Tensor:
        """x with its last two axes swapped: the column source of a dynamic B operand."""
        perm = list(range(rank - 2)) + [rank - 1, rank - 2]
        return self.transpose(x, perm, hint)

    def cast(self, x: Tensor, dtype, hint: str | None = None) -> Tensor:
        to = _ONNX_TYPE[np.dtype(dtype)]
        return self._node("Cast", [x], hint or f"{x.name}.cast", dtype, x.lo, x.hi, to=to)

    def add(self, x: Tensor, y: Tensor, hint: str) -> Tensor:
        return self._node("Add", [x, y], hint, x.dtype, x.lo + y.lo, x.hi + y.hi)

    def sub(self, x: Tensor, y: Tensor, hint: str) -> Tensor:
        return self._node("Sub", [x, y], hint, x.dtype, x.lo - y.hi, x.hi - y.lo)

    def mul(self, x: Tensor, y: Tensor, hint: str) -> Tensor:
        corners = [x.lo * y.lo, x.lo * y.hi, x.hi * y.lo, x.hi * y.hi]
        return self._node("Mul", [x, y], hint, x.dtype, min(corners), max(corners))

    def wrapping(self, op: str, x: Tensor, y: Tensor, hint: str) -> Tensor:
        """Add or Mul (int64) that may wrap, on purpose: a hash's mixing step. The op set
        defines the wrap (two's complement, docs/opset.md); the result may be any int64."""
        if op not in ("Add", "Mul") or x.dtype != np.int64 or y.dtype != np.int64:
            raise TypeError(f"{hint}: wrapping Add or Mul of int64 only, got {op} of "
                            f"{x.dtype} and {y.dtype}")
        return self._node(op, [x, y], hint, np.int64, *_LIMITS[np.dtype(np.int64)])

    def remainder(self, x: Tensor, m: Tensor, hint: str) -> Tensor:
        """x mod m for x >= 0 and m >= 1, as x - (x / m) * m (truncation is floor here)."""
        if x.lo < 0:
            raise RangeError(f"{hint}: remainder of [{x.lo}, {x.hi}], which may be negative")
        q = self.div(x, m, f"{hint}.q")
        # q * m <= x, which interval arithmetic (q.hi * m.hi) cannot see.
        floor = self._node("Mul", [q, m], f"{hint}.floor", x.dtype, 0, x.hi)
        r = self.sub(x, floor, hint)
        return self.assume(r, 0, m.hi - 1, "a remainder is below its divisor")

    def square(self, x: Tensor, hint: str) -> Tensor:
        """x * x, whose interval (unlike a general product's) is non-negative."""
        lo = 0 if x.lo <= 0 <= x.hi else min(x.lo * x.lo, x.hi * x.hi)
        return self._node("Mul", [x, x], hint, x.dtype, lo, x.magnitude**2)

    def div(self, x: Tensor, y: Tensor, hint: str) -> Tensor:
        """Truncating division by a strictly positive divisor."""
        if y.lo < 1:
            raise RangeError(f"{hint}: divisor interval [{y.lo}, {y.hi}] may reach zero")
        corners = [_trunc_div(a, b) for a in (x.lo, x.hi) for b in (y.lo, y.hi)]
        lo, hi = min(corners), max(corners)
        if x.lo <= 0 <= x.hi:
            lo, hi = min(lo, 0), max(hi, 0)
        return self._node("Div", [x, y], hint, x.dtype, lo, hi)

    def clip(self, x: Tensor, lo: int, hi: int, hint: str) -> Tensor:
        lo_t, hi_t = self.scalar(lo, x.dtype), self.scalar(hi, x.dtype)
        # An interval wholly outside [lo, hi] clips to the bound it passed.
        return self._node("Clip", [x, lo_t, hi_t], hint, x.dtype, min(max(x.lo, lo), hi),
                          max(min(x.hi, hi), lo))

    def minimum(self, x: Tensor, y: Tensor, hint: str) -> Tensor:
        return self._node("Min", [x, y], hint, x.dtype, min(x.lo, y.lo), min(x.hi, y.hi))

    def maximum(self, x: Tensor, y: Tensor, hint: str) -> Tensor:
        return self._node("Max", [x, y], hint, x.dtype, max(x.lo, y.lo), max(x.hi, y.hi))

    def greater(self, x: Tensor, y: Tensor, hint: str) -> Tensor:
        return self._node("Greater", [x, y], hint, np.bool_, 0, 1)

    # ------------------------------------------------------------- reductions

    def reduce_sum(self, x: Tensor, n: int, hint: str) -> Tensor:
        """Sum over the last axis (length at most n), keepdims.

        ONNX Runtime accumulates ReduceSum in double, so every partial sum must stay within
        2**53 to be exact (see opset.reduce_sum).
        """
        if n * x.magnitude > DOUBLE_EXACT_LIMIT:
            raise RangeError(f"{hint}: {n} terms of magnitude {x.magnitude} exceed 2**53, "
                             "where ONNX Runtime's ReduceSum stops being exact")
        axes = self.ints([-1])
        return self._node("ReduceSum", [x, axes], hint, x.dtype, n * min(x.lo, 0),
                          n * max(x.hi, 0), keepdims=1)

    def reduce_max(self, x: Tensor, hint: str) -> Tensor:
        axes = self.ints([-1])
        return self._node("ReduceMax", [x, axes], hint, x.dtype, x.lo, x.hi, keepdims=1)

    def argmax(self, x: Tensor, n: int, hint: str) -> Tensor:
        """Index of the first maximum over the last axis (length n), keepdims."""
        return self._node("ArgMax", [x], hint, np.int64, 0, n - 1, axis=-1, keepdims=1,
                          select_last_index=0)

    # ---------------------------------------------------------- data movement

    def gather(self, data: Tensor, indices: Tensor, hint: str, axis: int = 0) -> Tensor:
        return self._node("Gather", [data, indices], hint, data.dtype, data.lo, data.hi, axis=axis)

    def gather_elements(self, data: Tensor, indices: Tensor, axis: int, hint: str) -> Tensor:
        return self._node("GatherElements", [data, indices], hint, data.dtype, data.lo, data.hi,
                          axis=axis)

    def reshape(self, x: Tensor, shape: list[int], hint: str) -> Tensor:
        return self._node("Reshape", [x, self.ints(shape)], hint, x.dtype, x.lo, x.hi)

    def transpose(self, x: Tensor, perm: list[int], hint: str) -> Tensor:
        return self._node("Transpose", [x], hint, x.dtype, x.lo, x.hi, perm=perm)

    def concat(self, xs: list[Tensor], axis: int, hint: str) -> Tensor:
        lo, hi = min(t.lo for t in xs), max(t.hi for t in xs)
        return self._node("Concat", xs, hint, xs[0].dtype, lo, hi, axis=axis)

    def slice(self, x: Tensor, start: Tensor, end: int | Tensor, axis: int, hint: str) -> Tensor:
        """x[start:end] along one axis; start (and end, when a tensor) is a 1-element int64
        tensor (may be dynamic)."""
        end_t = end if isinstance(end, Tensor) else self.ints([end])
        return self._node("Slice", [x, start, end_t, self.ints([axis])], hint,
                          x.dtype, x.lo, x.hi)

    def shape(self, x: Tensor, max_dim: int, hint: str) -> Tensor:
        return self._node("Shape", [x], hint, np.int64, 0, max_dim)

    def range(self, start: Tensor, limit: Tensor, hint: str) -> Tensor:
        one = self.scalar(1)
        return self._node("Range", [start, limit, one], hint, np.int64, start.lo, limit.hi)

    # ------------------------------------------------------------ fixed point

    def rescale(self, x: Tensor, multiplier, shift: int, lo: int, hi: int, hint: str,
                out_dtype=np.int64, zero_point: int = 0) -> Tensor:
        """round(x * M / 2**S) clipped to [lo, hi], plus zero_point, as out_dtype.

        Rounds half up. Division truncates toward zero in ONNX, so the value is clipped first and
        shifted to be non-negative before the division, where truncation equals floor. With
        zero_point == -lo (uint8 activations) the shift by -lo *is* the zero point, so no Sub.
        M may be a scalar or a per-channel vector broadcasting over the last axis.
        """
        if shift < 1:
            raise ValueError(f"{hint}: shift must be >= 1")
        x64 = x if x.dtype == np.int64 else self.cast(x, np.int64, f"{hint}.i64")
        m = np.asarray(multiplier, dtype=np.int64)
        if m.ndim == 0 and int(m) == 1:
            y = x64
        else:
            m_t = self.const(f"{hint}.M", m) if m.ndim else self.scalar(int(m))
            y = self.mul(x64, m_t, f"{hint}.mul")
        unit = 1 << shift
        y = self.clip(y, lo * unit, hi * unit, f"{hint}.clip")
        return self._round_shift(y, shift, lo, hi, hint, out_dtype, zero_point)

    def rescale_int32(self, x: Tensor, multiplier, shift: int, lo: int, hi: int, hint: str,
                      out_dtype=np.int32, zero_point: int = 0) -> Tensor:
        """`rescale` done in int32: round(x * M / 2**S) clipped to [lo, hi], plus zero_point.

        int64 element-wise ops cost ONNX Runtime 4-5x their int32 twins, and on the MLP's
        (T, 8960) tensors that decided the verification time. The price is headroom: x * M
        must fit int32, so x is clipped first, to the inputs past which the result stays
        saturated: x_lo = floor((lo * 2**S + 2**(S-1) - 1) / M), the largest x that rounds to
        lo, and x_hi = ceil((hi * 2**S - 2**(S-1)) / M), the smallest that rounds to hi (per
        channel when M is a vector: Max and Min against constant bounds, or one Clip where
        `quant.shared_clip` finds scalar bounds that serve every channel). With M < 2**S (a
        multiplier below 1) x_lo and x_hi round to exactly lo and hi, so the result equals
        `rescale`'s for every x; a larger multiplier can step past them, and a Clip of the
        result restores it. M is a scalar or a vector over the last axis;
        `quant.choose_multiplier_int32` picks M and S so that everything fits int32.
        """
        if shift < 1:
            raise ValueError(f"{hint}: shift must be >= 1")
        if x.dtype != np.int32:
            raise TypeError(f"{hint}: rescale_int32 takes int32, got {x.dtype}")
        if not lo <= 0 <= hi:
            raise ValueError(f"{hint}: [{lo}, {hi}] must hold 0 (a zero multiplier gives 0)")
        unit = 1 << shift
        if (hi - lo + 1) * unit >= 2**31:
            raise RangeError(f"{hint}: [{lo}, {hi}] with shift {shift} overflows int32")
        m = np.asarray(multiplier, dtype=np.int64)
        if np.any(m < 0) or np.any(m >= 2**31):
            raise ValueError(f"{hint}: multipliers must lie in [0, 2**31)")
        # A zero multiplier needs no clip: its product is 0.
        channel_lo, channel_hi = saturation_inputs(np.maximum(m, 1), shift, lo, hi)
        x_lo = np.where(m > 0, channel_lo, x.lo).clip(x.lo, x.hi)
        x_hi = np.where(m > 0, channel_hi, x.hi).clip(x.lo, x.hi)
        if m.ndim == 0:
            x = self.clip(x, int(x_lo), int(x_hi), f"{hint}.clip")
            if int(m) == 1:  # a rounding shift alone
                return self._round_shift(x, shift, lo, hi, hint, out_dtype, zero_point)
            m_t = self.scalar(int(m), np.int32)
            prod_lo, prod_hi = int(x_lo * m), int(x_hi * m)
        else:
            shared = shared_clip(m, shift, lo, hi)
            if shared is not None and max(shared[0], x.lo) <= min(shared[1], x.hi):
                # One scalar Clip for every channel; a channel's product may now pass its own
                # saturation point (a Clip of the result takes it back) or, below it, make the
                # dividend negative (truncation then gives at most 0, and that Clip gives 0).
                g_lo, g_hi = max(shared[0], x.lo), min(shared[1], x.hi)
                if (g_lo, g_hi) != (x.lo, x.hi):  # else x's own interval is inside: no Clip
                    x = self.clip(x, g_lo, g_hi, f"{hint}.clip")
                m_max = int(m.max())
                prod_lo, prod_hi = min(g_lo * m_max, 0), max(g_hi * m_max, 0)
            else:
                x = self.maximum(x, self.const(f"{hint}.x_min", x_lo.astype(np.int32)),
                                 f"{hint}.lo")
                x = self.minimum(x, self.const(f"{hint}.x_max", x_hi.astype(np.int32)),
                                 f"{hint}.hi")
                # The product's interval, channel by channel (interval arithmetic on the whole
                # vectors would pair one channel's bound with another's multiplier).
                prod_lo, prod_hi = int((x_lo * m).min()), int((x_hi * m).max())
            m_t = self.const(f"{hint}.M", m.astype(np.int32))
        y = self._node("Mul", [x, m_t], f"{hint}.mul", np.int32, prod_lo, prod_hi)
        return self._round_shift(y, shift, lo, hi, hint, out_dtype, zero_point)

    def _round_shift(self, y: Tensor, shift: int, lo: int, hi: int, hint: str, out_dtype,
                     zero_point: int) -> Tensor:
        """The tail both rescales share: y = x * M, already clipped to about [lo, hi] * 2**S,
        to round(y / 2**S) within [lo, hi], plus zero_point, as out_dtype.

        Shifted by -lo first, so that the value is non-negative where Div's truncation is
        floor; the result is value - lo, which is the zero point itself when zero_point == -lo.
        """
        unit = 1 << shift
        y = self.add(y, self.scalar(-lo * unit + unit // 2, y.dtype), f"{hint}.offset")
        q = self.div(y, self.scalar(unit, y.dtype), f"{hint}.shift")  # value - lo
        if q.lo < 0 or q.hi > hi - lo:  # a multiplier of 1 or more stepped past saturation
            q = self.clip(q, 0, hi - lo, f"{hint}.saturate")
        if zero_point != -lo:
            q = self.sub(q, self.scalar(-lo - zero_point, y.dtype), f"{hint}.value")
        if np.dtype(out_dtype) != q.dtype:
            q = self.cast(q, out_dtype, hint)
        return q

    # --------------------------------------------------- 16-bit activations as planes

    def planes(self, u: Tensor, axis: int, hint: str, count: int = 2) -> Tensor:
        """An activation of 8 * count bits as `count` uint8 planes stacked along `axis`, the
        most significant first.

        `u` is the activation x offset by its zero point, u = x + zp in [0, 256**count) (int32
        or int64). The lowest plane is Cast to uint8, which keeps the low byte; each higher one
        is u // 256**j (Div on a non-negative value, where truncation is floor), Cast likewise,
        and the top one needs no wrap. For two planes, u = 256 * hi + lo and, with
        MatMulInteger's zero point 128 on both, x = 256 * (hi - 128) + (lo - 128) + 128 when
        zp = 2**15.
        """
        top = PLANE_BASE**count - 1
        if u.lo < 0 or u.hi > top:
            raise RangeError(f"{hint}: [{u.lo}, {u.hi}] is not a {8 * count}-bit activation "
                             f"in [0, 2**{8 * count})")
        names = {2: ["hi", "lo"], 3: ["hi", "mid", "lo"]}.get(count)
        if names is None:
            raise ValueError(f"{hint}: 2 or 3 planes, not {count}")
        out = []
        for j, part in enumerate(names):
            weight = PLANE_BASE ** (count - 1 - j)
            if j == 0:  # the top byte: u // 256**(count-1) is already in [0, 255]
                high = self.div(u, self.scalar(weight, u.dtype), f"{hint}.{part}.value")
                out.append(self.cast(high, np.uint8, f"{hint}.{part}"))
                continue
            v = u if weight == 1 else self.div(u, self.scalar(weight, u.dtype),
                                               f"{hint}.{part}.value")
            lo, hi = (v.lo, v.hi) if v.hi < PLANE_BASE else (0, PLANE_BASE - 1)
            out.append(self._node("Cast", [v], f"{hint}.{part}", np.uint8, lo, hi,
                                  to=_ONNX_TYPE[np.dtype(np.uint8)]))  # wraps: the low byte
        return self.concat(out, axis, hint)

    def signed_planes(self, v: Tensor, axis: int, hint: str) -> Tensor:
        """A 13-bit signed value v in [-2**12, 2**12) as two int8 planes of a MatMulInteger B
        operand, stacked along `axis` (length 1 there), high first: hi = floor(v / 64) in
        [-64, 63] and lo = v mod 64 in [0, 63], so v = 64 * hi + lo and each plane keeps to
        the 7 bits that rule out pair saturation (`matmul_integer`).

        With u = v + 2**12 >= 0, floor is Div's truncation: hi = u // 64 - 64,
        lo = u - 64 * (u // 64).
        """
        if v.lo < -SIGNED_PLANE_HALF or v.hi >= SIGNED_PLANE_HALF:
            raise RangeError(f"{hint}: [{v.lo}, {v.hi}] is not a 13-bit signed value")
        u = self.add(v, self.scalar(SIGNED_PLANE_HALF, v.dtype), f"{hint}.u")
        top = self.div(u, self.scalar(SIGNED_PLANE_BASE, v.dtype), f"{hint}.u.hi")  # [0, 127]
        high = self.sub(top, self.scalar(SIGNED_PLANE_BASE, v.dtype), f"{hint}.hi.value")
        low = self.sub(u, self.mul(top, self.scalar(SIGNED_PLANE_BASE, v.dtype),
                                   f"{hint}.u.hi.scaled"), f"{hint}.lo.value")
        low = self.assume(low, 0, SIGNED_PLANE_BASE - 1, "u mod 64")
        return self.concat([self.cast(high, np.int8, f"{hint}.hi"),
                            self.cast(low, np.int8, f"{hint}.lo")], axis, hint)

    def matmul_integer_planes(self, a: Tensor, rows: Tensor, b: Tensor, bias, hint: str
                              ) -> Tensor:
        """floor((S + bias + 128) / 256) with S[i, j] = sum_k x[i, k] * B[k, j], in int32, for a
        16-bit activation x given as `planes` stacked along the rows: `a` is (2R, K) uint8,
        the high planes of R rows then their low planes; `rows` the 1-element int64 R.

        One MatMulInteger (zero point 128) reads the constant weights B (K, N) once for both
        planes: Y = [acc_hi; acc_lo] with acc_hi = sum_k (hi - 128) B and
        acc_lo = sum_k (lo - 128) B. Since x = 256 * (hi - 128) + (lo - 128) + 128,

            S = 256 * acc_hi + acc_lo + 128 * colsum(B),   colsum(B)[j] = sum_k B[k, j].

        S itself may not fit int32 (2**15 * 64 * K exceeds it from K = 1024 on), so the graph
        keeps S / 256, which has the range of an 8-bit input's accumulator, rounded half up,
        with the bias (int, per column, in units of S, or None) folded in at S's resolution.
        Writing bias = 256 * bh + bl with bl in [0, 256):

            floor((S + bias + 128) / 256)
              = acc_hi + bh + floor((acc_lo + 128 * colsum + bl + 128) / 256)
              = acc_hi + floor((acc_lo + C) / 256) + D,
            C = 128 * colsum + bl + 128 + 256 * E,   D = bh - E,

        with E >= 0 the smallest integer that makes the dividend acc_lo + C non-negative over
        acc_lo's interval, where Div's truncation is floor. Every term is bounded by
        128 * sum_k |B[k, j]| plus constants; the builder checks each interval as usual.
        """
        weights = self.constants.get(b.name)
        if weights is None or weights.ndim != 2:
            raise TypeError(f"{hint}: the planes' B operand must be a constant matrix")
        k = weights.shape[0]
        y = self.matmul_integer(a, b, ACT_ZERO_POINT, k, f"{hint}.planes")  # (2R, N)
        acc_hi = self.slice(y, self.ints([0]), rows, 0, f"{hint}.hi")  # (R, N)
        acc_lo = self.slice(y, rows, INT64_MAX, 0, f"{hint}.lo")  # (R, N)
        w = weights.astype(np.int64)
        colsum = w.sum(axis=0)
        bias = np.zeros(w.shape[1], np.int64) if bias is None else np.asarray(bias, np.int64)
        bh, bl = np.divmod(bias, PLANE_BASE)  # floor division: bl in [0, 256)
        c0 = ACT_ZERO_POINT * colsum + bl + PLANE_BASE // 2
        e = max(0, -((acc_lo.lo + int(c0.min())) // PLANE_BASE))  # ceil(-(lo + min C0) / 256)
        num = self.add(acc_lo, self.const(f"{hint}.C", _as_int32(c0 + PLANE_BASE * e, hint)),
                       f"{hint}.lo.biased")
        if num.lo < 0:
            raise RangeError(f"{hint}: the low plane's dividend may be negative")
        q = self.div(num, self.scalar(PLANE_BASE, np.int32), f"{hint}.lo.shift")
        acc = self.add(acc_hi, q, f"{hint}.sum")
        d = bh - e
        d_t = (self.scalar(int(_as_int32(d[:1], hint)[0]), np.int32) if np.all(d == d[0])
               else self.const(f"{hint}.D", _as_int32(d, hint)))
        acc = self.add(acc, d_t, hint)
        # The exact range of floor((S + bias + 128) / 256) per column, for x in
        # [-2**15, 2**15): interval arithmetic on the sum above is looser (it pairs one
        # column's bound with another's constant).
        pos, neg = np.clip(w, 0, None).sum(axis=0), np.clip(-w, 0, None).sum(axis=0)
        s_lo = -PLANE_ZERO_POINT * pos - (PLANE_ZERO_POINT - 1) * neg
        s_hi = (PLANE_ZERO_POINT - 1) * pos + PLANE_ZERO_POINT * neg
        lo = int(((s_lo + bias + PLANE_BASE // 2) // PLANE_BASE).min())
        hi = int(((s_hi + bias + PLANE_BASE // 2) // PLANE_BASE).max())
        return self.assume(acc, lo, hi, "the planes' rounded accumulator is "
                           "floor((S + bias + 128) / 256), S a sum of 16-bit x times B")

    def matmul_integer_wide(self, a: Tensor, count: int, weights: np.ndarray, bias,
                            zero_point: int, hint: str) -> Tensor:
        """S + bias exactly, in int64, with S[i, j] = sum_k x[i, k] * W[k, j] for an activation
        x of `count` uint8 planes stacked along the rows (`planes`; `a` is (count * R, K),
        x = u - zero_point) and 13-bit weights W (K, N) in
        [-2**12, 2**12), given as integers and split into two 7-bit planes here.

        One MatMulInteger (zero point 128) multiplies every activation plane by both weight
        planes side by side, B = [W_hi | W_lo] (K, 2N) with W = 64 * W_hi + W_lo
        (`split_signed_planes`), so each of the count * 2 partial products keeps to int32 and
        to 7-bit B operands. Then (Z in int32 where it fits, the rest in int64):

            Z_p = 64 * Y[p, :, :N] + Y[p, :, N:] = sum_k (plane_p - 128) * W,
            S = sum_p 256**(count-1-p) * Z_p + (128 * sum_p 256**p - zero_point) * colsum(W).
        """
        w = np.asarray(weights, np.int64)
        if w.ndim != 2 or w.min() < -SIGNED_PLANE_HALF or w.max() >= SIGNED_PLANE_HALF:
            raise RangeError(f"{hint}: wide weights must be a 13-bit signed matrix")
        k, n = w.shape
        hi, lo = split_signed_planes(w)
        b = self.const(f"{hint}.W", np.concatenate([hi, lo], axis=1))  # (K, 2N) int8
        y = self.matmul_integer(a, b, ACT_ZERO_POINT, k, f"{hint}.planes")  # (count*R, 2N)
        y = self.reshape(y, [count, -1, 2 * n], f"{hint}.by_plane")  # (count, R, 2N)
        # Z_p = 64 hi + lo stays in int32 up to K of about 4,000 (|Y| <= 128 * 64 * K): the
        # weight planes are recombined there, and only Z, half of Y, is widened to int64.
        wide_first = (SIGNED_PLANE_BASE + 1) * y.magnitude >= 2**31
        if wide_first:
            y = self.cast(y, np.int64, f"{hint}.i64")
        z = self.add(self.mul(self.slice(y, self.ints([0]), n, 2, f"{hint}.whi"),
                              self.scalar(SIGNED_PLANE_BASE, y.dtype), f"{hint}.whi.scaled"),
                     self.slice(y, self.ints([n]), 2 * n, 2, f"{hint}.wlo"),
                     f"{hint}.z")  # (count, R, N): sum_k (plane - 128) * W
        if not wide_first:
            z = self.cast(z, np.int64, f"{hint}.i64")
        total = None
        for p in range(count):
            zp_ = self.slice(z, self.ints([p]), p + 1, 0, f"{hint}.z{p}")
            if p < count - 1:
                zp_ = self.mul(zp_, self.scalar(PLANE_BASE ** (count - 1 - p)),
                               f"{hint}.z{p}.scaled")
            total = zp_ if total is None else self.add(total, zp_, f"{hint}.sum{p}")
        colsum = w.sum(axis=0)
        offset = ACT_ZERO_POINT * sum(PLANE_BASE**p for p in range(count)) - zero_point
        bias = np.zeros(n, np.int64) if bias is None else np.asarray(bias, np.int64)
        s = self.add(self.reshape(total, [-1, n], f"{hint}.rows"),
                     self.const(f"{hint}.C", offset * colsum + bias), f"{hint}.exact")
        # The exact range per column, for x in [-zero_point, 256**count - 1 - zero_point].
        x_lo, x_hi = -zero_point, PLANE_BASE**count - 1 - zero_point
        pos, neg = np.clip(w, 0, None).sum(axis=0), np.clip(-w, 0, None).sum(axis=0)
        s_lo = int((x_lo * pos - x_hi * neg + bias).min())
        s_hi = int((x_hi * pos - x_lo * neg + bias).max())
        return self.assume(s, s_lo, s_hi, "S + bias, S a sum of the planes' x times 13-bit W")

    def lookup(self, table: Tensor, index: Tensor, hint: str) -> Tensor:
        """table[index] for a 1-D constant table, elementwise over an index tensor of any shape.

        Done as GatherElements over the flattened indices: ONNX Runtime's Gather copies each
        element through a generic block copy (12 ms for 2.6 M indices on 2 cores), its
        GatherElements is 5x faster. The index stays int32 where it is: a Cast to int64 on
        ONNX Runtime's one thread cost more than the lookup itself (2.6 M indices: 6.6 ms
        against 2.3 ms). Returns the index tensor's shape, table's dtype.
        """
        if index.lo < 0 or index.hi >= self.constants[table.name].shape[0]:
            raise RangeError(f"{hint}: index interval [{index.lo}, {index.hi}] leaves the table")
        if index.dtype not in INDEX_DTYPES:
            raise TypeError(f"{hint}: a lookup takes int32 or int64 indices, got {index.dtype}")
        flat = self.reshape(index, [-1], f"{hint}.flat")
        values = self.gather_elements(table, flat, 0, f"{hint}.values")
        shape = self.shape(index, INT64_MAX, f"{hint}.shape")
        return self._node("Reshape", [values, shape], hint, values.dtype, values.lo, values.hi)

    def _powers_of_two(self) -> tuple[Tensor, Tensor]:
        """The tables 2**i - 1 (i < 62) and 2**i (i < 63), made together: the order of the
        constants is part of a model's root."""
        return (self.const("c.pow2m1", (np.int64(1) << np.arange(62, dtype=np.int64)) - 1),
                self.const("c.pow2", np.int64(1) << np.arange(63, dtype=np.int64)))

    def bit_length(self, n: Tensor, hint: str) -> Tensor:
        """The bit length of each element of a non-negative int64 tensor below 2**62 (0 for 0)
        whose last axis has length 1: how many of 2**0 .. 2**61 it reaches, summed."""
        if n.dtype != np.int64 or n.lo < 0 or n.hi >= 2**62:
            raise RangeError(f"{hint}: bit length of [{n.lo}, {n.hi}] ({n.dtype}): int64 in "
                             "[0, 2**62) only")
        pow2_minus_1, _ = self._powers_of_two()
        above = self.greater(n, pow2_minus_1, f"{hint}.above")  # n > 2**i - 1  <=>  n >= 2**i
        bitlen = self.reduce_sum(self.cast(above, np.int64, f"{hint}.above.i64"), 62,
                                 f"{hint}.bitlen")
        return self.assume(bitlen, 0, max(int(n.hi).bit_length(), 0),
                           "a bit length is at most the largest value's")

    def power_of_two(self, k: Tensor, hint: str) -> Tensor:
        """2**k (int64) for an int64 exponent tensor in [0, 62]."""
        if k.lo < 0 or k.hi > 62:
            raise RangeError(f"{hint}: exponent [{k.lo}, {k.hi}] outside [0, 62]")
        _, pow2 = self._powers_of_two()
        x = self.gather(pow2, k, hint)
        return self.assume(x, 1 << k.lo, 1 << k.hi, "2**k over k's interval")

    def isqrt(self, n: Tensor, hint: str, iterations: int = 6) -> Tensor:
        """floor(sqrt(n)) for 1 <= n < 2**62 by Newton's method from above.

        x0 = 2**ceil(bitlen(n)/2) >= sqrt(n) and x0 < 2*sqrt(n)+2; each step
        x <- min(x, (x + n // x) // 2) never goes below isqrt(n) (AM-GM on integers) and the
        relative error squares per step, so 6 steps reach isqrt(n) for every n below 2**62.
        """
        if n.lo < 1 or n.hi >= 2**62:
            raise RangeError(f"{hint}: isqrt argument [{n.lo}, {n.hi}] outside [1, 2**62)")
        bitlen = self.bit_length(n, hint)
        half = self.div(self.add(bitlen, self.scalar(1), f"{hint}.bitlen1"), self.scalar(2),
                        f"{hint}.halfbits")
        x = self.power_of_two(half, f"{hint}.x0")
        x = self.assume(x, 1, x.hi, "2**k with k >= 1")
        two = self.scalar(2)
        for i in range(iterations):
            q = self.div(n, x, f"{hint}.it{i}.q")
            s = self.add(x, q, f"{hint}.it{i}.s")
            x_next = self.div(s, two, f"{hint}.it{i}.h")
            x = self.minimum(x, x_next, f"{hint}.it{i}")
            x = self.assume(x, 1, x.hi, "Newton from above never goes below isqrt(n) >= 1")
        return self.assume(x, 1, math.isqrt(n.hi), "the result is isqrt(n) <= isqrt(max n)")

    # ------------------------------------------------------------------ model

    def model(self, reuse: dict[str, onnx.TensorProto] | None = None) -> onnx.ModelProto:
        """The ONNX model with every constant as an initializer.

        `reuse` maps constant names to already-built initializers (e.g. references into an
        external data file) to use instead of serialising the numpy value again.
        """
        reuse = reuse or {}
        inits = [reuse[name] if name in reuse else numpy_helper.from_array(arr, name)
                 for name, arr in self.constants.items()]
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
                                  producer_name="optinfer")
        helper.set_model_props(model, {COLUMN_SOURCES_KEY: json.dumps(self.column_sources,
                                                                      sort_keys=True)})
        model.ir_version = 10
        return model
