"""`optinfer model fidelity --text/--prompts`: integer vs float on any model, per layer too."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from optinfer.errors import UserError
from optinfer.models.checkpoint import WeightReader, write_random_checkpoint
from optinfer.models.fidelity import dequantization, measure_text_fidelity
from optinfer.models.float_reference import FloatReference
from optinfer.models.runtime import IntegerModel
from optinfer.models.tiny_r1 import FLOAT_DIR, INTEGER_DIR, held_out_problems

OPTINFER = str(Path(sys.executable).parent / "optinfer")
TOP_KEYS = {"float", "model", "model_root", "text", "teacher_forced_agreement",
            "float_perplexity", "integer_perplexity", "perplexity_ratio",
            "mean_kl_float_to_integer", "greedy"}
POINT_KEYS = {"rel_rms_error", "median_channel_error", "float_rms", "saturated"}


@pytest.fixture(scope="module")
def tiny_r1_files(tmp_path_factory) -> tuple[Path, Path]:
    """A text of whole held-out problems (prompt and trace) and four other prompts."""
    root = tmp_path_factory.mktemp("fidelity")
    problems = held_out_problems(12, seed=5)
    text, prompts = root / "text.txt", root / "prompts.txt"
    text.write_text(" ".join(p.prompt + p.completion for p in problems[:8]) + "\n")
    prompts.write_text("\n".join(p.prompt for p in problems[8:]) + "\n")
    return text, prompts


def test_tiny_r1_integer_is_faithful_on_text_and_prompts(tiny_r1_files):
    """tiny-r1's integer model agrees with its float model (docs/models.md: 1.000 on its task),
    so the off-graph logits must give nearly the float perplexity: this checks their scale."""
    text, prompts = tiny_r1_files
    result = measure_text_fidelity(FLOAT_DIR, INTEGER_DIR, text, prompts, per_layer=True,
                                   window=96)
    assert TOP_KEYS | {"per_layer"} == set(result)
    assert result["teacher_forced_agreement"] >= 0.95
    assert 0.9 <= result["perplexity_ratio"] <= 1.1
    assert result["perplexity_ratio"] == pytest.approx(
        result["integer_perplexity"] / result["float_perplexity"])
    assert 0 <= result["mean_kl_float_to_integer"] < 0.2
    assert result["text"]["tokens_compared"] > 200
    greedy = result["greedy"]
    assert greedy["prompts"] == 4 and greedy["identical"] >= 3
    assert greedy["mean_common_prefix"] >= 12 and greedy["position_agreement"] >= 0.75
    layers = result["per_layer"]["layers"]
    assert [layer["layer"] for layer in layers] == [0, 1, 2, 3]
    for point in [result["per_layer"]["embedding"], *(layer[part] for layer in layers
                                                       for part in ("after_attention",
                                                                    "after_mlp"))]:
        assert set(point) == POINT_KEYS
        assert 0 <= point["rel_rms_error"] < 0.2 and point["saturated"] == 0
        assert point["float_rms"] > 0


def test_random_model_against_its_own_float_checkpoint(random_checkpoint, random_model,
                                                       tmp_path):
    """Sanity on an untrained model: near-uniform next-token distributions give a perplexity
    ratio near 1; agreement is a fraction; the embedding is nearly exact."""
    rng = np.random.default_rng(3)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"t{i}" for i in rng.integers(3, 96, size=120)) + "\n")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("t5 t17 t42\nt60 t61 t62 t63\n")
    result = measure_text_fidelity(random_checkpoint, random_model, text, prompts,
                                   per_layer=True, window=50, new_tokens=4)
    assert 0 <= result["teacher_forced_agreement"] <= 1
    assert result["text"] == {"file": str(text), "windows": 3, "window": 50,
                              "tokens_compared": 49 + 49 + 19}
    assert 0.8 < result["perplexity_ratio"] < 1.25
    assert result["float_perplexity"] > 1 and result["integer_perplexity"] > 1
    assert result["per_layer"]["embedding"]["rel_rms_error"] < 0.05
    assert len(result["per_layer"]["layers"]) == 2
    assert result["greedy"]["new_tokens"] == 4 and 0 <= result["greedy"]["identical"] <= 2


def test_dequantised_logits_are_the_float_logits_up_to_quantisation(random_checkpoint,
                                                                     random_model):
    """The graph's int32 logits times the off-graph scale land on the float logits' scale."""
    integer = IntegerModel(random_model)
    reader = WeightReader(random_checkpoint)
    scales = dequantization(integer, reader.lm_head())
    tokens = [5, 17, 42, 8, 60, 2, 33]
    from optinfer.models.fidelity import _probe_session

    logits = _probe_session(integer, ["logits"]).run(
        ["logits"], {"sequence": np.asarray([1, *tokens], np.int64)})[0] * scales.logits
    expected = FloatReference(reader).forward(tokens)
    slope = float((logits * expected).sum() / (expected * expected).sum())
    assert 0.8 < slope < 1.25  # a wrong scale (a power of two, a missing factor) is far off
    assert np.corrcoef(logits.ravel(), expected.ravel())[0, 1] > 0.9


def test_another_float_checkpoint_is_refused(random_model, tmp_path):
    """Same config, another lm_head (one row halved: its channel's multiplier changes)."""
    from safetensors.torch import load_file, save_file

    other = write_random_checkpoint(tmp_path / "other", preset="tiny", seed=7)
    weights = load_file(other / "model.safetensors")
    weights["lm_head.weight"][5] *= 0.5
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    text = tmp_path / "text.txt"
    text.write_text("t1 t2 t3 t4\n")
    with pytest.raises(UserError, match="lm_head is not the one"):
        measure_text_fidelity(other, random_model, text)
    with pytest.raises(UserError, match="is not the model"):
        measure_text_fidelity(FLOAT_DIR, random_model, text)
    with pytest.raises(UserError, match="--per-layer needs --text"):
        measure_text_fidelity(other, random_model, None, text, per_layer=True)


def test_command_prints_json_and_refuses_bad_combinations(tiny_r1_files):
    text, prompts = tiny_r1_files
    proc = subprocess.run([OPTINFER, "model", "fidelity", "--float", str(FLOAT_DIR), "--model",
                           str(INTEGER_DIR), "--text", str(text), "--prompts", str(prompts),
                           "--new-tokens", "8", "--window", "64", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert set(result) == TOP_KEYS  # no per_layer without --per-layer
    assert result["greedy"]["new_tokens"] == 8 and result["text"]["window"] == 64
    proc = subprocess.run([OPTINFER, "model", "fidelity", "--text", str(text)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "need --float CHECKPOINT and --model DIR" in proc.stderr
    assert "Traceback" not in proc.stderr
