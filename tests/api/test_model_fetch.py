"""fetch_model: a watchtower downloads tiny-r1 from a node's API and keeps it only when it is
the model registered on chain (manifest hash, the id the manifest gives, file hashes,
recomputed model root)."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from optinfer.contracts.registry import ModelRegistry, ModelSpec
from optinfer.errors import UserError
from optinfer.models.runtime import IntegerModel
from optinfer.services.deployments import STEPS, deploy_all
from optinfer.services.model_fetch import ModelRejected, fetch_model

from .conftest import TINY_R1, tiny_r1_spec

MODEL_ID = "0x" + tiny_r1_spec().model_id.hex()
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


def serving_any_id(model_dir: Path) -> httpx.Client:
    """A lying node: it answers every model id with `model_dir`'s manifest and files."""
    def handler(request: httpx.Request) -> httpx.Response:
        parts = request.url.path.split("/")  # "", v1, models, id[, files, name]
        name = parts[5] if len(parts) > 5 else "manifest.json"
        return httpx.Response(200, content=(model_dir / name).read_bytes())

    return httpx.Client(transport=httpx.MockTransport(handler))


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


def test_a_manifest_other_than_the_registered_one_is_refused(registry, tmp_path):
    client = serving_any_id(tampered_copy(tmp_path, rehash=True))
    dest = tmp_path / "fetched" / "model"
    with pytest.raises(ModelRejected, match="but the registry holds"):
        fetch_model(BASE, MODEL_ID, dest, registry, client=client)
    assert nothing_left(dest)


def test_files_that_do_not_recompute_the_root_are_refused(make_client, chain, empty_registry,
                                                          tmp_path):
    """Even a registered manifest cannot vouch for weights the root does not commit."""
    tampered = tampered_copy(tmp_path, rehash=True)
    spec = ModelSpec.from_manifest(tampered / "manifest.json")
    empty_registry.register_send(spec, chain.accounts[0])
    client = make_client(model_dir=tampered)
    dest = tmp_path / "fetched" / "model"
    with pytest.raises(ModelRejected, match="recompute to root"):
        fetch_model(BASE, spec.model_id, dest, empty_registry, client=client)
    assert nothing_left(dest)


@pytest.mark.parametrize("changes", [{"eos_token_ids": ()}, {"max_context": 4096}])
def test_a_squatters_registration_with_other_eos_or_context_is_another_model_point5(
        chain, empty_registry, tmp_path, changes):
    """Someone registers tiny-r1's roots and manifest hash first, with other EOS ids or another
    max context: that is another model id, which tiny-r1's manifest does not give, so a node
    serving tiny-r1 under it is refused; tiny-r1 itself still registers and fetches."""
    squatter = replace(tiny_r1_spec(), manifest_uri="https://squatter.example", **changes)
    empty_registry.register_send(squatter, chain.accounts[1])
    lying_node = serving_any_id(TINY_R1)
    dest = tmp_path / "fetched" / "model"
    with pytest.raises(ModelRejected, match="gives model id 0x[0-9a-f]{64} .*: it is not the "
                                            "manifest of that model"):
        fetch_model(BASE, squatter.model_id, dest, empty_registry, client=lying_node)
    assert nothing_left(dest)
    with pytest.raises(ModelRejected, match="not registered"):
        fetch_model(BASE, MODEL_ID, dest, empty_registry, client=lying_node)

    empty_registry.register_send(tiny_r1_spec(), chain.accounts[0])
    assert fetch_model(BASE, MODEL_ID, dest, empty_registry, client=lying_node) == dest


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
