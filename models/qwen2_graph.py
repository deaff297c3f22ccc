"""The integer-only Qwen2 graph: what each layer computes, in ONNX integer ops.

`IntegerQwen2` holds every integer constant of a converted model (the converter fills it from a
float checkpoint and calibration); `build_graph` lays the graph out in one of two modes:

- "verify": the committed graph. Input `sequence` int64 (T+1,) = [P, x_0 .. x_{T-1}] with
  x = prompt ++ output[:-1] and P the prompt length; output `next_tokens` int64 (T-P+1,), the
  greedy token predicted after each of positions P-1 .. T-1, i.e. the claimed output.
- "decode": the same computation with a KV cache, for generation. Inputs `tokens` (T,),
  `positions` (T,) and the past K/V of every layer; outputs the token after the last position
  and the present K/V. Attention and every other op are row-local with static scales, so the
  two modes give identical tokens (tests check it).

Representations (real value = integer * scale):
- residual stream: int32, one scale for the whole model, saturating at +-RES_CLIP;
- inputs of MatMulInteger: uint8, zero point 128, one calibrated scale per tensor; with
  `linear_input_bits` 16, the linear layers' inputs (q/k/v, o, gate/up, down, lm_head) are 16-bit
  (int32 offset by 2**15, one calibrated scale per tensor) entering one MatMulInteger as two
  uint8 planes stacked along the rows (`GraphBuilder.planes`, `matmul_integer_planes`);
- weights: int8 in [-64, 63], one scale per output channel;
- K and V (the cache): int8 in [-64, 63]; attention probabilities: uint8, scale 1/255;
- logits: int32, acc * M_c, exact: they only need to be ordered like the real logits.
- requantisations, the MLP between its products, q and k through RoPE, and the attention
  scores down to the exp table: int32 (int64 where the converter found int32's headroom too
  small for a multiplier); RMSNorm and the embedding's row scales: int64.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from optinfer.models import sampling
from optinfer.models.graph_builder import (
    INT64_MAX,
    PLANE_BASE,
    PLANE_TOP,
    PLANE_ZERO_POINT,
    SIGNED_PLANE_BASE,
    SIGNED_PLANE_HALF,
    GraphBuilder,
    Tensor,
    vocabulary_chunk,
)

#: A sampling verify graph's input starts [P, temperature, top_p, seed] (`build_graph`).
SAMPLING_HEADER = 4
#: The predicted rows' positions in a sampling graph (the batch graph gathers them instead).
FINAL_POSITIONS = "final.positions"
EXP_FRAC_BITS = 8  # exp table index resolution: 1/256 nat
EXP_OUT_BITS = 16  # exp table values: 2**16 = exp(0)
EXP_LEN = 16 * (1 << EXP_FRAC_BITS) + 1  # exp(-16) rounds to 0 at 2**16; last entry 0 = masked
GATE_HALF_RANGE = 1 << 15  # gate fixed point: |gate| <= 2**15 units of 2**-gate_frac_bits
UP_CLIP = 1 << 15  # up projection fixed point, calibrated scale; silu * up fits int32
QK_FIX_CLIP = 1 << 15  # q and k before RoPE: |x| * 2**ROPE_FRAC_BITS * 2 fits int32
ROPE_FRAC_BITS = 14
MASK_PENALTY = 1 << 24  # subtracted from masked scores before the row max
PROB_MAX = 255  # attention probabilities: uint8, scale 1/255
#: With 16-bit linear inputs: probabilities of scale 1/16383 as two uint8 planes; e * max plus
#: half the row sum (at most 2**16 * 8192 / 2) stays within int32.
WIDE_PROB_MAX = (1 << 14) - 1
#: The vocabulary argmax's chunks: at most 2,560 int32, so that the one-step of a chunk's
#: ReduceMax or ArgMax stays under 1.5M gas (about 540 gas an element: 1.29M at R1's 2,374,
#: 2.05M at SmolLM2's 4,096 under the 16 KiB bound this replaced; docs/performance.md).
ARGMAX_CHUNK_BYTES = 10 * 1024
LINEAR_INPUT_BITS = (8, 16)  # uint8 linear inputs, or 16-bit ones as two uint8 planes
#: Weights of 7 bits (int8 in [-64, 63], one MatMulInteger operand), or, with 16-bit linear
#: inputs, 13 bits: the fine graph, where weights are two 7-bit planes
#: (`GraphBuilder.matmul_integer_wide`) and the other points that a real LM showed to need
#: more bits follow: values 13-bit like keys, queries 12-bit (`fine_query_half`), and the
#: down projection's input 24-bit (three planes); docs/models.md, "The fine graph".
WEIGHT_BITS = (7, 13)
FINE_WEIGHT_BITS = 13
FINE_ACT_PLANES = 3  # the down projection's input: 24 bits
FINE_ACT_ZERO_POINT = 1 << 23
#: Fine queries are planes whose zero points (128 each) make up the whole offset:
#: q = 256 * (hi - 128) + (lo - 128), so the scores need no correction term for them.
FINE_QUERY_ZERO_POINT = 128 * (PLANE_BASE + 1)
#: The fine graph's logits: round(S * M_c / 2**shift) within +-2**FINE_LOGIT_BITS (int32).
FINE_LOGIT_BITS = 30
#: The fine graph computes its logits in blocks of this many vocabulary columns, joined by
#: one Concat: the lm_head's product and int64 recombination take about 40 bytes per predicted
#: row and vocabulary entry, 2.3 GB at once at R1-Distill-1.5B shape over 257 rows (the
#: verification process then peaked at 5.5 GB), 0.13 GB per block of 8,192. The decode graph
#: has the same blocks: the two graphs share their weight constants.
FINE_LOGIT_BLOCK = 8192


def wide_pv_bound(max_context: int) -> int:
    """|P . V| with 14-bit probabilities: a row of them sums to at most WIDE_PROB_MAX + S/2
    (each rounds e * max / sum), so either plane's row does too, and |V| <= 64."""
    return (WIDE_PROB_MAX + max_context // 2) * 64


def fine_query_half(head_dim: int) -> int:
    """A fine graph's queries lie in [-h, h): the largest power of two h for which a score,
    |s| <= B = head_dim * h * 2**12 against 13-bit keys, minus the fine mask penalty 2B + 1
    stays within int32 (`key_planes_score_bound`). 2048 (12 bits) at head_dim 64."""
    room = (2**31 - 2) // (3 * head_dim * SIGNED_PLANE_HALF)
    return 1 << (room.bit_length() - 1)


def key_planes_score_bound(head_dim: int, fine: bool) -> int:
    """B, the largest |q . k| of a graph with 13-bit keys: head_dim * h * 2**12, with h 128 for
    the 16-bit graph's uint8 queries (|q - 128| <= 128) and `fine_query_half` for the fine
    graph's. The causal mask subtracts 2B + 1 and floors at -B - 1, so a row's max minus a
    score is at most 2B + 1."""
    q_half = fine_query_half(head_dim) if fine else 128
    return head_dim * q_half * SIGNED_PLANE_HALF


def residual_bits(hidden_size: int) -> int:
    """Bits of a residual whose RMSNorm sum of squares stays within 2**53.

    (ONNX Runtime's ReduceSum accumulates in double: exact only up to 2**53.) A finer residual
    (`IntegerQwen2.residual_bits`) squares its values with the bits past these dropped.
    """
    return (53 - int(np.ceil(np.log2(hidden_size)))) // 2


#: The residual of a model with 16-bit linear inputs: 28 bits, so that with 8x headroom over
#: the calibrated range it keeps 2**25 levels below a real LM's largest (attention-sink)
#: activation, and ordinary tokens keep their precision (docs/models.md, "Residual stream").
#: r + delta stays within int32 (|r| <= 2**28, |delta| <= 2**27).
FINE_RESIDUAL_BITS = 28


@dataclass(frozen=True)
class Requant:
    """x -> round(x * M / 2**shift), M scalar or per output channel (int64).

    int32: done in int32 (`GraphBuilder.rescale_int32`), else in int64 (`rescale`); the
    converter falls back to int64 where int32's headroom would leave M too few bits.
    """

    M: np.ndarray
    shift: int
    int32: bool = False


@dataclass(frozen=True)
class Norm:
    """RMSNorm to uint8: q = clip(round(r * G / isqrt(mean(r^2) + eps_q) / 2**shift) + 128).

    On a residual finer than `residual_bits` allows, each row's sum of squares is taken over
    its top bits (`_Qwen2Builder.row_top_bits`)."""

    G: np.ndarray  # (H,) int64, gamma / output scale * 2**shift
    shift: int
    eps_q: int  # eps in residual units squared, >= 1


@dataclass(frozen=True)
class Linear:
    """MatMulInteger operand B (in, out) int8, optional bias in accumulator units, requant."""

    weight: np.ndarray  # (in, out) int8
    bias: np.ndarray | None  # (out,) int64
    out: Requant


@dataclass(frozen=True)
class Layer:
    attn_norm: Norm
    q: Linear  # -> q fixed point (int32, |q| <= QK_FIX_CLIP), q_rot's scale / 2**e
    k: Linear
    v: Linear  # -> int8 [-64, 63]
    q_rot: Requant  # RoPE output -> uint8: M = 1, a rounding shift by ROPE_FRAC_BITS + e
    k_rot: Requant  # RoPE output -> int8 [-64, 63], likewise
    scores: Requant  # score difference -> exp table index (1/256 nat)
    attn_out: Requant  # P.V accumulator -> uint8
    o: Linear  # -> residual units
    mlp_norm: Norm
    gate: Linear  # -> gate fixed point 2**-gate_frac_bits, offset by GATE_HALF_RANGE (int32)
    up: Linear  # -> up fixed point, |up| <= UP_CLIP (int32)
    act_divisor: int  # silu(gate) * up / act_divisor -> uint8 (1 in a fine graph)
    down: Linear  # -> residual units
    # A fine graph's silu(gate) * up -> 24 bits, offset by FINE_ACT_ZERO_POINT.
    act: Requant | None = None


@dataclass(frozen=True)
class IntegerQwen2:
    """All integer constants of a converted Qwen2 model."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_context: int
    embed: np.ndarray  # (V, H) int8
    embed_M: np.ndarray  # (V, 1) int64: row scale -> residual units
    embed_shift: int
    layers: list[Layer]
    final_norm: Norm
    lm_head: Linear  # logits = acc * M exactly (out.shift unused, 0): int32, one common scale
    exp_table: np.ndarray  # (EXP_LEN,) int32
    gate_frac_bits: int  # the gate's fixed point, one for the model (the SiLU table is shared)
    silu_table: np.ndarray  # (2*GATE_HALF_RANGE+1,) int32, quant.silu_table
    rope_cos: np.ndarray  # (max_context, 1, head_dim) int32, 2**ROPE_FRAC_BITS = 1
    rope_sin: np.ndarray
    # 8: the linear layers' inputs are uint8 (zero point 128). 16: they are 16-bit (zero point
    # 2**15) as two uint8 planes in one MatMulInteger, whose Linear.bias is then in units of
    # the exact sum S and whose Linear.out requantises floor((S + bias + 128) / 256).
    linear_input_bits: int = 8
    # The residual saturates at +-2**residual_bits; None: residual_bits(hidden_size).
    residual_bits: int | None = None
    # 7, or 13 for the fine graph (16-bit linear inputs only; see WEIGHT_BITS): every
    # Linear.weight is then int16 in [-2**12, 2**12), its bias in units of the exact sum S,
    # and its requantisation (int64) starts from S; lm_head.out rounds S * M to int32 logits.
    weight_bits: int = 7
    # One integer logit in real units (the converter's; 0 when unknown). The sampler's
    # temperature scaling needs it (`sampling.IndexScale`).
    logit_scale: float = 0.0

    @property
    def fine(self) -> bool:
        return self.weight_bits == FINE_WEIGHT_BITS

    @property
    def res_clip(self) -> int:
        return 1 << (self.residual_bits or residual_bits(self.hidden_size))


def argmax_chunk(vocab_size: int) -> int:
    """Largest divisor of the vocabulary whose int32 chunk fits ARGMAX_CHUNK_BYTES."""
    return vocabulary_chunk(vocab_size, ARGMAX_CHUNK_BYTES)


@dataclass(frozen=True)
class Planes:
    """A 16-bit (or 24-bit) linear input: its uint8 planes stacked along the rows,
    (count * R, K), R as a 1-element int64 tensor (`GraphBuilder.planes`), and the zero point
    the planes' value u is offset by (x = u - zero_point)."""

    stack: Tensor
    rows: Tensor
    count: int = 2
    zero_point: int = PLANE_ZERO_POINT


class _Qwen2Builder:
    """Lays out the graph of one IntegerQwen2 on a GraphBuilder."""

    def __init__(self, m: IntegerQwen2, mode: str, samples: bool = False):
        if m.linear_input_bits not in LINEAR_INPUT_BITS:
            raise ValueError(f"linear inputs of {m.linear_input_bits} bits: 8 or 16")
        if m.weight_bits not in WEIGHT_BITS or (m.fine and m.linear_input_bits != 16):
            raise ValueError(f"weights of {m.weight_bits} bits: 7, or 13 with 16-bit inputs")
        self.m, self.mode = m, mode
        self.g = GraphBuilder(f"optinfer-qwen2-{mode}")
        self.res_clip = m.res_clip
        self.wide = m.linear_input_bits == 16
        self.fine = m.fine
        self.rows: Tensor | None = None  # the layers' row count, a 1-element int64 tensor
        if samples and not m.logit_scale > 0:
            raise ValueError("a sampling graph needs the logits' scale (convert again)")
        self.samples = samples  # a sampling graph (`build_graph`)
        # With sampling: each predicted row's temperature, top-p, seed and position (L, 1).
        self.draw: dict[str, Tensor] = {}

    # ---------------------------------------------------------------- pieces

    def rmsnorm(self, r: Tensor, p: Norm, name: str, rows: Tensor | None = None
                ) -> Tensor | Planes:
        """uint8 (zero point 128), or with 16-bit linear inputs Planes (zero point 2**15) of
        `rows` rows (default: the layers' row count)."""
        g, h = self.g, self.m.hidden_size
        zp, top = (PLANE_ZERO_POINT, PLANE_TOP) if self.wide else (128, 255)
        r64 = g.cast(r, np.int64, f"{name}.r")  # (T, H)
        c, unit = r64, None
        if r64.magnitude > 1 << residual_bits(h):  # else r^2 sums exactly as it is
            c, unit = self.row_top_bits(r64, name)  # (T, H) in units of unit (T, 1)
        sq = g.square(c, f"{name}.sq")  # (T, H)
        ss = g.reduce_sum(sq, h, f"{name}.ss")  # (T, 1)
        ms = g.add(g.div(ss, g.scalar(h), f"{name}.mean"), g.scalar(p.eps_q), f"{name}.ms")
        rms = g.isqrt(ms, f"{name}.rms")  # (T, 1) units of c
        if unit is not None:  # back to residual units
            rms = g.mul(rms, unit, f"{name}.rms.scaled")
        # One rounding division per element, by a per-row divisor: with den = rms * 2**shift,
        # floor((num + (zp + 0.5) * den) / den) = round(num / den) + zp wherever the dividend
        # is non-negative; where it is negative the Clip gives 0 as floor would. (shift >= 1,
        # so (zp + 0.5) * den = rms * (2 * zp + 1) * 2**(shift-1) exactly; zp = 128: 257.)
        den = g.mul(rms, g.scalar(1 << p.shift), f"{name}.den")  # (T, 1)
        offset = g.mul(rms, g.scalar((2 * zp + 1) << (p.shift - 1)), f"{name}.offset")  # (T, 1)
        num = g.mul(r64, g.const(f"{name}.G", p.G), f"{name}.num")  # (T, H)
        y = g.div(g.add(num, offset, f"{name}.biased"), den, f"{name}.y")  # (T, H)
        y = g.clip(y, 0, top, f"{name}.clip")
        if self.wide:  # (2T, H) u8 planes of y in [0, 2**16)
            return Planes(g.planes(y, 0, name), self.rows if rows is None else rows)
        return g.cast(y, np.uint8, name)  # (T, H) u8

    def row_top_bits(self, r64: Tensor, name: str) -> tuple[Tensor, Tensor]:
        """(c, 2**k): each row of r truncated to c = trunc(r / 2**k), with k the fewest bits
        that bring the row's largest |r| below 2**residual_bits(H), so the sum of squares of
        c is exact in ONNX Runtime's double-accumulating ReduceSum.

        A row that fits keeps k = 0, every bit: an ordinary token's residual is far below
        2**residual_bits(H) units. A row past it (an attention-sink token's) has an rms of at
        least 2**(B-1) / sqrt(H) units, so dropping k bits moves its rms by a relative
        2**(1-B) or less."""
        g, b = self.g, residual_bits(self.m.hidden_size)
        top = g.reduce_max(g.square(r64, f"{name}.r2"), f"{name}.r2max")  # (T, 1) max r^2
        bitlen = g.bit_length(top, f"{name}.r2max")  # max r^2 < 2**bitlen
        # k = ceil((bitlen - 2B) / 2), at least 0: then (r / 2**k)^2 < 2**(2B).
        excess = g.clip(g.sub(bitlen, g.scalar(2 * b - 1), f"{name}.excess"), 0, 62,
                        f"{name}.excess.pos")
        k = g.div(excess, g.scalar(2), f"{name}.k")
        unit = g.power_of_two(k, f"{name}.unit")  # (T, 1)
        c = g.div(r64, unit, f"{name}.top")
        bound = (1 << b) - 1
        return g.assume(c, -bound, bound, "the row's largest |r| / 2**k is below 2**B"), unit

    def linear(self, x: Tensor | Planes, p: Linear, name: str) -> Tensor:
        """MatMulInteger plus bias, in int32 accumulator units (not yet requantised); for
        Planes, the 16-bit sum plus bias divided by 256 and rounded
        (`GraphBuilder.matmul_integer_planes`); in a fine graph the exact sum plus bias, int64
        (`GraphBuilder.matmul_integer_wide`)."""
        g = self.g
        if self.fine:
            return g.matmul_integer_wide(x.stack, x.count, p.weight, p.bias, x.zero_point,
                                         f"{name}.acc")
        if isinstance(x, Planes):
            return g.matmul_integer_planes(x.stack, x.rows, g.const(f"{name}.W", p.weight),
                                           p.bias, f"{name}.acc")
        acc = g.matmul_integer(x, g.const(f"{name}.W", p.weight), 128, p.weight.shape[0],
                               f"{name}.acc")
        if p.bias is not None:
            acc = g.add(acc, g.const(f"{name}.b", p.bias.astype(np.int32)), f"{name}.biased")
        return acc

    def requant_int32(self, x: Tensor, r: Requant, lo: int, hi: int, name: str,
                      zero_point: int = 0, out_dtype=np.int32) -> Tensor:
        """An int32 tensor requantised to out_dtype, in int32 where the converter could."""
        if r.int32:
            return self.g.rescale_int32(x, r.M, r.shift, lo, hi, name, out_dtype, zero_point)
        return self.g.rescale(x, r.M, r.shift, lo, hi, name, out_dtype, zero_point)

    def to_residual(self, acc: Tensor, p: Linear, name: str) -> Tensor:
        half = self.res_clip // 2
        return self.requant_int32(acc, p.out, -half, half, name)

    def add_residual(self, r: Tensor, delta: Tensor, name: str) -> Tensor:
        s = self.g.add(r, delta, f"{name}.sum")
        return self.g.clip(s, -self.res_clip, self.res_clip, name)

    def rope(self, x: Tensor, heads: int, cos: Tensor, sin: Tensor, name: str) -> Tensor:
        g, hd = self.g, self.m.head_dim
        x3 = g.reshape(x, [0, heads, hd], f"{name}.heads")  # (T, heads, hd) int32
        # The halves swapped, as two slices (block copies; a Gather copies element by element).
        upper = g.slice(x3, g.ints([hd // 2]), hd, 2, f"{name}.upper")
        lower = g.slice(x3, g.ints([0]), hd // 2, 2, f"{name}.lower")
        xs = g.concat([upper, lower], 2, f"{name}.swap")  # (T, heads, hd)
        a = g.mul(x3, cos, f"{name}.cos")
        b = g.mul(xs, sin, f"{name}.sin")
        return g.add(a, b, f"{name}.rot")  # (T, heads, hd), scale * 2**-14

    # ----------------------------------------------------------------- layers

    def attention(self, i: int, x: Tensor, ctx: dict) -> tuple[Tensor, Tensor, Tensor]:
        g, m, p = self.g, self.m, self.m.layers[i]
        n, kv, hd = m.num_heads, m.num_kv_heads, m.head_dim
        grp = n // kv
        name = f"L{i}.attn"
        fix = QK_FIX_CLIP
        q = self.requant_int32(self.linear(x, p.q, f"{name}.q"), p.q.out, -fix, fix,
                               f"{name}.q.fix")  # (T, n*hd) int32
        k = self.requant_int32(self.linear(x, p.k, f"{name}.k"), p.k.out, -fix, fix,
                               f"{name}.k.fix")  # (T, kv*hd) int32
        if self.fine:  # 13-bit values, in int32 until they are split into planes below
            half = SIGNED_PLANE_HALF
            v = self.requant_int32(self.linear(x, p.v, f"{name}.v"), p.v.out, -half, half - 1,
                                   f"{name}.v.q13")  # (T, kv*hd) int32
        else:
            v = self.requant_int32(self.linear(x, p.v, f"{name}.v"), p.v.out, -64, 63,
                                   f"{name}.v.q", 0, np.int8)  # (T, kv*hd) int8
        q = self.rope(q, n, ctx["cos"], ctx["sin"], f"{name}.q")  # int32, |q| < 2**30
        k = self.rope(k, kv, ctx["cos"], ctx["sin"], f"{name}.k")
        if self.fine:  # (T, n, hd) int32: q + FINE_QUERY_ZERO_POINT, planes below
            qh = fine_query_half(m.head_dim)
            q = self.requant_int32(q, p.q_rot, -qh, qh - 1, f"{name}.q.q12",
                                   FINE_QUERY_ZERO_POINT, np.int32)
        else:
            q = self.requant_int32(q, p.q_rot, -128, 127, f"{name}.q.u8", 128,
                                   np.uint8)  # (T, n, hd) u8
        if self.wide:  # 13-bit keys, in int32 until they are split into planes below
            half = SIGNED_PLANE_HALF
            k = self.requant_int32(k, p.k_rot, -half, half - 1, f"{name}.k.q13")  # (T, kv, hd)
        else:
            k = self.requant_int32(k, p.k_rot, -64, 63, f"{name}.k.q", 0,
                                   np.int8)  # (T, kv, hd)
        q = g.reshape(q, [0, kv, grp, hd], f"{name}.q.groups")  # (T, kv, grp, hd)
        q = g.transpose(q, [1, 2, 0, 3], f"{name}.q.bhtd")  # (kv, grp, T, hd)
        k = g.transpose(k, [1, 2, 0], f"{name}.k.bdt")  # (kv, hd, T)
        if self.wide:  # two int8 planes along axis 1 (GraphBuilder.signed_planes)
            k = g.reshape(k, [kv, 1, hd, -1], f"{name}.k.heads")  # (kv, 1, hd, T) int32
            k = g.signed_planes(k, 1, f"{name}.k.cache")  # (kv, 2, hd, T) int8
        else:
            k = g.reshape(k, [kv, 1, hd, -1], f"{name}.k.cache")  # (kv, 1, hd, T) int8
        v = g.reshape(v, [0, kv, hd], f"{name}.v.heads")  # (T, kv, hd)
        v = g.transpose(v, [1, 0, 2], f"{name}.v.btd")  # (kv, T, hd)
        if self.fine:  # two int8 planes along axis 1, like the keys
            v = g.reshape(v, [kv, 1, -1, hd], f"{name}.v.heads")  # (kv, 1, T, hd) int32
            v = g.signed_planes(v, 1, f"{name}.v.cache")  # (kv, 2, T, hd) int8
        else:
            v = g.reshape(v, [kv, 1, -1, hd], f"{name}.v.cache")  # (kv, 1, T, hd) int8
        if self.mode == "decode":
            k = g.concat([ctx["past_k"][i], k], 3, f"{name}.k.present")  # (kv, 1|2, hd, S)
            v = g.concat([ctx["past_v"][i], v], 2, f"{name}.v.present")  # (kv, 1|2, S, hd)
        s_max = m.max_context
        k_cols = v_cols = None
        if self.mode == "verify":  # proof-only: B operands' columns as contiguous rows
            k_cols = g.swap_last_axes(k, 4, f"{name}.k.columns")  # (kv, 1|2, S, hd)
            v_cols = g.swap_last_axes(v, 4, f"{name}.v.columns")  # (kv, 1|2, hd, S)
        if self.fine:
            scores = self.fine_scores(q, k, k_cols, name)  # (kv, grp, T, S) int32
        elif self.wide:
            scores = self.wide_scores(q, k, k_cols, name)  # (kv, grp, T, S) int32
        else:
            scores = g.matmul_integer(q, k, 128, hd, f"{name}.scores",
                                      columns=k_cols)  # (kv, grp, T, S) int32
        masked = g.sub(scores, ctx["mask_penalty"], f"{name}.masked")
        if self.wide:  # every masked score to -B - 1, below every visible one
            bound = key_planes_score_bound(hd, self.fine)
            masked = g.maximum(masked, g.scalar(-bound - 1, np.int32),
                               f"{name}.masked.floor")
        row_max = g.reduce_max(masked, f"{name}.rowmax")  # (kv, grp, T, 1)
        diff = g.sub(row_max, masked, f"{name}.diff")  # >= 0 on unmasked keys
        diff = g.assume(diff, 0, diff.hi, "a row's max is >= every entry of the row")
        idx = self.requant_int32(diff, p.scores, 0, EXP_LEN - 1, f"{name}.expidx")
        idx = g.maximum(idx, ctx["mask_index"], f"{name}.expidx.masked")  # masked -> exp 0
        e = g.lookup(ctx["exp"], idx, f"{name}.exp")  # (kv, grp, T, S) int32
        total = g.reduce_sum(e, s_max, f"{name}.expsum")  # (kv, grp, T, 1), >= 2**16
        total = g.assume(total, 1 << EXP_OUT_BITS, total.hi,
                         "the row max is unmasked (a query sees itself) and has exp index 0")
        prob_max = WIDE_PROB_MAX if self.wide else PROB_MAX
        num = g.add(g.mul(e, g.scalar(prob_max, np.int32), f"{name}.pnum"),
                    g.div(total, g.scalar(2, np.int32), f"{name}.phalf"), f"{name}.pround")
        prob = g.assume(g.div(num, total, f"{name}.pdiv"), 0, prob_max,
                        "each exp term is at most the row sum, so e*max/sum + 1/2 < max + 1")
        if self.fine:
            att = self.fine_pv(prob, v, v_cols, name)  # (kv, grp, T, hd)
        elif self.wide:
            att = self.wide_pv(prob, v, v_cols, name)  # (kv, grp, T, hd)
        else:
            prob = g.cast(prob, np.uint8, f"{name}.prob")
            att = g.matmul_integer(prob, v, 0, s_max, f"{name}.pv",
                                   columns=v_cols)  # (kv, grp, T, hd)
        if self.wide:
            zp = PLANE_ZERO_POINT
            att = self.requant_int32(att, p.attn_out, -zp, zp - 1, f"{name}.out.u16", zp,
                                     np.int32)  # (kv, grp, T, hd) in [0, 2**16)
            att = g.planes(att, 2, f"{name}.out.planes")  # (kv, grp, 2T, hd) u8, hi then lo
        else:
            att = self.requant_int32(att, p.attn_out, -128, 127, f"{name}.out.u8", 128,
                                     np.uint8)
        att = g.transpose(att, [2, 0, 1, 3], f"{name}.out.tbgd")  # (T or 2T, kv, grp, hd)
        att = g.reshape(att, [-1, n * hd], f"{name}.out")  # (T or 2T, n*hd) u8
        if self.wide:
            att = Planes(att, self.rows)
        delta = self.to_residual(self.linear(att, p.o, f"{name}.o"), p.o, f"{name}.o.res")
        return delta, k, v

    def wide_scores(self, q: Tensor, k: Tensor, k_cols: Tensor | None, name: str) -> Tensor:
        """q . k for uint8 q (kv, grp, T, hd) and 13-bit keys as planes (kv, 2, hd, S): one
        MatMulInteger with the query groups folded into the rows, so that the planes' axis
        is the batch axis the product broadcasts q over, then 64 * hi + lo."""
        g, m = self.g, self.m
        kv, grp, hd = m.num_kv_heads, m.num_heads // m.num_kv_heads, m.head_dim
        rows = g.reshape(q, [kv, 1, -1, hd], f"{name}.q.rows")  # (kv, 1, grp*T, hd)
        both = g.matmul_integer(rows, k, 128, hd, f"{name}.scores.planes",
                                columns=k_cols)  # (kv, 2, grp*T, S)
        hi = g.slice(both, g.ints([0]), 1, 1, f"{name}.scores.hi")
        lo = g.slice(both, g.ints([1]), 2, 1, f"{name}.scores.lo")
        exact = g.add(g.mul(hi, g.scalar(SIGNED_PLANE_BASE, np.int32), f"{name}.scores.hi64"),
                      lo, f"{name}.scores.sum")  # (kv, 1, grp*T, S)
        return g.reshape(exact, [0, grp, -1, 0], f"{name}.scores")  # (kv, grp, T, S)

    def wide_pv(self, prob: Tensor, v: Tensor, v_cols: Tensor | None, name: str) -> Tensor:
        """P . V for probabilities in [0, WIDE_PROB_MAX] (kv, grp, T, S) int32: two uint8
        planes stacked along the rows, one MatMulInteger, 256 * hi + lo."""
        g, s_max = self.g, self.m.max_context
        planes = g.planes(prob, 2, f"{name}.prob")  # (kv, grp, 2T, S) u8
        both = g.matmul_integer(planes, v, 0, s_max, f"{name}.pv.planes",
                                columns=v_cols)  # (kv, grp, 2T, hd)
        bound = wide_pv_bound(s_max)
        why = "a row of probabilities sums to at most WIDE_PROB_MAX + S/2 and |V| <= 64"
        hi = g.assume(g.slice(both, g.ints([0]), self.rows, 2, f"{name}.pv.hi"),
                      -bound // PLANE_BASE, bound // PLANE_BASE, why)
        lo = g.assume(g.slice(both, self.rows, INT64_MAX, 2, f"{name}.pv.lo"), -bound, bound,
                      why)
        exact = g.add(g.mul(hi, g.scalar(PLANE_BASE, np.int32), f"{name}.pv.hi256"), lo,
                      f"{name}.pv")
        return g.assume(exact, -bound, bound, why)

    def fine_scores(self, q: Tensor, k: Tensor, k_cols: Tensor | None, name: str) -> Tensor:
        """q . k for fine queries (kv, grp, T, hd), int32 offset by FINE_QUERY_ZERO_POINT, and
        13-bit keys as planes (kv, 2, hd, S): the queries' two uint8 planes stacked along the
        rows (groups folded in), one MatMulInteger broadcasting them over the keys' planes,
        then 64 * key hi + key lo and 256 * query hi + query lo."""
        g, m = self.g, self.m
        kv, grp, hd = m.num_kv_heads, m.num_heads // m.num_kv_heads, m.head_dim
        rows = g.reshape(q, [kv, 1, -1, hd], f"{name}.q.rows")  # (kv, 1, grp*T, hd)
        planes = g.planes(rows, 2, f"{name}.q.planes")  # (kv, 1, 2*grp*T, hd) u8
        both = g.matmul_integer(planes, k, 128, hd, f"{name}.scores.planes",
                                columns=k_cols)  # (kv, 2, 2*grp*T, S)
        k_hi = g.slice(both, g.ints([0]), 1, 1, f"{name}.scores.khi")
        k_lo = g.slice(both, g.ints([1]), 2, 1, f"{name}.scores.klo")
        by_q = g.add(g.mul(k_hi, g.scalar(SIGNED_PLANE_BASE, np.int32), f"{name}.scores.khi64"),
                     k_lo, f"{name}.scores.k")  # (kv, 1, 2*grp*T, S): sum (plane - 128) k
        group_rows = g.mul(self.rows, g.ints([grp]), f"{name}.q.group_rows")
        bound = key_planes_score_bound(hd, fine=True)
        why = "a fine query's planes make up q in [-h, h), and |k| <= 2**12"
        q_hi = g.assume(g.slice(by_q, g.ints([0]), group_rows, 2, f"{name}.scores.qhi"),
                        -bound // PLANE_BASE, bound // PLANE_BASE, why)
        q_lo = g.slice(by_q, group_rows, INT64_MAX, 2, f"{name}.scores.qlo")
        exact = g.add(g.mul(q_hi, g.scalar(PLANE_BASE, np.int32), f"{name}.scores.qhi256"),
                      q_lo, f"{name}.scores.sum")  # (kv, 1, grp*T, S)
        exact = g.assume(exact, -bound, bound, why)
        return g.reshape(exact, [0, grp, -1, 0], f"{name}.scores")  # (kv, grp, T, S)

    def fine_pv(self, prob: Tensor, v: Tensor, v_cols: Tensor | None, name: str) -> Tensor:
        """P . V for probabilities in [0, WIDE_PROB_MAX] (kv, grp, T, S) int32 and 13-bit
        values as planes (kv, 2, S, hd): the probabilities' two uint8 planes stacked along the
        rows (groups folded in), one MatMulInteger broadcasting them over the values' planes,
        then 64 * value hi + value lo and 256 * prob hi + prob lo."""
        g, m, s_max = self.g, self.m, self.m.max_context
        kv, grp, hd = m.num_kv_heads, m.num_heads // m.num_kv_heads, m.head_dim
        planes = g.planes(prob, 2, f"{name}.prob")  # (kv, grp, 2T, S) u8
        rows = g.reshape(planes, [kv, 1, -1, 0], f"{name}.prob.rows")  # (kv, 1, grp*2T, S)
        both = g.matmul_integer(rows, v, 0, s_max, f"{name}.pv.planes",
                                columns=v_cols)  # (kv, 2, grp*2T, hd)
        # Either probability plane's row sums to at most WIDE_PROB_MAX + S/2 (each is at
        # most the probability), and a value plane is at most 64 in magnitude.
        plane = wide_pv_bound(s_max)
        why_plane = "a probability plane's row sums to at most WIDE_PROB_MAX + S/2, |V plane| <= 64"
        v_hi = g.assume(g.slice(both, g.ints([0]), 1, 1, f"{name}.pv.vhi"), -plane, plane,
                        why_plane)
        v_lo = g.assume(g.slice(both, g.ints([1]), 2, 1, f"{name}.pv.vlo"), -plane, plane,
                        why_plane)
        bound = wide_pv_bound(s_max) * SIGNED_PLANE_BASE
        why = ("a row of probabilities sums to at most WIDE_PROB_MAX + S/2 and "
               "|V| <= 2**12")
        by_p = g.assume(g.add(g.mul(v_hi, g.scalar(SIGNED_PLANE_BASE, np.int32),
                                    f"{name}.pv.vhi64"), v_lo, f"{name}.pv.v"),
                        -bound, bound, why)  # (kv, 1, grp*2T, hd)
        by_p = g.reshape(by_p, [kv, grp, -1, hd], f"{name}.pv.groups")  # (kv, grp, 2T, hd)
        hi = g.assume(g.slice(by_p, g.ints([0]), self.rows, 2, f"{name}.pv.hi"),
                      -bound // PLANE_BASE, bound // PLANE_BASE, why)
        lo = g.slice(by_p, self.rows, INT64_MAX, 2, f"{name}.pv.lo")
        exact = g.add(g.mul(hi, g.scalar(PLANE_BASE, np.int32), f"{name}.pv.hi256"), lo,
                      f"{name}.pv")
        return g.assume(exact, -bound, bound, why)

    def mlp(self, i: int, x: Tensor) -> Tensor:
        """silu(gate) * up in int32: a SiLU table indexed by the requantised gate itself."""
        g, m, p = self.g, self.m, self.m.layers[i]
        name = f"L{i}.mlp"
        half = GATE_HALF_RANGE
        gate = self.requant_int32(self.linear(x, p.gate, f"{name}.gate"), p.gate.out,
                                  -half, half, f"{name}.gate.fix",
                                  zero_point=half)  # (T, I) gate + half in [0, 2 * half]
        up = self.requant_int32(self.linear(x, p.up, f"{name}.up"), p.up.out,
                                -UP_CLIP, UP_CLIP, f"{name}.up.fix")  # (T, I)
        silu = g.lookup(g.const("c.silu", m.silu_table), gate, f"{name}.silu")  # (T, I)
        act = g.mul(silu, up, f"{name}.act")  # (T, I), |act| < 2**31
        if self.fine:  # 24 bits as three planes
            zp = FINE_ACT_ZERO_POINT
            act = self.requant_int32(act, p.act, -zp, zp - 1, f"{name}.act.q24", zp)
            act = Planes(g.planes(act, 0, f"{name}.act.planes", FINE_ACT_PLANES), self.rows,
                         FINE_ACT_PLANES, zp)  # (3T, I) u8
            return self.to_residual(self.linear(act, p.down, f"{name}.down"), p.down,
                                    f"{name}.down.res")
        d = p.act_divisor
        zp = PLANE_ZERO_POINT if self.wide else 128
        act = g.clip(act, -zp * d, (zp - 1) * d, f"{name}.act.clip")
        act = g.add(act, g.scalar(zp * d + d // 2, np.int32), f"{name}.act.offset")
        act = g.div(act, g.scalar(d, np.int32), f"{name}.act.shift")  # round(act / d) + zp
        if self.wide:
            act = Planes(g.planes(act, 0, f"{name}.act.planes"), self.rows)  # (2T, I) u8
        else:
            act = g.cast(act, np.uint8, f"{name}.act.u8")  # (T, I) u8
        return self.to_residual(self.linear(act, p.down, f"{name}.down"), p.down,
                                f"{name}.down.res")

    # ------------------------------------------------------------------ graph

    def build(self) -> GraphBuilder:
        g, m = self.g, self.m
        ctx: dict = {}
        vmax, cmax = m.vocab_size - 1, m.max_context
        if self.mode == "verify":
            # [P] ++ tokens, or [P, temperature, top-p, seed] ++ tokens, whose header may hold
            # any int64.
            header = SAMPLING_HEADER if self.samples else 1
            seq = g.input("sequence", np.int64, [f"T+{header}"], 0,
                          INT64_MAX if self.samples else max(vmax, cmax))
            start = g.sub(g.slice(seq, g.ints([0]), 1, 0, "prompt_len"), g.ints([1]), "start")
            for i, name in enumerate(sampling.PARAMETERS[:header - 1], start=1):
                self.draw[name] = g.reshape(g.slice(seq, g.ints([i]), i + 1, 0, f"{name}.1d"),
                                            [1, 1], name)
            tokens = g.slice(seq, g.ints([header]), INT64_MAX, 0, "tokens")  # (T,)
            self.rows = g.shape(tokens, cmax, "length.1d")
            length = g.reshape(self.rows, [], "length")
            positions = g.range(g.scalar(0), length, "positions")  # (T,)
            key_positions = positions
        else:
            tokens = g.input("tokens", np.int64, ["T"], 0, vmax)
            positions = g.input("positions", np.int64, ["T"], 0, cmax - 1)
            kv, hd = m.num_kv_heads, m.head_dim
            key_planes = 2 if self.wide else 1
            value_planes = 2 if self.fine else 1
            ctx["past_k"] = [g.input(f"past_k.{i}", np.int8, [kv, key_planes, hd, "P"], -64, 63)
                             for i in range(len(m.layers))]
            ctx["past_v"] = [g.input(f"past_v.{i}", np.int8, [kv, value_planes, "P", hd], -64,
                                     63) for i in range(len(m.layers))]
            new_1d = self.rows = g.shape(tokens, cmax, "length.1d")
            start = g.sub(new_1d, g.ints([1]), "last")
            # Keys are the cache (positions 0..P-1) followed by the new tokens.
            total = g.add(g.reshape(new_1d, [], "new"),
                          g.reshape(g.gather(g.shape(ctx["past_k"][0], cmax, "past.shape"),
                                             g.ints(3, "c.i64.3"), "past.len"), [], "past"),
                          "keys")
            key_positions = g.range(g.scalar(0), total, "key_positions")
            if self.samples:
                for name, (lo, hi) in sampling.PARAMETER_RANGES.items():
                    self.draw[name] = g.input(name, np.int64, ["L", 1], lo, hi)
        # Causal mask, shared by all layers: key j is hidden from query i when j > pos(i).
        hidden = g.greater(g.reshape(key_positions, [1, -1], "kpos"),
                           g.reshape(positions, [-1, 1], "qpos"), "mask")  # (T, S) bool
        hidden = g.cast(hidden, np.int32, "mask.i32")
        # Masked scores fall below every visible one: by MASK_PENALTY (enough for the 8-bit
        # graph's scores, at most hd * 128 * 64), or with 13-bit keys by 2B + 1 and then no
        # further than -B - 1, so that a row's max minus a masked score stays within int32.
        penalty = (2 * key_planes_score_bound(m.head_dim, self.fine) + 1 if self.wide
                   else MASK_PENALTY)
        ctx["mask_penalty"] = g.mul(hidden, g.scalar(penalty, np.int32), "mask.penalty")
        ctx["mask_index"] = g.mul(hidden, g.scalar(EXP_LEN - 1, np.int32), "mask.index")
        ctx["exp"] = g.const("c.exp", m.exp_table)
        ctx["cos"] = g.gather(g.const("c.rope.cos", m.rope_cos), positions, "rope.cos")
        ctx["sin"] = g.gather(g.const("c.rope.sin", m.rope_sin), positions, "rope.sin")

        # Embedding: int8 rows with a per-row multiplier into residual units.
        rows = g.gather(g.const("embed.W", m.embed), tokens, "embed.rows")  # (T, H) int8
        row_m = g.gather(g.const("embed.M", m.embed_M), tokens, "embed.M.rows")  # (T, 1)
        r = g.cast(rows, np.int64, "embed.i64")
        r = g.rescale(g.mul(r, row_m, "embed.scaled"), 1, m.embed_shift, -self.res_clip,
                      self.res_clip, "embed", np.int32)  # (T, H) residual units

        presents = []
        for i in range(len(m.layers)):
            x = self.rmsnorm(r, m.layers[i].attn_norm, f"L{i}.attn_norm")
            delta, k, v = self.attention(i, x, ctx)
            presents.append((k, v))
            r = self.add_residual(r, delta, f"L{i}.attn.residual")
            x = self.rmsnorm(r, m.layers[i].mlp_norm, f"L{i}.mlp_norm")
            r = self.add_residual(r, self.mlp(i, x), f"L{i}.mlp.residual")

        r = g.slice(r, start, INT64_MAX, 0, "final.rows")  # only the predicted positions
        if self.samples:  # the sampler's key: each predicted row's position
            self.draw["positions"] = g.reshape(
                g.slice(positions, start, INT64_MAX, 0, FINAL_POSITIONS), [-1, 1],
                "final.positions.2d")
        # Its row count, for the planes: T - start (T - P + 1 to verify, 1 to decode).
        final_rows = g.sub(self.rows, start, "final.length.1d") if self.wide else None
        x = self.rmsnorm(r, m.final_norm, "final_norm", final_rows)
        # Logits only need the right order: acc * M_c (M_c proportional to the channel's weight
        # scale) is exact in int32 and needs no rounding shift over the whole vocabulary.
        if self.fine:
            return self.finish(self.fine_logits(x), presents)
        if self.wide:  # (L, V) int32, the rounded 16-bit sum (same range as 8 bits')
            acc = self.linear(x, m.lm_head, "lm_head")
        else:
            acc = g.matmul_integer(x, g.const("lm_head.W", m.lm_head.weight), 128,
                                   m.lm_head.weight.shape[0], "lm_head.acc")  # (L, V) int32
        logits = g.mul(acc, g.const("lm_head.M", m.lm_head.out.M), "logits")  # (L, V) int32
        return self.finish(logits, presents)

    def fine_logits(self, x: Planes) -> Tensor:
        """The lm_head's exact sums (int64) rounded to int32 logits per channel, one vocabulary
        block at a time (`FINE_LOGIT_BLOCK`), so that only one block's intermediates are alive
        at once."""
        g, p = self.g, self.m.lm_head
        bound = 1 << FINE_LOGIT_BITS
        starts = range(0, p.weight.shape[1], FINE_LOGIT_BLOCK)
        logits = []
        for b, start in enumerate(starts):
            cols = slice(start, start + FINE_LOGIT_BLOCK)
            block = replace(p, weight=p.weight[:, cols],
                            bias=None if p.bias is None else p.bias[cols],
                            out=replace(p.out, M=p.out.M[cols]))
            head, name = (("lm_head", "logits") if len(starts) == 1
                          else (f"lm_head.b{b}", f"logits.b{b}"))
            acc = self.linear(x, block, head)
            logits.append(g.rescale(acc, block.out.M, block.out.shift, -bound, bound, name,
                                    np.int32))
        return logits[0] if len(logits) == 1 else g.concat(logits, 1, "logits")

    def finish(self, logits: Tensor, presents: list) -> GraphBuilder:
        """The next tokens from the logits, and in decode mode the present K/V as outputs."""
        g = self.g
        if self.samples:
            tokens_out = g.reshape(self.sample(logits), [-1], "next_tokens")
        else:
            tokens_out = self.argmax_tree(logits)
        g.output(tokens_out, ["L"])
        if self.mode == "decode":
            for k, v in presents:
                g.output(k)
                g.output(v)
        return g

    def sample(self, logits: Tensor) -> Tensor:
        """Each predicted row's token (L, 1): the argmax at temperature 0, else drawn
        (`sampling.sample_tokens`). Temperature and top-p are clipped to their ranges, so
        that any header has its tokens (the coordinator admits only values inside them)."""
        g, m, draw = self.g, self.m, self.draw
        greedy = g.reshape(self.argmax_tree(logits, "greedy"), [-1, 1], "greedy.2d")
        temperature, top_p = (g.clip(draw[name], *sampling.PARAMETER_RANGES[name],
                                     f"{name}.clip") for name in ("temperature", "top_p"))
        return sampling.sample_tokens(
            g, logits, greedy, temperature, top_p, draw["seed"], draw["positions"],
            m.vocab_size, sampling.sum_chunk(m.vocab_size), sampling.IndexScale.for_logits(
                m.logit_scale))

    def argmax_tree(self, logits: Tensor, name: str = "next_tokens") -> Tensor:
        """First index of the max over the vocabulary, as a two-level tree of bounded chunks;
        (L,), named `name`."""
        g, vocab = self.g, self.m.vocab_size
        c = argmax_chunk(vocab)
        if c == vocab:
            return g.reshape(g.argmax(logits, vocab, "argmax"), [-1], name)
        n = vocab // c
        chunks = g.reshape(logits, [-1, n, c], "argmax.chunks")  # (L, n, c)
        local = g.argmax(chunks, c, "argmax.local")  # (L, n, 1) first max within each chunk
        best = g.reduce_max(chunks, "argmax.chunkmax")  # (L, n, 1)
        best = g.reshape(best, [-1, n], "argmax.chunkmax.2d")  # (L, n)
        chunk = g.argmax(best, n, "argmax.chunk")  # (L, 1) first chunk holding the max
        local = g.reshape(local, [-1, n], "argmax.local.2d")
        within = g.gather_elements(local, chunk, 1, "argmax.within")  # (L, 1)
        base = g.mul(chunk, g.scalar(c), "argmax.base")
        return g.reshape(g.add(base, within, "argmax.index"), [-1], name)


def build_graph(m: IntegerQwen2, mode: str = "verify", sampling: bool = False
                ) -> GraphBuilder:
    """Lay out the integer Qwen2 graph; mode is "verify" (committed) or "decode" (KV cache).

    With `sampling` the next tokens are drawn (`optinfer.models.sampling`; issue 22, not yet
    the converter's graphs): the verify graph's input is then ``[P, temperature, top_p, seed]
    ++ tokens`` (SAMPLING_HEADER leading integers), and the decode graph takes ``temperature``,
    ``top_p`` and ``seed`` (L, 1) beside its other inputs."""
    if mode not in ("verify", "decode"):
        raise ValueError(f"unknown graph mode {mode!r}")
    return _Qwen2Builder(m, mode, sampling).build()
