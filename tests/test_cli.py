"""The `optinfer` command line, run as a user runs it: a subprocess, JSON on stdout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from optinfer.models.tiny_r1 import INTEGER_DIR
from tests.chat_models import THINK, tiny_r1_with_chat_template

OPTINFER = str(Path(sys.executable).parent / "optinfer")


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([OPTINFER, *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def cli_json(*args: str) -> dict:
    proc = cli(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def claim(random_model) -> tuple[str, list[int]]:
    """A prompt and the output the model really produces for it."""
    from optinfer.models.runtime import IntegerModel

    prompt = [4, 8, 15, 16, 23, 42]
    return ",".join(map(str, prompt)), IntegerModel(random_model).generate(prompt, 8)


def test_verify_accepts_the_real_output_and_rejects_a_forgery(random_model, claim):
    prompt, output = claim
    ok = cli_json("verify", "--model", random_model, "--prompt-tokens", prompt,
                  "--output-tokens", ",".join(map(str, output)))
    assert ok["valid"] is True and ok["first_mismatch"] is None
    forged = list(output)
    forged[-1] = (forged[-1] + 1) % 96
    bad = cli_json("verify", "--model", random_model, "--prompt-tokens", prompt,
                   "--output-tokens", ",".join(map(str, forged)))
    assert bad == {"valid": False, "first_mismatch": len(output) - 1, "reason": bad["reason"]}
    # Without --json an invalid claim is the exit status too (typer's Exit code reaches it).
    plain = cli("verify", "--model", random_model, "--prompt-tokens", prompt,
                "--output-tokens", ",".join(map(str, forged)))
    assert plain.returncode == 1 and "INVALID" in plain.stdout


def test_trace_root_is_the_same_with_one_and_two_threads(random_model, claim):
    prompt, output = claim
    args = ("trace", "--model", random_model, "--prompt-tokens", prompt, "--output-tokens",
            ",".join(map(str, output)))
    one, two = cli_json(*args, "--threads", "1"), cli_json(*args, "--threads", "2")
    manifest = json.loads((random_model / "manifest.json").read_text())
    assert one == two
    assert one["nodes"] == manifest["nodes"]
    assert one["state_root"].startswith("0x") and len(one["state_root"]) == 66


def test_inspect_reports_the_manifest_figures(random_model):
    info = cli_json("model", "inspect", random_model)
    manifest = json.loads((random_model / "manifest.json").read_text())
    assert info["model_root"] == manifest["model_root"]
    # The id a request names: the registry's hash of the root and the manifest's other fields.
    from optinfer.contracts.registry import ModelSpec

    spec = ModelSpec.from_manifest(random_model / "manifest.json")
    assert info["model_id"] == "0x" + spec.model_id.hex() != info["model_root"]
    assert info["float_tensors"] == 0
    assert info["nodes"] == sum(info["ops"].values())
    assert 0 < info["max_fan_in_bytes"] <= 32 * 1024
    assert (info["linear_input_bits"], info["weight_bits"]) == (8, 7)  # the default graph


@pytest.mark.parametrize("args, message", [
    (("verify", "--prompt-tokens", "1,2", "--output-tokens", "3", "--model", "/nonexistent"),
     "does not exist"),
    (("verify", "--prompt-tokens", "1,x", "--output-tokens", "3"), "comma-separated"),
    (("model", "convert", "/nonexistent", "-o", "/tmp/never-written"), "not found"),
    (("generate", "--prompt", "hello 2+2="), "cannot encode the prompt"),
    (("generate", "--prompt", "1+1=", "--max-tokens", "0"), "max tokens must be >= 1"),
    (("generate", "--prompt", "1+1=", "--chat"), "has no chat template"),
    (("generate", "--prompt", "1+1=", "--system", "9"), "--system needs --chat"),
])
def test_user_mistakes_give_one_line_and_a_nonzero_exit(args, message):
    proc = cli(*args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    """tiny-r1 with a chat template of its vocabulary (tests/chat_models.py)."""
    return tiny_r1_with_chat_template(tmp_path_factory.mktemp("chat") / "tiny-r1-chat")


def test_generate_chat_formats_the_prompt_with_the_models_template(chat_model):
    plain = cli_json("generate", "--model", chat_model, "--prompt", "12+34=")
    chat = cli_json("generate", "--model", chat_model, "--prompt", "12+34=", "--chat",
                    "--max-tokens", "40")
    # The template's layout: BOS, the question, <think> opening the answer.
    assert chat["prompt_tokens"] == plain["prompt_tokens"] + [THINK]
    assert chat["text"] == "2+4+0=06 1+3+0=04</think>46"
    system = cli_json("generate", "--model", chat_model, "--prompt", "12+34=", "--chat",
                      "--system", "9", "--max-tokens", "1")
    assert system["prompt_tokens"] == [1, 14, 17, *plain["prompt_tokens"][1:], THINK]
    bad = cli("generate", "--model", chat_model, "--prompt", "hello", "--chat")
    assert bad.returncode == 2 and "cannot encode the conversation" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_a_corrupt_manifest_is_a_user_error(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    proc = cli("model", "inspect", tmp_path)
    assert proc.returncode == 2 and "not a valid optinfer manifest" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_model_of_another_op_set_version_is_refused_with_the_remedy(tmp_path):
    manifest = json.loads((INTEGER_DIR / "manifest.json").read_text())
    manifest["opset_version"] = 1  # converted before int32 indices
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    proc = cli("generate", "--model", tmp_path, "--prompt", "1+1=")
    assert proc.returncode == 2 and "op-set version 1" in proc.stderr
    assert "convert the model again" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_tokens_and_long_prompts_are_refused(random_model):
    out_of_vocab = cli("verify", "--model", random_model, "--prompt-tokens", "1,96",
                       "--output-tokens", "3")
    assert out_of_vocab.returncode == 2 and "outside the vocabulary" in out_of_vocab.stderr
    long_prompt = ",".join(["1"] * 200)
    too_long = cli("verify", "--model", random_model, "--prompt-tokens", long_prompt,
                   "--output-tokens", "3")
    assert too_long.returncode == 2 and "context" in too_long.stderr
    assert "Traceback" not in out_of_vocab.stderr + too_long.stderr


def test_random_r1_writes_the_exact_r1_shape_and_converts_it(tmp_path):
    """One layer at full width: the R1-Distill vocabulary, heads and widths go through the
    converter and the runtime (the 28-layer run is the benchmark's)."""
    out = tmp_path / "r1"
    result = cli_json("model", "random-r1", "-o", out, "--layers", "1", "--max-context", "64")
    config = json.loads((out / "checkpoint" / "config.json").read_text())
    assert (config["hidden_size"], config["intermediate_size"], config["vocab_size"]) == (
        1536, 8960, 151936)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (12, 2)
    assert config["num_hidden_layers"] == 1 and config["rope_theta"] == 10000
    info = cli_json("model", "inspect", out / "integer")
    assert info["model_root"] == result["model_root"]
    assert info["float_tensors"] == 0 and info["max_fan_in_bytes"] == 2 * 8960 + 1
    assert info["ops"]["ArgMax"] == 2  # the vocabulary argmax is a two-level tree
    from optinfer.models.runtime import IntegerModel

    model = IntegerModel(out / "integer", threads=2)
    tokens = model.generate([151643, 40, 1000, 99999], 3, stop_at_eos=False)
    assert model.verify([151643, 40, 1000, 99999], tokens).valid


def test_train_tiny_writes_a_checkpoint_that_converts(tmp_path):
    """A few seconds of training through the CLI: the checkpoint is real and converts."""
    metrics = cli_json("model", "train-tiny", "-o", tmp_path / "float", "--minutes", "0.03",
                       "--eval-problems", "5")
    assert metrics["steps"] >= 1 and metrics["eval"]["problems"] == 5
    assert (tmp_path / "float" / "model.safetensors").is_file()
    from optinfer.models.tiny_r1 import CALIBRATION_FILE

    summary = cli_json("model", "convert", tmp_path / "float", "-o", tmp_path / "int",
                       "--calibration", CALIBRATION_FILE)
    assert summary["float_tensors"] == 0 and summary["nodes"] > 0


def _command_paths() -> list[tuple[str, ...]]:
    """Every leaf command of `optinfer`, as its words."""
    import typer

    from optinfer.services.cli import app

    paths = []

    def walk(command, path: tuple[str, ...]) -> None:
        children = getattr(command, "commands", None)
        if not children:
            paths.append(path)
            return
        for name, child in children.items():
            walk(child, (*path, name))

    walk(typer.main.get_command(app), ())
    return sorted(paths)


def test_issue20_point12_every_command_answers_a_usage_mistake_without_a_traceback(
        monkeypatch, capsys):
    """An unknown option, an unknown subcommand and a value of the wrong type, for every
    command: typer's usage line and one error line on stderr, exit status 2, no traceback
    (typer carries its own copy of click, whose exceptions the CLI used to let through)."""
    from optinfer.services import cli as module

    paths = _command_paths()
    assert ("provider", "run") in paths and ("bench", "rpc") in paths and len(paths) > 20

    def run(*argv: str) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", ["optinfer", *argv])
        with pytest.raises(SystemExit) as exited:
            module.main()
        return exited.value.code, capsys.readouterr().err

    for path in paths:
        code, stderr = run(*path, "--no-such-option")
        assert code == 2, (path, stderr)
        assert "No such option: --no-such-option" in stderr, (path, stderr)
        assert "Traceback" not in stderr and "╭" not in stderr, (path, stderr)
    code, stderr = run("provider", "no-such-command")
    assert (code, "No such command 'no-such-command'" in stderr) == (2, True)
    code, stderr = run("generate", "--max-tokens", "many", "--prompt", "1+1=")
    assert code == 2 and "Invalid value for '--max-tokens'" in stderr
    assert "Traceback" not in stderr and "╭" not in stderr
