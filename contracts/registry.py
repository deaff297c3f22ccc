"""Python binding of ``ModelRegistry.sol`` (web3.py, committed artifact).

The model id is the model root itself: registering ``spec`` makes ``spec.model_root`` the id
that claims name and ``get_model`` takes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from eth_account.signers.local import LocalAccount
from eth_typing import ChecksumAddress
from web3 import Web3
from web3.types import TxReceipt

from optinfer.contracts.bindings import BoundContract, deploy, reverts_decoded, send_function
from optinfer.errors import UserError
from optinfer.prover import commitments
from optinfer.prover.commitments import ProofError

CONTRACT_NAME = "ModelRegistry"


@dataclass(frozen=True)
class ModelSpec:
    """What ``register`` takes, and the model root it gives. The hashes are 32 bytes each;
    `model_root` is computed from the two roots, the op set and the node count, as the
    registry computes it."""

    nodes_root: bytes
    constants_root: bytes
    opset_version: int
    manifest_hash: bytes
    manifest_uri: str
    max_context: int
    node_count: int
    eos_token_ids: tuple[int, ...] = ()

    @property
    def model_root(self) -> bytes:
        return commitments.model_root(self.nodes_root, self.constants_root,
                                      self.opset_version, self.node_count)

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

        The two roots, op-set version, max context, node count and EOS token ids are the
        manifest's ``nodes_root``, ``constants_root``, ``opset_version``, ``max_context``,
        ``nodes`` and ``config.eos_token_ids``; the manifest hash is SHA-256 of `raw`.
        UserError (naming `what`) unless they give the manifest's ``model_root``.
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
        return cls(w3, deploy(w3, CONTRACT_NAME, signer))

    # -- register ------------------------------------------------------------------------

    def register_call(self, spec: ModelSpec, sender: str) -> bytes:
        """Dry-run ``register(spec)`` as `sender`: the id it would assign, or ContractRevert."""
        function = self.contract.functions.register(*spec.as_args())
        return bytes(reverts_decoded(self.artifact, lambda: function.call({"from": sender})))

    def register_send(self, spec: ModelSpec, signer: LocalAccount) -> TxReceipt:
        """Register `spec` in a transaction signed by `signer`; the receipt, or ContractRevert."""
        function = self.contract.functions.register(*spec.as_args())
        return send_function(self.w3, self.artifact, function, signer)

    # -- views ---------------------------------------------------------------------------

    def get_model(self, model_id: bytes) -> RegisteredModel:
        """The registered model with id `model_id`; ContractRevert ModelNotRegistered if none."""
        function = self.contract.functions.getModel(model_id)
        (nodes_root, constants_root, manifest_hash, uri, opset, max_context, nodes, registrant,
         registered_at, eos) = reverts_decoded(self.artifact, function.call)
        spec = ModelSpec(
            nodes_root=bytes(nodes_root),
            constants_root=bytes(constants_root),
            opset_version=opset,
            manifest_hash=bytes(manifest_hash),
            manifest_uri=uri,
            max_context=max_context,
            node_count=nodes,
            eos_token_ids=tuple(eos),
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
