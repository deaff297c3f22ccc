"""ModelRegistry on a real anvil: registration, immutability, validation, events, tiny-r1."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
from eth_utils import keccak

from optinfer.contracts.bindings import ContractRevert, reverts_decoded
from optinfer.contracts.registry import ModelSpec
from optinfer.errors import UserError
from optinfer.models import opset

TINY_R1_MANIFEST = (
    Path(__file__).resolve().parents[2] / "models" / "tiny-r1" / "integer" / "manifest.json"
)

SPEC = ModelSpec(
    nodes_root=bytes(range(1, 33)),
    constants_root=bytes(range(33, 65)),
    opset_version=2,
    manifest_hash=hashlib.sha256(b"manifest").digest(),
    manifest_uri="https://example.org/models/m/manifest.json",
    max_context=4096,
    node_count=123_456,
    eos_token_ids=(151_643, 2),
)


def expect_revert(action, error_signature: str) -> ContractRevert:
    """Run `action`, require a revert whose selector is `error_signature`'s; return it."""
    with pytest.raises(ContractRevert) as caught:
        action()
    err = caught.value
    assert err.data[:4] == keccak(text=error_signature)[:4], err.data.hex()
    assert err.name == error_signature.split("(")[0]
    return err


def test_register_newModel_succeeds_andReadsBackEveryField(registry, chain):
    sender = chain.accounts[1]
    receipt = registry.register_send(SPEC, sender)
    block = registry.w3.eth.get_block(receipt["blockNumber"])

    model = registry.get_model(SPEC.model_root)
    assert model.model_id == SPEC.model_root
    assert model.spec == SPEC
    assert model.registrant == sender.address
    assert model.registered_at == block["timestamp"] > 0
    assert registry.is_registered(SPEC.model_root)


def test_register_call_returnsModelRootAsId_withoutRegistering(registry, chain):
    assert registry.register_call(SPEC, chain.accounts[0].address) == SPEC.model_root
    # A dry run changes nothing.
    assert not registry.is_registered(SPEC.model_root)


def test_register_duplicateRoot_reverts(registry, chain):
    registry.register_send(SPEC, chain.accounts[0])
    other = replace(SPEC, manifest_uri="ipfs://other", max_context=7)

    err = expect_revert(
        lambda: registry.register_send(other, chain.accounts[1]), "ModelAlreadyRegistered(bytes32)"
    )
    assert err.args_decoded == (SPEC.model_root,)
    expect_revert(
        lambda: registry.register_call(other, chain.accounts[1].address),
        "ModelAlreadyRegistered(bytes32)",
    )
    # The first registration stands untouched.
    model = registry.get_model(SPEC.model_root)
    assert model.spec == SPEC
    assert model.registrant == chain.accounts[0].address


def test_register_theIdIsComputed_soARootCannotBePairedWithAnotherNodeCount(registry, chain):
    """The registry computes the id from the two roots, the op set and the node count: a
    registration that claims the same roots with another node count gets another id, and
    the model's own id keeps the values its root commits to (the ones a challenge checks)."""
    registry.register_send(SPEC, chain.accounts[0])
    other = replace(SPEC, node_count=SPEC.node_count + 1)
    assert other.model_root != SPEC.model_root
    receipt = registry.register_send(other, chain.accounts[1])
    assert registry.registered_events(receipt)[0]["modelRoot"] == other.model_root
    assert registry.get_model(SPEC.model_root).spec.node_count == SPEC.node_count
    assert registry.get_model(other.model_root).spec.node_count == SPEC.node_count + 1
    assert SPEC.model_root == hashlib.sha256(
        SPEC.nodes_root + SPEC.constants_root + SPEC.opset_version.to_bytes(4, "big")
        + SPEC.node_count.to_bytes(4, "big")).digest()


def test_register_zeroNodeCount_reverts(registry, chain):
    spec = replace(SPEC, node_count=0)
    expect_revert(lambda: registry.register_send(spec, chain.accounts[0]), "ZeroNodeCount()")
    assert not registry.is_registered(SPEC.model_root)


def test_register_zeroMaxContext_reverts(registry, chain):
    spec = replace(SPEC, max_context=0)
    expect_revert(lambda: registry.register_send(spec, chain.accounts[0]), "ZeroMaxContext()")
    assert not registry.is_registered(SPEC.model_root)


def test_register_otherOpsetVersion_reverts(registry, chain):
    # The one-step verifier recomputes version 2 alone: a version-1 graph (int64 indices only)
    # would be judged by rules it was not written in.
    for version in (1, 3):
        spec = replace(SPEC, opset_version=version)
        err = expect_revert(lambda spec=spec: registry.register_send(spec, chain.accounts[0]),
                            "UnsupportedOpsetVersion(uint32,uint32)")
        assert err.args_decoded == (version, 2)
        assert not registry.is_registered(spec.model_root)
    assert registry.contract.functions.OPSET_VERSION().call() == opset.OPSET_VERSION == 2


def test_getModel_unknownId_reverts(registry):
    err = expect_revert(
        lambda: registry.get_model(b"\xaa" * 32), "ModelNotRegistered(bytes32)"
    )
    assert err.args_decoded == (b"\xaa" * 32,)


def test_disputeCommitments_areTheRootsTheIdWasComputedFrom(registry, chain):
    registry.register_send(SPEC, chain.accounts[0])
    view = registry.contract.functions.disputeCommitments(SPEC.model_root)
    assert view.call() == [SPEC.nodes_root, SPEC.constants_root, SPEC.node_count]
    unknown = registry.contract.functions.disputeCommitments(b"\xaa" * 32)
    expect_revert(lambda: reverts_decoded(registry.artifact, unknown.call),
                  "ModelNotRegistered(bytes32)")


def test_register_emitsModelRegistered_withTheRightArgs(registry, chain):
    sender = chain.accounts[2]
    receipt = registry.register_send(SPEC, sender)

    # The raw log: the event signature and the two indexed fields are topics.
    (log,) = receipt["logs"]
    assert log["address"] == registry.address
    signature = ("ModelRegistered(bytes32,address,bytes32,bytes32,uint32,bytes32,string,uint32,"
                 "uint32,uint32[])")
    assert log["topics"][0] == keccak(text=signature)
    assert log["topics"][1] == SPEC.model_root
    assert log["topics"][2] == bytes(12) + bytes.fromhex(sender.address[2:])

    assert registry.registered_events(receipt) == [
        {
            "modelRoot": SPEC.model_root,
            "registrant": sender.address,
            "nodesRoot": SPEC.nodes_root,
            "constantsRoot": SPEC.constants_root,
            "opsetVersion": SPEC.opset_version,
            "manifestHash": SPEC.manifest_hash,
            "manifestUri": SPEC.manifest_uri,
            "maxContext": SPEC.max_context,
            "nodeCount": SPEC.node_count,
            "eosTokenIds": list(SPEC.eos_token_ids),
        }
    ]


def test_register_tinyR1Manifest_succeeds(registry, chain):
    manifest = json.loads(TINY_R1_MANIFEST.read_text())
    spec = ModelSpec.from_manifest(TINY_R1_MANIFEST, manifest_uri="optinfer:models/tiny-r1")
    assert spec.model_root.hex() == manifest["model_root"].removeprefix("0x")
    assert spec.manifest_hash == hashlib.sha256(TINY_R1_MANIFEST.read_bytes()).digest()

    receipt = registry.register_send(spec, chain.accounts[0])
    # Six storage slots (the two roots among them), a short URI and the EOS ids (two slots):
    # once per model.
    assert receipt["gasUsed"] < 250_000

    model = registry.get_model(spec.model_root)
    assert model.spec.opset_version == manifest["opset_version"]
    assert model.spec.node_count == manifest["nodes"]
    assert model.spec.max_context == manifest["max_context"]
    assert model.spec.manifest_hash == spec.manifest_hash
    assert model.spec.manifest_uri == "optinfer:models/tiny-r1"
    assert model.spec.eos_token_ids == tuple(manifest["config"]["eos_token_ids"]) == (2,)
    assert registry.contract.functions.eosTokenIds(spec.model_root).call() == [2]


def test_register_eosTokenIds_noneAllowed_moreThanEightRevert(registry, chain):
    none = replace(SPEC, eos_token_ids=())
    registry.register_send(none, chain.accounts[0])
    assert registry.get_model(SPEC.model_root).spec.eos_token_ids == ()
    nine = replace(SPEC, constants_root=bytes(range(2, 34)), eos_token_ids=tuple(range(9)))
    err = expect_revert(lambda: registry.register_send(nine, chain.accounts[0]),
                        "TooManyEosTokenIds(uint256,uint256)")
    assert err.args_decoded == (9, 8)
    eos_of_unregistered = registry.contract.functions.eosTokenIds(nine.model_root)
    expect_revert(lambda: reverts_decoded(registry.artifact, eos_of_unregistered.call),
                  "ModelNotRegistered(bytes32)")


def test_fromManifest_rootsThatDoNotGiveTheModelRoot_raisesUserError(tmp_path):
    manifest = json.loads(TINY_R1_MANIFEST.read_text())
    manifest["nodes"] += 1  # the count the model root does not commit to
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="give model root 0x[0-9a-f]{64}, not its model_root"):
        ModelSpec.from_manifest(path)


def test_fromManifest_notAManifest_raisesUserError(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"model_root": "0x12"}))
    with pytest.raises(UserError, match="not an integer-model manifest"):
        ModelSpec.from_manifest(path)


def test_deploy_runtimeCode_equalsCommittedArtifact(registry):
    # ModelRegistry has no immutables, so the chain holds exactly the artifact's runtime code.
    code = registry.w3.eth.get_code(registry.address)
    assert "0x" + bytes(code).hex() == registry.artifact.deployed_bytecode
