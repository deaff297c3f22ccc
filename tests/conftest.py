"""Shared fixtures: small random checkpoints and their converted integer models, made once."""

from __future__ import annotations

from pathlib import Path

import pytest

from optinfer.models.checkpoint import write_random_checkpoint
from optinfer.models.converter import convert

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
