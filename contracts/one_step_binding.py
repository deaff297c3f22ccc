"""Python binding of ``OneStepVerifier.sol``: the on-chain one-step (docs/protocol.md, "One step").

`encode_witness` turns a reference :class:`optinfer.prover.one_step.Witness` into the ABI tuple
of ``IOneStepVerifier.Witness`` (the dispute game's binding forwards it untouched), `context`
builds ``IOneStepVerifier.Context``. :class:`OneStepVerifier` calls ``providerWrong`` as an
``eth_call``: True when the provider's element is wrong (the reference raises WrongClaim), False
when it is right (the reference returns the value), :class:`ContractRevert` named after the
broken rule when the witness is malformed (the reference raises ProofError).

The verifier is over the 24 KiB code size limit as one contract, so the output-signature
rules (``OneStepShapes.expectedOutput``) live in a linked library: `OneStepVerifier.deploy`
deploys the library first and links it.
"""

from __future__ import annotations

from typing import Any

from eth_account.signers.local import LocalAccount
from eth_utils import keccak
from web3 import Web3

from optinfer.contracts.artifacts import load_artifact
from optinfer.contracts.bindings import BoundContract, reverts_decoded
from optinfer.contracts.sender import TxSender
from optinfer.prover.commitments import RangeProof
from optinfer.prover.one_step import OpenedRange, OpenedTensor, Witness
from optinfer.prover.one_step_element import COLUMNS
from optinfer.prover.one_step_prover import OneStepProver

CONTRACT_NAME = "OneStepVerifier"
#: The external library OneStepVerifier's bytecode links, by its fully qualified name.
SHAPES_LIBRARY = ("src/lib/OneStepShapes.sol", "OneStepShapes")


def _proof(proof: RangeProof) -> tuple[bytes, list[bytes]]:
    return bytes(proof.chunks), [bytes(s) for s in proof.siblings]


def _tensor(tensor: OpenedTensor) -> tuple:
    return (tensor.position, tensor.layout == COLUMNS, tensor.ref.kind, tensor.ref.index,
            tensor.dtype, [int(d) for d in tensor.shape], bytes(tensor.data_root),
            [bytes(h) for h in tensor.path])


def _range(opened: OpenedRange) -> tuple:
    o = opened.opening
    return (o.input_position, o.layout == COLUMNS, o.start_element, o.count, _proof(opened.proof))


def encode_witness(witness: Witness) -> tuple:
    """The ABI tuple of ``IOneStepVerifier.Witness`` for a reference witness (its `k`,
    `out_index` go into the Context; the claimed value is read on chain from `output_proof`)."""
    return (
        bytes(witness.description),
        [bytes(h) for h in witness.description_path],
        [_tensor(t) for t in witness.tensors],
        [_range(r) for r in witness.ranges],
        witness.output_dtype,
        [int(d) for d in witness.output_shape],
        bytes(witness.output_data_root),
        _proof(witness.output_proof),
    )


def context(nodes_root: bytes, constants_root: bytes, agreed_state: bytes, output_root: bytes,
            k: int, out_index: int) -> tuple:
    """The ABI tuple of ``IOneStepVerifier.Context``: the roots the witness is checked against
    (the model's nodes and constants roots, `S_{k-1}`, the provider's `T_k`) and the element."""
    return (bytes(nodes_root), bytes(constants_root), bytes(agreed_state), bytes(output_root),
            int(k), int(out_index))


def prover_context(prover: OneStepProver, witness: Witness, provider=None) -> tuple:
    """The Context `OneStepProver.check` uses for `witness`: the model's roots, the honest
    `S_{k-1}` and `provider`'s `T_k` (a TraceCommitment; default the honest trace)."""
    provider = provider or prover.trace
    return context(prover.committed.nodes_root, prover.committed.constants_root,
                   prover.trace.state.root(witness.k - 1), provider.roots[witness.k],
                   witness.k, witness.out_index)


def _link(bytecode: str, source: str, name: str, address: str) -> str:
    placeholder = "__$" + keccak(text=f"{source}:{name}").hex()[:34] + "$__"
    if placeholder not in bytecode:
        raise ValueError(f"{name} is not linked by this bytecode")
    return bytecode.replace(placeholder, address[2:].lower())


class OneStepVerifier(BoundContract):
    """A deployed OneStepVerifier at `address`."""

    NAME = CONTRACT_NAME

    @classmethod
    def deploy(cls, w3: Web3, signer: LocalAccount) -> OneStepVerifier:
        """Deploy the OneStepShapes library and a OneStepVerifier linked to it."""
        return cls.deploy_from(TxSender(w3, signer))

    @classmethod
    def deploy_from(cls, sender: TxSender) -> OneStepVerifier:
        """:meth:`deploy` from `sender` (whose nonce count then covers both transactions)."""
        library = sender.deploy(SHAPES_LIBRARY[1])
        artifact = load_artifact(CONTRACT_NAME)
        bytecode = _link(artifact.bytecode, *SHAPES_LIBRARY, library)
        factory = sender.w3.eth.contract(abi=artifact.abi, bytecode=bytecode)
        receipt = sender.send({"data": factory.constructor().data_in_transaction}, artifact)
        return cls(sender.w3, receipt["contractAddress"])

    def _function(self, ctx: tuple, witness: Witness | tuple) -> Any:
        encoded = encode_witness(witness) if isinstance(witness, Witness) else witness
        return self.contract.functions.providerWrong(ctx, encoded)

    def provider_wrong(self, ctx: tuple, witness: Witness | tuple) -> bool:
        """``providerWrong`` as an eth_call: True when the provider loses, False when the
        challenger does; ContractRevert (named after the broken rule) on a malformed witness.
        `witness` is a reference Witness or an already encoded tuple."""
        function = self._function(ctx, witness)
        return bool(reverts_decoded(self.artifact, function.call))

    def estimate_gas(self, ctx: tuple, witness: Witness | tuple) -> int:
        """Gas of a transaction calling ``providerWrong`` (base, calldata and execution): what
        the one-step costs when the dispute game forwards it, less the game's own work."""
        function = self._function(ctx, witness)
        return int(reverts_decoded(self.artifact, function.estimate_gas))


def one_step_gas(w3: Web3, verifier: OneStepVerifier | str, committed, trace, k: int,
                 out_index: int | None = None) -> int:
    """Gas of the one-step for element `out_index` (default: the last) of node k, the figure
    `optinfer bench dispute` reports per op type.

    `committed` is the model's CommittedModel (its nodes and constants roots), `trace` an
    honest `prover.game.Trace` (ModelTrace): the witness is built from it and checked against
    its own `S_{k-1}` and `T_k`, so the verifier returns False. `verifier` is a bound
    OneStepVerifier or its address on `w3`.
    """
    if not isinstance(verifier, OneStepVerifier):
        verifier = OneStepVerifier(w3, verifier)
    out_index = trace.tensor(k).size - 1 if out_index is None else out_index
    witness = trace.one_step_witness(k, out_index)
    ctx = context(committed.nodes_root, committed.constants_root, trace.state_root(k - 1),
                  trace.tensor_tree(k).root, k, out_index)
    return verifier.estimate_gas(ctx, witness)
