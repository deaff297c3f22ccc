"""Qwen2 checkpoint reading: config formats, rejections, dtypes, tying, sharding, presets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from optinfer.errors import UserError
from optinfer.models.checkpoint import (
    INDEX_FILE,
    Qwen2Spec,
    WeightReader,
    parameter_count,
    preset_config,
    read_spec,
    write_random_checkpoint,
)

# config.json of deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B as shipped, written from memory
# (transformers 4.x format). Kept as literal text, independent of the preset in checkpoint.py,
# so that a wrong preset value fails test_r1_preset_config_json_is_deepseeks.
DEEPSEEK_R1_DISTILL_QWEN_1_5B_CONFIG = """{
  "architectures": [
    "Qwen2ForCausalLM"
  ],
  "attention_dropout": 0.0,
  "bos_token_id": 151643,
  "eos_token_id": 151643,
  "hidden_act": "silu",
  "hidden_size": 1536,
  "initializer_range": 0.02,
  "intermediate_size": 8960,
  "max_position_embeddings": 131072,
  "max_window_layers": 21,
  "model_type": "qwen2",
  "num_attention_heads": 12,
  "num_hidden_layers": 28,
  "num_key_value_heads": 2,
  "rms_norm_eps": 1e-06,
  "rope_theta": 10000,
  "sliding_window": 4096,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.44.0",
  "use_cache": true,
  "use_mrope": false,
  "use_sliding_window": false,
  "vocab_size": 151936
}
"""

# deepseek-ai/DeepSeek-R1-Distill-Qwen-7B, same format (from memory).
DEEPSEEK_R1_DISTILL_QWEN_7B_CONFIG = {
    **json.loads(DEEPSEEK_R1_DISTILL_QWEN_1_5B_CONFIG),
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "max_window_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
}

R1_1_5B_SPEC = Qwen2Spec(
    hidden_size=1536,
    num_layers=28,
    num_heads=12,
    num_kv_heads=2,
    head_dim=128,
    intermediate_size=8960,
    vocab_size=151936,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    max_position_embeddings=131072,
    bos_token_id=151643,
    eos_token_ids=(151643,),
    torch_dtype="bfloat16",
)


def _write_config(directory: Path, config: dict | str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    text = config if isinstance(config, str) else json.dumps(config)
    (directory / "config.json").write_text(text)
    return directory


def _deepseek_config() -> dict:
    return json.loads(DEEPSEEK_R1_DISTILL_QWEN_1_5B_CONFIG)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny checkpoints sharing seed 0: bf16 in both config formats, fp32, fp32 sharded, tied."""
    root = tmp_path_factory.mktemp("tiny")
    return {
        "v4": write_random_checkpoint(root / "v4", preset="tiny", config_format="v4"),
        "v5": write_random_checkpoint(root / "v5", preset="tiny", config_format="v5"),
        "fp32": write_random_checkpoint(root / "fp32", preset="tiny", dtype="float32"),
        "fp16": write_random_checkpoint(root / "fp16", preset="tiny", dtype="float16"),
        "sharded": write_random_checkpoint(
            root / "sharded", preset="tiny", dtype="float32", max_shard_size="40KB"
        ),
        "tied": write_random_checkpoint(root / "tied", preset="tiny", tie_word_embeddings=True),
    }


# --- config parsing ------------------------------------------------------------------------


def test_read_spec_deepseek_1_5b_config_parses(tmp_path):
    spec = read_spec(_write_config(tmp_path, DEEPSEEK_R1_DISTILL_QWEN_1_5B_CONFIG))
    assert spec == R1_1_5B_SPEC
    assert spec.group == 6


def test_read_spec_deepseek_7b_config_parses(tmp_path):
    spec = read_spec(_write_config(tmp_path, DEEPSEEK_R1_DISTILL_QWEN_7B_CONFIG))
    assert (spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (
        3584,
        28,
        4,
        128,
    )
    assert (spec.vocab_size, spec.group) == (152064, 7)


def test_read_spec_v5_format_equals_v4(tmp_path):
    """The same model written by transformers 5.x: rope_parameters, dtype, layer_types."""
    v5 = _deepseek_config()
    del v5["rope_theta"], v5["torch_dtype"]
    v5.update(
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
        dtype="bfloat16",
        layer_types=["full_attention"] * 28,
        sliding_window=None,
        transformers_version="5.24.0",
    )
    assert read_spec(_write_config(tmp_path, v5)) == R1_1_5B_SPEC


def test_read_spec_eos_list_and_defaults(tmp_path):
    config = _deepseek_config()
    config["eos_token_id"] = [151643, 151645]
    for optional in ("max_position_embeddings", "tie_word_embeddings", "hidden_act"):
        del config[optional]
    config["head_dim"] = 64
    spec = read_spec(_write_config(tmp_path, config))
    assert spec.eos_token_ids == (151643, 151645)
    assert spec.max_position_embeddings == 32768
    assert spec.tie_word_embeddings is False
    assert spec.head_dim == 64


def test_read_spec_tiny_both_formats_same_spec(tiny_dirs):
    v4 = json.loads((tiny_dirs["v4"] / "config.json").read_text())
    v5 = json.loads((tiny_dirs["v5"] / "config.json").read_text())
    assert v4["rope_theta"] == 10000 and v4["torch_dtype"] == "bfloat16"
    assert "rope_parameters" not in v4 and "dtype" not in v4
    assert v5["rope_parameters"] == {"rope_theta": 10000, "rope_type": "default"}
    assert v5["dtype"] == "bfloat16" and "rope_theta" not in v5 and "torch_dtype" not in v5
    assert read_spec(tiny_dirs["v4"]) == read_spec(tiny_dirs["v5"])
    spec = read_spec(tiny_dirs["v4"])
    assert (spec.hidden_size, spec.num_layers, spec.num_heads, spec.num_kv_heads) == (64, 2, 4, 2)
    assert (spec.intermediate_size, spec.vocab_size, spec.max_position_embeddings) == (
        128,
        96,
        128,
    )


def _without(field: str):
    def mutate(config: dict) -> None:
        del config[field]

    return mutate


def _setting(field: str, value):
    def mutate(config: dict) -> None:
        config[field] = value

    return mutate


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (_without("hidden_size"), "hidden_size"),
        (_without("num_hidden_layers"), "num_hidden_layers"),
        (_without("num_attention_heads"), "num_attention_heads"),
        (_without("num_key_value_heads"), "num_key_value_heads"),
        (_without("intermediate_size"), "intermediate_size"),
        (_without("vocab_size"), "vocab_size"),
        (_without("rms_norm_eps"), "rms_norm_eps"),
        (_without("rope_theta"), "rope_theta"),
        (_without("model_type"), "model_type"),
        (_setting("model_type", "llama"), "model_type"),
        (_setting("architectures", ["Qwen2ForSequenceClassification"]), "architectures"),
        (_setting("hidden_act", "gelu"), "hidden_act"),
        (_setting("rope_scaling", {"type": "yarn", "factor": 4.0}), "rope_scaling"),
        (
            _setting("rope_parameters", {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
            "rope_parameters.rope_type",
        ),
        (_setting("use_sliding_window", True), "use_sliding_window"),
        (_setting("layer_types", ["sliding_attention"] * 28), "layer_types"),
        (_setting("num_key_value_heads", 5), "num_key_value_heads"),
        (_setting("hidden_size", "1536"), "hidden_size"),
        (_setting("rope_parameters", {"rope_theta": 5e5, "rope_type": "default"}), "rope_theta"),
    ],
)
def test_read_spec_bad_field_reverts_naming_it(tmp_path, mutate, field):
    config = _deepseek_config()
    mutate(config)
    with pytest.raises(UserError, match=f"'{field}'") as caught:
        read_spec(_write_config(tmp_path, config))
    assert "config.json" in str(caught.value)


def test_read_spec_missing_directory_reverts(tmp_path):
    with pytest.raises(UserError, match="nowhere.*not found"):
        read_spec(tmp_path / "nowhere")


def test_read_spec_missing_config_reverts(tmp_path):
    with pytest.raises(UserError, match="config.json not found"):
        read_spec(tmp_path)


def test_read_spec_invalid_json_reverts(tmp_path):
    with pytest.raises(UserError, match="config.json is not valid JSON"):
        read_spec(_write_config(tmp_path, '{"model_type": "qwen2",'))


# --- weights -------------------------------------------------------------------------------


def test_weight_reader_dtypes_hold_the_same_values(tiny_dirs):
    """Same seed: bf16 and fp16 checkpoints are the fp32 one rounded; all read as float32."""
    fp32, bf16, fp16 = (WeightReader(tiny_dirs[k]) for k in ("fp32", "v4", "fp16"))
    assert read_spec(tiny_dirs["fp32"]).torch_dtype == "float32"
    assert bf16.names() == fp32.names() == fp16.names()
    for name in fp32.names():
        exact = fp32.get(name)
        assert bf16.get(name).dtype == np.float32 and fp16.get(name).dtype == np.float32
        rounded = torch.from_numpy(exact).to(torch.bfloat16).float().numpy()
        np.testing.assert_array_equal(bf16.get(name), rounded, err_msg=name)
        rounded = torch.from_numpy(exact).to(torch.float16).float().numpy()
        np.testing.assert_array_equal(fp16.get(name), rounded, err_msg=name)


def test_weight_reader_layer_shapes_and_nontrivial_init(tiny_dirs):
    reader = WeightReader(tiny_dirs["fp32"])
    layer = reader.layer(1)
    expected = {
        "q_w": (64, 64),
        "q_b": (64,),
        "k_w": (32, 64),
        "k_b": (32,),
        "v_w": (32, 64),
        "v_b": (32,),
        "o_w": (64, 64),
        "gate_w": (128, 64),
        "up_w": (128, 64),
        "down_w": (64, 128),
        "input_norm": (64,),
        "post_norm": (64,),
    }
    assert {k: v.shape for k, v in layer.items()} == expected
    assert 0.015 < layer["gate_w"].std() < 0.025
    assert np.all(layer["k_b"] != 0) and np.abs(layer["k_b"]).max() > 0.05
    assert not np.allclose(layer["input_norm"], 1.0) and 0.5 < layer["input_norm"].mean() < 1.5
    assert reader.embed_tokens().shape == reader.lm_head().shape == (96, 64)
    assert not np.array_equal(reader.lm_head(), reader.embed_tokens())
    assert reader.final_norm().shape == (64,)
    with pytest.raises(IndexError):
        reader.layer(2)


def test_weight_reader_tied_has_no_lm_head_tensor(tiny_dirs):
    reader = WeightReader(tiny_dirs["tied"])
    assert reader.spec.tie_word_embeddings
    assert "lm_head.weight" not in reader.names()
    np.testing.assert_array_equal(reader.lm_head(), reader.embed_tokens())
    # Tensors are seeded per name, so tying changes no other tensor.
    untied = WeightReader(tiny_dirs["v4"])
    np.testing.assert_array_equal(reader.embed_tokens(), untied.embed_tokens())
    np.testing.assert_array_equal(reader.layer(0)["q_w"], untied.layer(0)["q_w"])


def test_weight_reader_untied_without_lm_head_reverts(tiny_dirs, tmp_path):
    tensors = load_file(tiny_dirs["fp32"] / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((tiny_dirs["fp32"] / "config.json").read_text())
    with pytest.raises(UserError, match="'lm_head.weight' not found.*tie_word_embeddings"):
        WeightReader(tmp_path).lm_head()


def test_weight_reader_sharded_equals_single_file(tiny_dirs):
    assert (tiny_dirs["sharded"] / INDEX_FILE).is_file()
    assert len(list(tiny_dirs["sharded"].glob("*.safetensors"))) > 2
    sharded, single = WeightReader(tiny_dirs["sharded"]), WeightReader(tiny_dirs["fp32"])
    assert sharded.names() == single.names()
    for name in single.names():
        np.testing.assert_array_equal(sharded.get(name), single.get(name), err_msg=name)


def test_weight_reader_missing_tensor_names_tensor_and_file(tiny_dirs, tmp_path):
    reader = WeightReader(tiny_dirs["fp32"])
    with pytest.raises(UserError, match="'model.layers.7.mlp.up_proj.weight' not found"):
        reader.get("model.layers.7.mlp.up_proj.weight")

    # An index that names a tensor its shard does not hold: the message names the shard.
    source = tiny_dirs["sharded"]
    index = json.loads((source / INDEX_FILE).read_text())
    victim = "model.layers.0.self_attn.k_proj.bias"
    shard = index["weight_map"][victim]
    for path in source.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    tensors = load_file(source / shard)
    del tensors[victim]
    save_file(tensors, tmp_path / shard, metadata={"format": "pt"})
    with pytest.raises(UserError, match=f"'{victim}' not found in .*{shard}"):
        WeightReader(tmp_path).layer(0)


def test_weight_reader_shape_mismatch_names_tensor(tiny_dirs, tmp_path):
    for path in tiny_dirs["fp32"].iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 256
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="gate_proj.weight.*shape"):
        WeightReader(tmp_path).layer(0)


def test_weight_reader_no_safetensors_reverts(tmp_path):
    _write_config(tmp_path, DEEPSEEK_R1_DISTILL_QWEN_1_5B_CONFIG)
    with pytest.raises(UserError, match=r"no \*.safetensors"):
        WeightReader(tmp_path)


# --- random checkpoints --------------------------------------------------------------------


def test_r1_preset_config_json_is_deepseeks(tmp_path):
    out = write_random_checkpoint(tmp_path / "r1", weights=False)
    assert json.loads((out / "config.json").read_text()) == _deepseek_config()
    assert read_spec(out) == R1_1_5B_SPEC
    assert not list(out.glob("*.safetensors"))
    v5 = write_random_checkpoint(tmp_path / "r1v5", weights=False, config_format="v5")
    v5_config = json.loads((v5 / "config.json").read_text())
    assert v5_config["rope_parameters"] == {"rope_theta": 10000, "rope_type": "default"}
    assert v5_config["dtype"] == "bfloat16" and "id2label" not in v5_config
    assert read_spec(v5) == R1_1_5B_SPEC
    assert parameter_count(R1_1_5B_SPEC) == 1_777_088_000


def test_r1_preset_qwen2config_values():
    config = preset_config("r1-distill-1.5b")
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (
        1536,
        28,
        8960,
    )
    assert (config.num_attention_heads, config.num_key_value_heads) == (12, 2)
    assert (config.vocab_size, config.max_position_embeddings) == (151936, 131072)
    assert config.rope_parameters["rope_theta"] == 10000
    assert config.rms_norm_eps == 1e-6 and config.tie_word_embeddings is False
    assert (config.bos_token_id, config.eos_token_id) == (151643, 151643)
    assert preset_config("r1-distill-1.5b", num_layers=1).num_hidden_layers == 1


def test_write_random_checkpoint_overrides_and_layer_prefix(tiny_dirs, tmp_path):
    out = write_random_checkpoint(
        tmp_path, preset="tiny", num_layers=1, dtype="float32", rope_theta=1e6, vocab_size=80
    )
    spec = read_spec(out)
    assert (spec.num_layers, spec.rope_theta, spec.vocab_size) == (1, 1e6, 80)
    two_layers = WeightReader(tiny_dirs["fp32"])
    one_layer = WeightReader(out)
    np.testing.assert_array_equal(one_layer.layer(0)["up_w"], two_layers.layer(0)["up_w"])


def test_write_random_checkpoint_bad_arguments_revert(tmp_path):
    with pytest.raises(UserError, match="unknown preset"):
        write_random_checkpoint(tmp_path, preset="r1-distill-70b", weights=False)
    with pytest.raises(UserError, match="config_format"):
        write_random_checkpoint(tmp_path, preset="tiny", config_format="v3", weights=False)
    with pytest.raises(UserError, match="dtype"):
        write_random_checkpoint(tmp_path, preset="tiny", dtype="int8", weights=False)


def test_tokenizer_json_covers_vocab(tiny_dirs, tmp_path):
    tokenizer = Tokenizer.from_file(str(tiny_dirs["v4"] / "tokenizer.json"))
    assert tokenizer.get_vocab_size() == 96
    assert tokenizer.encode("t5 t95 <｜end▁of▁sentence｜>").ids == [5, 95, 2]
    assert tokenizer.token_to_id("<｜begin▁of▁sentence｜>") == 1
    big = write_random_checkpoint(tmp_path, weights=False)
    tokenizer = Tokenizer.from_file(str(big / "tokenizer.json"))
    assert tokenizer.get_vocab_size() == 151936
    assert tokenizer.token_to_id("<｜end▁of▁sentence｜>") == 151643
