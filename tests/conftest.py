"""Shared fixtures: small random checkpoints and their converted integer models, made once;
and the suite's Hypothesis profiles (tests/profiles.py)."""

from __future__ import annotations

import os
from pathlib import Path

# Under xdist two workers share the machine's cores: torch's OpenMP pool, sized to every core
# in each worker (and in the processes they start), spins against the other's. The float
# model's tests ran 5x slower beside one another than alone (107 s against 20 s, measured on
# 2 cores); with one thread each, 17 s side by side. ONNX Runtime's pools are set per session
# and not touched by this. Set before torch is imported, which the imports below do.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from optinfer.models.checkpoint import write_random_checkpoint  # noqa: E402
from optinfer.models.converter import convert  # noqa: E402
from tests import profiles  # noqa: E402

# Hypothesis profiles (tests/profiles.py): `ci`, derandomized so that a red run reproduces, and
# `deep`, many more examples on fresh seeds. Loaded here, before any test module is imported:
# `ci` unless OPTINFER_HYPOTHESIS_PROFILE names another; `--hypothesis-profile=NAME` is applied
# after this and wins.
_COMMON = dict(deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=profiles.CI_EXAMPLES, derandomize=True,
                          database=None, **_COMMON)
settings.register_profile("deep", max_examples=profiles.CI_EXAMPLES * profiles.DEEP_FACTOR,
                          derandomize=False, **_COMMON)
settings.load_profile(os.environ.get(profiles.PROFILE_VARIABLE, "ci"))

TINY_CONTEXT = 96


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory) -> Path:
    """A random Qwen2 checkpoint: GQA, q/k/v biases, untied embeddings, bf16 weights."""
    path = tmp_path_factory.mktemp("ckpt") / "random-tiny"
    write_random_checkpoint(path, preset="tiny", seed=7)
    return path


@pytest.fixture(scope="session")
def random_model(random_checkpoint, tmp_path_factory) -> Path:
    """The integer conversion of `random_checkpoint`."""
    out = tmp_path_factory.mktemp("int") / "model"
    convert(random_checkpoint, out, max_context=TINY_CONTEXT)
    return out
