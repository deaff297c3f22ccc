"""Python binding of ``CommitmentsHarness.sol``: the Solidity commitments library, callable.

Each method is an ``eth_call`` of the harness (nothing is sent): it returns what the library
returns, in the Python reference's types (``bytes`` for hashes and opened bytes), or raises
:class:`optinfer.contracts.bindings.ContractRevert` carrying the custom error's name, e.g.
``RangeProofRootMismatch``. Tensors are described as in ``optinfer.prover.commitments``:
a dtype (ONNX code or numpy dtype-like) and a shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from eth_account.signers.local import LocalAccount
from web3 import Web3

from optinfer.contracts.bindings import BoundContract, reverts_decoded
from optinfer.contracts.sender import TxSender
from optinfer.prover.commitments import DTypeLike, RangeProof, dtype_code

CONTRACT_NAME = "CommitmentsHarness"


def _dtype(dtype: DTypeLike) -> int:
    return dtype if isinstance(dtype, int) else dtype_code(dtype)


def _shape(shape: Sequence[int]) -> list[int]:
    return [int(d) for d in shape]


class CommitmentsHarness(BoundContract):
    """A deployed CommitmentsHarness at `address`."""

    NAME = CONTRACT_NAME

    @classmethod
    def deploy(cls, w3: Web3, signer: LocalAccount) -> CommitmentsHarness:
        """Deploy a fresh harness from `signer` and bind to it."""
        return cls(w3, TxSender(w3, signer).deploy(CONTRACT_NAME))

    def _call(self, function_name: str, *args: Any) -> Any:
        function = getattr(self.contract.functions, function_name)(*args)
        return reverts_decoded(self.artifact, function.call)

    # -- trees ---------------------------------------------------------------------------

    def hash_pair(self, left: bytes, right: bytes) -> bytes:
        """``sha256(left || right)`` on chain."""
        return bytes(self._call("hashPair", left, right))

    def leaf_hash(self, chunk: bytes) -> bytes:
        """``sha256(chunk)`` of a 1024-byte chunk on chain."""
        return bytes(self._call("leafHash", chunk))

    def zero_hash(self, height: int) -> bytes:
        """``Z_height`` on chain."""
        return bytes(self._call("zeroHash", height))

    def root_from_path(self, leaf: bytes, index: int, path: Sequence[bytes]) -> bytes:
        """The root implied by `leaf` at `index` and its sibling `path` (bottom first)."""
        return bytes(self._call("rootFromPath", leaf, index, list(path)))

    def root_of_nodes(self, nodes: Sequence[bytes]) -> bytes:
        """Root over a power-of-two list of nodes (``node_from_children``)."""
        return bytes(self._call("rootOfNodes", list(nodes)))

    # -- tensors -------------------------------------------------------------------------

    def tensor_header(self, dtype: DTypeLike, shape: Sequence[int]) -> bytes:
        """The tensor header bytes on chain."""
        return bytes(self._call("tensorHeader", _dtype(dtype), _shape(shape)))

    def tensor_byte_length(self, dtype: DTypeLike, shape: Sequence[int]) -> int:
        """Length of the tensor's canonical data bytes on chain."""
        return int(self._call("tensorByteLength", _dtype(dtype), _shape(shape)))

    def data_tree_depth(self, dtype: DTypeLike, shape: Sequence[int]) -> int:
        """Depth of the tensor's data tree on chain."""
        return int(self._call("dataTreeDepth", _dtype(dtype), _shape(shape)))

    def tensor_root_from_data_root(
        self, dtype: DTypeLike, shape: Sequence[int], data_root: bytes
    ) -> bytes:
        """``sha256(header || data_root)`` on chain."""
        return bytes(
            self._call("tensorRootFromDataRoot", _dtype(dtype), _shape(shape), data_root)
        )

    def data_root(self, data: bytes) -> bytes:
        """Data-tree root of canonical data bytes, computed on chain."""
        return bytes(self._call("dataRoot", bytes(data)))

    def tensor_root(self, dtype: DTypeLike, shape: Sequence[int], data: bytes) -> bytes:
        """Tensor root from dtype, shape and canonical data bytes, computed on chain."""
        return bytes(self._call("tensorRoot", _dtype(dtype), _shape(shape), bytes(data)))

    # -- proofs --------------------------------------------------------------------------

    def verify_leaf_update(
        self, state_prev: bytes, state_next: bytes, index: int, leaf: bytes, path: Sequence[bytes]
    ) -> None:
        """Step-4 check; returns None when accepted, raises ContractRevert otherwise."""
        self._call("verifyLeafUpdate", state_prev, state_next, index, leaf, list(path))

    def verify_tensor_range(
        self,
        root: bytes,
        dtype: DTypeLike,
        shape: Sequence[int],
        byte_start: int,
        byte_end: int,
        proof: RangeProof,
    ) -> bytes:
        """The opened bytes ``[byte_start, byte_end)``, or ContractRevert."""
        args = (root, _dtype(dtype), _shape(shape), byte_start, byte_end, _proof(proof))
        return bytes(self._call("verifyTensorRange", *args))

    def verify_descent_step(
        self,
        node: bytes,
        height: int,
        index: int,
        children: Sequence[bytes],
        dtype: DTypeLike,
        shape: Sequence[int],
    ) -> None:
        """Step-5 descent check; None when accepted, ContractRevert otherwise."""
        args = (node, height, index, list(children), _dtype(dtype), _shape(shape))
        self._call("verifyDescentStep", *args)

    def verify_leaf_chunk(
        self, leaf: bytes, leaf_index: int, chunk: bytes, dtype: DTypeLike, shape: Sequence[int]
    ) -> bytes:
        """The chunk's data bytes (padding cut) when it checks, else ContractRevert."""
        args = (leaf, leaf_index, bytes(chunk), _dtype(dtype), _shape(shape))
        return bytes(self._call("verifyLeafChunk", *args))

    def element_byte_range(
        self, dtype: DTypeLike, shape: Sequence[int], flat_index: int
    ) -> tuple[int, int]:
        """``[start, end)`` of element `flat_index` on chain."""
        start, end = self._call("elementByteRange", _dtype(dtype), _shape(shape), flat_index)
        return int(start), int(end)

    def decode_element(self, dtype: DTypeLike, data: bytes, index: int) -> int:
        """Element `index` of canonical bytes `data`, decoded on chain."""
        return int(self._call("decodeElement", _dtype(dtype), bytes(data), index))

    def decode_claimed_element(self, dtype: DTypeLike, data: bytes, index: int) -> int:
        """Element `index` of `data` as the one-step reads a claimed element (a bool as its
        byte), decoded on chain."""
        return int(self._call("decodeClaimedElement", _dtype(dtype), bytes(data), index))

    # -- gas -----------------------------------------------------------------------------

    def gas_leaf_hash(self, chunk: bytes) -> int:
        """Execution gas of hashing one 1024-byte chunk (no base or calldata cost)."""
        return int(self._call("gasLeafHash", chunk))

    def gas_verify_tensor_range(
        self,
        root: bytes,
        dtype: DTypeLike,
        shape: Sequence[int],
        byte_start: int,
        byte_end: int,
        proof: RangeProof,
    ) -> int:
        """Execution gas of ``verifyTensorRange`` inside the harness."""
        args = (root, _dtype(dtype), _shape(shape), byte_start, byte_end, _proof(proof))
        return int(self._call("gasVerifyTensorRange", *args))

    def gas_verify_leaf_update(
        self, state_prev: bytes, state_next: bytes, index: int, leaf: bytes, path: Sequence[bytes]
    ) -> int:
        """Execution gas of ``verifyLeafUpdate`` inside the harness."""
        args = (state_prev, state_next, index, leaf, list(path))
        return int(self._call("gasVerifyLeafUpdate", *args))

    def gas_zero_hash(self, height: int) -> int:
        """Execution gas of ``zeroHash(height)``."""
        return int(self._call("gasZeroHash", height))

    def estimate_gas(self, function_name: str, *args: Any) -> int:
        """Whole-transaction gas estimate (base 21000 + calldata + execution) of a harness
        function called with `args` (a RangeProof argument is converted)."""
        converted = [_proof(a) if isinstance(a, RangeProof) else a for a in args]
        function = getattr(self.contract.functions, function_name)(*converted)
        return int(reverts_decoded(self.artifact, function.estimate_gas))


def _proof(proof: RangeProof) -> tuple[bytes, list[bytes]]:
    """A RangeProof as the ABI tuple ``(bytes chunks, bytes32[] siblings)``."""
    return (bytes(proof.chunks), [bytes(s) for s in proof.siblings])
