"""Checkpoint -> integer-only ONNX model: calibration, quantisation, graph, manifest.

`convert(checkpoint_dir, out_dir)` reads a Hugging Face `Qwen2ForCausalLM` directory (or a Llama
or Qwen2 GGUF file, `gguf_import`), runs the
float reference over calibration sequences to find the range of every quantised tensor, turns
weights and ranges into the integer constants of `IntegerQwen2`, lays out the verify and decode
graphs, and writes them next to one shared constants file. The output directory appears whole or
not at all.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from optinfer.errors import UserError
from optinfer.models import quant
from optinfer.models.chat import write_chat_template
from optinfer.models.checkpoint import TOKENIZER_FILE, Qwen2Spec, WeightReader, read_spec
from optinfer.models.float_reference import CalibrationStats, FloatReference
from optinfer.models.graph_builder import PLANE_BASE, PLANE_ZERO_POINT, SIGNED_PLANE_HALF
from optinfer.models.qwen2_graph import (
    EXP_FRAC_BITS,
    EXP_LEN,
    EXP_OUT_BITS,
    FINE_ACT_ZERO_POINT,
    FINE_LOGIT_BITS,
    FINE_RESIDUAL_BITS,
    FINE_WEIGHT_BITS,
    GATE_HALF_RANGE,
    LINEAR_INPUT_BITS,
    MASK_PENALTY,
    PROB_MAX,
    QK_FIX_CLIP,
    ROPE_FRAC_BITS,
    UP_CLIP,
    WEIGHT_BITS,
    WIDE_PROB_MAX,
    IntegerQwen2,
    Layer,
    Linear,
    Norm,
    Requant,
    build_graph,
    fine_query_half,
    key_planes_score_bound,
    residual_bits,
    wide_pv_bound,
)

DEFAULT_MAX_CONTEXT = 4096
MAX_CONTEXT_LIMIT = 8192  # int32 softmax sums over the keys stay within the 32 KiB fan-in
MANIFEST_FORMAT = "optinfer-integer-model/1"
VERIFY_GRAPH = "model.onnx"
DECODE_GRAPH = "decode.onnx"
CONSTANTS_FILE = "weights.bin"
INLINE_CONSTANT_BYTES = 1024  # smaller constants stay inside each graph file

Progress = Callable[[float, str], None]


# ------------------------------------------------------------------ calibration


def read_calibration(path: Path, tokenizer_path: Path, vocab_size: int) -> list[list[int]]:
    """Calibration sequences from a file: one sample per line, text or a JSON list of token ids."""
    if not path.is_file():
        raise UserError(f"calibration file {path} does not exist")
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path)) if tokenizer_path.is_file() else None
    sequences = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("["):
            try:
                ids = [int(t) for t in json.loads(line)]
            except (ValueError, TypeError) as err:
                raise UserError(f"{path}:{n}: not a JSON list of token ids ({err})") from None
        else:
            if tokenizer is None:
                raise UserError(f"{path}:{n}: text sample but the checkpoint has no tokenizer.json")
            ids = tokenizer.encode(line).ids
        if any(not 0 <= t < vocab_size for t in ids):
            raise UserError(f"{path}:{n}: token id outside the vocabulary (0..{vocab_size - 1})")
        if ids:
            sequences.append(ids)
    if not sequences:
        raise UserError(f"calibration file {path} has no samples")
    return sequences


def default_calibration(spec: Qwen2Spec, count: int = 4, length: int = 32) -> list[list[int]]:
    """Seeded random token sequences: a neutral default when no calibration file is given."""
    rng = np.random.default_rng(0)
    return [rng.integers(0, spec.vocab_size, size=length).tolist() for _ in range(count)]


def calibrate(reference: FloatReference, sequences: list[list[int]],
              progress: Progress | None = None) -> CalibrationStats:
    stats = CalibrationStats()
    for n, seq in enumerate(sequences):
        reference.forward(seq, record=stats)
        if progress:
            progress((n + 1) / len(sequences), "calibrating")
    return stats


# ----------------------------------------------------------------- quantisation


def _signed_multiplier(values: np.ndarray, x_bound: int, out_bound: int) -> tuple[np.ndarray, int]:
    big_m, shift = quant.choose_multiplier(np.abs(values), x_bound, out_bound)
    return np.where(values < 0, -big_m, big_m).astype(np.int64), shift


def _requant(m, x_bound: int, out_bound: int) -> Requant:
    big_m, shift = quant.choose_multiplier(m, x_bound, out_bound)
    return Requant(M=big_m if np.ndim(m) else big_m.reshape(()), shift=shift)


def _requant_int32(m, x_bound: int, lo: int, hi: int) -> Requant:
    """In int32 where its headroom leaves M enough bits, else in int64 (see `Requant`)."""
    try:
        big_m, shift = quant.choose_multiplier_int32(m, lo, hi)
    except ValueError:
        return _requant(m, x_bound, max(-lo, hi))
    return Requant(M=big_m if np.ndim(m) else big_m.reshape(()), shift=shift, int32=True)


def _rope_extra_bits(out_scale: float, amax: float, out_levels: int) -> int:
    """e for q (or k) before RoPE in units of out_scale / 2**e, the scale after RoPE's int8 or
    uint8 requantisation divided by a power of two, so that the requantisation after RoPE
    (whose tables carry 2**ROPE_FRAC_BITS) is a rounding shift alone, with no multiplier.

    e is the largest that keeps 2x the calibrated max within QK_FIX_CLIP, and at most what
    keeps the shift's (out_levels + 1) * 2**shift within int32.
    """
    e = math.floor(math.log2(QK_FIX_CLIP * out_scale / (2 * amax)))
    e_max = math.floor(math.log2((2**31 - 1) / (out_levels + 1))) - ROPE_FRAC_BITS
    return max(min(e, e_max), 1 - ROPE_FRAC_BITS)


def _rounding_shift(shift: int) -> Requant:
    return Requant(M=np.array(1, np.int64), shift=shift, int32=True)


# The gate's fixed point: its range is 2x the largest calibrated gate of any layer, rounded up to
# a power of two and kept within [8, 1024] (the SiLU table's 2**16 steps then give 1/4096 to
# 1/32), so that one SiLU table serves every layer.
GATE_RANGE_MIN, GATE_RANGE_MAX = 8, 1024
ACT_DIVISOR_MAX = 1 << 23  # 255 * d + d / 2 must fit int32
ACT16_DIVISOR_MAX = (1 << 15) - 1  # with 16-bit inputs, 65535 * d + d / 2 must fit int32


def check_linear_input_bits(linear_input_bits: int) -> None:
    """UserError unless the linear layers' inputs are 8 or 16 bits wide."""
    if linear_input_bits not in LINEAR_INPUT_BITS:
        raise UserError("linear input bits (--linear-input-bits) must be 8 or 16, got "
                        f"{linear_input_bits}")


def check_weight_bits(weight_bits: int, linear_input_bits: int) -> None:
    """UserError unless the weights are 7 bits, or 13 (the fine graph) with 16-bit inputs."""
    if weight_bits not in WEIGHT_BITS:
        raise UserError(f"weight bits (--weight-bits) must be 7 or 13, got {weight_bits}")
    if weight_bits == FINE_WEIGHT_BITS and linear_input_bits != 16:
        raise UserError("13-bit weights need 16-bit linear inputs (--linear-input-bits 16)")


def linear_input_levels(wide: bool) -> int:
    """The largest |x| of a linear layer's input in its units: uint8 (zero point 128), or
    with 16-bit inputs (`wide`) 16-bit (zero point 2**15)."""
    return quant.ACT16_MAX if wide else quant.ACT_MAX


def linear_input_scale(calibrated_max: float, wide: bool) -> float:
    """Scale of a linear layer's input, from its calibrated max |x|."""
    return quant.activation_scale(max(float(calibrated_max), 1e-6), linear_input_levels(wide))


def accumulator_input_units(wide: bool, fine: bool = False) -> int:
    """Input units in one unit of a linear layer's accumulator: 1, or with 16-bit inputs 256
    (the planes' product is kept as floor((S + bias + 128) / 256),
    `GraphBuilder.matmul_integer_planes`); 1 again in the fine graph, which keeps S exactly."""
    return PLANE_BASE if wide and not fine else 1


def model_residual_bits(hidden_size: int, linear_input_bits: int) -> int:
    """The residual's saturation bits: FINE_RESIDUAL_BITS for a model with 16-bit linear
    inputs; with 8-bit ones what RMSNorm squares exactly (the graph as it always was)."""
    return FINE_RESIDUAL_BITS if linear_input_bits == 16 else residual_bits(hidden_size)


def residual_scale(calibrated_max: float, res_bits: int) -> float:
    """The residual stream's one scale: 8x headroom over the calibrated range before the
    residual saturates at 2**res_bits."""
    return max(float(calibrated_max), 1e-6) * 8 / 2**res_bits


class _Quantizer:
    """Turns float weights and calibrated ranges into the constants of IntegerQwen2."""

    def __init__(self, spec: Qwen2Spec, stats: CalibrationStats, max_context: int,
                 linear_input_bits: int = 8, weight_bits: int = 7):
        check_linear_input_bits(linear_input_bits)
        check_weight_bits(weight_bits, linear_input_bits)
        self.spec, self.stats, self.max_context = spec, stats, max_context
        self.wide = linear_input_bits == 16
        self.fine = weight_bits == FINE_WEIGHT_BITS
        self.weight_bits = weight_bits
        self.in_levels = linear_input_levels(self.wide)
        self.res_bits = model_residual_bits(spec.hidden_size, linear_input_bits)
        self.res_clip = 1 << self.res_bits
        self.s_res = residual_scale(self._amax("residual"), self.res_bits)
        self.gate_bits = self.gate_frac_bits()

    def _amax(self, name: str) -> float:
        try:
            value = float(self.stats.max_abs[name])
        except KeyError:
            raise ValueError(f"calibration has no statistics for {name}") from None
        return max(value, 1e-6)

    def input_scale(self, name: str) -> float:
        """Scale of a linear layer's input whose calibration point is `name`."""
        return linear_input_scale(self._amax(name), self.wide)

    def norm(self, gamma: np.ndarray, out_scale: float) -> Norm:
        gain = np.asarray(gamma, np.float64) / out_scale
        # out_bound 256 * res_clip: the graph adds 128.5 * rms * 2**shift to r * G (int64);
        # with 16-bit outputs 2**16 * res_clip ((2**15 + 0.5) * rms * 2**shift).
        levels = 2 * PLANE_ZERO_POINT if self.wide else 256
        big_g, shift = _signed_multiplier(gain, self.res_clip, levels * self.res_clip)
        eps_q = max(1, round(self.spec.rms_norm_eps / self.s_res**2))
        return Norm(G=big_g, shift=shift, eps_q=eps_q)

    def linear(self, w, b, in_scale: float, out_scale: float, out_bound: int,
               in_levels: int | None = None) -> Linear:
        """Quantised weights, bias in accumulator units, and the requantisation to out_scale
        within [-out_bound, out_bound] (in int32 where the multiplier keeps enough bits).

        With 16-bit inputs the bias is in units of the exact sum S (in_scale * weight scale)
        and the requantised accumulator is floor((S + bias + 128) / 256)
        (`GraphBuilder.matmul_integer_planes`), 256 units of S each. In the fine graph the
        requantisation (int64) starts from S + bias itself; `in_levels` is the input's
        largest |x| in its units (default: a 16-bit input's)."""
        if self.fine:
            return self.fine_linear(w, b, in_scale, out_scale, out_bound,
                                    in_levels or self.in_levels)
        ql = quant.quantize_linear(w, b)
        acc_scale = in_scale * ql.scale  # real value of one accumulator unit, per channel
        k = ql.weight.shape[0]
        bias = None
        x_bound = k * 128 * 64
        if ql.bias is not None:
            bias = np.rint(ql.bias / acc_scale).astype(np.int64)
            bias_bound = int(np.abs(bias).max())
            x_bound += bias_bound // PLANE_BASE + 1 if self.wide else bias_bound
        acc_scale = acc_scale * accumulator_input_units(self.wide)
        out = _requant_int32(acc_scale / out_scale, x_bound, -out_bound, out_bound)
        return Linear(weight=ql.weight, bias=bias, out=out)

    def fine_linear(self, w, b, in_scale: float, out_scale: float, out_bound: int,
                    in_levels: int) -> Linear:
        """13-bit weights; S + bias bounded by (in_levels + 1) * max column sum |W| + |bias|
        (`GraphBuilder.matmul_integer_wide`), requantised in int64."""
        ql = quant.quantize_linear(w, b, FINE_WEIGHT_BITS)
        acc_scale = in_scale * ql.scale  # real value of one unit of S, per channel
        bias = None if ql.bias is None else np.rint(ql.bias / acc_scale).astype(np.int64)
        x_bound = (in_levels + 1) * int(np.abs(ql.weight.astype(np.int64)).sum(axis=0).max())
        if bias is not None:
            x_bound += int(np.abs(bias).max())
        return Linear(weight=ql.weight, bias=bias,
                      out=_requant(acc_scale / out_scale, x_bound, out_bound))

    def gate_frac_bits(self) -> int:
        amax = max(self._amax(f"L{i}.gate") for i in range(self.spec.num_layers))
        gate_range = min(max(2 ** math.ceil(math.log2(2 * amax)), GATE_RANGE_MIN), GATE_RANGE_MAX)
        return int(math.log2(GATE_HALF_RANGE // gate_range))

    def layer(self, i: int, weights: dict) -> Layer:
        spec, a = self.spec, self._amax
        p = f"L{i}."
        s_attn_in = self.input_scale(p + "attn_in")
        # Queries: uint8; in the fine graph in [-h, h) (fine_query_half), two planes.
        q_half = fine_query_half(spec.head_dim) if self.fine else 128
        s_q = quant.activation_scale(a(p + "q_rot"), q_half - 1)
        # Keys: int8, 7 bits; with 16-bit linear inputs 13 bits (two int8 planes); values
        # likewise in the fine graph.
        key_levels = SIGNED_PLANE_HALF if self.wide else 64
        value_levels = SIGNED_PLANE_HALF if self.fine else 64
        s_k = a(p + "k_rot") / (key_levels - 1)
        s_v = a(p + "v") / (value_levels - 1)
        e_q = _rope_extra_bits(s_q, a(p + "q"), 2 * q_half)
        e_k = _rope_extra_bits(s_k, a(p + "k"), 2 * key_levels)
        s_attn_out = self.input_scale(p + "attn_out")
        s_mlp_in = self.input_scale(p + "mlp_in")
        gate_unit = 2.0**-self.gate_bits
        act_levels = None
        if self.fine:
            # act = silu * up (up's scale keeps 2x its calibrated max within UP_CLIP), then
            # requantised to 24 bits, three planes.
            act_levels = FINE_ACT_ZERO_POINT - 1
            s_act = quant.activation_scale(a(p + "act"), act_levels)
            s_up = 2 * a(p + "up") / UP_CLIP
            d = 1
            act = _requant_int32(gate_unit * s_up / s_act, GATE_HALF_RANGE * UP_CLIP,
                                 -FINE_ACT_ZERO_POINT, FINE_ACT_ZERO_POINT - 1)
        else:
            s_act = self.input_scale(p + "act")
            # act = silu * up is requantised by one integer divisor d: up's scale follows from
            # it, as large as keeps 2x the calibrated up within UP_CLIP.
            d = math.floor(s_act / gate_unit * UP_CLIP / (2 * a(p + "up")))
            d = min(max(d, 1), ACT16_DIVISOR_MAX if self.wide else ACT_DIVISOR_MAX)
            s_up = s_act / gate_unit / d
            act = None
        half_res = self.res_clip // 2
        # A row's max minus a score: with 13-bit keys at most 2B + 1 (the masked scores'
        # floor, `key_planes_score_bound`).
        if self.wide:
            score_bound = 2 * key_planes_score_bound(spec.head_dim, self.fine) + 1
        else:
            score_bound = 2 * spec.head_dim * q_half * key_levels + MASK_PENALTY
        prob_max = WIDE_PROB_MAX if self.wide else PROB_MAX
        # |P . V|; the 8-bit graph keeps its looser bound (and its model root).
        pv_bound = (wide_pv_bound(self.max_context) if self.wide
                    else self.max_context * 255 * 64) * (value_levels // 64)
        return Layer(
            attn_norm=self.norm(weights["input_norm"], s_attn_in),
            q=self.linear(weights["q_w"], weights["q_b"], s_attn_in, s_q / 2**e_q, QK_FIX_CLIP),
            k=self.linear(weights["k_w"], weights["k_b"], s_attn_in, s_k / 2**e_k, QK_FIX_CLIP),
            v=self.linear(weights["v_w"], weights["v_b"], s_attn_in, s_v, value_levels),
            q_rot=_rounding_shift(ROPE_FRAC_BITS + e_q),
            k_rot=_rounding_shift(ROPE_FRAC_BITS + e_k),
            scores=_requant_int32(s_q * s_k / math.sqrt(spec.head_dim) * 2**EXP_FRAC_BITS,
                                  score_bound, 0, EXP_LEN - 1),
            attn_out=_requant_int32(s_v / prob_max / s_attn_out, pv_bound,
                                    -self.in_levels - 1, self.in_levels),
            o=self.linear(weights["o_w"], None, s_attn_out, self.s_res, half_res),
            mlp_norm=self.norm(weights["post_norm"], s_mlp_in),
            gate=self.linear(weights["gate_w"], None, s_mlp_in, gate_unit, GATE_HALF_RANGE),
            up=self.linear(weights["up_w"], None, s_mlp_in, s_up, UP_CLIP),
            act_divisor=d,
            down=self.linear(weights["down_w"], None, s_act, self.s_res, half_res, act_levels),
            act=act,
        )

    def embedding(self, table: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        # Embedding rows are gathered, never multiplied: a full 8-bit range is safe here.
        q, row_scale = quant.quantize_rows(table, 127, -127)
        row_scale = np.maximum(row_scale, 1e-12)
        big_m, shift = quant.choose_multiplier(row_scale / self.s_res, 127, self.res_clip)
        return q, big_m.reshape(-1, 1), shift

    def head(self, final_gamma: np.ndarray, lm_head: np.ndarray) -> tuple[Norm, Linear]:
        """Final norm, and an lm_head whose logits are acc * M exactly, in int32 (no shift).

        M_c is proportional to channel c's weight scale, so acc * M_c orders the vocabulary like
        the real logits. M gets as many bits as keep |acc * M| in int32, where |acc| is bounded
        by 128 times the largest absolute column sum of the int8 weights (the graph builder
        proves the same bound).
        """
        s_final = self.input_scale("final_in")
        ql, big_m, m_bits = lm_head_quantization(lm_head, self.weight_bits)
        # 7-bit weights: the logits are acc * M exactly, no shift.
        shift = fine_logit_shift(ql, m_bits) if self.fine else 0
        # One integer logit in real units (as fidelity.dequantization reads it back).
        self.logit_scale = (s_final * accumulator_input_units(self.wide, self.fine)
                            * float(ql.scale.max()) * 2.0**(shift - m_bits))
        return self.norm(final_gamma, s_final), Linear(weight=ql.weight, bias=None,
                                                       out=Requant(M=big_m, shift=shift))


def _lm_head_bound(ql: quant.QuantizedLinear, fine: bool) -> int:
    """|acc| of the lm_head: 128 (uint8) or 2**15 (the fine graph's 16-bit input, exact S)
    times the largest absolute column sum of its weights."""
    levels = PLANE_ZERO_POINT if fine else 128
    return levels * int(np.abs(ql.weight.astype(np.int64)).sum(axis=0).max())


def fine_logit_shift(ql: quant.QuantizedLinear, m_bits: int) -> int:
    """The fine graph's logits are round(S * M / 2**shift): the shift that keeps them within
    2**FINE_LOGIT_BITS."""
    return max(quant.bits(_lm_head_bound(ql, True)) + m_bits - FINE_LOGIT_BITS, 1)


def lm_head_quantization(lm_head: np.ndarray, weight_bits: int = 7
                         ) -> tuple[quant.QuantizedLinear, np.ndarray, int]:
    """The lm_head's weights, its per-channel logit multipliers M and their bits.

    M_c = round(scale_c / max(scale) * 2**m_bits), so one real logit is
    acc_c * s_final * scale_c ~= (acc_c * M_c) * s_final * max(scale) / 2**m_bits. With 7-bit
    weights acc_c * M_c itself is the graph's int32 logit; in the fine graph (13-bit weights,
    M with 24 bits) the logit is round(S_c * M_c / 2**shift), shift from `_Quantizer.head`
    (`fidelity` reads either as real logits with one common scale).
    """
    fine = weight_bits == FINE_WEIGHT_BITS
    ql = quant.quantize_linear(lm_head, bits=weight_bits)
    m_bits = 24 if fine else 31 - quant.bits(_lm_head_bound(ql, False))
    dtype = np.int64 if fine else np.int32
    big_m = np.maximum(np.rint(ql.scale / ql.scale.max() * 2.0**m_bits), 1).astype(dtype)
    return ql, big_m, m_bits


def quantize(spec: Qwen2Spec, reader: WeightReader, stats: CalibrationStats, max_context: int,
             progress: Progress | None = None, linear_input_bits: int = 8,
             weight_bits: int = 7) -> IntegerQwen2:
    """The integer constants of the model, one layer at a time (float weights are freed)."""
    qz = _Quantizer(spec, stats, max_context, linear_input_bits, weight_bits)
    embed, embed_m, embed_shift = qz.embedding(reader.embed_tokens())
    layers = []
    for i in range(spec.num_layers):
        layers.append(qz.layer(i, reader.layer(i)))
        if progress:
            progress((i + 1) / spec.num_layers, f"quantising layer {i + 1}/{spec.num_layers}")
    final_norm, lm_head = qz.head(reader.final_norm(), reader.lm_head())
    cos, sin = quant.rope_tables(max_context, spec.head_dim, spec.rope_theta, ROPE_FRAC_BITS)
    return IntegerQwen2(
        hidden_size=spec.hidden_size, num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_dim, intermediate_size=spec.intermediate_size,
        vocab_size=spec.vocab_size, max_context=max_context,
        embed=embed, embed_M=embed_m, embed_shift=embed_shift, layers=layers,
        final_norm=final_norm, lm_head=lm_head,
        exp_table=quant.exp_table(EXP_FRAC_BITS, EXP_LEN, EXP_OUT_BITS),
        gate_frac_bits=qz.gate_bits,
        silu_table=quant.silu_table(qz.gate_bits, GATE_HALF_RANGE),
        rope_cos=cos, rope_sin=sin, linear_input_bits=linear_input_bits,
        residual_bits=None if qz.res_bits == residual_bits(spec.hidden_size) else qz.res_bits,
        weight_bits=weight_bits, logit_scale=qz.logit_scale,
    )


# ----------------------------------------------------------------------- output


def save_graphs(verify_builder, decode_builder, out_dir: Path) -> onnx.ModelProto:
    """Write both graphs; large constants go once into CONSTANTS_FILE, shared by both.

    Returns the saved verify graph, whose large constants now refer to the constants file.
    """
    verify = verify_builder.model()
    onnx.save_model(verify, str(out_dir / VERIFY_GRAPH), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=CONSTANTS_FILE,
                    size_threshold=INLINE_CONSTANT_BYTES, convert_attribute=False)
    # The decode graph reuses the verify graph's references into the constants file instead of
    # writing the bytes a second time.
    external = {t.name: t for t in verify.graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL}
    decode = decode_builder.model(reuse=external)
    for t in decode.graph.initializer:
        if t.name not in external and len(t.raw_data) > INLINE_CONSTANT_BYTES:
            raise ValueError(f"decode-only constant {t.name} is large; it would be duplicated")
    onnx.save_model(decode, str(out_dir / DECODE_GRAPH))
    return verify


def _make_readable(directory: Path) -> None:
    """mkdtemp makes a private directory; the model is meant to be shared like any file."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~umask)


@dataclass
class FloatCheckpoint:
    """A float model the converter reads: a Hugging Face directory or a GGUF file."""

    spec: Qwen2Spec
    reader: WeightReader
    tokenizer: Path | None  # its tokenizer.json, None when it has none
    source: dict | None  # for a GGUF: what the manifest records about the file


def open_checkpoint(path: Path, scratch: Path) -> FloatCheckpoint:
    """`path` as a float checkpoint: a `Qwen2ForCausalLM` directory, or a GGUF file (Llama or
    Qwen2, `gguf_import`) whose tokenizer is converted into `scratch/tokenizer.json`."""
    from optinfer.models import gguf_import

    path = Path(path)
    if path.is_file() or path.suffix.lower() == ".gguf":
        reader = gguf_import.GGUFWeightReader(path)  # refuses a file that is not GGUF
        tokenizer = gguf_import.write_tokenizer(path, Path(scratch) / TOKENIZER_FILE)
        source = {"format": "gguf", "file": path.name, "architecture": reader.architecture,
                  "tensor_types": reader.tensor_types()}
        return FloatCheckpoint(reader.spec, reader, tokenizer, source)
    spec = read_spec(path)
    tokenizer = path / TOKENIZER_FILE
    return FloatCheckpoint(spec, WeightReader(path, spec),
                           tokenizer if tokenizer.is_file() else None, None)


def convert(checkpoint_dir: Path, out_dir: Path, calibration: Path | None = None,
            max_context: int | None = None, progress: Progress | None = None,
            linear_input_bits: int = 8, weight_bits: int = 7, sampling: bool = False) -> dict:
    """Convert a Qwen2ForCausalLM checkpoint directory or a Llama/Qwen2 GGUF file; returns the
    manifest. `linear_input_bits` 16 makes the linear layers' inputs 16-bit (two uint8 planes
    in one MatMulInteger, docs/models.md); 8, the default, is the graph as it always was.
    `weight_bits` 13 (with 16-bit inputs) makes the fine graph (`qwen2_graph.WEIGHT_BITS`).
    `sampling` draws the next tokens with a temperature, top-p and seed in the graphs
    (`qwen2_graph.build_graph`; docs/models.md, "Sampling")."""
    check_linear_input_bits(linear_input_bits)
    check_weight_bits(weight_bits, linear_input_bits)
    with tempfile.TemporaryDirectory(prefix="optinfer-convert-") as scratch:
        return _convert(Path(checkpoint_dir), Path(out_dir), calibration, max_context, progress,
                        Path(scratch), linear_input_bits, weight_bits, sampling)


def _convert(checkpoint_dir: Path, out_dir: Path, calibration: Path | None,
             max_context: int | None, progress: Progress | None, scratch: Path,
             linear_input_bits: int = 8, weight_bits: int = 7,
             sampling: bool = False) -> dict:
    from optinfer.models.manifest import build_manifest

    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"output directory {out_dir} exists and is not empty; choose another")
    if progress:
        progress(0.0, "reading the checkpoint")
    checkpoint = open_checkpoint(checkpoint_dir, scratch)
    spec, reader, tokenizer = checkpoint.spec, checkpoint.reader, checkpoint.tokenizer
    if max_context is None:
        max_context = min(spec.max_position_embeddings, DEFAULT_MAX_CONTEXT)
    context_limit = min(MAX_CONTEXT_LIMIT, spec.max_position_embeddings)
    if not 2 <= max_context <= context_limit:
        raise UserError(f"max context {max_context} must be in 2..{context_limit} "
                        "(bounded fan-in of the softmax, and the checkpoint's own limit)")
    if calibration is not None:
        sequences = read_calibration(Path(calibration), tokenizer or scratch / TOKENIZER_FILE,
                                     spec.vocab_size)
        calibration_desc = {"source": Path(calibration).name, "sequences": len(sequences)}
    else:
        sequences = default_calibration(spec)
        calibration_desc = {"source": "random tokens, seed 0", "sequences": len(sequences)}
    sequences = [s[:max_context] for s in sequences]

    stats = calibrate(FloatReference(reader, spec), sequences,
                      progress and (lambda f, msg: progress(0.3 * f, msg)))
    qmodel = quantize(spec, reader, stats, max_context,
                      progress and (lambda f, msg: progress(0.3 + 0.4 * f, msg)),
                      linear_input_bits, weight_bits)
    if progress:
        progress(0.75, "building graphs")
    verify_builder, decode_builder = (build_graph(qmodel, mode, sampling)
                                      for mode in ("verify", "decode"))

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        if progress:
            progress(0.8, "writing graphs")
        verify = save_graphs(verify_builder, decode_builder, staging)
        if tokenizer is not None:
            shutil.copyfile(tokenizer, staging / TOKENIZER_FILE)
            write_chat_template(checkpoint_dir, staging)
        if progress:
            progress(0.9, "committing")
        manifest = build_manifest(spec, max_context, verify, verify_builder, staging,
                                  calibration_desc, stats)
        if checkpoint.source is not None:
            manifest["source"] = checkpoint.source
        if linear_input_bits != 8:  # absent: 8, so that a default manifest is as it was
            manifest["linear_input_bits"] = linear_input_bits
        if qmodel.residual_bits is not None:  # absent: residual_bits(hidden_size)
            manifest["residual_bits"] = qmodel.residual_bits
        if weight_bits != 7:  # absent: 7
            manifest["weight_bits"] = weight_bits
        if sampling:  # absent: greedy graphs, whose input is [P] ++ tokens
            manifest["sampling"] = True
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        _make_readable(staging)
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if progress:
        progress(1.0, "done")
    return manifest
