"""The committed integer tiny-r1: intact, faithful to its float checkpoint, usable from the CLI."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from optinfer.models.fidelity import measure_fidelity
from optinfer.models.runtime import IntegerModel
from optinfer.models.tiny_r1 import (
    CALIBRATION_FILE,
    FLOAT_DIR,
    INTEGER_DIR,
    SAMPLING_DIR,
    held_out_problems,
)

OPTINFER = str(Path(sys.executable).parent / "optinfer")


@pytest.mark.parametrize("directory", [INTEGER_DIR, SAMPLING_DIR])
def test_committed_files_match_their_manifest(directory):
    manifest = json.loads((directory / "manifest.json").read_text())
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((directory / name).read_bytes()).hexdigest() == digest, name
    assert manifest["float_tensors"] == 0
    assert manifest.get("sampling", False) is (directory == SAMPLING_DIR)


def test_the_committed_sampling_model_is_the_greedy_one_converted_with_sampling(tmp_path):
    """integer-sampling is the float checkpoint converted with --sampling on the same
    calibration: the same calibrated ranges as the greedy model, and at temperature 0 the
    same answers. Converting again here gives both committed roots, where this machine's
    greedy conversion gives the greedy one (calibration runs float passes, which another CPU
    may round otherwise; docs/models.md)."""
    from optinfer.models.converter import convert

    greedy, sampler = IntegerModel(INTEGER_DIR), IntegerModel(SAMPLING_DIR)
    assert sampler.manifest["calibration"] == greedy.manifest["calibration"]
    for problem in held_out_problems(5, seed=3):
        prompt = greedy.encode(problem.prompt)
        assert sampler.generate(prompt, 48) == greedy.generate(prompt, 48)
    fresh = {}
    for name, sampling in (("greedy", False), ("sampling", True)):
        fresh[name] = convert(FLOAT_DIR, tmp_path / name, CALIBRATION_FILE,
                              sampling=sampling)["model_root"]
    if fresh["greedy"] != greedy.manifest["model_root"]:
        pytest.skip("this CPU's conversion of tiny-r1 differs from the committed one")
    assert fresh["sampling"] == sampler.manifest["model_root"]


def test_integer_accuracy_is_within_two_points_of_float():
    result = measure_fidelity(FLOAT_DIR, INTEGER_DIR, problems=100, seed=1)
    assert result["float_accuracy"] >= 0.9
    assert result["accuracy_gap_points"] <= 2.0
    assert result["token_agreement"] >= 0.98


def test_generate_answers_a_question_and_the_answer_verifies():
    problem = held_out_problems(1, seed=7)[0]
    proc = subprocess.run([OPTINFER, "generate", "--prompt", problem.prompt, "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["text"] == problem.completion
    verdict = subprocess.run(
        [OPTINFER, "verify", "--prompt-tokens", ",".join(map(str, result["prompt_tokens"])),
         "--output-tokens", ",".join(map(str, result["tokens"])), "--max-tokens", "48",
         "--json"], capture_output=True, text=True, timeout=120)
    assert json.loads(verdict.stdout) == {"valid": True, "first_mismatch": None, "reason": "ok"}


@pytest.mark.parametrize("threads", [1, 2])
def test_model_demo_passes_every_check(threads):
    proc = subprocess.run([OPTINFER, "model", "demo", "--threads", str(threads), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["ok"] and result["correct"] and result["valid"] and result["forged_rejected"]
    assert result["model_root"] == IntegerModel(INTEGER_DIR).manifest["model_root"]
