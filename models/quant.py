"""Quantisation arithmetic of the converter: weight quantisation, fixed-point multipliers, tables.

Everything here runs once, at conversion time, in float64; what it produces are integers that
the graph uses. The graph itself never sees a float.

Conventions (see docs/opset.md and docs/models.md):
- Activations that feed `MatMulInteger` are uint8 with zero point 128: real = (q - 128) * scale.
- Weights are int8 kept to 7 bits, [-64, 63], with one scale per output channel, so that a pair of
  u8 x s8 products never exceeds int16 (x86 without VNNI saturates there): 2 * 255 * 64 = 32640.
- A real multiplier m is applied as an integer multiplier M and a rounding right shift S:
  x * m ~= round(x * M / 2**S).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

WEIGHT_MAX = 63  # int8 weights live in [-64, 63]
WEIGHT_MIN = -64
ACT_ZERO_POINT = 128  # uint8 activations: real = (q - 128) * scale
ACT_MAX = 127  # largest |q - 128| used by the symmetric activation scale
ACT16_MAX = (1 << 15) - 1  # the same for 16-bit linear inputs (zero point 2**15)

INT64_HEADROOM_BITS = 62  # products are kept below 2**62 so that adding a rounding term is safe
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
#: Fewest bits choose_multiplier_int32 leaves a multiplier when it gives up shift for a shared
#: clip (relative error at most 2**-9).
SHARED_CLIP_MIN_BITS = 8
#: Most bits of shift choose_multiplier_int32 gives up for a shared clip.
SHARED_CLIP_MAX_SHIFT_LOSS = 3


@dataclass(frozen=True)
class QuantizedLinear:
    """A linear layer y = x W^T + b as MatMulInteger operands.

    `weight` is (in_features, out_features) int8 in [-64, 63] (the B operand of MatMulInteger);
    real W[o, i] ~= weight[i, o] * scale[o].
    """

    weight: np.ndarray  # (in, out) int8
    scale: np.ndarray  # (out,) float64
    bias: np.ndarray | None  # (out,) float64, real units


ROWS_PER_CHUNK = 4096  # bounds the float temporaries of big matrices (embedding, lm_head)


def quantize_rows(w: np.ndarray, qmax: int, qmin: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row quantisation: (q int8, scale float64) with w[r] ~= q[r] * scale[r].

    Works through the rows in chunks, so a 151936 x 1536 matrix needs no full-size float64 copy.
    """
    w = np.asarray(w)
    q = np.empty(w.shape, np.int8 if qmax <= 127 and qmin >= -128 else np.int16)
    scale = np.empty(w.shape[0], np.float64)
    for start in range(0, w.shape[0], ROWS_PER_CHUNK):
        rows = np.asarray(w[start:start + ROWS_PER_CHUNK], dtype=np.float64)
        amax = np.abs(rows).max(axis=1)
        s = np.where(amax > 0, amax / qmax, 1.0)
        scale[start:start + len(rows)] = s
        q[start:start + len(rows)] = np.clip(np.rint(rows / s[:, None]), qmin, qmax)
    return q, scale


def quantize_linear(w: np.ndarray, b: np.ndarray | None = None, bits: int = 7
                    ) -> QuantizedLinear:
    """Per-output-channel symmetric quantisation of a torch-layout (out, in) weight: 7 bits
    (int8 in [-64, 63]), or 13 (int16 in [-2**12, 2**12), the fine graph's two planes)."""
    half = 1 << (bits - 1)
    q, scale = quantize_rows(w, half - 1, -half)
    bias = None if b is None else np.asarray(b, dtype=np.float64)
    return QuantizedLinear(weight=np.ascontiguousarray(q.T), scale=scale, bias=bias)


def activation_scale(amax: float, levels: int = ACT_MAX) -> float:
    """Scale of a uint8 (zero point 128) activation whose calibrated max |x| is `amax`; with
    `levels` ACT16_MAX, of a 16-bit one (zero point 2**15)."""
    return max(float(amax), 1e-8) / levels


def bits(n: int | float) -> int:
    """Number of bits needed for the magnitude n (0 for n < 1)."""
    n = abs(float(n))
    return 0 if n < 1 else math.floor(math.log2(n)) + 1


def choose_multiplier(
    m: np.ndarray | float, x_bound: int, out_bound: int, precision_bits: int = 24
) -> tuple[np.ndarray, int]:
    """Integer multiplier(s) M and one shift S with x * m ~= x * M / 2**S.

    Constraints, so that the rounding-shift sequence in the graph cannot overflow int64:
    |x| * max(M) < 2**62 and out_bound * 2**S < 2**62. Within them, M gets up to
    `precision_bits` significant bits. Returns M as int64 (same shape as m) and S >= 1.
    """
    m = np.atleast_1d(np.asarray(m, dtype=np.float64))
    if not np.all(m >= 0):
        raise ValueError("multipliers must be non-negative")
    m_max = float(m.max())
    if m_max == 0:
        return np.zeros(m.shape, np.int64), 1
    # Largest M allowed by the product bound, and largest S allowed by the clip bound.
    m_int_cap = 2 ** (INT64_HEADROOM_BITS - bits(x_bound))
    s_cap = INT64_HEADROOM_BITS - bits(out_bound) - 1
    # S such that max(M) = m_max * 2**S has `precision_bits` bits, within both caps.
    s = precision_bits - 1 - math.floor(math.log2(m_max))
    s = min(s, s_cap)
    while s > 1 and m_max * 2.0**s >= m_int_cap:
        s -= 1
    s = max(s, 1)
    big_m = np.rint(m * 2.0**s).astype(np.int64)
    if int(big_m.max()) * max(int(x_bound), 1) >= 2**INT64_HEADROOM_BITS:
        raise ValueError(f"multiplier {m_max:g} cannot be applied to |x| <= {x_bound} in int64")
    if int(big_m.max()) == 0:
        raise ValueError(f"multiplier {m_max:g} underflows with shift {s}")
    return big_m, s


def saturation_inputs(big_m: np.ndarray, shift: int, lo: int, hi: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Per channel (every M > 0), the inputs past which round(x * M / 2**S) clipped to
    [lo, hi] stays saturated: x_lo, the largest x that rounds to lo or below, and x_hi, the
    smallest that rounds to hi or above."""
    unit, half = 1 << shift, 1 << (shift - 1)
    return (lo * unit + half - 1) // big_m, -((half - hi * unit) // big_m)


def shared_clip(big_m: np.ndarray, shift: int, lo: int, hi: int) -> tuple[int, int] | None:
    """One input interval [x_lo, x_hi] that serves every channel of round(x * M_c / 2**S)
    clipped to [lo, hi] (`GraphBuilder.rescale_int32`), or None.

    Wide enough that clipping x to it changes no channel's result: x_lo is at or below every
    channel's last input that rounds to lo, x_hi at or above every channel's first input that
    rounds to hi. Narrow enough that x * M_c, and x * M_c plus the rounding offset
    -lo * 2**S + 2**(S-1), fit int32 for every channel. The two meet when the multipliers
    spread little: about max(M) / min(M) < 2**31 / (hi * 2**S) - 1 for a symmetric range.
    One Clip with scalar bounds then replaces a Max and a Min against per-channel bound
    vectors, which cost ONNX Runtime 2-3x a Clip each. Zero multipliers need no bound (their
    product is 0).
    """
    big_m = np.atleast_1d(np.asarray(big_m, dtype=np.int64))
    positive = big_m[big_m > 0]
    if positive.size == 0 or shift < 1:
        return None
    channel_lo, channel_hi = saturation_inputs(positive, shift, lo, hi)
    x_lo, x_hi = int(channel_lo.min()), int(channel_hi.max())
    unit, half = 1 << shift, 1 << (shift - 1)
    offset, m_max = -lo * unit + half, int(positive.max())  # offset > 0 since lo <= 0
    if min(x_lo * m_max, 0) < INT32_MIN or max(x_hi * m_max, 0) + offset > INT32_MAX:
        return None
    return x_lo, x_hi


def choose_multiplier_int32(m: np.ndarray | float, lo: int, hi: int) -> tuple[np.ndarray, int]:
    """M (int64 values that fit int32, m's shape) and S for `GraphBuilder.rescale_int32`.

    S is the largest shift with (hi - lo + 1 + max(m)) * 2**S < 2**31, the graph's headroom
    (the clipped input's product can pass hi * 2**S by up to M); M = round(m * 2**S). The
    precision of M is what the headroom leaves: a channel whose multiplier rounds below 2**6
    is refused, since its relative error could exceed 1%.

    Per-channel multipliers that spread too far for a `shared_clip` at that S may get one a
    few bits lower (at most SHARED_CLIP_MAX_SHIFT_LOSS) if every multiplier keeps
    SHARED_CLIP_MIN_BITS: the faster graph for at most 2**-9 of relative error in M.
    """
    m = np.atleast_1d(np.asarray(m, dtype=np.float64))
    if not np.all(m >= 0):
        raise ValueError("multipliers must be non-negative")
    room = hi - lo + 1 + math.ceil(float(m.max()))
    if room * 2 >= 2**31:
        raise ValueError(f"[{lo}, {hi}] with multiplier {float(m.max()):g} does not fit int32")
    s = 1
    while room * 2 ** (s + 1) < 2**31:
        s += 1
    big_m = np.rint(m * 2.0**s).astype(np.int64)
    small = big_m[m > 0]
    if small.size and int(small.min()) < 2**6:
        raise ValueError(f"multiplier {float(m[m > 0].min()):g} keeps {int(small.min())} as M "
                         f"with shift {s}: fewer than 6 bits in int32")
    if m.size > 1 and shared_clip(big_m, s, lo, hi) is None:
        for lower in range(s - 1, max(s - SHARED_CLIP_MAX_SHIFT_LOSS, 1) - 1, -1):
            lower_m = np.rint(m * 2.0**lower).astype(np.int64)
            if small.size and int(lower_m[m > 0].min()) < 2**SHARED_CLIP_MIN_BITS:
                break
            if shared_clip(lower_m, lower, lo, hi) is not None:
                return lower_m, lower
    return big_m, s


def silu_table(frac_bits: int, half_range: int) -> np.ndarray:
    """T[j] = round(2**F * silu((j - half_range) / 2**F)) for j in [0, 2 * half_range], int32.

    Indexed by the gate in fixed point 2**-F offset by half_range, so the gate's requantisation
    produces the index directly; the output has the gate's unit.
    """
    x = (np.arange(2 * half_range + 1, dtype=np.float64) - half_range) / 2.0**frac_bits
    silu = x * 0.5 * (1.0 + np.tanh(x / 2))  # = x * sigmoid(x), without exp overflow
    return np.rint(2.0**frac_bits * silu).astype(np.int32)


def exp_table(frac_bits: int, length: int, out_bits: int) -> np.ndarray:
    """E[i] = round(2**out_bits * exp(-i / 2**frac_bits)) for i < length - 1, and E[-1] = 0.

    The last entry is the masked / underflowed value: indices are clipped to length - 1.
    """
    i = np.arange(length, dtype=np.float64)
    table = np.rint(2.0**out_bits * np.exp(-i / 2.0**frac_bits))
    table[-1] = 0
    return table.astype(np.int32)


def rope_tables(
    max_positions: int, head_dim: int, theta: float, frac_bits: int
) -> tuple[np.ndarray, np.ndarray]:
    """Fixed-point RoPE tables, (max_positions, 1, head_dim) int32 each, scale 2**-frac_bits.

    q_rot = q * COS[pos] + swap_halves(q) * SIN[pos], which is Hugging Face's
    q * cos + rotate_half(q) * sin with rotate_half(q) = [-q2, q1]: the sign sits in SIN.
    """
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (np.arange(0, half, dtype=np.float64) * 2.0 / head_dim))
    angles = np.arange(max_positions, dtype=np.float64)[:, None] * inv_freq[None, :]
    cos = np.concatenate([np.cos(angles), np.cos(angles)], axis=1)
    sin = np.concatenate([-np.sin(angles), np.sin(angles)], axis=1)
    one = 2.0**frac_bits
    cos_q = np.rint(cos * one).astype(np.int32)[:, None, :]
    sin_q = np.rint(sin * one).astype(np.int32)[:, None, :]
    return cos_q, sin_q
