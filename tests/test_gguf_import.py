"""GGUF import: a Llama GGUF converts to the integer model its Hugging Face twin converts to.

The GGUF files are written here with the `gguf` package's GGUFWriter from a tiny random
LlamaForCausalLM, the way llama.cpp's converter writes them (q and k rows permuted, tied
embeddings without `output.weight`, the tokenizer as metadata). The "equivalent Hugging Face
checkpoint" is the same weights in a Qwen2ForCausalLM with zero q/k/v biases, saved in float32;
for quantised files, the weights transformers itself reads out of the GGUF.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from optinfer.errors import UserError
from optinfer.models.converter import convert
from optinfer.models.float_reference import FloatReference
from optinfer.models.gguf_import import (
    GGUFWeightReader,
    is_gguf,
    permute_rows,
    unpermute_rows,
)
from optinfer.models.runtime import IntegerModel

OPTINFER = str(Path(sys.executable).parent / "optinfer")
CONTEXT = 64
CALIBRATION_TEXT = [
    "the cat sat on the mat and the dog sat on the log",
    "def add(a, b): return a + b",
    "numbers like 12 and 345 appear in text",
]
TOKENS = [5, 17, 42, 8, 60, 2, 33, 33, 90, 11, 7, 120]


def _llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute, verbatim."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


# ------------------------------------------------------------------------------ fixtures


def _train_tokenizer(path: Path):
    """A small byte-level BPE (GPT-2 style), so the GGUF carries a real tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(CALIBRATION_TEXT * 20 + ["hello world, this is a test"] * 5,
                                  trainer)
    tokenizer.save(str(path))
    return tokenizer


def _llama(vocab: int, hidden: int, intermediate: int, tied: bool, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=CONTEXT, rope_theta=100000.0,
                         rms_norm_eps=1e-5, tie_word_embeddings=tied, bos_token_id=1,
                         eos_token_id=2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(1.0, 0.1)
            else:
                param.normal_(0.0, 0.05)
    return model


def _k_quant_bytes(qtype, shape: tuple[int, int], rng) -> np.ndarray:
    """Random blocks of a K-quant (the `gguf` package cannot quantise to them) with sane f16
    super-block scales in place, so the dequantised weights are finite and small."""
    rows, cols = shape
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    blocks = rng.integers(0, 256, size=(rows * cols // 256, block_bytes), dtype=np.uint8)
    scale = np.frombuffer(np.float16(2e-4).tobytes(), np.uint8)
    if qtype == gguf.GGMLQuantizationType.Q6_K:  # ... scales, d (last 2 bytes)
        blocks[:, -2:] = scale
    else:  # Q4_K, Q5_K: d, dmin first
        blocks[:, 0:2] = scale
        blocks[:, 2:4] = np.frombuffer(np.float16(1e-4).tobytes(), np.uint8)
    return blocks.reshape(rows, -1)


def _write_gguf(path: Path, model, tokenizer_json: Path, types: dict[str, object]) -> Path:
    """The Llama model as llama.cpp writes a GGUF; `types` picks a GGML type per tensor kind
    (token_embd, attn_q, ..., default F32)."""
    c = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(c.rope_theta if hasattr(c, "rope_theta")
                              else c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_vocab_size(c.vocab_size)
    vocab = json.loads(tokenizer_json.read_text())["model"]
    tokens = sorted(vocab["vocab"], key=vocab["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in vocab["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if i < 3 else gguf.TokenType.NORMAL
                            for i in range(len(tokens))])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)

    names = {"model.embed_tokens.weight": "token_embd", "model.norm.weight": "output_norm",
             "lm_head.weight": "output"}
    parts = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    rng = np.random.default_rng(0)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if name in names:
            kind = names[name]
            gguf_name = kind + ".weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            kind = parts[rest.rsplit(".", 1)[0]]
            gguf_name = f"blk.{layer}.{kind}.weight"
        data = tensor.numpy().astype(np.float32)
        if kind == "attn_q":
            data = _llama_cpp_permute(data, c.num_attention_heads, c.num_attention_heads)
        elif kind == "attn_k":
            data = _llama_cpp_permute(data, c.num_attention_heads, c.num_key_value_heads)
        qtype = types.get(kind, gguf.GGMLQuantizationType.F32) if data.ndim == 2 else None
        if qtype is None or qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name, data)
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(gguf_name, data.astype(np.float16))
        elif qtype in (gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q5_K,
                       gguf.GGMLQuantizationType.Q6_K):
            writer.add_tensor(gguf_name, _k_quant_bytes(qtype, data.shape, rng),
                              raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _save_as_qwen2(state: dict, config, tokenizer_json: Path, out: Path) -> Path:
    """The Hugging Face twin: Llama weights in a Qwen2ForCausalLM, zero q/k/v biases, fp32."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    qwen = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings, rope_theta=100000.0,
        rms_norm_eps=config.rms_norm_eps, tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=1, eos_token_id=2)).to(torch.float32)
    missing, unexpected = qwen.load_state_dict(state, strict=False)
    assert not unexpected and all(m.endswith("_proj.bias") for m in missing), missing
    with torch.no_grad():
        for name, param in qwen.named_parameters():
            if name.endswith("_proj.bias"):
                param.zero_()
    qwen.save_pretrained(out)
    (out / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gguf")


@pytest.fixture(scope="module")
def source_tokenizer(work):
    return _train_tokenizer(work / "source-tokenizer.json")


@pytest.fixture(scope="module")
def calibration(work) -> Path:
    path = work / "calibration.txt"
    path.write_text("\n".join(CALIBRATION_TEXT) + "\n")
    return path


@pytest.fixture(scope="module")
def f32(work, source_tokenizer, calibration):
    """A tied fp32 Llama, its GGUF, the GGUF's conversion, and its Hugging Face twin's."""
    vocab = source_tokenizer.get_vocab_size()
    model = _llama(vocab, 64, 128, tied=True, seed=1)
    path = _write_gguf(work / "tiny-f32.gguf", model, work / "source-tokenizer.json", {})
    from_gguf = convert(path, work / "int-gguf", calibration, CONTEXT)
    twin = _save_as_qwen2(model.state_dict(), model.config, work / "int-gguf" / "tokenizer.json",
                          work / "hf-twin")
    from_hf = convert(twin, work / "int-hf", calibration, CONTEXT)
    return {"model": model, "gguf": path, "from_gguf": from_gguf, "from_hf": from_hf}


# --------------------------------------------------------------------------------- tests


def test_permutation_round_trips_and_matches_llama_cpp():
    w = np.arange(8 * 2 * 3, dtype=np.float32).reshape(16, 3)  # 2 heads of 8 rows
    assert np.array_equal(permute_rows(w, 2), _llama_cpp_permute(w, 2, None))
    assert np.array_equal(unpermute_rows(permute_rows(w, 2), 2), w)


def test_reader_gives_the_hugging_face_weights_and_config(f32):
    model, reader = f32["model"], GGUFWeightReader(f32["gguf"])
    spec = reader.spec
    assert (spec.hidden_size, spec.num_layers, spec.num_heads, spec.num_kv_heads,
            spec.head_dim, spec.intermediate_size) == (64, 2, 4, 2, 16, 128)
    assert spec.tie_word_embeddings and spec.rope_theta == 100000.0
    assert spec.rms_norm_eps == 1e-5  # the file's float32, read as config.json says it
    assert spec.bos_token_id == 1 and spec.eos_token_ids == (2,)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    layer = reader.layer(1)
    assert np.array_equal(layer["q_w"], state["model.layers.1.self_attn.q_proj.weight"])
    assert np.array_equal(layer["k_w"], state["model.layers.1.self_attn.k_proj.weight"])
    assert np.array_equal(layer["down_w"], state["model.layers.1.mlp.down_proj.weight"])
    assert not layer["q_b"].any() and layer["k_b"].shape == (32,)
    assert np.array_equal(reader.lm_head(), state["model.embed_tokens.weight"])


def test_float_reference_on_the_gguf_gives_llamas_logits(f32):
    reader = GGUFWeightReader(f32["gguf"])
    ours = FloatReference(reader, reader.spec).forward(TOKENS)
    with torch.no_grad():
        theirs = f32["model"](torch.tensor([TOKENS])).logits[0].numpy()
    np.testing.assert_allclose(ours, theirs, atol=2e-5, rtol=1e-4)


def test_gguf_converts_to_the_same_integer_model_as_its_hugging_face_twin(f32, work):
    a, b = f32["from_gguf"], f32["from_hf"]
    assert a["model_root"] == b["model_root"]
    assert a["files"] == b["files"]  # graphs, constants and tokenizer, byte for byte
    assert a["source"]["format"] == "gguf" and a["source"]["architecture"] == "llama"
    assert "source" not in b
    prompt = IntegerModel(work / "int-gguf").encode("the cat sat")
    assert (IntegerModel(work / "int-gguf").generate(prompt, 8)
            == IntegerModel(work / "int-hf").generate(prompt, 8))


def test_the_tokenizer_is_carried_over(f32, work, source_tokenizer):
    converted = IntegerModel(work / "int-gguf")
    for text in ["hello world, this is a test", "def add(a, b): return a + b", "zq 9!"]:
        assert converted.encode(text) == source_tokenizer.encode(text).ids
        assert converted.tokenizer.decode(converted.encode(text)) == text


def test_quantised_and_untied_gguf_reads_as_transformers_reads_it(work, source_tokenizer,
                                                                   calibration):
    """F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q4_K, Q6_K tensors and an untied lm_head: every
    weight equals what transformers dequantises from the same file, and the conversion equals
    its Hugging Face twin's built from transformers' weights."""
    from transformers import AutoModelForCausalLM

    q = gguf.GGMLQuantizationType
    vocab = source_tokenizer.get_vocab_size()
    model = _llama(vocab, 256, 512, tied=False, seed=2)
    types = {"token_embd": q.Q8_0, "attn_q": q.Q4_0, "attn_k": q.Q4_1, "attn_v": q.Q5_0,
             "attn_output": q.F16, "ffn_gate": q.Q4_K, "ffn_up": q.Q6_K, "ffn_down": q.BF16,
             "output": q.Q8_0}
    path = _write_gguf(work / "tiny-mixed.gguf", model, work / "source-tokenizer.json", types)
    reader = GGUFWeightReader(path)
    assert set(reader.tensor_types()) == {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0",
                                          "Q4_K", "Q6_K"}
    loaded = AutoModelForCausalLM.from_pretrained(str(work), gguf_file=path.name,
                                                  dtype=torch.float32)
    state = loaded.state_dict()
    for name, tensor in state.items():
        assert np.array_equal(reader.get(name), tensor.numpy()), name
    with torch.no_grad():
        theirs = loaded(torch.tensor([TOKENS])).logits[0].numpy()
    np.testing.assert_allclose(FloatReference(reader, reader.spec).forward(TOKENS), theirs,
                               atol=1e-4, rtol=1e-4)
    from_gguf = convert(path, work / "int-mixed", calibration, CONTEXT)
    twin = _save_as_qwen2(state, loaded.config, work / "int-mixed" / "tokenizer.json",
                          work / "hf-mixed")
    assert convert(twin, work / "int-mixed-hf", calibration, CONTEXT)["model_root"] == (
        from_gguf["model_root"])


def _gguf_with_architecture(path: Path, arch: str) -> Path:
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unsupported_architecture_and_unreadable_files_are_one_line_errors(tmp_path):
    other = _gguf_with_architecture(tmp_path / "phi.gguf", "phi3")
    with pytest.raises(UserError, match="architecture 'phi3' is not supported"):
        GGUFWeightReader(other)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + b"\xff" * 64)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(other.read_bytes()[:40])
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"\x00" * 64)
    assert is_gguf(garbage) and not is_gguf(not_gguf)
    cases = [(other, "architecture 'phi3' is not supported"),
             (garbage, "not a readable GGUF file"), (truncated, "not a readable GGUF file"),
             (not_gguf, "not a GGUF file"), (tmp_path / "missing.gguf", "not found")]
    for path, message in cases:
        with pytest.raises(UserError, match=message):
            convert(path, tmp_path / "never")
        assert not (tmp_path / "never").exists()
    for path in (other, garbage):  # through the command line: exit 2, one line, no traceback
        proc = subprocess.run([OPTINFER, "model", "convert", str(path), "-o",
                               str(tmp_path / "never")], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2, (path, proc.stderr)
        assert "Traceback" not in proc.stderr, proc.stderr
        # One line of error (the progress bar's line may stand above it).
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert lines[-1].startswith("error: ") and proc.stderr.count("error") == 1, lines
        assert not (tmp_path / "never").exists()
