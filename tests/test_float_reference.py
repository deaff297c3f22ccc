"""The float32 reference forward against transformers, and its calibration statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import Qwen2ForCausalLM

from optinfer.errors import UserError
from optinfer.models.checkpoint import WeightReader, write_random_checkpoint
from optinfer.models.float_reference import (
    CalibrationStats,
    FloatReference,
    calibration_points,
    channel_calibration_points,
    greedy_generate,
)

TOKENS = [1, 17, 42, 5, 95, 0, 63, 63, 12, 88, 7, 30, 2, 44]

# (name, write_random_checkpoint arguments): untied/tied, both config formats, both dtypes,
# a non-default RoPE theta and a head_dim that is not hidden/heads.
VARIANTS = {
    "untied-v4-fp32": {"dtype": "float32", "config_format": "v4"},
    "tied-v5-bf16": {"tie_word_embeddings": True, "config_format": "v5", "rope_theta": 1e6},
    "untied-headdim32": {"dtype": "float32", "head_dim": 32, "seed": 3},
    # transformers must read the RoPE base from a 4.x-format file too, as DeepSeek ships it.
    "untied-v4-theta": {"config_format": "v4", "rope_theta": 5e5, "seed": 1},
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    return {
        name: write_random_checkpoint(root / name, preset="tiny", **kwargs)
        for name, kwargs in VARIANTS.items()
    }


@pytest.fixture(scope="module")
def references(checkpoints):
    return {name: FloatReference(WeightReader(path)) for name, path in checkpoints.items()}


def _transformers_model(path):
    return Qwen2ForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_matches_transformers(checkpoints, references, variant):
    ours = references[variant].forward(TOKENS)
    model = _transformers_model(checkpoints[variant])
    with torch.no_grad():
        theirs = model(torch.tensor([TOKENS])).logits[0].numpy()
    assert ours.dtype == np.float32 and ours.shape == (len(TOKENS), 96)
    relative = np.abs(ours - theirs).max() / np.abs(theirs).max()
    assert relative < 1e-4, f"{variant}: max relative difference {relative:.2e}"
    # A random model still spreads its predictions: the comparison is not between constants.
    assert len(set(ours.argmax(-1).tolist())) > 1


def test_forward_is_causal(references):
    ref = references["untied-v4-fp32"]
    full = ref.forward(TOKENS)
    prefix = ref.forward(np.array(TOKENS[:5]))
    np.testing.assert_allclose(prefix, full[:5], rtol=1e-5, atol=1e-6)


def test_forward_rejects_bad_tokens(references):
    ref = references["untied-v4-fp32"]
    with pytest.raises(UserError, match=r"\[0, 96\)"):
        ref.forward([3, 96])
    with pytest.raises(UserError, match="non-empty"):
        ref.forward([])


def test_greedy_generate_matches_transformers(checkpoints, references):
    variant = "tied-v5-bf16"
    prompt = TOKENS[:6]
    ours = greedy_generate(references[variant], prompt, max_new_tokens=8, eos_ids=())
    model = _transformers_model(checkpoints[variant])
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=8,
            min_new_tokens=8,
            do_sample=False,
            pad_token_id=0,
        )
    assert ours == out[0, len(prompt) :].tolist()
    # Stopping: the first generated token declared as EOS ends generation right there.
    assert greedy_generate(references[variant], prompt, 8, eos_ids=[ours[0]]) == ours[:1]


def test_calibration_records_every_point(references):
    ref = references["untied-v4-fp32"]
    stats = CalibrationStats()
    ref.forward(TOKENS, record=stats)
    spec = ref.spec
    assert set(stats.max_abs) == set(calibration_points(spec.num_layers))
    assert all(math.isfinite(v) and v > 0 for v in stats.max_abs.values())
    widths = {"attn_in": 64, "mlp_in": 64, "act": 128, "final_in": 64}
    assert set(stats.channel_max_abs) == set(channel_calibration_points(spec.num_layers))
    for name, vector in stats.channel_max_abs.items():
        assert vector.dtype == np.float32 and vector.shape == (widths[name.split(".")[-1]],)
        assert np.all(np.isfinite(vector)) and np.all(vector >= 0)
        assert vector.max() == np.float32(stats.max_abs[name])
    embedding_max = np.abs(ref.embed.numpy()[TOKENS]).max()
    assert stats.max_abs["residual"] >= embedding_max
    logits = ref.forward(TOKENS)
    assert stats.max_abs["logits"] == pytest.approx(np.abs(logits).max(), rel=1e-6)


def _layer0_scores_float64(ref: FloatReference, tokens: list[int]) -> np.ndarray:
    """Layer 0's (heads, T, T) attention scores, recomputed in float64 from the formulas."""
    spec, w = ref.spec, {k: v.numpy().astype(np.float64) for k, v in ref.layers[0].items()}
    x = ref.embed.numpy()[tokens].astype(np.float64)  # (T, D)
    h = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + spec.rms_norm_eps) * w["input_norm"]
    q = (h @ w["q_w"].T + w["q_b"]).reshape(len(tokens), spec.num_heads, spec.head_dim)
    k = (h @ w["k_w"].T + w["k_b"]).reshape(len(tokens), spec.num_kv_heads, spec.head_dim)
    half = spec.head_dim // 2
    inv_freq = spec.rope_theta ** (-np.arange(half) * 2.0 / spec.head_dim)
    angles = np.arange(len(tokens))[:, None] * np.concatenate([inv_freq, inv_freq])[None, :]

    def rope(t):  # (T, heads, hd); rotate_half pairs dimension j with j + hd/2
        rotated = np.concatenate([-t[..., half:], t[..., :half]], axis=-1)
        return t * np.cos(angles)[:, None, :] + rotated * np.sin(angles)[:, None, :]

    q, k = rope(q), rope(k)
    return np.stack([q[:, i] @ k[:, i // spec.group].T for i in range(spec.num_heads)]) / math.sqrt(
        spec.head_dim
    )


def test_calibration_scores_only_unmasked_entries(references):
    """The recorded score max covers the causal entries (key position <= query position) only,
    with GQA head mapping and 1/sqrt(head_dim) scaling as in the formulas."""
    ref = references["untied-headdim32"]
    assert ref.spec.head_dim == 32  # not hidden/heads = 16
    # Chosen (by search over pairs) so that the one masked entry, query 0 x key 1, has by far
    # the largest |score|: recording it would be caught.
    tokens = [43, 86]
    scores = _layer0_scores_float64(ref, tokens)
    causal = np.tril(np.ones((len(tokens), len(tokens)), dtype=bool))
    unmasked_max, all_max = np.abs(scores[:, causal]).max(), np.abs(scores).max()
    assert all_max > unmasked_max * 2, "test tokens must make the masked entries matter"
    stats = CalibrationStats()
    ref.forward(tokens, record=stats)
    assert stats.max_abs["L0.scores"] == pytest.approx(unmasked_max, rel=1e-5)


def test_calibration_running_max_and_json_round_trip(references):
    ref = references["tied-v5-bf16"]
    stats = CalibrationStats()
    ref.forward(TOKENS, record=stats)
    first = dict(stats.max_abs)
    ref.forward(TOKENS, record=stats)
    assert stats.max_abs == first  # the same data again changes nothing
    ref.forward(list(range(50, 90)), record=stats)
    assert all(stats.max_abs[name] >= value for name, value in first.items())
    assert any(stats.max_abs[name] > value for name, value in first.items())

    restored = CalibrationStats.from_json(stats.to_json())
    assert restored.max_abs == stats.max_abs
    assert restored.channel_max_abs.keys() == stats.channel_max_abs.keys()
    for name, vector in stats.channel_max_abs.items():
        np.testing.assert_array_equal(restored.channel_max_abs[name], vector)

    merged = CalibrationStats()
    merged.merge(restored)
    assert merged.max_abs == stats.max_abs
    with pytest.raises(UserError, match="format"):
        CalibrationStats.from_json('{"max_abs": {}}')
