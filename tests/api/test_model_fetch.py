"""fetch_model: a watchtower downloads tiny-r1 from a node's API and keeps it only when it is
the model registered on chain (manifest hash, file hashes, recomputed model root)."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from optinfer.contracts.registry import ModelRegistry, ModelSpec
from optinfer.errors import UserError
from optinfer.models.runtime import IntegerModel
from optinfer.services.deployments import STEPS, deploy_all
from optinfer.services.model_fetch import ModelRejected, fetch_model

from .conftest import TINY_R1, tiny_r1_spec

MODEL_ID = json.loads((TINY_R1 / "manifest.json").read_text())["model_root"]
BASE = "http://testserver"


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """Downloads do not depend on the database: SQLite only (the API tests run both)."""
    return f"sqlite:///{tmp_path / 'node.db'}"


@pytest.fixture
def registry(w3, deployment) -> ModelRegistry:
    """The deployment's registry, tiny-r1 registered."""
    return ModelRegistry(w3, deployment.address("ModelRegistry"))


@pytest.fixture
def empty_registry(chain, w3) -> ModelRegistry:
    """A second registry with nothing registered."""
    deployed = deploy_all(w3, chain.accounts[0], steps=STEPS[:1])
    return ModelRegistry(w3, deployed.address("ModelRegistry"))


def tampered_copy(tmp_path: Path, *, rehash: bool) -> Path:
    """tiny-r1 with one byte of its weights changed; `rehash`: the manifest lists the new
    file hash (so only the registry's manifest hash or the model root can tell)."""
    copy = tmp_path / "tampered"
    shutil.copytree(TINY_R1, copy)
    weights = bytearray((copy / "weights.bin").read_bytes())
    weights[len(weights) // 2] ^= 0x01
    (copy / "weights.bin").write_bytes(bytes(weights))
    if rehash:
        manifest = json.loads((copy / "manifest.json").read_text())
        manifest["files"]["weights.bin"] = hashlib.sha256(weights).hexdigest()
        (copy / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return copy


def nothing_left(dest: Path) -> bool:
    """Neither `dest` nor a staging directory beside it."""
    return not dest.exists() and list(dest.parent.iterdir()) == []


def test_round_trip_gives_a_model_that_answers_the_same(make_client, registry, tmp_path):
    client = make_client()
    dest = tmp_path / "fetched" / "tiny-r1"
    assert fetch_model(BASE, MODEL_ID, dest, registry, client=client) == dest
    for name in ("manifest.json", "model.onnx", "decode.onnx", "weights.bin",
                 "tokenizer.json"):
        assert (dest / name).read_bytes() == (TINY_R1 / name).read_bytes(), name
    assert sorted(p.name for p in dest.parent.iterdir()) == ["tiny-r1"]  # no staging left
    prompt = [1, 6, 7, 15, 8, 9, 16]
    assert IntegerModel(dest).generate(prompt, 20) == IntegerModel(TINY_R1).generate(prompt, 20)


def test_a_tampered_file_is_refused(make_client, registry, tmp_path):
    client = make_client(model_dir=tampered_copy(tmp_path, rehash=False))
    dest = tmp_path / "fetched" / "model"
    with pytest.raises(ModelRejected, match="weights.bin hashes to"):
        fetch_model(BASE, MODEL_ID, dest, registry, client=client)
    assert nothing_left(dest)


def test_a_manifest_other_than_the_registered_one_is_refused(make_client, registry, tmp_path):
    client = make_client(model_dir=tampered_copy(tmp_path, rehash=True))
    dest = tmp_path / "fetched" / "model"
    with pytest.raises(ModelRejected, match="but the registry holds"):
        fetch_model(BASE, MODEL_ID, dest, registry, client=client)
    assert nothing_left(dest)


def test_files_that_do_not_recompute_the_root_are_refused(make_client, chain, empty_registry,
                                                          tmp_path):
    """Even a registered manifest cannot vouch for weights the root does not commit."""
    tampered = tampered_copy(tmp_path, rehash=True)
    empty_registry.register_send(ModelSpec.from_manifest(tampered / "manifest.json"),
                                 chain.accounts[0])
    client = make_client(model_dir=tampered)
    dest = tmp_path / "fetched" / "model"
    with pytest.raises(ModelRejected, match="recompute to root"):
        fetch_model(BASE, MODEL_ID, dest, empty_registry, client=client)
    assert nothing_left(dest)


@pytest.mark.parametrize("changes", [{"eos_token_ids": ()}, {"max_context": 4096}])
def test_a_registration_whose_context_or_eos_ids_are_not_the_manifest_s_is_refused(
        make_client, chain, empty_registry, tmp_path, changes):
    """Neither is part of the root: someone registering the genuine root first could set them
    to other values, and the coordinator would judge requests and answers by those."""
    spec = replace(ModelSpec.from_manifest(TINY_R1 / "manifest.json"), **changes)
    empty_registry.register_send(spec, chain.accounts[0])
    dest = tmp_path / "fetched" / "model"
    with pytest.raises(ModelRejected, match="is registered with max context .* but its "
                                            "manifest says"):
        fetch_model(BASE, MODEL_ID, dest, empty_registry, client=make_client())
    assert nothing_left(dest)


def test_an_unregistered_model_is_refused(make_client, empty_registry, tmp_path):
    dest = tmp_path / "fetched" / "model"
    with pytest.raises(ModelRejected, match="not registered"):
        fetch_model(BASE, MODEL_ID, dest, empty_registry, client=make_client())
    assert nothing_left(dest)


def test_a_model_the_node_does_not_serve(make_client, registry, tmp_path):
    other = "0x" + "ab" * 32
    with pytest.raises(UserError, match="HTTP 404 this node does not serve"):
        fetch_model(BASE, other, tmp_path / "x", registry, client=make_client())
    with pytest.raises(UserError, match="0x \\+ 64 hex digits"):
        fetch_model(BASE, "0x1234", tmp_path / "x", registry, client=make_client())
    (tmp_path / "exists").mkdir()
    with pytest.raises(UserError, match="already exists"):
        fetch_model(BASE, MODEL_ID, tmp_path / "exists", registry, client=make_client())


def test_registered_spec_is_the_committed_manifest():
    # The deployment fixture registers this spec: the manifest hash fetch_model checks.
    spec = tiny_r1_spec()
    assert spec.manifest_hash == hashlib.sha256((TINY_R1 / "manifest.json").read_bytes()).digest()
