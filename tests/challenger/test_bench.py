"""`optinfer bench watchtower --json`, run as a user runs it (a small burst; the timing
itself is recorded in docs/performance.md, not asserted)."""

from __future__ import annotations

import json
import subprocess

from optinfer.models.tiny_r1 import INTEGER_DIR
from tests.challenger.conftest import VENV_BIN


def test_bench_watchtower_reports_verification_throughput():
    done = subprocess.run([str(VENV_BIN / "optinfer"), "bench", "watchtower", "--claims", "24",
                           "--prompts", "3", "--batch", "5", "--model", str(INTEGER_DIR),
                           "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert (result["model"], result["verify_batch"]) == ("tiny-r1", 5)
    assert (result["claims"], result["claims_seen"], result["valid"], result["disputed"]) == (
        24, 24, 24, 0)
    assert result["claims_per_s"] > 0
    assert 0 < result["verify_ms_median"] <= result["verify_ms_p95"]


def test_bench_watchtower_refuses_bad_sizes():
    done = subprocess.run([str(VENV_BIN / "optinfer"), "bench", "watchtower", "--claims", "0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "--claims must be >= 1" in done.stderr
    for args, message in ((["--batch", "0"], "--batch must be at least 1"),
                          (["--model", "/nonexistent"], "is not a converted model")):
        done = subprocess.run([str(VENV_BIN / "optinfer"), "bench", "watchtower", *args],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
