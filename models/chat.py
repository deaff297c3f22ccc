"""Chat templates: the prompt layout an instruct or reasoning model was trained on.

An instruct model answers well only when its prompt is laid out the way its training
conversations were: role markers, special tokens, the opening of the assistant's turn. A
checkpoint ships that layout as a Jinja template (a Hugging Face directory in
`tokenizer_config.json` or `chat_template.jinja`, a GGUF file in `tokenizer.chat_template`).
The converter keeps it in the integer model directory as `chat_template.json`, with the special
tokens the template names (`write_chat_template`); the manifest lists the file like
`tokenizer.json`, so the model id binds it and `optinfer model fetch` carries it.

Formatting follows transformers' `apply_chat_template(messages, add_generation_prompt=True,
tokenize=True)`: the same sandboxed Jinja environment (trim_blocks, lstrip_blocks, loop
controls, `raise_exception`, `strftime_now`, a `tojson` that leaves HTML alone), the special
tokens as variables (`bos_token`, `eos_token`, ...), and the rendered text encoded without the
tokenizer's own special tokens, since the template writes them itself. The chain never sees a
template: a request carries the formatted token ids.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optinfer.errors import UserError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from optinfer.models.runtime import IntegerModel

CHAT_TEMPLATE_FILE = "chat_template.json"
ROLES = ("system", "user", "assistant")
# The special tokens a template sees as variables, as transformers passes a GGUF's (and the
# ones a Hugging Face tokenizer_config.json names for language models).
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


@dataclass(frozen=True)
class ChatTemplate:
    """A model's chat template and the special tokens it refers to (name -> token text)."""

    template: str
    special_tokens: dict[str, str] = field(default_factory=dict)

    def render(self, messages: Sequence[dict[str, str]]) -> str:
        """The conversation as the model's prompt text, ending with the assistant's opening.
        UserError when the template refuses it (its `raise_exception`)."""
        import jinja2

        messages = check_messages(messages)
        try:
            return _compile(self.template).render(
                messages=messages, tools=None, documents=None, add_generation_prompt=True,
                **self.special_tokens)
        except jinja2.TemplateError as err:
            raise UserError(f"the model's chat template refuses the conversation: {err}"
                            ) from None

    def encode(self, tokenizer: Tokenizer, messages: Sequence[dict[str, str]]) -> list[int]:
        """The token ids of the rendered conversation; the tokenizer adds nothing of its own
        (no BOS: a template that wants one writes it)."""
        text = self.render(messages)
        try:
            ids = tokenizer.encode(text, add_special_tokens=False).ids
        except Exception as err:  # tokenizers raises a bare Exception for unknown characters
            raise UserError(f"the model's tokenizer cannot encode the conversation: {err}"
                            ) from None
        if not ids:
            raise UserError("the chat template renders the conversation to no tokens")
        return ids

    def to_json(self) -> str:
        """The `chat_template.json` text: stable (sorted keys), since the manifest hashes it."""
        return json.dumps({"chat_template": self.template,
                           "special_tokens": dict(sorted(self.special_tokens.items()))},
                          indent=2, ensure_ascii=False, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, what: str) -> ChatTemplate:
        try:
            data = json.loads(text)
            template, special = data["chat_template"], data.get("special_tokens", {})
        except (ValueError, KeyError, TypeError) as err:
            raise UserError(f"{what} is not a chat template file ({err})") from None
        if not isinstance(template, str) or not isinstance(special, dict) or not all(
                isinstance(v, str) for v in special.values()):
            raise UserError(f"{what}: chat_template must be text and special_tokens an object "
                            "of texts")
        return cls(template, dict(special))


# --------------------------------------------------------------------------- messages


def conversation(prompt: str, system: str | None = None) -> list[dict[str, str]]:
    """`prompt` as one user message, after a system message when `system` is given."""
    messages = [] if system is None else [{"role": "system", "content": system}]
    return [*messages, {"role": "user", "content": prompt}]


def check_messages(messages: Any) -> list[dict[str, str]]:
    """`messages` as a list of {role, content}; UserError naming the first wrong message."""
    if not isinstance(messages, list | tuple) or not messages:
        raise UserError("the conversation holds no messages: give at least one "
                        "{role, content} message")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise UserError(f"message {i} must have exactly the keys role and content, got "
                            f"{message!r}")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise UserError(f"message {i}: role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise UserError(f"message {i}: content must be text, got {type(content).__name__}")
        checked.append({"role": role, "content": content})
    return checked


def chat_tokens(model: IntegerModel, messages: Sequence[dict[str, str]]) -> list[int]:
    """The prompt token ids of `messages` formatted with `model`'s chat template."""
    ids = load_chat_template(model.dir).encode(model.tokenizer, messages)
    model.check_tokens(ids, "the formatted conversation")
    return ids


# ---------------------------------------------------------------------- model directory


def load_chat_template(model_dir: Path) -> ChatTemplate:
    """The chat template kept in a converted model directory; UserError when it has none."""
    path = Path(model_dir) / CHAT_TEMPLATE_FILE
    if not path.is_file():
        raise UserError(f"the model in {model_dir} has no chat template ({CHAT_TEMPLATE_FILE}): "
                        "its checkpoint had none, or it was converted before optinfer kept "
                        "them; give the prompt as plain text, or convert the model again")
    return ChatTemplate.from_json(path.read_text(encoding="utf-8"), str(path))


def write_chat_template(source: Path, out_dir: Path) -> Path | None:
    """Keep the chat template of `source` (a Hugging Face checkpoint directory or a GGUF file)
    in `out_dir` as `chat_template.json`; None (nothing written) when it has none. A template
    that does not compile stops here, not at a user's first chat request."""
    template = read_chat_template(source)
    if template is None:
        return None
    _compile_or_refuse(template.template, str(source))
    path = Path(out_dir) / CHAT_TEMPLATE_FILE
    path.write_text(template.to_json(), encoding="utf-8")
    return path


def read_chat_template(source: Path) -> ChatTemplate | None:
    """The chat template of a Hugging Face checkpoint directory or a GGUF file, None when it
    has none."""
    from optinfer.models import gguf_import

    source = Path(source)
    if source.is_file() or source.suffix.lower() == ".gguf":
        template, special = gguf_import.chat_template_fields(source)
        return None if template is None else ChatTemplate(template, special)
    return _from_checkpoint_dir(source)


def _from_checkpoint_dir(directory: Path) -> ChatTemplate | None:
    """transformers' reading: `chat_template.jinja` first, else `tokenizer_config.json`'s
    `chat_template` (text, or a list of named templates whose "default" is taken); the special
    tokens from `tokenizer_config.json`, overridden by `special_tokens_map.json`."""
    config = _read_json(directory / "tokenizer_config.json")
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    else:
        template = config.get("chat_template")
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            if "default" not in named:
                raise UserError(f"{directory / 'tokenizer_config.json'}: of the chat templates "
                                f"{sorted(map(str, named))} none is named 'default'")
            template = named["default"]
    if template is None:
        return None
    if not isinstance(template, str):
        raise UserError(f"{directory / 'tokenizer_config.json'}: chat_template must be text")
    special_map = _read_json(directory / "special_tokens_map.json")
    special = {}
    for name in SPECIAL_TOKENS:
        value = special_map.get(name, config.get(name))
        if isinstance(value, dict):  # an AddedToken: {"content": ..., "lstrip": ..., ...}
            value = value.get("content")
        if isinstance(value, str):
            special[name] = value
    return ChatTemplate(template, special)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise UserError(f"{path} is not valid JSON: {err}") from None
    return data if isinstance(data, dict) else {}


# ------------------------------------------------------------------------------ jinja


def _compile_or_refuse(template: str, what: str) -> None:
    import jinja2

    try:
        _compile(template)
    except jinja2.TemplateError as err:
        raise UserError(f"{what}: its chat template does not compile: {err}") from None


@lru_cache(maxsize=8)
def _compile(template: str):
    """The template in transformers' environment (`_cached_compile_jinja_template`): sandboxed
    and immutable, since a template comes with a model and may come from anyone."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}`: transformers marks the assistant's tokens
        with it (for training masks); for a prompt it renders its body as it stands."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body
                                          ).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        """jinja's `namespace()`, refusing attributes that start with an underscore."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            for name in dict(*args, **kwargs):
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, *args, **kwargs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"a chat template may not set {name!r} on a namespace")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    env.globals["namespace"] = Namespace
    return env.from_string(template)


__all__ = [
    "CHAT_TEMPLATE_FILE",
    "ROLES",
    "ChatTemplate",
    "chat_tokens",
    "check_messages",
    "conversation",
    "load_chat_template",
    "read_chat_template",
    "write_chat_template",
]
