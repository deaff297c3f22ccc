"""The converted integer model: exactness, determinism, verification and the static bounds."""

from __future__ import annotations

import json
import shutil
import threading
import time

import numpy as np
import onnx
import pytest

from optinfer.errors import UserError
from optinfer.models import opset, reference
from optinfer.models.checkpoint import write_random_checkpoint
from optinfer.models.converter import convert
from optinfer.models.runtime import IntegerModel

from .conftest import TINY_CONTEXT

PROMPT = [3, 17, 42, 5, 8, 60, 2]


@pytest.fixture(scope="module")
def model(random_model) -> IntegerModel:
    return IntegerModel(random_model)


@pytest.fixture(scope="module")
def generated(model) -> list[int]:
    return model.generate(PROMPT, 24)


def test_manifest_states_an_integer_graph_with_bounded_fan_in(random_model, model):
    m = model.manifest
    assert m["float_tensors"] == 0
    assert 0 < m["max_fan_in_bytes"] <= 32 * 1024
    # per layer: q, k, v, scores, P.V, o, gate, up, down; then the lm_head
    assert m["ops"]["MatMulInteger"] == 9 * 2 + 1
    assert m["model_root"].startswith("0x") and len(m["model_root"]) == 66
    for graph in ("model.onnx", "decode.onnx"):
        proto = onnx.load(str(random_model / graph), load_external_data=False)
        assert opset.check_supported(proto) == []
        assert len(proto.graph.node) == len({n.output[0] for n in proto.graph.node})


def test_conversion_is_deterministic(random_checkpoint, random_model, tmp_path):
    again = convert(random_checkpoint, tmp_path / "again", max_context=TINY_CONTEXT)
    first = json.loads((random_model / "manifest.json").read_text())
    assert again["model_root"] == first["model_root"]
    assert again["files"] == first["files"]


def test_generated_tokens_verify_and_every_changed_token_fails(model, generated):
    assert model.verify(PROMPT, generated).valid
    for i in range(len(generated)):
        forged = list(generated)
        forged[i] = (forged[i] + 1) % model.vocab_size
        verdict = model.verify(PROMPT, forged)
        assert not verdict.valid
        assert verdict.first_mismatch == i


def test_kv_cache_decoding_equals_one_pass_for_many_prompts(model):
    rng = np.random.default_rng(3)
    for length in (1, 2, 5, 17, 40):
        prompt = rng.integers(0, model.vocab_size, size=length).tolist()
        tokens = model.generate(prompt, 12)
        assert model.predict(prompt, tokens).tolist() == tokens


def test_trace_is_identical_across_threads_and_runs(random_model, generated):
    runs = []
    for threads in (1, 2, 2):
        _, outputs = IntegerModel(random_model, threads=threads).trace(PROMPT, generated)
        runs.append(outputs)
    for other in runs[1:]:
        assert len(other) == len(runs[0])
        for a, b in zip(runs[0], other, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    one = IntegerModel(random_model, threads=1).state_root(PROMPT, generated)
    two = IntegerModel(random_model, threads=2).state_root(PROMPT, generated)
    assert one == two and one[0] == len(runs[0])


def test_numpy_reference_equals_onnxruntime_on_every_node(random_model, model, generated):
    sequence, outputs = model.trace(PROMPT, generated)
    graph = onnx.load(str(random_model / "model.onnx"))
    seen = []
    reference.run_graph(graph, {"sequence": sequence},
                        on_node=lambda k, node, outs: seen.append((k, outs[0])))
    assert [k for k, _ in seen] == list(range(1, len(outputs) + 1))
    for (k, ours), theirs in zip(seen, outputs, strict=True):
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, k
        assert np.array_equal(ours, theirs), f"node {k} differs"


def test_every_tensor_stays_inside_its_static_bounds(model):
    """The range analysis is sound on real runs, long sequences included."""
    names = [n.output[0] for n in model.verify_graph().graph.node]
    bounds = model.manifest["bounds"]
    rng = np.random.default_rng(5)
    for length in (2, TINY_CONTEXT):
        prompt = rng.integers(0, model.vocab_size, size=length // 2).tolist()
        output = rng.integers(0, model.vocab_size, size=length - len(prompt) + 1).tolist()
        _, outputs = model.trace(prompt, output)
        for name, tensor in zip(names, outputs, strict=True):
            lo, hi = bounds[name]
            if tensor.size:
                assert lo <= int(tensor.min()) and int(tensor.max()) <= hi, name


def test_bad_inputs_are_user_errors(model, random_model, tmp_path):
    with pytest.raises(UserError, match="outside the vocabulary"):
        model.verify([1, model.vocab_size], [2])
    with pytest.raises(UserError, match="exceed the model's context"):
        model.verify([1] * TINY_CONTEXT, [2, 3])
    with pytest.raises(UserError, match="exceed the model's context"):
        model.generate([1] * (TINY_CONTEXT - 2), 10)
    with pytest.raises(UserError, match="does not exist"):
        IntegerModel(tmp_path / "nope")
    with pytest.raises(UserError, match="not a converted model"):
        IntegerModel(tmp_path)


def test_early_eos_and_max_tokens_rules(model):
    eos = model.eos_ids[0]
    tokens = model.generate(PROMPT, 5)
    verdict = model.verify(PROMPT, tokens, max_tokens=len(tokens) + 5)
    ends_in_eos = tokens[-1] == eos
    assert verdict.valid == ends_in_eos
    assert model.verify(PROMPT, tokens, max_tokens=len(tokens)).valid


@pytest.mark.parametrize("variant", [
    {"config_format": "v5"},
    {"tie_word_embeddings": True, "dtype": "float32"},
])
def test_other_checkpoint_variants_convert_and_run(tmp_path, variant):
    ckpt = write_random_checkpoint(tmp_path / "ckpt", preset="tiny", seed=11, **variant)
    convert(ckpt, tmp_path / "int", max_context=32)
    m = IntegerModel(tmp_path / "int")
    tokens = m.generate([1, 2, 3], 6)
    assert m.verify([1, 2, 3], tokens).valid


def test_failed_conversion_leaves_no_output(random_checkpoint, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(random_checkpoint, broken)
    config = json.loads((broken / "config.json").read_text())
    del config["num_hidden_layers"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="num_hidden_layers"):
        convert(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["broken"]


def test_model_root_recomputes_from_the_files_on_disk(random_model, model):
    from onnx import numpy_helper

    from optinfer.models.manifest import model_commitment

    graph = onnx.load(str(random_model / "model.onnx"))  # constants loaded from weights.bin
    constants = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}
    commitment = model_commitment(graph, constants)
    assert "0x" + commitment["model_root"].hex() == model.manifest["model_root"]
    assert "0x" + commitment["nodes_root"].hex() == model.manifest["nodes_root"]


def test_node_description_layout():
    from onnx import helper

    from optinfer.models.manifest import node_description

    node = helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=1)
    raw = node_description(node, {"x": 7}, {"axes": 3})
    code = opset.OP_ORDER.index("ReduceSum") + 1
    assert raw == (code.to_bytes(2, "big") + bytes([2])
                   + bytes([0]) + (7).to_bytes(4, "big")
                   + bytes([1]) + (3).to_bytes(4, "big")
                   + bytes([1]) + bytes([2, 1]) + (1).to_bytes(8, "big", signed=True))


def test_every_matrix_product_names_rows_that_are_its_b_columns(model, generated):
    """One-step proofs open a row of the column source instead of a strided column of B."""
    from optinfer.models.manifest import column_sources

    graph = model.verify_graph()
    sources = column_sources(graph)
    sequence, outputs = model.trace(PROMPT, generated)
    value = {n.output[0]: t for n, t in zip(graph.graph.node, outputs, strict=True)}
    constants = {t.name for t in graph.graph.initializer}
    matmuls = [n for n in graph.graph.node if n.op_type == "MatMulInteger"]
    assert {n.output[0] for n in matmuls} == set(sources)
    order = {n.output[0]: k for k, n in enumerate(graph.graph.node)}
    for node in matmuls:
        b, source = node.input[1], sources[node.output[0]]
        if b in constants:
            assert source == b  # committed transposed
            continue
        assert order[source] < order[node.output[0]], "the source is in the agreed state"
        assert np.array_equal(value[source], np.swapaxes(value[b], -1, -2))


def test_extreme_scales_fall_back_where_int32_would_be_imprecise(tmp_path):
    """Large q/k (score multiplier above 1) and a tiny gate (too few bits in int32) convert."""
    from safetensors.torch import load_file, save_file

    ckpt = write_random_checkpoint(tmp_path / "ckpt", preset="tiny", seed=5)
    weights = load_file(ckpt / "model.safetensors")
    for name in list(weights):
        if ".self_attn.q_proj." in name or ".self_attn.k_proj." in name:
            weights[name] = (weights[name].float() * 40).to(weights[name].dtype)
        if ".mlp.gate_proj." in name:
            weights[name] = (weights[name].float() * 1e-4).to(weights[name].dtype)
    save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})
    convert(ckpt, tmp_path / "int", max_context=32)
    m = IntegerModel(tmp_path / "int")
    names = {n.name: n.op_type for n in m.verify_graph().graph.node}
    assert names["L0.attn.expidx.saturate"] == "Clip"  # int32, multiplier above 1
    assert names["L0.mlp.gate.fix.i64"] == "Cast"  # int64: int32 would keep too few bits
    tokens = m.generate([1, 2, 3], 8, stop_at_eos=False)
    assert m.verify([1, 2, 3], tokens).valid
    sequence, outputs = m.trace([1, 2, 3], tokens)
    values = reference.run_graph(onnx.load(str(tmp_path / "int" / "model.onnx")),
                                 {"sequence": sequence}, keep_all=True)
    node_outputs = [n.output[0] for n in m.verify_graph().graph.node]
    bounds = m.manifest["bounds"]
    for name, got in zip(node_outputs, outputs, strict=True):
        assert np.array_equal(values[name], got), name
        if got.size:
            assert bounds[name][0] <= int(got.min()) and int(got.max()) <= bounds[name][1], name


@pytest.mark.parametrize("ratio", [0.3, 1.0, 1.7, 40.0])
@pytest.mark.parametrize("levels", [256, 128])
def test_rope_fixed_point_makes_the_requantisation_after_rope_a_shift(ratio, levels):
    from optinfer.models.converter import _rope_extra_bits
    from optinfer.models.qwen2_graph import QK_FIX_CLIP, ROPE_FRAC_BITS

    amax_rotated = 3.0
    out_scale, amax = amax_rotated / (levels // 2 - 1), amax_rotated * ratio
    e = _rope_extra_bits(out_scale, amax, levels)
    # The shift after RoPE fits rescale_int32's headroom for the output's levels ...
    assert (levels + 1) * 2 ** (ROPE_FRAC_BITS + e) < 2**31
    # ... and q before RoPE, in units of out_scale / 2**e, keeps twice its calibrated max
    # within the clip, with e the largest that does (unless the headroom capped it).
    assert 2 * amax / (out_scale / 2**e) <= QK_FIX_CLIP
    capped = (levels + 1) * 2 ** (ROPE_FRAC_BITS + e + 1) >= 2**31
    assert capped or 2 * amax / (out_scale / 2 ** (e + 1)) > QK_FIX_CLIP


def test_a_session_asked_for_by_two_threads_at_once_is_made_once(random_model, monkeypatch):
    """`IntegerModel.session` is safe to call from several threads (a watchtower's verifier
    and game threads): a session not yet made is built once, and both get it."""
    m = IntegerModel(random_model)
    built = []
    make = IntegerModel._new_session

    def slow_make(self, kind):  # a window wide enough for every thread to come in unlocked
        built.append(kind)
        time.sleep(0.2)
        return make(self, kind)

    monkeypatch.setattr(IntegerModel, "_new_session", slow_make)
    got = []
    threads = [threading.Thread(target=lambda: got.append(m.session("decode")))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert built == ["decode"]
    assert len(got) == 4 and all(session is got[0] for session in got)
