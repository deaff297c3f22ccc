"""Verifiable sampling: temperature and top-p inside the integer graph, keyed by a seed.

A sampled token is a function of its row's integer logits and four integers: the temperature
(thousandths; 0 is greedy), top-p (thousandths), a seed and the row's position. The sampler
is built from op-set ops only (docs/opset.md), so ONNX Runtime, the numpy reference and the
one-step verifier compute the same token, and a dispute over a sampled token is played as
over a greedy one. Per row:

1. **Tempered exp.** d = max - logit (logit units, int64); i = floor(min(d, D) * K / 2**F),
   clipped to the table, is d * scale / temperature in 1/256 nat, with K = C / t computed in
   the graph from the temperature t; e = EXP[i] = round(2**19 * exp(-i / 256)).
2. **Top-p.** The smallest table index j whose mass (the sum of e over tokens with i <= j)
   reaches ceil(p * Z), Z the sum of every e: a binary search over the table (mass grows with
   j). The nucleus is every token with i <= j: the most probable tokens whose tempered mass
   reaches p, with every token tied with the last at the table's resolution.
3. **Draw.** u = r mod M, M the nucleus's mass, r a 62-bit word hashed from (seed,
   position) by a SplitMix64-style mix whose XORs are additions (the op set has no XOR).
4. **Inverse CDF.** The token where the nucleus's running mass, in vocabulary order, first
   exceeds u: the chunk first (a binary search over chunk sums), then the element in it.

Sums over the vocabulary run over chunks of at most 8 KiB of int32 (`sum_chunk`) and then over
the chunk sums, so that no sampler node's one-step costs more than 1.5M gas.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from optinfer.errors import UserError
from optinfer.models.graph_builder import GraphBuilder, Tensor, vocabulary_chunk

TEMPERATURE_UNIT = 1000  # the temperature in thousandths: 600 is 0.6
MIN_TEMPERATURE = 50  # 0.05; below it sampling is greedy in all but name
MAX_TEMPERATURE = 2000
TOP_P_UNIT = 1000  # top-p in thousandths: 950 is 0.95, 1000 keeps every token
SEED_LIMIT = 1 << 63  # seeds are int64 values in [0, 2**63)
#: A sampling graph's per-row parameters and the values each may take: its decode graph's
#: inputs of these names, and the verify input's header after the prompt length, in this
#: order.
PARAMETER_RANGES = {"temperature": (0, MAX_TEMPERATURE), "top_p": (1, TOP_P_UNIT),
                    "seed": (0, SEED_LIMIT - 1)}
PARAMETERS = tuple(PARAMETER_RANGES)

EXP_FRAC_BITS = 8  # the exp table's index resolution: 1/256 nat
EXP_BITS = 19  # e = 2**19 at the row's max: a chunk of 2,560 sums within int32
EXP_LEN = 14 * (1 << EXP_FRAC_BITS) + 1  # exp(-14) * 2**19 rounds to 0: the last entries are 0
#: K's least precision (at the highest temperature), and the headroom d * K leaves in int64.
K_MIN_BITS, PRODUCT_BITS = 24, 62
#: SplitMix64's constants as int64 (two's complement): the golden-ratio step and two mixers.
GOLDEN, MIX_1, MIX_2 = (c - (1 << 64) for c in (
    0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


#: The sampler's chunks: at most 2,048 int32, so that the one-step of a chunk's ReduceSum
#: stays under 1.5M gas (over the argmax's 2,374-element chunks at R1-Distill's vocabulary it
#: took 1,534,345 gas; docs/performance.md, "Sampling").
SUM_CHUNK_BYTES = 8 * 1024


def sum_chunk(vocab_size: int) -> int:
    """The largest divisor of the vocabulary whose int32 chunk fits SUM_CHUNK_BYTES."""
    return vocabulary_chunk(vocab_size, SUM_CHUNK_BYTES)


def exp_table() -> np.ndarray:
    """EXP[i] = round(2**EXP_BITS * exp(-i / 2**EXP_FRAC_BITS)), int32, EXP_LEN entries."""
    i = np.arange(EXP_LEN, dtype=np.float64)
    return np.rint(np.exp(-i / (1 << EXP_FRAC_BITS)) * (1 << EXP_BITS)).astype(np.int32)


@dataclass(frozen=True)
class Sampling:
    """A request's sampling parameters. Temperature 0 is greedy decoding (top-p and the seed
    are then unused)."""

    temperature: int = 0  # thousandths
    top_p: int = TOP_P_UNIT  # thousandths
    seed: int = 0

    def __post_init__(self):
        if self.temperature != 0 and not MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE:
            raise UserError(
                f"temperature {self.temperature / TEMPERATURE_UNIT:g} is outside the range "
                f"{MIN_TEMPERATURE / TEMPERATURE_UNIT:g}-{MAX_TEMPERATURE / TEMPERATURE_UNIT:g}"
                " (or 0 for greedy decoding)")
        if not 1 <= self.top_p <= TOP_P_UNIT:
            raise UserError(f"top-p {self.top_p / TOP_P_UNIT:g} is outside the range "
                            f"{1 / TOP_P_UNIT:g}-1")
        if not 0 <= self.seed < SEED_LIMIT:
            raise UserError(f"seed {self.seed} is outside 0 .. 2**63 - 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_floats(cls, temperature: float, top_p: float = 1.0, seed: int = 0) -> Sampling:
        """From a user's 0.6 and 0.95: thousandths, rounded."""
        return cls(round(temperature * TEMPERATURE_UNIT), round(top_p * TOP_P_UNIT), seed)

    @classmethod
    def from_chain(cls, temperature: int, top_p: int, seed: int) -> Sampling:
        """A stored request's draw: temperature 0 is greedy whatever the other two hold, and
        reads as ``Sampling()`` (docs/protocol.md, "Sampling")."""
        return cls(temperature, top_p, seed) if temperature else cls()

    def as_chain(self) -> tuple[int, int, int]:
        """``InferenceCoordinator.Sampling`` (temperature, topP, seed)."""
        return (self.temperature, self.top_p, self.seed)


def verify_sequence(prompt: Sequence[int], output: Sequence[int], draw: Sampling | None
                    ) -> np.ndarray:
    """The verify graph's input, int64: ``header ++ P ++ O[:-1]`` with the header [len(P)]
    for a greedy-only model (`draw` None), [len(P), temperature, top_p, seed] for a sampling
    one (the greedy draw is ``Sampling()``; docs/protocol.md, "The verified computation")."""
    header = [len(prompt)] if draw is None else [
        len(prompt), *(getattr(draw, name) for name in PARAMETERS)]
    return np.asarray([*header, *prompt, *output[:-1]], dtype=np.int64)


@dataclass(frozen=True)
class IndexScale:
    """i = floor(min(d, cap) * (numerator / t) / 2**shift) approximates d * scale * 256 /
    (t / 1000), for logits of `scale` (real logit = integer * scale)."""

    numerator: int
    shift: int
    cap: int

    @classmethod
    def for_logits(cls, scale: float) -> IndexScale:
        """The most precise (numerator, shift) whose products stay within PRODUCT_BITS."""
        if not scale > 0:
            raise ValueError(f"the logit scale must be positive, got {scale}")
        per_nat = scale * TEMPERATURE_UNIT * (1 << EXP_FRAC_BITS)  # i per unit of d, t = 1
        spread = MAX_TEMPERATURE / MIN_TEMPERATURE
        # K = numerator / t is smallest at the highest temperature: give it K_MIN_BITS, but
        # keep cap * K_max = EXP_LEN * 2**shift * spread (about) inside 2**PRODUCT_BITS.
        shift = math.ceil(K_MIN_BITS + math.log2(MAX_TEMPERATURE / per_nat))
        shift = max(min(shift, PRODUCT_BITS - 1 - math.ceil(math.log2(EXP_LEN * spread))), 0)
        numerator = round(per_nat * (1 << shift))
        if numerator // MAX_TEMPERATURE < 1:
            raise ValueError(f"logit scale {scale} is too small for the sampler's index")
        # Past the cap every d indexes the table's last entry, at every temperature.
        cap = -(-(EXP_LEN << shift) // (numerator // MAX_TEMPERATURE))
        return cls(numerator, shift, cap)


def sample_tokens(g: GraphBuilder, logits: Tensor, greedy: Tensor, temperature: Tensor,
                  top_p: Tensor, seed: Tensor, positions: Tensor, vocab_size: int, chunk: int,
                  scale: IndexScale, hint: str = "sample") -> Tensor:
    """The next token of each row (L, 1) int64: `greedy` (L, 1) where the temperature is 0,
    else sampled from `logits` (L, V) int32. `temperature`, `top_p`, `seed` and `positions`
    are (L, 1) int64 (or broadcast to it); `chunk` divides the vocabulary."""
    if vocab_size % chunk:
        raise ValueError(f"chunk {chunk} does not divide the vocabulary {vocab_size}")
    index, e = _tempered_exp(g, logits, temperature, vocab_size, chunk, scale, f"{hint}.exp")
    sums = _VocabularySums(g, vocab_size, chunk, hint)
    total = sums.total(e, f"{hint}.z")
    # ceil(Z * p): Z <= V * 2**19 and p <= 1000 keep it far inside int64.
    target = g.div(g.add(g.mul(total, top_p, f"{hint}.zp"), g.scalar(TOP_P_UNIT - 1),
                         f"{hint}.zp.up"), g.scalar(TOP_P_UNIT), f"{hint}.target")
    last = _first_reaching(g, lambda j, h: sums.total(_masked(g, e, index, j, h), h),
                           EXP_LEN, g.add(target, g.scalar(-1), f"{hint}.target.1"),
                           f"{hint}.topp")
    kept = _masked(g, e, index, last, f"{hint}.kept")
    chunk_sums = sums.per_chunk(kept, f"{hint}.kept.chunks")  # (L, n) int64
    mass = g.reduce_sum(chunk_sums, vocab_size // chunk, f"{hint}.mass")
    mass = g.assume(mass, 1 << EXP_BITS, mass.hi,
                    "the nucleus holds the row's max, whose e is 2**EXP_BITS")
    u = g.remainder(_random_word(g, seed, positions, f"{hint}.rng"), mass, f"{hint}.u")
    return _select(g, kept, chunk_sums, u, greedy, temperature, vocab_size, chunk, hint)


def _tempered_exp(g: GraphBuilder, logits: Tensor, temperature: Tensor, vocab_size: int,
                  chunk: int, scale: IndexScale, hint: str) -> tuple[Tensor, Tensor]:
    """(i, e) of every token, both (L, V) int32."""
    n = vocab_size // chunk
    top = g.reduce_max(g.reshape(logits, [-1, n, chunk], f"{hint}.chunks"), f"{hint}.chunkmax")
    top = g.reduce_max(g.reshape(top, [-1, n], f"{hint}.chunkmax.2d"), f"{hint}.max")  # (L, 1)
    d = g.sub(g.cast(top, np.int64, f"{hint}.max.i64"), g.cast(logits, np.int64, f"{hint}.i64"),
              f"{hint}.d")
    d = g.assume(d, 0, d.hi, "the row's max minus each of its elements")
    d = g.minimum(d, g.scalar(scale.cap), f"{hint}.d.cap")
    t = g.maximum(temperature, g.scalar(MIN_TEMPERATURE), f"{hint}.t")  # 0 (greedy) runs too
    k = g.div(g.scalar(scale.numerator), t, f"{hint}.k")
    i = g.div(g.mul(d, k, f"{hint}.dk"), g.scalar(1 << scale.shift), f"{hint}.index.wide")
    i = g.cast(g.minimum(i, g.scalar(EXP_LEN - 1), f"{hint}.index.clip"), np.int32,
               f"{hint}.index")
    return i, g.lookup(g.const(f"{hint}.table", exp_table()), i, f"{hint}.e")


class _VocabularySums:
    """Sums of (L, V) int32 over the vocabulary, by chunks and then over the chunk sums."""

    def __init__(self, g: GraphBuilder, vocab_size: int, chunk: int, hint: str):
        self.g, self.vocab_size, self.chunk, self.n = g, vocab_size, chunk, vocab_size // chunk

    def per_chunk(self, x: Tensor, hint: str) -> Tensor:
        g = self.g
        sums = g.reduce_sum(g.reshape(x, [-1, self.n, self.chunk], f"{hint}.3d"), self.chunk,
                            f"{hint}.sum")  # (L, n, 1) int32
        return g.cast(g.reshape(sums, [-1, self.n], f"{hint}.2d"), np.int64, hint)

    def total(self, x: Tensor, hint: str) -> Tensor:
        return self.g.reduce_sum(self.per_chunk(x, f"{hint}.chunks"), self.n, hint)  # (L, 1)


def _masked(g: GraphBuilder, e: Tensor, index: Tensor, last: Tensor, hint: str) -> Tensor:
    """e where index <= last (L, 1), else 0. The 0/1 mask is clip(last + 1 - index, 0, 1),
    two int32 ops: with Greater and a Cast of its bool instead, the sampler took 3.9 ms a row
    at R1-Distill's vocabulary, against 3.2 ms (docs/models.md, "Sampling")."""
    bound = g.cast(g.add(last, g.scalar(1), f"{hint}.bound"), np.int32, f"{hint}.bound.i32")
    inside = g.clip(g.sub(bound, index, f"{hint}.gap"), 0, 1, f"{hint}.inside")
    return g.mul(inside, e, hint)


def _first_reaching(g: GraphBuilder, mass, n: int, below: Tensor, hint: str) -> Tensor:
    """The smallest j in [0, n) with mass(j) > below, (L, 1) int64, by binary search: mass(j, h)
    is a (L, 1) int64 that never falls as j grows, and mass(n - 1) > below."""
    lo = g.mul(below, g.scalar(0), f"{hint}.start")  # zeros, (L, 1) as `below` is
    hi = g.add(lo, g.scalar(n - 1), f"{hint}.end")
    for step in range(math.ceil(math.log2(n)) if n > 1 else 0):
        h = f"{hint}.{step}"
        mid = g.div(g.add(lo, hi, f"{h}.sum"), g.scalar(2), f"{h}.mid")
        reached = g.cast(g.greater(mass(mid, f"{h}.mass"), below, f"{h}.reached"), np.int64,
                         f"{h}.reached.i64")
        missed = g.sub(g.scalar(1), reached, f"{h}.missed")
        # reached: the answer is at most mid; else it is past mid.
        hi = g.assume(g.add(mid, g.mul(missed, g.sub(hi, mid, f"{h}.hi.gap"), f"{h}.hi.step"),
                            f"{h}.hi"), 0, n - 1, "hi stays a candidate index")
        lo = g.assume(g.add(lo, g.mul(missed, g.sub(g.add(mid, g.scalar(1), f"{h}.mid1"), lo,
                                                    f"{h}.lo.gap"), f"{h}.lo.step"),
                            f"{h}.lo"), 0, n - 1, "lo stays a candidate index")
    return lo


def _random_word(g: GraphBuilder, seed: Tensor, positions: Tensor, hint: str) -> Tensor:
    """A word in [0, 2**62) from (seed, position), (L, 1) int64."""
    step = g.add(positions, g.scalar(1), f"{hint}.step")
    z = g.wrapping("Add", seed, g.wrapping("Mul", step, g.scalar(GOLDEN), f"{hint}.golden"),
                   f"{hint}.z0")
    for i, (shift, mixer) in enumerate(((30, MIX_1), (27, MIX_2))):
        spread = g.wrapping("Add", z, g.div(z, g.scalar(1 << shift), f"{hint}.down{i}"),
                            f"{hint}.fold{i}")
        z = g.wrapping("Mul", spread, g.scalar(mixer), f"{hint}.z{i + 1}")
    z = g.wrapping("Add", z, g.div(z, g.scalar(1 << 31), f"{hint}.down2"), f"{hint}.z3")
    return g.add(g.div(z, g.scalar(4), f"{hint}.quarter"), g.scalar(1 << 61), hint)


def _select(g: GraphBuilder, kept: Tensor, chunk_sums: Tensor, u: Tensor, greedy: Tensor,
            temperature: Tensor, vocab_size: int, chunk: int, hint: str) -> Tensor:
    """The token where the running mass of `kept` first exceeds u, or `greedy` at t = 0."""
    n = vocab_size // chunk
    chunk_ids = g.const(f"{hint}.chunk.ids", np.arange(n, dtype=np.int64))

    def before_or_at(values: Tensor, ids: Tensor, j: Tensor, h: str) -> Tensor:
        inside = g.cast(g.greater(g.add(j, g.scalar(1), f"{h}.bound"), ids, f"{h}.inside"),
                        values.dtype, f"{h}.inside.cast")
        total = g.reduce_sum(g.mul(inside, values, f"{h}.values"), ids.hi + 1, h)
        return total if total.dtype == np.int64 else g.cast(total, np.int64, f"{h}.i64")

    which = _first_reaching(g, lambda j, h: before_or_at(chunk_sums, chunk_ids, j, h), n, u,
                            f"{hint}.chunk")
    through = before_or_at(chunk_sums, chunk_ids, which, f"{hint}.chunk.through")
    own = g.gather_elements(chunk_sums, which, 1, f"{hint}.chunk.own")
    rest = g.sub(u, g.sub(through, own, f"{hint}.chunk.before"), f"{hint}.rest")  # u in chunk
    rest = g.assume(rest, 0, rest.hi, "u lies in the chosen chunk's mass")
    if n == 1:
        row = kept
    else:
        kept3 = g.reshape(kept, [-1, n, chunk], f"{hint}.kept.3d")
        spread = g.add(g.reshape(which, [-1, 1, 1], f"{hint}.which.3d"),
                       g.const(f"{hint}.zeros", np.zeros((1, 1, chunk), np.int64)),
                       f"{hint}.which.row")
        row = g.reshape(g.gather_elements(kept3, spread, 1, f"{hint}.row.3d"), [-1, chunk],
                        f"{hint}.row")  # (L, c)
    element_ids = g.const(f"{hint}.element.ids", np.arange(chunk, dtype=np.int64))
    within = _first_reaching(g, lambda j, h: before_or_at(row, element_ids, j, h), chunk, rest,
                             f"{hint}.element")
    sampled = g.add(g.mul(which, g.scalar(chunk), f"{hint}.base"), within, f"{hint}.sampled")
    sampled = g.assume(sampled, 0, vocab_size - 1, "a chunk and an element inside it")
    is_greedy = g.cast(g.greater(g.scalar(1), temperature, f"{hint}.greedy"), np.int64,
                       f"{hint}.greedy.i64")
    return g.add(sampled, g.mul(is_greedy, g.sub(greedy, sampled, f"{hint}.swap"),
                                f"{hint}.swap.mul"), hint)


def sampler_model(vocab_size: int, chunk: int, scale: IndexScale, logit_lo: int, logit_hi: int,
                  max_position: int = 1 << 20):
    """The sampler alone, as an ONNX model (tests and benchmarks): inputs ``logits`` (L, V)
    int32 within [logit_lo, logit_hi] and ``temperature``, ``top_p``, ``seed``, ``positions``
    (L, 1) int64; output ``tokens`` (L,) int64."""
    g = GraphBuilder("sampler")
    logits = g.input("logits", np.int32, ["L", vocab_size], logit_lo, logit_hi)
    ranges = {**PARAMETER_RANGES, "positions": (0, max_position)}
    rows = [g.input(name, np.int64, ["L", 1], lo, hi) for name, (lo, hi) in ranges.items()]
    greedy = g.argmax(logits, vocab_size, "greedy")
    tokens = sample_tokens(g, logits, greedy, *rows, vocab_size=vocab_size, chunk=chunk,
                           scale=scale)
    g.output(g.reshape(tokens, [-1], "tokens"), ["L"])
    return g.model()
