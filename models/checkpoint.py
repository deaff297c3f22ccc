"""Hugging Face Qwen2 checkpoints: config parsing, lazy weight reading, random checkpoints.

Three things live here:

- `read_spec(dir) -> Qwen2Spec`: the architecture numbers of a `Qwen2ForCausalLM` directory,
  from a config.json in either format in use — the transformers-4.x one that
  DeepSeek-R1-Distill-Qwen-1.5B/7B ship (`rope_theta`, `torch_dtype`, `rope_scaling: null`) and
  the one current transformers (5.x) writes (`rope_parameters`, `dtype`). Anything the integer
  converter does not implement (another architecture, sliding-window attention, scaled RoPE,
  an activation other than SiLU) is refused with a `UserError` naming the field.
- `WeightReader`: lazy access to the `*.safetensors` of a directory, one tensor at a time, as
  float32 numpy arrays in torch layout (a linear weight is (out_features, in_features)). Nothing
  loads all weights at once, so a 1.5B checkpoint can be converted layer by layer.
- `write_random_checkpoint(...)`: a randomly initialised checkpoint with DeepSeek-R1-Distill-
  Qwen-1.5B's exact config (or a tiny one for tests), saved by transformers itself, so the
  converter and benchmarks run on the real layout without downloading the real weights.
"""

from __future__ import annotations

import copy
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from optinfer.errors import UserError

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"

# ---------------------------------------------------------------------------------------------
# Spec
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Qwen2Spec:
    """The numbers of a Qwen2 decoder that the float reference and the converter need.

    `eos_token_ids` is always a tuple (config.json may give one int, a list, or nothing);
    `torch_dtype` is the dtype the checkpoint was saved in, as a string ("bfloat16").
    """

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    max_position_embeddings: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    torch_dtype: str

    @property
    def group(self) -> int:
        """Query heads per key/value head (GQA): query head h reads kv head h // group."""
        return self.num_heads // self.num_kv_heads


# Fields without which we refuse to guess: they fix every tensor's shape. Fields with a
# documented Qwen2Config default (max_position_embeddings, tie_word_embeddings, hidden_act,
# head_dim) take that default when absent, exactly as transformers would.
_REQUIRED_INT_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
)
_QWEN2_DEFAULT_MAX_POSITIONS = 32768
_DEFAULT_ROPE_TYPES = (None, "default")


def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise UserError(f"{path} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from exc


def _field_int(config: dict, name: str, where: Path, default: int | None = None) -> int:
    value = config.get(name, default)
    if value is None:
        raise UserError(f"{where}: required field '{name}' is missing")
    # bool is an int subclass in Python; `true` is never a valid layer count.
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"{where}: field '{name}' must be a positive integer, got {value!r}")
    return value


def _field_float(config: dict, name: str, where: Path, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise UserError(f"{where}: field '{name}' must be a positive number, got {value!r}")
    return float(value)


def _rope_theta(config: dict, where: Path) -> float:
    """RoPE base from either format; refuse any scaled RoPE (YaRN, linear, dynamic, ...)."""
    scaling = config.get("rope_scaling")
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else None
        if kind not in _DEFAULT_ROPE_TYPES:
            raise UserError(
                f"{where}: field 'rope_scaling' = {scaling!r} is not supported "
                "(only unscaled RoPE: null or rope_type 'default')"
            )
    params = config.get("rope_parameters")
    theta_v4 = config.get("rope_theta")
    if params is None:
        if theta_v4 is None:
            raise UserError(
                f"{where}: required field 'rope_theta' (or 'rope_parameters.rope_theta') is missing"
            )
        return _field_float(config, "rope_theta", where, theta_v4)
    if not isinstance(params, dict):
        raise UserError(f"{where}: field 'rope_parameters' must be an object, got {params!r}")
    kind = params.get("rope_type", params.get("type"))
    if kind not in _DEFAULT_ROPE_TYPES:
        raise UserError(
            f"{where}: field 'rope_parameters.rope_type' = {kind!r} is not supported "
            "(only 'default', unscaled RoPE)"
        )
    theta = params.get("rope_theta", theta_v4)
    if theta is None:
        raise UserError(f"{where}: required field 'rope_parameters.rope_theta' is missing")
    theta = _field_float(config, "rope_parameters.rope_theta", where, theta)
    if theta_v4 is not None and float(theta_v4) != theta:
        raise UserError(
            f"{where}: fields 'rope_theta' ({theta_v4}) and 'rope_parameters.rope_theta' "
            f"({theta}) disagree"
        )
    return theta


def _eos_ids(config: dict, where: Path) -> tuple[int, ...]:
    eos = config.get("eos_token_id")
    if eos is None:
        return ()
    items = eos if isinstance(eos, list) else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items):
        raise UserError(f"{where}: field 'eos_token_id' must be an int or a list of ints: {eos!r}")
    return tuple(items)


def spec_from_config(config: dict, where: Path) -> Qwen2Spec:
    """Validate a parsed config.json (dict) and return its `Qwen2Spec`; `where` names the file
    in error messages. See `read_spec` for what is accepted."""
    if not isinstance(config, dict):
        raise UserError(f"{where}: expected a JSON object at the top level")
    model_type = config.get("model_type")
    if model_type != "qwen2":
        raise UserError(f"{where}: field 'model_type' is {model_type!r}, expected 'qwen2'")
    architectures = config.get("architectures")
    # A bare Qwen2Config (no model saved with it) has no 'architectures'; a list naming anything
    # else (a classifier head, a multimodal wrapper) is a different model.
    if architectures is not None and architectures != ["Qwen2ForCausalLM"]:
        raise UserError(
            f"{where}: field 'architectures' is {architectures!r}, expected ['Qwen2ForCausalLM']"
        )
    hidden_act = config.get("hidden_act", "silu")
    if hidden_act != "silu":
        raise UserError(f"{where}: field 'hidden_act' is {hidden_act!r}, only 'silu' is supported")
    if config.get("use_sliding_window", False):
        raise UserError(
            f"{where}: field 'use_sliding_window' is true: sliding-window attention is not "
            "supported (full causal attention only)"
        )
    layer_types = config.get("layer_types")
    if layer_types is not None and any(kind != "full_attention" for kind in layer_types):
        raise UserError(
            f"{where}: field 'layer_types' lists {sorted(set(layer_types))}: only "
            "'full_attention' is supported"
        )
    if config.get("use_mrope", False):
        raise UserError(f"{where}: field 'use_mrope' is true: multimodal RoPE is not supported")

    hidden, layers, heads, kv_heads, intermediate, vocab = (
        _field_int(config, name, where) for name in _REQUIRED_INT_FIELDS
    )
    if heads % kv_heads != 0:
        raise UserError(
            f"{where}: field 'num_attention_heads' ({heads}) is not divisible by "
            f"'num_key_value_heads' ({kv_heads})"
        )
    if config.get("head_dim") is None and hidden % heads != 0:
        raise UserError(
            f"{where}: field 'hidden_size' ({hidden}) is not divisible by "
            f"'num_attention_heads' ({heads}) and no 'head_dim' is given"
        )
    head_dim = _field_int(config, "head_dim", where, default=hidden // heads)
    if head_dim % 2 != 0:
        raise UserError(f"{where}: field 'head_dim' ({head_dim}) must be even for RoPE")
    if "rms_norm_eps" not in config:
        raise UserError(f"{where}: required field 'rms_norm_eps' is missing")
    eps = _field_float(config, "rms_norm_eps", where, config["rms_norm_eps"])

    tie = config.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise UserError(f"{where}: field 'tie_word_embeddings' must be true or false: {tie!r}")
    bos = config.get("bos_token_id")
    if bos is not None and (isinstance(bos, bool) or not isinstance(bos, int)):
        raise UserError(f"{where}: field 'bos_token_id' must be an int or null: {bos!r}")
    # transformers 4.x writes 'torch_dtype', 5.x writes 'dtype'; a config without either was
    # saved in float32 (the transformers default).
    dtype = config.get("dtype", config.get("torch_dtype")) or "float32"
    if not isinstance(dtype, str):
        raise UserError(f"{where}: field 'dtype'/'torch_dtype' must be a string: {dtype!r}")

    return Qwen2Spec(
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=intermediate,
        vocab_size=vocab,
        rope_theta=_rope_theta(config, where),
        rms_norm_eps=eps,
        tie_word_embeddings=tie,
        max_position_embeddings=_field_int(
            config, "max_position_embeddings", where, default=_QWEN2_DEFAULT_MAX_POSITIONS
        ),
        bos_token_id=bos,
        eos_token_ids=_eos_ids(config, where),
        torch_dtype=dtype.removeprefix("torch."),
    )


def read_spec(checkpoint_dir: Path) -> Qwen2Spec:
    """Parse `checkpoint_dir/config.json` of a `Qwen2ForCausalLM` into a `Qwen2Spec`.

    Accepts the transformers-4.x format (as DeepSeek-R1-Distill-Qwen-1.5B/7B ship it) and the
    transformers-5.x format. `head_dim` defaults to hidden_size / num_attention_heads,
    `max_position_embeddings` to 32768, `tie_word_embeddings` to false (Qwen2Config's
    defaults). Raises `UserError` naming the file or field when: the directory or config.json is
    missing or not JSON; a required field (the six shape fields, rms_norm_eps, the RoPE theta)
    is missing; model_type is not 'qwen2' or architectures is not ['Qwen2ForCausalLM'];
    hidden_act is not 'silu'; RoPE is scaled; sliding-window attention is on; the heads are not
    divisible by the KV heads. `sliding_window`/`max_window_layers` are ignored when
    `use_sliding_window` is false, as transformers does.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise UserError(f"checkpoint directory {checkpoint_dir} not found")
    path = checkpoint_dir / CONFIG_FILE
    return spec_from_config(_load_json(path), path)


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------


class WeightReader:
    """Lazy, read-only access to the safetensors weights of a Qwen2 checkpoint directory.

    Handles a single `model.safetensors`, a sharded checkpoint with
    `model.safetensors.index.json`, or several `*.safetensors` without an index (then each
    file's header is read to find the names). Tensors are read one at a time from the
    memory-mapped files and returned as float32 numpy arrays (bf16/fp16 converted through
    torch, since numpy has no bfloat16). Each `get` allocates a fresh array; the reader keeps
    no tensor data of its own.
    """

    def __init__(self, checkpoint_dir: Path, spec: Qwen2Spec | None = None) -> None:
        from safetensors import safe_open

        self.checkpoint_dir = Path(checkpoint_dir)
        self.spec = spec if spec is not None else read_spec(self.checkpoint_dir)
        self._safe_open = safe_open
        # name -> file name (relative to checkpoint_dir)
        self._file_of: dict[str, str] = {}
        self._handles: dict[str, Any] = {}
        self._keys_of_file: dict[str, set[str]] = {}
        index_path = self.checkpoint_dir / INDEX_FILE
        if index_path.is_file():
            index = _load_json(index_path)
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict):
                raise UserError(f"{index_path}: field 'weight_map' is missing or not an object")
            self._file_of = {str(k): str(v) for k, v in weight_map.items()}
            self._source = index_path.name
        else:
            files = sorted(p.name for p in self.checkpoint_dir.glob("*.safetensors"))
            if not files:
                raise UserError(f"no *.safetensors file in {self.checkpoint_dir}")
            for file_name in files:
                for name in self._keys(file_name):
                    self._file_of[name] = file_name
            self._source = ", ".join(files)

    def _open(self, file_name: str) -> Any:
        handle = self._handles.get(file_name)
        if handle is None:
            path = self.checkpoint_dir / file_name
            if not path.is_file():
                raise UserError(f"weight file {path} not found (named by {INDEX_FILE})")
            try:
                handle = self._safe_open(str(path), framework="pt")
            except Exception as exc:  # safetensors raises its own error types for bad headers
                raise UserError(f"{path} is not a readable safetensors file: {exc}") from exc
            self._handles[file_name] = handle
        return handle

    def _keys(self, file_name: str) -> set[str]:
        keys = self._keys_of_file.get(file_name)
        if keys is None:
            keys = self._keys_of_file[file_name] = set(self._open(file_name).keys())
        return keys

    def names(self) -> list[str]:
        """All tensor names of the checkpoint, sorted."""
        return sorted(self._file_of)

    def has(self, name: str) -> bool:
        return name in self._file_of

    def get(self, name: str) -> np.ndarray:
        """The tensor `name` as a new float32 array in its stored shape."""
        import torch

        file_name = self._file_of.get(name)
        if file_name is None:
            raise UserError(f"tensor '{name}' not found in {self.checkpoint_dir} ({self._source})")
        if name not in self._keys(file_name):
            raise UserError(
                f"tensor '{name}' not found in {self.checkpoint_dir / file_name} "
                f"(listed there by {INDEX_FILE})"
            )
        tensor = self._open(file_name).get_tensor(name)
        return tensor.to(torch.float32).numpy()

    def _get_shaped(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        array = self.get(name)
        if array.shape != shape:
            raise UserError(
                f"tensor '{name}' in {self.checkpoint_dir / self._file_of[name]} has shape "
                f"{array.shape}, but {CONFIG_FILE} implies {shape}"
            )
        return array

    # Typed accessors: Qwen2's tensor names and the shapes config.json implies.

    def embed_tokens(self) -> np.ndarray:
        """(vocab, hidden) token embedding table."""
        s = self.spec
        return self._get_shaped("model.embed_tokens.weight", (s.vocab_size, s.hidden_size))

    def lm_head(self) -> np.ndarray:
        """(vocab, hidden) output projection; the embedding table when the model is tied.

        A tied checkpoint saved by transformers has no `lm_head.weight`; if one is present
        anyway, config.json's `tie_word_embeddings` decides, as it does in transformers.
        """
        s = self.spec
        if s.tie_word_embeddings:
            return self.embed_tokens()
        if not self.has("lm_head.weight"):
            raise UserError(
                f"tensor 'lm_head.weight' not found in {self.checkpoint_dir} ({self._source}), "
                f"and {CONFIG_FILE} says tie_word_embeddings is false"
            )
        return self._get_shaped("lm_head.weight", (s.vocab_size, s.hidden_size))

    def final_norm(self) -> np.ndarray:
        """(hidden,) weight of the final RMSNorm."""
        return self._get_shaped("model.norm.weight", (self.spec.hidden_size,))

    def layer(self, i: int) -> dict[str, np.ndarray]:
        """Weights of decoder layer i, float32, torch layout (linear weight = (out, in)).

        Keys: q_w (H*hd, D), q_b (H*hd,), k_w (KV*hd, D), k_b, v_w (KV*hd, D), v_b,
        o_w (D, H*hd), gate_w (I, D), up_w (I, D), down_w (D, I), input_norm (D,),
        post_norm (D,).
        """
        s = self.spec
        if not 0 <= i < s.num_layers:
            raise IndexError(f"layer {i} out of range: the model has {s.num_layers} layers")
        d, q_out, kv_out, inter = (
            s.hidden_size,
            s.num_heads * s.head_dim,
            s.num_kv_heads * s.head_dim,
            s.intermediate_size,
        )
        p = f"model.layers.{i}."
        wanted = {
            "q_w": ("self_attn.q_proj.weight", (q_out, d)),
            "q_b": ("self_attn.q_proj.bias", (q_out,)),
            "k_w": ("self_attn.k_proj.weight", (kv_out, d)),
            "k_b": ("self_attn.k_proj.bias", (kv_out,)),
            "v_w": ("self_attn.v_proj.weight", (kv_out, d)),
            "v_b": ("self_attn.v_proj.bias", (kv_out,)),
            "o_w": ("self_attn.o_proj.weight", (d, q_out)),
            "gate_w": ("mlp.gate_proj.weight", (inter, d)),
            "up_w": ("mlp.up_proj.weight", (inter, d)),
            "down_w": ("mlp.down_proj.weight", (d, inter)),
            "input_norm": ("input_layernorm.weight", (d,)),
            "post_norm": ("post_attention_layernorm.weight", (d,)),
        }
        return {key: self._get_shaped(p + name, shape) for key, (name, shape) in wanted.items()}


# ---------------------------------------------------------------------------------------------
# Random checkpoints
# ---------------------------------------------------------------------------------------------

# config.json of deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B, as shipped (transformers 4.x
# format), key for key. Its random stand-in is written with exactly this config.
_R1_DISTILL_1_5B: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"],
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
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.44.0",
    "use_cache": True,
    "use_mrope": False,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

# The same architecture at toy size, for fast tests (the FloatReference/transformers
# comparison, config round-trips). bos and eos differ so both are exercised.
_TINY: dict[str, Any] = {
    **_R1_DISTILL_1_5B,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_size": 64,
    "intermediate_size": 128,
    "max_position_embeddings": 128,
    "max_window_layers": 2,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "sliding_window": 128,
    "vocab_size": 96,
}

PRESETS: dict[str, dict[str, Any]] = {"r1-distill-1.5b": _R1_DISTILL_1_5B, "tiny": _TINY}

DTYPES = ("bfloat16", "float16", "float32")
CONFIG_FORMATS = ("v4", "v5")

# Random init scales. 0.02 is Qwen2's initializer_range. Biases and RMSNorm weights get their
# own non-trivial values (real checkpoints have large q/k biases and norm weights far from 1)
# so the converter's bias and norm-weight paths carry information.
WEIGHT_STD = 0.02
BIAS_STD = 0.1
NORM_WEIGHT_STD = 0.1  # norm weights are 1 + N(0, NORM_WEIGHT_STD)


def preset_config_dict(
    preset: str = "r1-distill-1.5b",
    num_layers: int | None = None,
    dtype: str = "bfloat16",
    tie_word_embeddings: bool | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """The config.json (transformers-4.x format, DeepSeek's key set) of a preset.

    `num_layers` replaces num_hidden_layers (and max_window_layers, which is tied to it in
    real configs only by convention and is unused with use_sliding_window false), `dtype` the
    torch_dtype, `tie_word_embeddings` the tie flag; `overrides` replace or add any other field
    by its config.json name (e.g. rope_theta=1e6, vocab_size=1000, head_dim=32).
    """
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; known: {', '.join(sorted(PRESETS))}")
    if dtype not in DTYPES:
        raise UserError(f"unsupported dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    config = copy.deepcopy(PRESETS[preset])
    if num_layers is not None:
        config["num_hidden_layers"] = num_layers
        config["max_window_layers"] = min(config["max_window_layers"], num_layers)
    config["torch_dtype"] = dtype
    if tie_word_embeddings is not None:
        config["tie_word_embeddings"] = tie_word_embeddings
    config.update(overrides)
    return config


def preset_config(
    preset: str = "r1-distill-1.5b",
    num_layers: int | None = None,
    dtype: str = "bfloat16",
    tie_word_embeddings: bool | None = None,
    **overrides: Any,
):
    """`preset_config_dict(...)` as a transformers `Qwen2Config`."""
    from transformers import Qwen2Config

    config = preset_config_dict(preset, num_layers, dtype, tie_word_embeddings, **overrides)
    fields = {k: v for k, v in config.items() if k not in ("architectures", "transformers_version")}
    return Qwen2Config(**fields)


def _to_v5_format(saved: dict[str, Any], v4: dict[str, Any]) -> dict[str, Any]:
    """The config as transformers 5.x writes it: `rope_parameters` and `dtype` instead of
    `rope_theta`/`rope_scaling` and `torch_dtype`. `saved` is what save_pretrained wrote (already
    5.x format under transformers 5; converted here if an older transformers wrote it)."""
    config = dict(saved)
    theta = config.pop("rope_theta", None)
    config.pop("rope_scaling", None)
    if not isinstance(config.get("rope_parameters"), dict):
        config["rope_parameters"] = {"rope_theta": float(theta), "rope_type": "default"}
    config.pop("torch_dtype", None)
    config["dtype"] = v4["torch_dtype"]
    config["tie_word_embeddings"] = v4["tie_word_embeddings"]
    return dict(sorted(config.items()))


def write_tokenizer(
    out_dir: Path, vocab_size: int, bos_token_id: int | None, eos_token_ids: tuple[int, ...]
) -> Path:
    """Write a stand-in `tokenizer.json` (WordLevel, whitespace-split) covering ids 0..vocab-1.

    The real DeepSeek tokenizer cannot be downloaded here. Token i is spelled `t{i}`, except
    the EOS ids ("<｜end▁of▁sentence｜>", "<eos{i}>" for further ones) and a BOS id distinct
    from them ("<｜begin▁of▁sentence｜>"), which are special tokens. Words not in the vocab map
    to id 0. `tokenizers.Tokenizer.from_file` loads the result.
    """
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    names = {i: f"t{i}" for i in range(vocab_size)}
    specials: list[str] = []
    for n, eos in enumerate(eos_token_ids):
        if 0 <= eos < vocab_size:
            names[eos] = "<｜end▁of▁sentence｜>" if n == 0 else f"<eos{eos}>"
            specials.append(names[eos])
    if bos_token_id is not None and 0 <= bos_token_id < vocab_size:
        if bos_token_id not in eos_token_ids:
            names[bos_token_id] = "<｜begin▁of▁sentence｜>"
        specials.append(names[bos_token_id])
    vocab = {name: i for i, name in names.items()}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=names[0]))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens([AddedToken(s, special=True) for s in dict.fromkeys(specials)])
    path = Path(out_dir) / TOKENIZER_FILE
    tokenizer.save(str(path))
    return path


def _random_init_(model, seed: int) -> None:
    """Fill every parameter in place: linear weights and embeddings N(0, WEIGHT_STD), biases
    N(0, BIAS_STD), RMSNorm weights 1 + N(0, NORM_WEIGHT_STD).

    Each tensor has its own generator, seeded from (seed, tensor name), so a tensor's values do
    not depend on which other tensors exist: a 1-layer checkpoint is a prefix of the 28-layer
    one, and tied and untied checkpoints share every common tensor. Values are drawn in float32
    and then cast into the parameter, so a bf16 checkpoint is the rounding of the fp32 one with
    the same seed; the transient float32 buffer is one tensor (0.9 GB embedding at 1.5B shape).
    """
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            tensor_seed = ((seed & 0xFFFFFFFF) << 32) | zlib.crc32(name.encode())
            generator = torch.Generator().manual_seed(tensor_seed)
            values = torch.empty(param.shape, dtype=torch.float32)
            if name.endswith("norm.weight"):
                values.normal_(1.0, NORM_WEIGHT_STD, generator=generator)
            elif name.endswith(".bias"):
                values.normal_(0.0, BIAS_STD, generator=generator)
            else:
                values.normal_(0.0, WEIGHT_STD, generator=generator)
            param.copy_(values)
            del values


def write_random_checkpoint(
    out_dir: Path,
    preset: str = "r1-distill-1.5b",
    num_layers: int | None = None,
    seed: int = 0,
    dtype: str = "bfloat16",
    config_format: str = "v4",
    tie_word_embeddings: bool | None = None,
    weights: bool = True,
    max_shard_size: int | str = "5GB",
    **overrides: Any,
) -> Path:
    """Write a randomly initialised `Qwen2ForCausalLM` checkpoint to `out_dir`; return out_dir.

    The config is `preset_config_dict(preset, num_layers, dtype, tie_word_embeddings,
    **overrides)`; the model is saved by transformers' `save_pretrained` (safetensors, in
    `dtype`; sharded with an index when larger than `max_shard_size` — DeepSeek's 1.5B ships one
    3.5 GB file, which the 5GB default reproduces), then config.json is rewritten in
    `config_format`: "v4" = DeepSeek's transformers-4.x file (rope_theta, torch_dtype), "v5" =
    transformers-5.x (rope_parameters, dtype). A stand-in tokenizer.json is written too (see
    `write_tokenizer`). With `weights=False` only config.json and tokenizer.json are written.

    The same seed gives the same values whatever the dtype (see `_random_init_`). The model is
    built on the meta device and materialised directly in `dtype`, so the 1.5B preset needs
    about 3.6 GB (bf16) plus one float32 tensor, not a full float32 copy.
    """
    if config_format not in CONFIG_FORMATS:
        raise UserError(f"unknown config_format {config_format!r}; use 'v4' or 'v5'")
    v4 = preset_config_dict(preset, num_layers, dtype, tie_word_embeddings, **overrides)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config_path = out_dir / CONFIG_FILE

    if weights:
        import torch
        import transformers
        from transformers import Qwen2ForCausalLM

        config = preset_config(preset, num_layers, dtype, tie_word_embeddings, **overrides)
        with torch.device("meta"):
            model = Qwen2ForCausalLM(config)
        model = model.to(getattr(torch, dtype)).to_empty(device="cpu")
        # to_empty gives each module fresh storage, which would untie a tied lm_head.
        model.tie_weights()
        _random_init_(model, seed)
        save_kwargs: dict[str, Any] = {"max_shard_size": max_shard_size}
        if int(transformers.__version__.split(".")[0]) < 5:
            save_kwargs["safe_serialization"] = True  # 5.x writes safetensors only
        model.save_pretrained(out_dir, **save_kwargs)
        del model
        saved = json.loads(config_path.read_text(encoding="utf-8"))
    else:
        # What save_pretrained would have written: the diff against the config defaults.
        config = preset_config(preset, num_layers, dtype, tie_word_embeddings, **overrides)
        saved = json.loads(config.to_json_string(use_diff=True))
        saved["architectures"] = ["Qwen2ForCausalLM"]

    final = v4 if config_format == "v4" else _to_v5_format(saved, v4)
    config_path.write_text(json.dumps(final, indent=2) + "\n", encoding="utf-8")
    eos = v4.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    write_tokenizer(out_dir, v4["vocab_size"], v4.get("bos_token_id"), eos_ids)
    return out_dir


def parameter_count(spec: Qwen2Spec) -> int:
    """Number of stored parameters a checkpoint with this spec has (lm_head counted once
    more when untied)."""
    d, hd, inter = spec.hidden_size, spec.head_dim, spec.intermediate_size
    q, kv = spec.num_heads * hd, spec.num_kv_heads * hd
    per_layer = (d * q + q) + 2 * (d * kv + kv) + q * d + 3 * d * inter + 2 * d
    embeddings = spec.vocab_size * d * (1 if spec.tie_word_embeddings else 2)
    return embeddings + spec.num_layers * per_layer + d


__all__ = [
    "CONFIG_FILE",
    "INDEX_FILE",
    "PRESETS",
    "Qwen2Spec",
    "WeightReader",
    "parameter_count",
    "preset_config",
    "preset_config_dict",
    "read_spec",
    "spec_from_config",
    "write_random_checkpoint",
    "write_tokenizer",
]
