"""Python binding of ``ModelRegistry.sol`` (web3.py, committed artifact).

Registering ``spec`` makes ``spec.model_id`` the id that claims name and ``get_model`` takes:
a hash of everything that decides the model's behaviour (``commitments.model_id``), computed
by the registry the same way. Before a model is registered on purpose,
:meth:`ModelSpec.check_registrable` refuses what the registry would refuse and, of what it
cannot see, a model with a one-step too large for one transaction.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from eth_account.signers.local import LocalAccount
from eth_typing import ChecksumAddress
from web3 import Web3
from web3.types import TxParams, TxReceipt

from optinfer.contracts.bindings import BoundContract, reverts_decoded
from optinfer.contracts.sender import TxSender
from optinfer.errors import UserError
from optinfer.prover import commitments
from optinfer.prover.commitments import ProofError

CONTRACT_NAME = "ModelRegistry"

MAX_NODE_COUNT = 2**commitments.STATE_DEPTH - 1
"""Most nodes a registered model may have (``ModelRegistry.MAX_NODE_COUNT``): node k writes
state leaf k, and leaf 0 is the input."""

MAX_CONTEXT_TOKENS = 8192
"""Longest max context a registered model may declare (``ModelRegistry.MAX_CONTEXT_TOKENS``):
a challenge hashes the whole prompt and output on chain, and a request of this many tokens
must be challengeable within the 2**24 per-transaction gas cap (EIP-7825)."""

MAX_EOS_TOKEN_IDS = 8
"""Most EOS token ids a registered model may declare (``ModelRegistry.MAX_EOS_TOKEN_IDS``)."""

MAX_ONE_STEP_FAN_IN_BYTES = 48 * 1024
"""Largest per-element fan-in (the manifest's ``max_fan_in_bytes``: the input bytes one output
element depends on, a MatMulInteger's two K-byte rows or a reduction's row, computed by the
converter at the model's max context) of a model this binding registers. The registry cannot
compute it on chain, so :meth:`ModelSpec.check_registrable` checks it before registering.
A one-step witness carries its fan-in plus chunk rounding (at most 2 KiB per opened range),
Merkle siblings and paths, headers and the node description: 8 KiB at most on the
R1-Distill-1.5B shape (docs/protocol.md, "Byte budget"). With 16 KiB allowed for that, a
witness stays within about 64 KiB of calldata: some 2.6M gas at EIP-7623's 40 gas per byte
plus the recomputation (about 19 gas per byte of a dot product), far inside the 2**24 gas cap
and half of the 128 KiB a geth node relays in one transaction. A node with a larger fan-in
could not be convicted in one transaction."""


@dataclass(frozen=True)
class ModelSpec:
    """What ``register`` takes, and the model id it gives. The hashes are 32 bytes each;
    `model_root` is the graph's commitment (the two roots, the op set and the node count) and
    `model_id` hashes it with the manifest hash, the max context and the EOS ids, as the
    registry computes it. `max_fan_in_bytes` is not registered: the manifest's largest
    per-element fan-in, which :meth:`check_registrable` bounds (None when not known, as for a
    spec read back from the registry); it takes no part in comparisons."""

    nodes_root: bytes
    constants_root: bytes
    opset_version: int
    manifest_hash: bytes
    manifest_uri: str
    max_context: int
    node_count: int
    eos_token_ids: tuple[int, ...] = ()
    sampling: bool = False  # the graph samples: leaf 0 starts [len(P), temperature, top_p, seed]
    max_fan_in_bytes: int | None = field(default=None, compare=False)

    @property
    def model_root(self) -> bytes:
        """The graph's commitment, the manifest's ``model_root``."""
        return commitments.model_root(self.nodes_root, self.constants_root,
                                      self.opset_version, self.node_count)

    @property
    def model_id(self) -> bytes:
        """The id the registry gives this spec, which requests name (``ModelRegistry.modelIdOf``,
        ``commitments.model_id``; the manifest URI is not part of it)."""
        return commitments.model_id(self.model_root, self.manifest_hash, self.max_context,
                                    self.eos_token_ids, self.sampling)

    def check_registrable(self) -> None:
        """UserError unless the registry would take this spec and every node of the model could
        be convicted in one transaction: the registry's bounds on the node count, the max
        context and the EOS ids, and, which the registry cannot check,
        ``max_fan_in_bytes <= MAX_ONE_STEP_FAN_IN_BYTES``."""
        if not 1 <= self.node_count <= MAX_NODE_COUNT:
            raise UserError(f"a registered model has 1 to {MAX_NODE_COUNT} nodes (the state "
                            f"tree's leaves after the input's), this one {self.node_count}")
        if not 1 <= self.max_context <= MAX_CONTEXT_TOKENS:
            raise UserError(f"a registered model's max context is 1 to {MAX_CONTEXT_TOKENS} "
                            f"tokens (longer requests could not be challenged within the gas "
                            f"cap), this one's {self.max_context}")
        if len(self.eos_token_ids) > MAX_EOS_TOKEN_IDS:
            raise UserError(f"a registered model has at most {MAX_EOS_TOKEN_IDS} EOS token ids, "
                            f"this one {len(self.eos_token_ids)}")
        if self.max_fan_in_bytes is None:
            raise UserError("the manifest does not give the model's largest one-step fan-in "
                            "(max_fan_in_bytes): convert the model again")
        if self.max_fan_in_bytes > MAX_ONE_STEP_FAN_IN_BYTES:
            raise UserError(
                f"one element of this model depends on {self.max_fan_in_bytes} input bytes "
                f"(max_fan_in_bytes), more than the {MAX_ONE_STEP_FAN_IN_BYTES} a one-step "
                "proof can carry in one transaction: a lie in that node could not be "
                "convicted; convert it with a shorter max context")

    @classmethod
    def from_manifest(cls, manifest_path: Path, manifest_uri: str | None = None) -> ModelSpec:
        """The spec of an integer model from its ``manifest.json`` (see
        :meth:`from_manifest_bytes`); the URI defaults to the file's ``file://`` URI."""
        manifest_path = Path(manifest_path)
        return cls.from_manifest_bytes(manifest_path.read_bytes(),
                                       manifest_uri or manifest_path.resolve().as_uri(),
                                       what=str(manifest_path))

    @classmethod
    def from_manifest_bytes(cls, raw: bytes, manifest_uri: str,
                            what: str = "the manifest") -> ModelSpec:
        """The spec of the manifest whose bytes are `raw`.

        The two roots, op-set version, max context, node count, EOS token ids, sampling flag
        and largest fan-in are the manifest's ``nodes_root``, ``constants_root``,
        ``opset_version``, ``max_context``, ``nodes``, ``config.eos_token_ids``, ``sampling``
        (false when absent) and ``max_fan_in_bytes`` (None when absent); the manifest hash is
        SHA-256 of `raw`. UserError (naming `what`) unless they give the manifest's
        ``model_root``.
        """
        try:
            manifest = json.loads(raw)
            root = bytes.fromhex(manifest["model_root"].removeprefix("0x"))
            spec = cls(
                nodes_root=bytes.fromhex(manifest["nodes_root"].removeprefix("0x")),
                constants_root=bytes.fromhex(manifest["constants_root"].removeprefix("0x")),
                opset_version=int(manifest["opset_version"]),
                manifest_hash=hashlib.sha256(raw).digest(),
                manifest_uri=manifest_uri,
                max_context=int(manifest["max_context"]),
                node_count=int(manifest["nodes"]),
                eos_token_ids=tuple(int(t) for t in manifest["config"]["eos_token_ids"]),
                sampling=bool(manifest.get("sampling", False)),
                max_fan_in_bytes=(None if manifest.get("max_fan_in_bytes") is None
                                  else int(manifest["max_fan_in_bytes"])),
            )
            computed = spec.model_root
        except (KeyError, TypeError, ValueError, ProofError) as err:
            raise UserError(f"{what} is not an integer-model manifest: {err}") from err
        if computed != root:
            raise UserError(f"{what}: its roots, op set and node count give model root "
                            f"0x{computed.hex()}, not its model_root 0x{root.hex()}")
        return spec

    def as_args(self) -> tuple:
        """The arguments of ``ModelRegistry.register`` in order."""
        return (
            self.nodes_root,
            self.constants_root,
            self.opset_version,
            self.manifest_hash,
            self.manifest_uri,
            self.max_context,
            self.node_count,
            list(self.eos_token_ids),
            self.sampling,
        )


@dataclass(frozen=True)
class RegisteredModel:
    """A model as the registry stores it (``ModelRegistry.Model`` plus its id)."""

    model_id: bytes
    spec: ModelSpec
    registrant: ChecksumAddress
    registered_at: int  # block timestamp, seconds


class ModelRegistry(BoundContract):
    """A deployed ModelRegistry at `address`."""

    NAME = CONTRACT_NAME

    @classmethod
    def deploy(cls, w3: Web3, signer: LocalAccount) -> ModelRegistry:
        """Deploy a fresh registry from `signer` and bind to it."""
        return cls(w3, TxSender(w3, signer).deploy(CONTRACT_NAME))

    # -- register ------------------------------------------------------------------------

    def register_call(self, spec: ModelSpec, sender: str) -> bytes:
        """Dry-run ``register(spec)`` as `sender`: the id it would assign, or ContractRevert."""
        function = self.contract.functions.register(*spec.as_args())
        return bytes(reverts_decoded(self.artifact, lambda: function.call({"from": sender})))

    def register_tx(self, spec: ModelSpec) -> TxParams:
        """The transaction registering `spec`."""
        return self.tx("register", *spec.as_args())

    def register_send(self, spec: ModelSpec, signer: LocalAccount) -> TxReceipt:
        """Register `spec` in a transaction signed by `signer`; the receipt, or ContractRevert."""
        return self._send(self.register_tx(spec), signer)

    # -- views ---------------------------------------------------------------------------

    def get_model(self, model_id: bytes) -> RegisteredModel:
        """The registered model with id `model_id`; ContractRevert ModelNotRegistered if none."""
        function = self.contract.functions.getModel(model_id)
        (nodes_root, constants_root, manifest_hash, uri, opset, max_context, nodes, registrant,
         registered_at, eos, sampling) = reverts_decoded(self.artifact, function.call)
        spec = ModelSpec(
            nodes_root=bytes(nodes_root),
            constants_root=bytes(constants_root),
            opset_version=opset,
            manifest_hash=bytes(manifest_hash),
            manifest_uri=uri,
            max_context=max_context,
            node_count=nodes,
            eos_token_ids=tuple(eos),
            sampling=sampling,
        )
        return RegisteredModel(
            model_id=bytes(model_id),
            spec=spec,
            registrant=Web3.to_checksum_address(registrant),
            registered_at=registered_at,
        )

    def is_registered(self, model_id: bytes) -> bool:
        """Whether a model with id `model_id` is registered."""
        return bool(self.contract.functions.isRegistered(model_id).call())

    def registered_events(self, receipt: TxReceipt) -> list[dict]:
        """The decoded ``ModelRegistered`` events' arguments in `receipt`, in log order."""
        return self.events(receipt, "ModelRegistered")
