// SPDX-License-Identifier: MIT
pragma solidity 0.8.37;

import {LeafChunkLengthMismatch} from "../Errors.sol";
import {Commitments} from "../lib/Commitments.sol";
import {Sha256Merkle} from "../lib/Sha256Merkle.sol";

/// @title CommitmentsHarness
/// @notice Exposes the Commitments and Sha256Merkle libraries as external functions, for the
///         property tests that compare them with `optinfer.prover.commitments` on anvil
///         (tests/contracts/test_commitments_onchain.py) and for gas measurements. No state.
/// @dev    The `gas*` functions run one library call between two `gasleft()` readings and
///         return the difference: the library's execution gas, without the transaction's
///         base cost and calldata.
contract CommitmentsHarness {
    ////////////////////////////////////////////////////////////////
    //                        Merkle trees                        //
    ////////////////////////////////////////////////////////////////

    function hashPair(bytes32 left, bytes32 right) external view returns (bytes32) {
        return Sha256Merkle.hashPair(left, right);
    }

    /// @notice sha256 of a 1024-byte chunk (the length is checked here, not in the library).
    function leafHash(bytes calldata chunk) external view returns (bytes32 leaf) {
        if (chunk.length != Sha256Merkle.LEAF_BYTES) revert LeafChunkLengthMismatch(chunk.length);
        uint256 offset;
        assembly {
            offset := chunk.offset
        }
        return Sha256Merkle.hashChunkAt(offset);
    }

    function zeroHash(uint256 height) external view returns (bytes32) {
        return Sha256Merkle.zeroHash(height);
    }

    function rootFromPath(bytes32 leaf, uint256 index, bytes32[] calldata path)
        external
        view
        returns (bytes32)
    {
        return Sha256Merkle.rootFromPath(leaf, index, path);
    }

    function rootOfNodes(bytes32[] calldata nodes) external view returns (bytes32) {
        return Sha256Merkle.rootOfNodes(nodes);
    }

    function treeDepth(uint256 count) external pure returns (uint256) {
        return Sha256Merkle.treeDepth(count);
    }

    ////////////////////////////////////////////////////////////////
    //                         Tensors                            //
    ////////////////////////////////////////////////////////////////

    function tensorHeader(uint8 dtype, uint64[] calldata shape)
        external
        pure
        returns (bytes memory)
    {
        return Commitments.tensorHeader(dtype, shape);
    }

    function tensorByteLength(uint8 dtype, uint64[] calldata shape)
        external
        pure
        returns (uint256)
    {
        return Commitments.tensorByteLength(dtype, shape);
    }

    function dataTreeDepth(uint8 dtype, uint64[] calldata shape) external pure returns (uint256) {
        return Commitments.dataTreeDepth(dtype, shape);
    }

    function tensorRootFromDataRoot(uint8 dtype, uint64[] calldata shape, bytes32 dataTreeRoot)
        external
        pure
        returns (bytes32)
    {
        return Commitments.tensorRootFromDataRoot(dtype, shape, dataTreeRoot);
    }

    function dataRoot(bytes calldata data) external view returns (bytes32) {
        return Commitments.dataRoot(data);
    }

    function tensorRoot(uint8 dtype, uint64[] calldata shape, bytes calldata data)
        external
        view
        returns (bytes32)
    {
        return Commitments.tensorRoot(dtype, shape, data);
    }

    ////////////////////////////////////////////////////////////////
    //                          Proofs                            //
    ////////////////////////////////////////////////////////////////

    function verifyLeafUpdate(
        bytes32 statePrev,
        bytes32 stateNext,
        uint256 index,
        bytes32 leaf,
        bytes32[] calldata path
    ) external view {
        Commitments.verifyLeafUpdate(statePrev, stateNext, index, leaf, path);
    }

    function verifyTensorRange(
        bytes32 root,
        uint8 dtype,
        uint64[] calldata shape,
        uint256 start,
        uint256 end,
        Commitments.RangeProof calldata proof
    ) external view returns (bytes memory opened) {
        return Commitments.verifyTensorRange(root, dtype, shape, start, end, proof);
    }

    function verifyDescentStep(
        bytes32 node,
        uint256 height,
        uint256 index,
        bytes32[] calldata children,
        uint8 dtype,
        uint64[] calldata shape
    ) external view {
        Commitments.verifyDescentStep(node, height, index, children, dtype, shape);
    }

    function verifyLeafChunk(
        bytes32 leaf,
        uint256 leafIndex,
        bytes calldata chunk,
        uint8 dtype,
        uint64[] calldata shape
    ) external view returns (bytes memory data) {
        return Commitments.verifyLeafChunk(leaf, leafIndex, chunk, dtype, shape);
    }

    function elementByteRange(uint8 dtype, uint64[] calldata shape, uint256 flatIndex)
        external
        pure
        returns (uint256 start, uint256 end)
    {
        return Commitments.elementByteRange(dtype, shape, flatIndex);
    }

    function decodeElement(uint8 dtype, bytes calldata data, uint256 index)
        external
        pure
        returns (int256)
    {
        return Commitments.decodeElement(dtype, data, index);
    }

    function decodeClaimedElement(uint8 dtype, bytes calldata data, uint256 index)
        external
        pure
        returns (int256)
    {
        return Commitments.decodeClaimedElement(dtype, data, index);
    }

    ////////////////////////////////////////////////////////////////
    //                      Gas measurements                      //
    ////////////////////////////////////////////////////////////////

    /// @notice Execution gas of hashing one 1024-byte leaf chunk from calldata.
    function gasLeafHash(bytes calldata chunk) external view returns (uint256 gasUsed) {
        uint256 offset;
        assembly {
            offset := chunk.offset
        }
        uint256 before = gasleft();
        Sha256Merkle.hashChunkAt(offset);
        gasUsed = before - gasleft();
    }

    /// @notice Execution gas of `verifyTensorRange` (reverts like it on a bad proof).
    function gasVerifyTensorRange(
        bytes32 root,
        uint8 dtype,
        uint64[] calldata shape,
        uint256 start,
        uint256 end,
        Commitments.RangeProof calldata proof
    ) external view returns (uint256 gasUsed) {
        uint256 before = gasleft();
        Commitments.verifyTensorRange(root, dtype, shape, start, end, proof);
        gasUsed = before - gasleft();
    }

    /// @notice Execution gas of `verifyLeafUpdate` (reverts like it on a bad update).
    function gasVerifyLeafUpdate(
        bytes32 statePrev,
        bytes32 stateNext,
        uint256 index,
        bytes32 leaf,
        bytes32[] calldata path
    ) external view returns (uint256 gasUsed) {
        uint256 before = gasleft();
        Commitments.verifyLeafUpdate(statePrev, stateNext, index, leaf, path);
        gasUsed = before - gasleft();
    }

    /// @notice Execution gas of `zeroHash(height)`.
    function gasZeroHash(uint256 height) external view returns (uint256 gasUsed) {
        uint256 before = gasleft();
        Sha256Merkle.zeroHash(height);
        gasUsed = before - gasleft();
    }
}
