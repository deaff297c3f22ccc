"""tiny-r1 with a chat template, for the tests of `--chat` and of the API's `messages`.

tiny-r1 is an arithmetic model without a chat template. Its copy here gets a template written
in its own 18-token vocabulary: BOS, a system message and a space, the question, and `<think>`
as the opening of the answer (which is how every tiny-r1 completion starts), so a formatted
question is the plain prompt plus `<think>` and the model still answers it. Assistant turns
are refused through the template's `raise_exception`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from optinfer.models.chat import CHAT_TEMPLATE_FILE, ChatTemplate
from optinfer.models.tiny_r1 import INTEGER_DIR

TINY_CHAT_TEMPLATE = ChatTemplate(
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + ' ' }}"
    "{% elif message['role'] == 'user' %}{{ message['content'] }}"
    "{% else %}{{ raise_exception('tiny-r1 answers one question, it holds no dialogue') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<think>{% endif %}",
    {"bos_token": "<bos>", "eos_token": "<eos>"})
THINK = 3  # tiny-r1's <think>


def tiny_r1_with_chat_template(dest: Path) -> Path:
    """A copy of the committed tiny-r1 in `dest` with TINY_CHAT_TEMPLATE kept as the converter
    keeps a checkpoint's: the file, listed in the manifest (so its model id is another)."""
    shutil.copytree(INTEGER_DIR, dest)
    template = dest / CHAT_TEMPLATE_FILE
    template.write_text(TINY_CHAT_TEMPLATE.to_json(), encoding="utf-8")
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["files"][CHAT_TEMPLATE_FILE] = hashlib.sha256(template.read_bytes()).hexdigest()
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return dest
