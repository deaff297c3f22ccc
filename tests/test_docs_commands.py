"""Every `optinfer ...` command the README and docs/ show is a real command with options it
accepts (each is also run by a test or by the demo; this catches a renamed command or option
the moment it happens)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from tests.test_compose import _optinfer_command

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND = re.compile(r"^\s*(?:[A-Z_]+=\S+\s+)*(?:\S*/)?optinfer (.+?)(?:\s+#.*)?$")


def _commands(path: Path) -> list[list[str]]:
    """The argv of every `optinfer` command line in the document's code (indented blocks and
    fences), continuation lines joined, placeholders in capitals kept as words."""
    commands, pending = [], ""
    in_fence = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
            continue
        if not (in_fence or line.startswith("    ")):
            pending = ""
            continue
        if pending:
            line = pending + " " + line.strip()
            pending = ""
        if line.rstrip().endswith("\\"):
            pending = line.rstrip()[:-1]
            continue
        match = COMMAND.match(line)
        if match:
            words = shlex.split(match.group(1).replace("[", "").replace("]", ""))
            commands.append([w for w in words if not w.startswith("#")])
    return commands


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_documented_commands_exist_with_their_options(document):
    for argv in _commands(document):
        _optinfer_command(argv)


def test_the_readme_shows_the_main_commands():
    shown = {" ".join(argv[:2]) for argv in _commands(ROOT / "README.md")}
    assert {"demo", "chain up", "contracts deploy", "provider run", "challenger run",
            "bench dispute"} <= shown | {argv.split()[0] for argv in shown}
