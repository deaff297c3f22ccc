// SPDX-License-Identifier: MIT
pragma solidity 0.8.37;

import {
    DescentChildrenMismatch,
    DescentFanOutInvalid,
    DescentNodeOutsideTree,
    DescentPaddingNotZero,
    ElementIndexOutsideTensor,
    ElementOutsideData,
    InvalidBoolElement,
    InvalidByteRange,
    LeafChunkHashMismatch,
    LeafChunkLengthMismatch,
    LeafChunkOutsideTensor,
    LeafChunkPaddingNotZero,
    RangeChunksLengthMismatch,
    RangeProofRootMismatch,
    RangeSiblingCountMismatch,
    StatePathLengthMismatch,
    StateSlotNotEmpty,
    StateUpdateMismatch,
    TensorDataLengthMismatch,
    TensorRankTooLarge,
    TensorTooLarge,
    UnsupportedDtype,
    ZeroTensorRoot
} from "../Errors.sol";
import {Sha256Merkle} from "./Sha256Merkle.sol";

/// @title Commitments
/// @notice The verifier side of docs/protocol.md's commitments, byte for byte what
///         `optinfer.prover.commitments` computes: tensor headers and roots, the state leaf
///         update (dispute step 4), range proofs over a tensor's 1 KiB leaf chunks, the
///         element-descent step and the leaf-chunk reveal (step 5), element decoding.
///         Every failed check reverts with the custom error named after the broken rule.
/// @dev    A tensor is described by its ONNX dtype code and its shape as `uint64[] memory`
///         (calldata arrays convert implicitly). Proof bytes are taken as calldata and opened
///         bytes are returned as calldata slices, so nothing large is copied to memory.
///         Size bound (stricter than the Python reference, for overflow safety only): a
///         tensor's data must stay below 2**64 bytes, else TensorTooLarge.
library Commitments {
    /// @notice Leaf slots of the state tree: 2**STATE_DEPTH.
    uint256 internal constant STATE_DEPTH = 16;

    /// @notice Bytes per leaf chunk (protocol constant LEAF_BYTES).
    uint256 internal constant LEAF_BYTES = Sha256Merkle.LEAF_BYTES;

    /// @notice ONNX TensorProto codes of the five committable dtypes.
    uint8 internal constant DTYPE_UINT8 = 2;
    uint8 internal constant DTYPE_INT8 = 3;
    uint8 internal constant DTYPE_INT32 = 6;
    uint8 internal constant DTYPE_INT64 = 7;
    uint8 internal constant DTYPE_BOOL = 9;

    /// @notice A contiguous byte range's opening: `chunks` are the covering leaf chunks
    ///         concatenated (1024 bytes each, the tensor's last one with its zero padding);
    ///         `siblings` the boundary hashes in the order `verifyTensorRange` consumes them
    ///         (per height from 0 up: the left boundary's, then the right boundary's).
    ///         Same fields as the reference's `RangeProof`.
    struct RangeProof {
        bytes chunks;
        bytes32[] siblings;
    }

    ////////////////////////////////////////////////////////////////
    //                        Model root                          //
    ////////////////////////////////////////////////////////////////

    /// @notice A model's root, its id in the registry: SHA-256 of its node-description root,
    ///         its constants root, and the op-set version and node count as uint32 big-endian
    ///         (docs/protocol.md, "Model root"). The op set and the node count are part of it,
    ///         so a registration cannot pair a model's roots with other values.
    function modelRoot(
        bytes32 nodesRoot,
        bytes32 constantsRoot,
        uint32 opsetVersion,
        uint32 nodeCount
    ) internal pure returns (bytes32) {
        return sha256(abi.encodePacked(nodesRoot, constantsRoot, opsetVersion, nodeCount));
    }

    ////////////////////////////////////////////////////////////////
    //                  Dtypes, shapes, headers                   //
    ////////////////////////////////////////////////////////////////

    /// @notice Bytes per element of `dtype`; reverts UnsupportedDtype for any other code.
    function itemSize(uint8 dtype) internal pure returns (uint256) {
        if (dtype == DTYPE_UINT8 || dtype == DTYPE_INT8 || dtype == DTYPE_BOOL) return 1;
        if (dtype == DTYPE_INT32) return 4;
        if (dtype == DTYPE_INT64) return 8;
        revert UnsupportedDtype(dtype);
    }

    /// @notice Number of elements: the product of the dimensions (1 for a scalar, 0 when any
    ///         dimension is 0). Reverts TensorTooLarge at 2**64 elements or more.
    function elementCount(uint64[] memory shape) internal pure returns (uint256 count) {
        // A zero dimension empties the tensor whatever the others are, even if their product
        // alone would overflow: look for it first.
        for (uint256 i = 0; i < shape.length; ++i) {
            if (shape[i] == 0) return 0;
        }
        count = 1;
        for (uint256 i = 0; i < shape.length; ++i) {
            // Both factors are below 2**64, so the product cannot overflow 256 bits.
            count *= shape[i];
            if (count >> 64 != 0) revert TensorTooLarge();
        }
    }

    /// @notice Length of a tensor's canonical data bytes: elements * itemsize.
    ///         Reverts UnsupportedDtype, or TensorTooLarge at 2**64 bytes or more.
    function tensorByteLength(uint8 dtype, uint64[] memory shape)
        internal
        pure
        returns (uint256 byteLength)
    {
        byteLength = elementCount(shape) * itemSize(dtype);
        if (byteLength >> 64 != 0) revert TensorTooLarge();
    }

    /// @notice Number of leaf chunks of `byteLength` data bytes: ceil(B / 1024), and one
    ///         (all-zero) chunk for an empty tensor.
    function leafCount(uint256 byteLength) internal pure returns (uint256) {
        return byteLength == 0 ? 1 : (byteLength + LEAF_BYTES - 1) / LEAF_BYTES;
    }

    /// @notice Depth of a tensor's data tree: ceil(log2(leafCount)), 0 for one chunk.
    function dataTreeDepth(uint8 dtype, uint64[] memory shape) internal pure returns (uint256) {
        return Sha256Merkle.treeDepth(leafCount(tensorByteLength(dtype, shape)));
    }

    /// @notice `uint8 dtype || uint8 rank || uint64_be(d_0) || ... || uint64_be(d_{n-1})`.
    ///         Reverts UnsupportedDtype or TensorRankTooLarge (rank above 255).
    /// @dev    Not abi.encodePacked(shape): packed arrays pad each element to 32 bytes.
    function tensorHeader(uint8 dtype, uint64[] memory shape)
        internal
        pure
        returns (bytes memory header)
    {
        header = new bytes(_headerLength(dtype, shape));
        uint256 out;
        assembly ("memory-safe") {
            out := add(header, 0x20)
        }
        _writeHeader(dtype, shape, out);
    }

    /// @dev 2 + 8 * rank, after checking the dtype and the rank.
    function _headerLength(uint8 dtype, uint64[] memory shape) private pure returns (uint256) {
        itemSize(dtype); // reverts UnsupportedDtype
        uint256 rank = shape.length;
        if (rank > 255) revert TensorRankTooLarge(rank);
        return 2 + 8 * rank;
    }

    /// @dev Write the header bytes at memory address `out` (checked by `_headerLength` first).
    ///      Each dimension is a 32-byte store with the dimension in its top 8 bytes: its 24 low
    ///      (zero) bytes land on the next dimension's slot, rewritten next, or past the header,
    ///      where the caller's next write (or nothing it reads) lies.
    function _writeHeader(uint8 dtype, uint64[] memory shape, uint256 out) private pure {
        assembly ("memory-safe") {
            let rank := mload(shape)
            mstore8(out, dtype)
            mstore8(add(out, 1), rank)
            let dims := add(shape, 0x20)
            for { let i := 0 } lt(i, rank) { i := add(i, 1) } {
                mstore(add(add(out, 2), shl(3, i)), shl(192, mload(add(dims, shl(5, i)))))
            }
        }
    }

    ////////////////////////////////////////////////////////////////
    //                       Tensor roots                         //
    ////////////////////////////////////////////////////////////////

    /// @notice T = sha256(header(dtype, shape) || dataTreeRoot), dataTreeRoot the data root.
    function tensorRootFromDataRoot(uint8 dtype, uint64[] memory shape, bytes32 dataTreeRoot)
        internal
        pure
        returns (bytes32)
    {
        // header || dataTreeRoot built once in a fresh buffer and hashed by the builtin (which
        // keeps this function pure for callers that are).
        uint256 headerLength = _headerLength(dtype, shape);
        bytes memory preimage = new bytes(headerLength + 32);
        uint256 out;
        assembly ("memory-safe") {
            out := add(preimage, 0x20)
        }
        _writeHeader(dtype, shape, out);
        assembly ("memory-safe") {
            mstore(add(out, headerLength), dataTreeRoot)
        }
        return sha256(preimage);
    }

    /// @notice Root of the data tree over `data` (a tensor's canonical bytes): sha256 of each
    ///         1024-byte chunk, the last one zero-padded (one all-zero chunk for no data), the
    ///         leaf list padded with ZERO to a power of two, folded pairwise.
    /// @dev    Meant for the small tensors a contract builds itself (the input sequence, the
    ///         output tokens): memory grows with 32 bytes per padded leaf.
    function dataRoot(bytes memory data) internal view returns (bytes32 root) {
        uint256 length = data.length;
        uint256 chunks = leafCount(length);
        uint256 width = uint256(1) << Sha256Merkle.treeDepth(chunks);
        // Zero-initialised: the padding leaves are ZERO.
        bytes32[] memory level = new bytes32[](width);
        assembly ("memory-safe") {
            let src := add(data, 0x20)
            let dst := add(level, 0x20)
            let fullChunks := div(length, 1024)
            // Whole chunks are hashed where they lie.
            for { let i := 0 } lt(i, fullChunks) { i := add(i, 1) } {
                let chunk := add(src, shl(10, i))
                if iszero(staticcall(gas(), 0x02, chunk, 1024, add(dst, shl(5, i)), 0x20)) {
                    revert(0, 0)
                }
            }
            // The last partial chunk (or the empty tensor's chunk) is zero-padded in free memory:
            // zeroed by copying from past the end of calldata, then the tail copied on top.
            let tail := mod(length, 1024)
            if or(tail, iszero(length)) {
                let buffer := mload(0x40)
                calldatacopy(buffer, calldatasize(), 1024)
                mcopy(buffer, add(src, shl(10, fullChunks)), tail)
                if iszero(staticcall(gas(), 0x02, buffer, 1024, add(dst, shl(5, fullChunks)), 0x20))
                {
                    revert(0, 0)
                }
            }
        }
        uint256 levelStart;
        assembly ("memory-safe") {
            levelStart := add(level, 0x20)
        }
        root = Sha256Merkle.foldLevelInPlace(levelStart, width);
    }

    /// @notice The tensor root of a tensor of `dtype` and `shape` whose canonical data bytes are
    ///         `data`; reverts TensorDataLengthMismatch unless data has the shape's length.
    function tensorRoot(uint8 dtype, uint64[] memory shape, bytes memory data)
        internal
        view
        returns (bytes32)
    {
        uint256 expected = tensorByteLength(dtype, shape);
        if (data.length != expected) revert TensorDataLengthMismatch(data.length, expected);
        return tensorRootFromDataRoot(dtype, shape, dataRoot(data));
    }

    ////////////////////////////////////////////////////////////////
    //                  State leaf update (step 4)                //
    ////////////////////////////////////////////////////////////////

    /// @notice Check that `stateNext` is `statePrev` with leaf `index` changed from ZERO to the
    ///         tensor root `leaf`, both proven by the same sibling `path`:
    ///         len(path) == STATE_DEPTH, leaf != ZERO, root_from_path(ZERO, index, path) ==
    ///         statePrev and root_from_path(leaf, index, path) == stateNext.
    /// @dev    Reverts, in that order, StatePathLengthMismatch, ZeroTensorRoot,
    ///         LeafIndexOutsideTree (index >= 2**16), StateSlotNotEmpty, StateUpdateMismatch.
    ///         32 node hashes.
    function verifyLeafUpdate(
        bytes32 statePrev,
        bytes32 stateNext,
        uint256 index,
        bytes32 leaf,
        bytes32[] calldata path
    ) internal view {
        // Rule: a state path has exactly one sibling per level of the state tree.
        if (path.length != STATE_DEPTH) revert StatePathLengthMismatch(path.length);
        // Rule: a tensor root is a SHA-256 digest, never the empty-slot marker.
        if (leaf == bytes32(0)) revert ZeroTensorRoot();
        // Rule: the slot was empty before, so no committed tensor is overwritten.
        if (Sha256Merkle.rootFromPath(bytes32(0), index, path) != statePrev) {
            revert StateSlotNotEmpty(index);
        }
        // Rule: the new state differs from the old one in that slot only.
        if (Sha256Merkle.rootFromPath(leaf, index, path) != stateNext) {
            revert StateUpdateMismatch(index);
        }
    }

    ////////////////////////////////////////////////////////////////
    //                        Range proofs                        //
    ////////////////////////////////////////////////////////////////

    /// @notice Number of boundary siblings the multiproof of leaves [first, last] needs in a tree
    ///         of `depth`: per height, one if the range's first node is a right child, one if
    ///         its last node is a left child.
    function boundarySiblingCount(uint256 first, uint256 last, uint256 depth)
        internal
        pure
        returns (uint256 count)
    {
        assembly ("memory-safe") {
            for { let h := 0 } lt(h, depth) { h := add(h, 1) } {
                count := add(count, add(and(first, 1), iszero(and(last, 1))))
                first := shr(1, first)
                last := shr(1, last)
            }
        }
    }

    /// @notice Verify `proof` opens bytes [start, end) of the tensor with root `root`, `dtype`
    ///         and `shape`, and return those bytes (a slice of proof.chunks).
    /// @dev    The covering leaves and the tree depth are derived from the shape, never taken
    ///         from the proof. Reverts InvalidByteRange, RangeChunksLengthMismatch,
    ///         RangeSiblingCountMismatch, RangeProofRootMismatch (also for any tampered chunk
    ///         byte, sibling, dtype or shape that keeps the counts), or the dtype/shape errors.
    ///         Gas: ~450 + 100 per chunk, ~190 per internal node, ~36 per sibling of calldata.
    function verifyTensorRange(
        bytes32 root,
        uint8 dtype,
        uint64[] memory shape,
        uint256 start,
        uint256 end,
        RangeProof calldata proof
    ) internal view returns (bytes calldata opened) {
        uint256 byteLength = tensorByteLength(dtype, shape);
        // Rule: a range proof opens a non-empty range inside the tensor's data.
        if (start >= end || end > byteLength) revert InvalidByteRange(start, end, byteLength);
        uint256 first = start / LEAF_BYTES;
        bytes32 computedDataRoot =
            _rangeDataRoot(proof, first, (end - 1) / LEAF_BYTES, leafCount(byteLength));
        // Rule: the rebuilt data root, bound to dtype and shape, is the committed tensor root.
        if (tensorRootFromDataRoot(dtype, shape, computedDataRoot) != root) {
            revert RangeProofRootMismatch();
        }
        uint256 chunksStart = first * LEAF_BYTES;
        return proof.chunks[start - chunksStart:end - chunksStart];
    }

    /// @dev The data root implied by `proof` for the covering leaves [first, last] of a data
    ///      tree over `leaves` leaves, after checking the proof carries exactly the covering
    ///      chunks and exactly the boundary siblings.
    function _rangeDataRoot(RangeProof calldata proof, uint256 first, uint256 last, uint256 leaves)
        private
        view
        returns (bytes32)
    {
        bytes calldata chunks = proof.chunks;
        bytes32[] calldata siblings = proof.siblings;
        // Rule: the proof carries exactly the covering chunks, whole.
        uint256 expectedBytes = (last - first + 1) * LEAF_BYTES;
        if (chunks.length != expectedBytes) {
            revert RangeChunksLengthMismatch(chunks.length, expectedBytes);
        }
        uint256 depth = Sha256Merkle.treeDepth(leaves);
        // Rule: the proof carries exactly the boundary siblings, none missing, none extra.
        uint256 expectedSiblings = boundarySiblingCount(first, last, depth);
        if (siblings.length != expectedSiblings) {
            revert RangeSiblingCountMismatch(siblings.length, expectedSiblings);
        }
        // Slots: a left boundary sibling, the covering leaves, a right boundary sibling.
        bytes32[] memory nodes = new bytes32[](last - first + 3);
        uint256 base;
        uint256 siblingsOffset;
        assembly ("memory-safe") {
            base := add(nodes, 0x20)
            siblingsOffset := siblings.offset
        }
        _hashChunksInto(chunks, base + 0x20);
        return _foldRange(base, first, last, depth, siblingsOffset);
    }

    /// @dev Height 0 of a range: sha256 of each 1024-byte chunk of `chunks`, written as words
    ///      from memory address `out`. Each chunk is copied once into free memory to be hashed.
    function _hashChunksInto(bytes calldata chunks, uint256 out) private view {
        assembly ("memory-safe") {
            let buffer := mload(0x40)
            let count := shr(10, chunks.length)
            for { let i := 0 } lt(i, count) { i := add(i, 1) } {
                calldatacopy(buffer, add(chunks.offset, shl(10, i)), 1024)
                if iszero(staticcall(gas(), 0x02, buffer, 1024, add(out, shl(5, i)), 0x20)) {
                    revert(0, 0)
                }
            }
        }
    }

    /// @notice Fold the range's leaf hashes (slots 1.. of the words at `base`) up `depth`
    ///         heights, taking boundary siblings from calldata at `nextSibling` in proof order
    ///         (counts already checked); return the data root.
    /// @dev    Slot 0 is kept for a left boundary sibling. Per height: put the left sibling in
    ///         slot 0 when the first node is a right child (the level then starts at slot 0),
    ///         append the right sibling when the last node is a left child, then fold the now
    ///         even-length level in place into slots 1, 2, ... (parent i is hashed from slots
    ///         s+2i and s+2i+1, s = 0 or 1, and written to slot 1+i <= s+2i after both were
    ///         read: the precompile copies its input before writing its output).
    function _foldRange(
        uint256 base,
        uint256 first,
        uint256 last,
        uint256 depth,
        uint256 nextSibling
    ) private view returns (bytes32 root) {
        assembly ("memory-safe") {
            for { let h := 0 } lt(h, depth) { h := add(h, 1) } {
                let levelStart := 1 // slot of the level's first node
                let levelCount := add(sub(last, first), 1)
                if and(first, 1) {
                    // The first node is a right child: its left sibling joins the level.
                    mstore(base, calldataload(nextSibling))
                    nextSibling := add(nextSibling, 0x20)
                    levelStart := 0
                    levelCount := add(levelCount, 1)
                }
                if iszero(and(last, 1)) {
                    // The last node is a left child: its right sibling joins the level.
                    mstore(add(base, shl(5, add(levelStart, levelCount))), calldataload(nextSibling))
                    nextSibling := add(nextSibling, 0x20)
                    levelCount := add(levelCount, 1)
                }
                let level := add(base, shl(5, levelStart))
                for { let i := 0 } lt(i, shr(1, levelCount)) { i := add(i, 1) } {
                    let parent := add(base, shl(5, add(i, 1)))
                    if iszero(staticcall(gas(), 0x02, add(level, shl(6, i)), 0x40, parent, 0x20)) {
                        revert(0, 0)
                    }
                }
                first := shr(1, first)
                last := shr(1, last)
            }
            root := mload(add(base, 0x20))
        }
    }

    ////////////////////////////////////////////////////////////////
    //                 Element descent (step 5)                   //
    ////////////////////////////////////////////////////////////////

    /// @notice Check one n-ary descent step in the data tree of a tensor of `dtype`, `shape`:
    ///         `children` are the 2**m nodes at height `height - m` under the agreed `node` at
    ///         (`height`, `index`), left to right. They must rehash to `node`, and every child
    ///         wholly in the padding (first leaf at or past the last real chunk) must be
    ///         Z_{height - m}.
    /// @dev    Reverts, in that order, DescentNodeOutsideTree (height not in 1..depth or index
    ///         past its level), DescentFanOutInvalid (count not 2**m, 1 <= m <= height),
    ///         DescentChildrenMismatch, DescentPaddingNotZero(position).
    function verifyDescentStep(
        bytes32 node,
        uint256 height,
        uint256 index,
        bytes32[] calldata children,
        uint8 dtype,
        uint64[] memory shape
    ) internal view {
        uint256 leaves = leafCount(tensorByteLength(dtype, shape));
        uint256 depth = Sha256Merkle.treeDepth(leaves);
        // Rule: the agreed node is an internal node of this tensor's data tree.
        if (height == 0 || height > depth || index >> (depth - height) != 0) {
            revert DescentNodeOutsideTree(height, index, depth);
        }
        uint256 count = children.length;
        uint256 fanOutBits = Sha256Merkle.treeDepth(count);
        // Rule: a step reveals 2**m descendants, 1 <= m <= height.
        if (count < 2 || count != uint256(1) << fanOutBits || fanOutBits > height) {
            revert DescentFanOutInvalid(count, height);
        }
        // Rule: the descendants are the agreed node's.
        if (Sha256Merkle.rootOfNodes(children) != node) revert DescentChildrenMismatch();
        // Rule: padding cannot hide a lie: a child past the last chunk is the empty subtree.
        uint256 childHeight = height - fanOutBits;
        uint256 firstChild = index << fanOutBits;
        // Children are in leaf order: once one starts in the padding, all later ones do.
        uint256 position = 0;
        while (position < count && (firstChild + position) << childHeight < leaves) {
            ++position;
        }
        if (position < count) {
            bytes32 empty = Sha256Merkle.zeroHash(childHeight);
            for (; position < count; ++position) {
                if (children[position] != empty) revert DescentPaddingNotZero(position);
            }
        }
    }

    /// @notice Check the chunk revealed at the bottom of a descent: `leafIndex` is a real chunk
    ///         of the tensor, `chunk` is exactly 1024 bytes, sha256(chunk) == `leaf`, and every
    ///         byte past the tensor's end is zero. Returns the chunk's data bytes (padding cut).
    /// @dev    Bool bytes are not checked here (as in the reference): a bool element other than
    ///         0/1 is the provider's fault once named, see `decodeElement`.
    ///         Reverts LeafChunkOutsideTensor, LeafChunkLengthMismatch, LeafChunkHashMismatch,
    ///         LeafChunkPaddingNotZero.
    function verifyLeafChunk(
        bytes32 leaf,
        uint256 leafIndex,
        bytes calldata chunk,
        uint8 dtype,
        uint64[] memory shape
    ) internal view returns (bytes calldata data) {
        uint256 byteLength = tensorByteLength(dtype, shape);
        uint256 leaves = leafCount(byteLength);
        // Rule: the disputed leaf is one of the tensor's real chunks.
        if (leafIndex >= leaves) revert LeafChunkOutsideTensor(leafIndex, leaves);
        // Rule: a chunk is exactly LEAF_BYTES and hashes to its leaf.
        if (chunk.length != LEAF_BYTES) revert LeafChunkLengthMismatch(chunk.length);
        if (Sha256Merkle.hashChunkAt(_offset(chunk)) != leaf) revert LeafChunkHashMismatch();
        uint256 chunkStart = leafIndex * LEAF_BYTES;
        uint256 dataEnd = byteLength - chunkStart < LEAF_BYTES ? byteLength - chunkStart : LEAF_BYTES;
        // Rule: the bytes past the tensor's end are zero.
        if (!_isZero(chunk[dataEnd:])) revert LeafChunkPaddingNotZero();
        return chunk[:dataEnd];
    }

    ////////////////////////////////////////////////////////////////
    //                         Elements                           //
    ////////////////////////////////////////////////////////////////

    /// @notice The byte range [start, end) of element `flatIndex` (C order) in the canonical
    ///         data; reverts ElementIndexOutsideTensor unless flatIndex < elementCount(shape).
    function elementByteRange(uint8 dtype, uint64[] memory shape, uint256 flatIndex)
        internal
        pure
        returns (uint256 start, uint256 end)
    {
        uint256 size = itemSize(dtype);
        uint256 count = elementCount(shape);
        if (flatIndex >= count) revert ElementIndexOutsideTensor(flatIndex, count);
        return (flatIndex * size, (flatIndex + 1) * size);
    }

    /// @notice Element `index` of `data` (canonical bytes of whole elements of `dtype`),
    ///         decoded little-endian two's complement; bool as 0/1, any other bool byte reverts
    ///         InvalidBoolElement. Reverts ElementOutsideData past the end of `data`.
    function decodeElement(uint8 dtype, bytes calldata data, uint256 index)
        internal
        pure
        returns (int256 value)
    {
        value = decodeClaimedElement(dtype, data, index);
        if (dtype == DTYPE_BOOL && value > 1) revert InvalidBoolElement(uint8(uint256(value)));
    }

    /// @notice Element `index` of `data` as the one-step reads the provider's claimed element
    ///         (`prover.commitments.claimed_element`): like `decodeElement`, but a bool is its
    ///         byte whatever it is. A non-canonical bool byte (2..255) is then a value no op
    ///         computes, so it is judged a wrong element (the provider's fault), not a malformed
    ///         proof that would stop the dispute.
    function decodeClaimedElement(uint8 dtype, bytes calldata data, uint256 index)
        internal
        pure
        returns (int256 value)
    {
        uint256 size = itemSize(dtype);
        if (index >= data.length / size) revert ElementOutsideData(index, data.length);
        uint256 offset = index * size;
        // Little-endian: byte k has weight 256**k.
        uint256 raw = 0;
        for (uint256 k = 0; k < size; ++k) {
            raw |= uint256(uint8(data[offset + k])) << (8 * k);
        }
        if (dtype == DTYPE_UINT8 || dtype == DTYPE_BOOL) return int256(raw);
        // Signed: sign-extend from the element's top bit.
        assembly {
            value := signextend(sub(size, 1), raw)
        }
    }

    ////////////////////////////////////////////////////////////////
    //                          Helpers                           //
    ////////////////////////////////////////////////////////////////

    /// @dev Calldata offset of a calldata bytes argument.
    function _offset(bytes calldata data) private pure returns (uint256 offset) {
        assembly {
            offset := data.offset
        }
    }

    /// @dev Whether every byte of `data` is zero: whole 32-byte words from its end, then the
    ///      leading partial word masked to its first (length mod 32) bytes.
    function _isZero(bytes calldata data) private pure returns (bool) {
        uint256 accumulated = 0;
        assembly {
            let start := data.offset
            let end := add(start, data.length)
            for {} iszero(lt(sub(end, start), 0x20)) {} {
                end := sub(end, 0x20)
                accumulated := or(accumulated, calldataload(end))
            }
            let rest := sub(end, start)
            if rest {
                // Keep the first `rest` bytes of the word at `start`; the others are past `end`.
                accumulated := or(accumulated, shr(sub(256, shl(3, rest)), calldataload(start)))
            }
        }
        return accumulated == 0;
    }
}
