"""How faithful an integer model is to the float model it was converted from.

Two measurements (docs/models.md):

- tiny-r1 (`measure_fidelity`): task accuracy of each model on held-out problems, and token
  agreement, the fraction of positions where the integer model, teacher-forced on the float
  model's own output, predicts the float model's token.
- any model (`measure_text_fidelity`): on a text, teacher-forced top-1 agreement, the
  perplexity of each model and the per-layer drift of the residual stream; on prompts, greedy
  continuation agreement.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from optinfer.errors import UserError
from optinfer.models.runtime import IntegerModel


def measure_fidelity(float_dir: Path, integer_dir: Path, problems: int = 200, seed: int = 0,
                     progress=None) -> dict:
    from optinfer.models.tiny_r1 import (
        MAX_NEW_TOKENS,
        build_tokenizer,
        encode_prompt,
        evaluate,
        float_generate_fn,
        held_out_problems,
    )

    held_out = held_out_problems(problems, seed=seed)
    tokenizer = build_tokenizer()
    float_generate = float_generate_fn(float_dir)
    integer = IntegerModel(integer_dir)
    float_outputs: dict[str, list[int]] = {}

    def float_fn(prompt_ids: list[int], max_new: int) -> list[int]:
        out = float_generate(prompt_ids, max_new)
        float_outputs[repr(prompt_ids)] = out
        if progress:
            progress(len(float_outputs) / (2 * problems), "float model")
        return out

    float_scores = evaluate(float_fn, held_out, tokenizer)
    done = []

    def integer_fn(prompt_ids: list[int], max_new: int) -> list[int]:
        done.append(1)
        if progress:
            progress(0.5 + len(done) / (2 * problems), "integer model")
        return integer.generate(prompt_ids, max_new)

    integer_scores = evaluate(integer_fn, held_out, tokenizer)
    agree = total = 0
    for problem in held_out:
        prompt = encode_prompt(tokenizer, problem.prompt)
        reference = float_outputs[repr(prompt)]
        predicted = integer.predict(prompt, reference).tolist()
        agree += sum(p == r for p, r in zip(predicted, reference, strict=True))
        total += len(reference)
    return {
        "problems": problems,
        "seed": seed,
        "max_new_tokens": MAX_NEW_TOKENS,
        "float_accuracy": float_scores["accuracy"],
        "integer_accuracy": integer_scores["accuracy"],
        "accuracy_gap_points": 100 * (float_scores["accuracy"] - integer_scores["accuracy"]),
        "token_agreement": agree / total,
        "tokens_compared": total,
        "integer_failures": integer_scores["failures"],
    }


# ---------------------------------------------------------------------------------------------
# Any model: teacher-forced agreement, perplexity, greedy continuations, per-layer drift
# ---------------------------------------------------------------------------------------------

DEFAULT_WINDOW = 256  # tokens per teacher-forced pass over the text
DEFAULT_NEW_TOKENS = 16  # greedy continuation length per prompt


@dataclass(frozen=True)
class Dequantization:
    """How to read the integer graph's tensors as real numbers, off-graph.

    residual: the residual stream's one scale (real = int32 * residual); res_clip: its
    saturation bound. logits: the graph's int32 logits `acc_c * M_c` times this are the real
    logits (`converter.lm_head_quantization`).
    """

    residual: float
    res_clip: int
    logits: float


def dequantization(integer: IntegerModel, lm_head: np.ndarray) -> Dequantization:
    """The scales of `integer`'s residual and logits, from its manifest and the float lm_head
    it was converted from; refuses a float lm_head whose multipliers are not the graph's."""
    from optinfer.models.converter import (
        accumulator_input_units,
        fine_logit_shift,
        linear_input_scale,
        lm_head_quantization,
        residual_scale,
    )
    from optinfer.models.qwen2_graph import FINE_WEIGHT_BITS, residual_bits

    weight_bits = integer.manifest.get("weight_bits", 7)
    fine = weight_bits == FINE_WEIGHT_BITS
    ql, big_m, m_bits = lm_head_quantization(lm_head, weight_bits)
    multipliers = _logit_multipliers(integer, fine)
    if not np.array_equal(multipliers, big_m):
        raise UserError(f"the float checkpoint's lm_head is not the one {integer.dir} was "
                        "converted from (its logit multipliers differ)")
    # The fine graph's logits are round(S * M / 2**shift): 2**shift units of S * M each.
    shift = fine_logit_shift(ql, m_bits) if fine else 0
    max_abs = integer.manifest["calibration"]["max_abs"]
    wide = integer.manifest.get("linear_input_bits", 8) == 16
    s_final = (linear_input_scale(max_abs["final_in"], wide)
               * accumulator_input_units(wide, fine))
    res_bits = integer.manifest.get("residual_bits",
                                    residual_bits(integer.manifest["config"]["hidden_size"]))
    return Dequantization(residual=residual_scale(max_abs["residual"], res_bits),
                          res_clip=1 << res_bits,
                          logits=s_final * float(ql.scale.max()) * 2.0**(shift - m_bits))


def _logit_multipliers(integer: IntegerModel, fine: bool) -> np.ndarray:
    """Every vocabulary channel's M_c: one constant, or in the fine graph one for each block
    of the vocabulary (`qwen2_graph.FINE_LOGIT_BLOCK`), joined in the vocabulary's order."""
    if not fine:
        return _constant(integer, "lm_head.M")
    initializers = {t.name: t for t in integer.verify_graph().graph.initializer}
    blocks = []
    while f"logits.b{len(blocks)}.M" in initializers:
        blocks.append(_constant(integer, f"logits.b{len(blocks)}.M", initializers))
    return (np.concatenate(blocks) if blocks
            else _constant(integer, "logits.M", initializers))


def _constant(integer: IntegerModel, name: str, initializers: dict | None = None
              ) -> np.ndarray:
    """One constant of the verify graph (`initializers`: its initializers by name, when the
    caller read them already), read from the constants file if it lives there."""
    from onnx import external_data_helper, numpy_helper

    if initializers is None:
        initializers = {t.name: t for t in integer.verify_graph().graph.initializer}
    tensor = initializers.get(name)
    if tensor is None:
        raise UserError(f"{integer.dir}: the verify graph has no constant {name}")
    if external_data_helper.uses_external_data(tensor):
        external_data_helper.load_external_data_for_tensor(tensor, str(integer.dir))
    return numpy_helper.to_array(tensor)


def _probe_session(integer: IntegerModel, names: list[str]) -> ort.InferenceSession:
    """The verify graph with `names` exposed as outputs too (not every node: that holds every
    intermediate tensor of a pass in memory)."""
    from optinfer.models.runtime import session_options

    model = integer.verify_graph()
    exposed = {o.name for o in model.graph.output}
    for name in names:
        if name not in exposed:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    so = session_options(integer.threads)
    so.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                str(integer.dir))
    return ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _read_lines(path: Path, what: str) -> list[str]:
    if not Path(path).is_file():
        raise UserError(f"{what} file {path} does not exist")
    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise UserError(f"{what} file {path} is empty")
    return lines


def _check_same_model(spec, integer: IntegerModel, float_path: Path) -> None:
    config = integer.manifest["config"]
    for field, value in asdict(spec).items():
        if field == "torch_dtype":
            continue
        theirs = config.get(field)
        if isinstance(value, tuple):
            theirs = tuple(theirs or ())
        if theirs != value:
            raise UserError(f"{float_path} is not the model {integer.dir} was converted from: "
                            f"{field} is {value!r} there, {theirs!r} in the integer model")


def _windows(tokens: list[int], window: int) -> list[list[int]]:
    out = [tokens[i:i + window] for i in range(0, len(tokens), window)]
    return [w for w in out if len(w) >= 2]


def measure_text_fidelity(float_path: Path, integer_dir: Path, text: Path | None = None,
                          prompts: Path | None = None, per_layer: bool = False,
                          window: int | None = None, new_tokens: int = DEFAULT_NEW_TOKENS,
                          threads: int = 1, progress=None) -> dict:
    """How faithful an integer model is to the float checkpoint (directory or GGUF) it was
    converted from, on any text.

    - On `text` (tokenised by the integer model's tokenizer, cut into windows of `window`
      tokens (default 256, or the model's context if shorter), each a pass of its own from
      position 0): teacher-forced top-1 agreement (the
      graph's own next-token argmax against the float model's), the perplexity of each model
      on the text's next tokens (the graph's int32 logits read as real logits off-graph,
      `dequantization`), and the mean KL divergence from float to integer next-token
      distributions. With `per_layer`, the relative RMS error of the residual stream after the
      embedding and after each layer's attention and MLP (the graph's int32 residual times its
      scale against the float model's), and the fraction of residual elements saturated.
    - On `prompts` (one per line): greedy continuations of `new_tokens` tokens by both models
      (stopping at EOS), how many are identical, and their mean common prefix.
    """
    from optinfer.models.converter import open_checkpoint
    from optinfer.models.float_reference import FloatReference, greedy_generate

    if text is None and prompts is None:
        raise UserError("give --text FILE and/or --prompts FILE")
    if per_layer and text is None:
        raise UserError("--per-layer needs --text")
    integer = IntegerModel(integer_dir, threads=threads)
    if window is None:
        window = min(DEFAULT_WINDOW, integer.max_context)
    if not 2 <= window <= integer.max_context:
        raise UserError(f"window must be in 2..{integer.max_context} tokens, got {window}")
    if not 1 <= new_tokens <= integer.max_context:
        raise UserError(f"new tokens must be in 1..{integer.max_context}, got {new_tokens}")
    text_lines = _read_lines(text, "text") if text is not None else None
    prompt_lines = _read_lines(prompts, "prompts") if prompts is not None else None
    report = progress or (lambda fraction, message: None)
    report(0.0, "loading the float model")
    with tempfile.TemporaryDirectory(prefix="optinfer-fidelity-") as scratch:
        checkpoint = open_checkpoint(Path(float_path), Path(scratch))
    spec = checkpoint.spec
    _check_same_model(spec, integer, Path(float_path))
    scales = dequantization(integer, checkpoint.reader.lm_head())
    reference = FloatReference(checkpoint.reader, spec)
    result: dict = {"float": str(float_path), "model": str(integer_dir),
                    "model_root": integer.manifest["model_root"]}

    windows = []
    if text_lines is not None:
        windows = _windows(integer.encode("\n".join(text_lines)), window)
        if not windows:
            raise UserError(f"text file {text} holds fewer than 2 tokens")
    steps = len(windows) + len(prompt_lines or ())
    done = 0

    if windows:
        layer_names = ["embed"] + [f"L{i}.{part}.residual" for i in range(spec.num_layers)
                                   for part in ("attn", "mlp")]
        names = ["next_tokens", "logits", *(layer_names if per_layer else [])]
        session = _probe_session(integer, names)
        agree = total = 0
        nll_float = nll_int = kl = 0.0
        hidden = spec.hidden_size
        err_sq = np.zeros((len(layer_names), hidden))  # per point and channel
        ref_sq = np.zeros((len(layer_names), hidden))
        saturated = np.zeros(len(layer_names))
        elements = 0
        for w in windows:
            residuals: list[np.ndarray] | None = [] if per_layer else None
            float_logits = reference.forward(w, residuals=residuals)  # (W, V)
            outputs = session.run(names, {"sequence": np.asarray([1, *w], np.int64)})
            predicted, int_logits = outputs[0], outputs[1]  # (W,), (W, V) int32
            n = len(w) - 1  # positions whose next token is in the text
            targets = np.asarray(w[1:])
            agree += int((predicted[:n] == float_logits[:n].argmax(axis=-1)).sum())
            total += n
            lp_float = _log_softmax(float_logits[:n])
            lp_int = _log_softmax(int_logits[:n].astype(np.float64) * scales.logits)
            rows = np.arange(n)
            nll_float -= float(lp_float[rows, targets].sum())
            nll_int -= float(lp_int[rows, targets].sum())
            kl += float((np.exp(lp_float) * (lp_float - lp_int)).sum())
            if per_layer:
                for j, (q, x) in enumerate(zip(outputs[2:], residuals, strict=True)):
                    real = q.astype(np.float64) * scales.residual
                    err_sq[j] += ((real - x) ** 2).sum(axis=0)
                    ref_sq[j] += (x.astype(np.float64) ** 2).sum(axis=0)
                    saturated[j] += int((np.abs(q) >= scales.res_clip).sum())
                elements += len(w)  # positions
            done += 1
            report(done / steps, f"text window {done}/{len(windows)}")
        result.update({
            "text": {"file": str(text), "windows": len(windows), "window": window,
                     "tokens_compared": total},
            "teacher_forced_agreement": agree / total,
            "float_perplexity": math.exp(nll_float / total),
            "integer_perplexity": math.exp(nll_int / total),
            "perplexity_ratio": math.exp((nll_int - nll_float) / total),
            "mean_kl_float_to_integer": kl / total,
        })
        if per_layer:
            rel = np.sqrt(err_sq.sum(axis=1) / np.maximum(ref_sq.sum(axis=1), 1e-300))
            # The typical channel's error: a few huge channels ("massive activations") dominate
            # the whole-vector error and can hide what happens to all the others.
            channel = np.median(np.sqrt(err_sq / np.maximum(ref_sq, 1e-300)), axis=1)
            rms = np.sqrt(ref_sq.sum(axis=1) / (elements * hidden))  # per element
            sat = saturated / (elements * hidden)

            def point(j: int) -> dict:
                return {"rel_rms_error": float(rel[j]), "median_channel_error": float(channel[j]),
                        "float_rms": float(rms[j]), "saturated": float(sat[j])}

            result["per_layer"] = {
                "metric": "relative RMS error of the residual stream, integer (dequantised) vs "
                          "float, over every position of the text: whole vectors, and the "
                          "median over channels of each channel's own",
                "residual_scale": scales.residual,
                "embedding": point(0),
                "layers": [{"layer": i, "after_attention": point(1 + 2 * i),
                            "after_mlp": point(2 + 2 * i)} for i in range(spec.num_layers)],
            }

    if prompt_lines is not None:
        identical = prefix_total = matched = compared = 0
        examples = []
        for line in prompt_lines:
            ids = integer.encode(line)
            float_out = greedy_generate(reference, ids, new_tokens, spec.eos_token_ids)
            int_out = integer.generate(ids, new_tokens)
            prefix = 0
            for a, b in zip(float_out, int_out, strict=False):
                if a != b:
                    break
                prefix += 1
            identical += int(float_out == int_out)
            prefix_total += prefix
            matched += sum(a == b for a, b in zip(float_out, int_out, strict=False))
            compared += len(float_out)
            examples.append({"prompt": line, "float": integer.decode_text(float_out),
                             "integer": integer.decode_text(int_out), "common_prefix": prefix})
            done += 1
            report(done / steps, f"prompt {done - len(windows)}/{len(prompt_lines)}")
        result["greedy"] = {
            "prompts": len(prompt_lines),
            "new_tokens": new_tokens,
            "identical": identical,
            "mean_common_prefix": prefix_total / len(prompt_lines),
            "position_agreement": matched / max(compared, 1),
            "examples": examples,
        }
    report(1.0, "done")
    return result
