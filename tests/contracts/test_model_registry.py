"""ModelRegistry on a real anvil: registration, the model id, immutability, validation,
events, tiny-r1; and the registration-side checks of ModelSpec.check_registrable."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
from eth_utils import keccak

from optinfer.contracts.bindings import ContractRevert, reverts_decoded
from optinfer.contracts.registry import (
    MAX_CONTEXT_TOKENS,
    MAX_EOS_TOKEN_IDS,
    MAX_NODE_COUNT,
    MAX_ONE_STEP_FAN_IN_BYTES,
    ModelSpec,
)
from optinfer.errors import UserError
from optinfer.models import opset
from optinfer.prover import commitments

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
    node_count=65_535,  # the most the state tree addresses
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

    model = registry.get_model(SPEC.model_id)
    assert model.model_id == SPEC.model_id
    assert model.spec == SPEC
    assert model.registrant == sender.address
    assert model.registered_at == block["timestamp"] > 0
    assert registry.is_registered(SPEC.model_id)


def test_register_call_returnsTheModelId_withoutRegistering(registry, chain):
    assert registry.register_call(SPEC, chain.accounts[0].address) == SPEC.model_id
    # A dry run changes nothing.
    assert not registry.is_registered(SPEC.model_id)


@pytest.mark.parametrize("sampling", [False, True])
def test_modelId_isTheSpecsHash_inPythonAndOnChainAlike_point5(sampling):
    """The id hashes the model root, the manifest hash, the max context, the EOS ids
    (count first), all big-endian, and one byte saying whether the graph samples;
    ModelRegistry.modelIdOf computes the same bytes."""
    spec = replace(SPEC, sampling=sampling)
    eos = b"".join(t.to_bytes(4, "big") for t in SPEC.eos_token_ids)
    assert spec.model_id == hashlib.sha256(
        SPEC.model_root + SPEC.manifest_hash + SPEC.max_context.to_bytes(4, "big")
        + len(SPEC.eos_token_ids).to_bytes(4, "big") + eos + bytes([sampling])).digest()
    assert SPEC.model_root == hashlib.sha256(
        SPEC.nodes_root + SPEC.constants_root + SPEC.opset_version.to_bytes(4, "big")
        + SPEC.node_count.to_bytes(4, "big")).digest()
    assert spec.model_id == commitments.model_id(SPEC.model_root, SPEC.manifest_hash,
                                                 SPEC.max_context, SPEC.eos_token_ids, sampling)


@pytest.mark.parametrize("eos,sampling", [((), False), ((2,), True), ((151_643, 2), False),
                                          (tuple(range(2**32 - 8, 2**32)), True)])
def test_modelIdOf_onChain_equalsModelSpecModelId_point5(registry, eos, sampling):
    spec = replace(SPEC, eos_token_ids=eos, sampling=sampling)
    on_chain = registry.contract.functions.modelIdOf(
        spec.nodes_root, spec.constants_root, spec.opset_version, spec.node_count,
        spec.manifest_hash, spec.max_context, list(spec.eos_token_ids), sampling).call()
    assert bytes(on_chain) == spec.model_id


@pytest.mark.parametrize("squat", [
    {"eos_token_ids": ()},
    {"eos_token_ids": (7,)},
    {"max_context": 8},
    {"manifest_hash": hashlib.sha256(b"the squatter's manifest").digest()},
    {"sampling": True},
])
def test_register_squatter_with_other_eos_gets_another_id_point5(registry, chain, squat):
    """Someone registers a published model's roots first, with other EOS ids, a tiny max
    context or a manifest (and a URI) of their own: that is another model under another id,
    and the model as published still registers under its own id, with its own fields."""
    squatter = replace(SPEC, manifest_uri="https://squatter.example/m.json", **squat)
    squatted = registry.register_call(squatter, chain.accounts[1].address)
    registry.register_send(squatter, chain.accounts[1])
    assert squatted == squatter.model_id != SPEC.model_id

    receipt = registry.register_send(SPEC, chain.accounts[0])
    assert receipt["status"] == 1
    assert registry.registered_events(receipt)[0]["modelId"] == SPEC.model_id
    model = registry.get_model(SPEC.model_id)
    assert model.spec == SPEC and model.registrant == chain.accounts[0].address
    assert registry.contract.functions.eosTokenIds(SPEC.model_id).call() == [151_643, 2]
    assert registry.get_model(squatter.model_id).spec == squatter


def test_register_sameModelAnotherUri_isTheSameModel_andReverts(registry, chain):
    """The URI is where to fetch, not what runs: not in the id. Registering the same model
    with another URI names the registered model, and reverts."""
    registry.register_send(SPEC, chain.accounts[0])
    other = replace(SPEC, manifest_uri="ipfs://other")
    assert other.model_id == SPEC.model_id

    err = expect_revert(
        lambda: registry.register_send(other, chain.accounts[1]), "ModelAlreadyRegistered(bytes32)"
    )
    assert err.args_decoded == (SPEC.model_id,)
    expect_revert(
        lambda: registry.register_call(other, chain.accounts[1].address),
        "ModelAlreadyRegistered(bytes32)",
    )
    # The first registration stands untouched.
    model = registry.get_model(SPEC.model_id)
    assert model.spec == SPEC
    assert model.registrant == chain.accounts[0].address


def test_register_theIdIsComputed_soARootCannotBePairedWithAnotherNodeCount(registry, chain):
    """The registry computes the id from the two roots, the op set and the node count (with
    the rest): a registration that claims the same roots with another node count gets another
    id, and the model's own id keeps the values its root commits to (the ones a challenge
    opens against)."""
    registry.register_send(SPEC, chain.accounts[0])
    other = replace(SPEC, node_count=SPEC.node_count - 1)
    assert other.model_id != SPEC.model_id
    receipt = registry.register_send(other, chain.accounts[1])
    assert registry.registered_events(receipt)[0]["modelId"] == other.model_id
    assert registry.get_model(SPEC.model_id).spec.node_count == SPEC.node_count
    assert registry.get_model(other.model_id).spec.node_count == SPEC.node_count - 1


def test_register_zeroNodeCount_reverts(registry, chain):
    spec = replace(SPEC, node_count=0)
    expect_revert(lambda: registry.register_send(spec, chain.accounts[0]), "ZeroNodeCount()")
    assert not registry.is_registered(spec.model_id)


@pytest.mark.parametrize("node_count", [2**16, 2**16 + 1, 2**32 - 1])
def test_register_node_count_beyond_state_tree_reverts_point8(registry, chain, node_count):
    """Node k writes state leaf k and leaf 0 is the input: with 2**16 leaves, node 65536 would
    have no leaf, and the bisection could never reach it."""
    spec = replace(SPEC, node_count=node_count)
    err = expect_revert(lambda: registry.register_send(spec, chain.accounts[0]),
                        "NodeCountBeyondStateTree(uint256,uint256)")
    assert err.args_decoded == (node_count, 2**16 - 1)
    assert not registry.is_registered(spec.model_id)
    # The last node the state tree addresses is fine.
    registry.register_send(replace(SPEC, node_count=2**16 - 1), chain.accounts[0])


def test_register_zeroMaxContext_reverts(registry, chain):
    spec = replace(SPEC, max_context=0)
    expect_revert(lambda: registry.register_send(spec, chain.accounts[0]), "ZeroMaxContext()")
    assert not registry.is_registered(spec.model_id)


@pytest.mark.parametrize("max_context", [8193, 2**32 - 1])
def test_register_max_context_beyond_dispute_bound_reverts_point8(registry, chain, max_context):
    """A request of the model's whole context must be challengeable in one transaction under
    the 2**24 gas cap: MAX_CONTEXT_TOKENS = 8192 tokens, and no more."""
    spec = replace(SPEC, max_context=max_context)
    err = expect_revert(lambda: registry.register_send(spec, chain.accounts[0]),
                        "MaxContextBeyondDisputeBound(uint256,uint256)")
    assert err.args_decoded == (max_context, 8192)
    assert not registry.is_registered(spec.model_id)
    at_bound = replace(SPEC, max_context=8192)
    registry.register_send(at_bound, chain.accounts[0])
    assert registry.get_model(at_bound.model_id).spec.max_context == 8192


def test_registry_bounds_are_mirrored_in_python(registry):
    functions = registry.contract.functions
    assert functions.MAX_NODE_COUNT().call() == MAX_NODE_COUNT == 2**commitments.STATE_DEPTH - 1
    assert functions.MAX_CONTEXT_TOKENS().call() == MAX_CONTEXT_TOKENS == 8192
    assert functions.MAX_EOS_TOKEN_IDS().call() == MAX_EOS_TOKEN_IDS == 8


def test_register_otherOpsetVersion_reverts(registry, chain):
    # The one-step verifier recomputes version 2 alone: a version-1 graph (int64 indices only)
    # would be judged by rules it was not written in.
    for version in (1, 3):
        spec = replace(SPEC, opset_version=version)
        err = expect_revert(lambda spec=spec: registry.register_send(spec, chain.accounts[0]),
                            "UnsupportedOpsetVersion(uint32,uint32)")
        assert err.args_decoded == (version, 2)
        assert not registry.is_registered(spec.model_id)
    assert registry.contract.functions.OPSET_VERSION().call() == opset.OPSET_VERSION == 2


def test_getModel_unknownId_reverts(registry):
    err = expect_revert(
        lambda: registry.get_model(b"\xaa" * 32), "ModelNotRegistered(bytes32)"
    )
    assert err.args_decoded == (b"\xaa" * 32,)


def test_disputeCommitments_areTheRootsTheIdWasComputedFrom(registry, chain):
    registry.register_send(SPEC, chain.accounts[0])
    view = registry.contract.functions.disputeCommitments(SPEC.model_id)
    assert view.call() == [SPEC.nodes_root, SPEC.constants_root, SPEC.node_count, False]
    sampler = replace(SPEC, sampling=True)
    registry.register_send(sampler, chain.accounts[0])
    assert registry.contract.functions.disputeCommitments(sampler.model_id).call() == [
        SPEC.nodes_root, SPEC.constants_root, SPEC.node_count, True]
    assert registry.get_model(sampler.model_id).spec == sampler
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
                 "uint32,uint32[],bool)")
    assert log["topics"][0] == keccak(text=signature)
    assert log["topics"][1] == SPEC.model_id
    assert log["topics"][2] == bytes(12) + bytes.fromhex(sender.address[2:])

    assert registry.registered_events(receipt) == [
        {
            "modelId": SPEC.model_id,
            "registrant": sender.address,
            "nodesRoot": SPEC.nodes_root,
            "constantsRoot": SPEC.constants_root,
            "opsetVersion": SPEC.opset_version,
            "manifestHash": SPEC.manifest_hash,
            "manifestUri": SPEC.manifest_uri,
            "maxContext": SPEC.max_context,
            "nodeCount": SPEC.node_count,
            "eosTokenIds": list(SPEC.eos_token_ids),
            "sampling": False,
        }
    ]


def test_register_tinyR1Manifest_succeeds(registry, chain):
    manifest = json.loads(TINY_R1_MANIFEST.read_text())
    spec = ModelSpec.from_manifest(TINY_R1_MANIFEST, manifest_uri="optinfer:models/tiny-r1")
    assert spec.model_root.hex() == manifest["model_root"].removeprefix("0x")
    assert spec.manifest_hash == hashlib.sha256(TINY_R1_MANIFEST.read_bytes()).digest()

    assert registry.register_call(spec, chain.accounts[0].address) == spec.model_id
    receipt = registry.register_send(spec, chain.accounts[0])
    # Six storage slots (the two roots among them), a short URI and the EOS ids (two slots):
    # once per model.
    assert receipt["gasUsed"] < 250_000

    model = registry.get_model(spec.model_id)
    assert model.spec.opset_version == manifest["opset_version"]
    assert model.spec.node_count == manifest["nodes"]
    assert model.spec.max_context == manifest["max_context"]
    assert model.spec.manifest_hash == spec.manifest_hash
    assert model.spec.manifest_uri == "optinfer:models/tiny-r1"
    assert model.spec.eos_token_ids == tuple(manifest["config"]["eos_token_ids"]) == (2,)
    assert registry.contract.functions.eosTokenIds(spec.model_id).call() == [2]


def test_register_eosTokenIds_noneAllowed_moreThanEightRevert(registry, chain):
    none = replace(SPEC, eos_token_ids=())
    registry.register_send(none, chain.accounts[0])
    assert registry.get_model(none.model_id).spec.eos_token_ids == ()
    nine = replace(SPEC, constants_root=bytes(range(2, 34)), eos_token_ids=tuple(range(9)))
    err = expect_revert(lambda: registry.register_send(nine, chain.accounts[0]),
                        "TooManyEosTokenIds(uint256,uint256)")
    assert err.args_decoded == (9, 8)
    eos_of_unregistered = registry.contract.functions.eosTokenIds(nine.model_id)
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


def test_check_registrable_tinyR1_passes_andReadsItsFanInFromTheManifest():
    spec = ModelSpec.from_manifest(TINY_R1_MANIFEST)
    assert spec.max_fan_in_bytes == json.loads(TINY_R1_MANIFEST.read_text())["max_fan_in_bytes"]
    spec.check_registrable()
    # At every bound, inclusive.
    replace(spec, max_fan_in_bytes=MAX_ONE_STEP_FAN_IN_BYTES, node_count=MAX_NODE_COUNT,
            max_context=MAX_CONTEXT_TOKENS, eos_token_ids=tuple(range(8))).check_registrable()


@pytest.mark.parametrize(("changes", "message"), [
    ({"max_fan_in_bytes": MAX_ONE_STEP_FAN_IN_BYTES + 1}, "could not be convicted"),
    ({"max_fan_in_bytes": None}, "does not give the model's largest one-step fan-in"),
    ({"node_count": MAX_NODE_COUNT + 1}, "1 to 65535 nodes"),
    ({"node_count": 0}, "1 to 65535 nodes"),
    ({"max_context": MAX_CONTEXT_TOKENS + 1}, "max context is 1 to 8192 tokens"),
    ({"eos_token_ids": tuple(range(9))}, "at most 8 EOS token ids"),
])
def test_check_registrable_refuses_what_the_game_cannot_handle_point8(changes, message):
    """Before registering, the binding refuses what the registry would refuse and, which the
    registry cannot compute, a node whose one-step (its fan-in, the largest MatMulInteger row
    pair or reduction row, plus the witness' overhead) would not fit one transaction."""
    spec = replace(ModelSpec.from_manifest(TINY_R1_MANIFEST), **changes)
    with pytest.raises(UserError, match=message):
        spec.check_registrable()


def test_deploy_runtimeCode_equalsCommittedArtifact(registry):
    # ModelRegistry has no immutables, so the chain holds exactly the artifact's runtime code.
    code = registry.w3.eth.get_code(registry.address)
    assert "0x" + bytes(code).hex() == registry.artifact.deployed_bytecode
