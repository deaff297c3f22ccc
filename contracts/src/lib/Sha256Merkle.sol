// SPDX-License-Identifier: MIT
pragma solidity 0.8.37;

import {LeafIndexOutsideTree} from "../Errors.sol";

/// @title Sha256Merkle
/// @notice The protocol's one Merkle construction (docs/protocol.md, "Merkle trees") over the
///         SHA-256 precompile: internal node = sha256(left || right) over exactly 64 bytes,
///         data leaf = sha256(1024-byte chunk), padding leaf ZERO = bytes32(0), and Z_h the root
///         of an all-ZERO subtree of height h.
/// @dev    Gas. Every hash is a STATICCALL to the precompile at address 0x02 (60 + 12 gas per
///         32-byte word: 84 for a node, 444 for a leaf chunk) made straight from where the bytes
///         already are: nodes are hashed from the scratch words 0x00..0x3f, levels are folded in
///         place in memory, and chunks are copied once from calldata (calldatacopy, 3 gas per
///         word) into free memory. Solidity's `sha256(abi.encodePacked(a, b))` would allocate
///         and copy on every call instead. The price is that these functions are `view`, not
///         `pure`: the compiler counts an assembly STATICCALL as reading the environment.
///
///         A precompile call only fails when it runs out of gas; every call checks success and
///         reverts empty-handed then, so a starved call can never yield a stale "hash".
library Sha256Merkle {
    /// @notice Bytes of tensor data per leaf chunk (protocol constant LEAF_BYTES).
    uint256 internal constant LEAF_BYTES = 1024;

    /// @notice Heights whose Z_h is read from the table in `zeroHash` (above: hashed upwards).
    uint256 internal constant ZERO_HASH_TABLE_MAX = 32;

    ////////////////////////////////////////////////////////////////
    //                       Single hashes                        //
    ////////////////////////////////////////////////////////////////

    /// @notice An internal node: sha256(left || right), exactly 64 bytes in.
    function hashPair(bytes32 left, bytes32 right) internal view returns (bytes32 node) {
        assembly ("memory-safe") {
            // The two scratch words at 0x00..0x3f are free for any use between statements.
            mstore(0x00, left)
            mstore(0x20, right)
            if iszero(staticcall(gas(), 0x02, 0x00, 0x40, 0x00, 0x20)) { revert(0, 0) }
            node := mload(0x00)
        }
    }

    /// @notice sha256 of the LEAF_BYTES calldata bytes starting at calldata offset
    ///         `chunkOffset`. The caller guarantees they lie inside its calldata argument.
    /// @dev    The chunk is copied to free memory (past the free memory pointer, which is left
    ///         unchanged: temporary use, overwritten by the next allocation).
    function hashChunkAt(uint256 chunkOffset) internal view returns (bytes32 leaf) {
        assembly ("memory-safe") {
            let buffer := mload(0x40)
            calldatacopy(buffer, chunkOffset, 1024)
            if iszero(staticcall(gas(), 0x02, buffer, 1024, 0x00, 0x20)) { revert(0, 0) }
            leaf := mload(0x00)
        }
    }

    /// @notice Z_h: the root of an all-ZERO subtree of height h (Z_0 = ZERO,
    ///         Z_{h+1} = sha256(Z_h || Z_h)).
    /// @dev    Heights 0..32 come from a table (a Yul switch: at most 33 comparisons, under
    ///         ~700 gas, against ~200 gas per level for hashing upwards); higher ones hash up from
    ///         Z_32. tests/contracts/test_commitments_onchain.py checks every entry against
    ///         `optinfer.prover.commitments.ZERO_HASHES`.
    function zeroHash(uint256 height) internal view returns (bytes32 z) {
        uint256 tableHeight = height > ZERO_HASH_TABLE_MAX ? ZERO_HASH_TABLE_MAX : height;
        assembly ("memory-safe") {
            switch tableHeight
            case 0 { z := 0x0000000000000000000000000000000000000000000000000000000000000000 }
            case 1 { z := 0xf5a5fd42d16a20302798ef6ed309979b43003d2320d9f0e8ea9831a92759fb4b }
            case 2 { z := 0xdb56114e00fdd4c1f85c892bf35ac9a89289aaecb1ebd0a96cde606a748b5d71 }
            case 3 { z := 0xc78009fdf07fc56a11f122370658a353aaa542ed63e44c4bc15ff4cd105ab33c }
            case 4 { z := 0x536d98837f2dd165a55d5eeae91485954472d56f246df256bf3cae19352a123c }
            case 5 { z := 0x9efde052aa15429fae05bad4d0b1d7c64da64d03d7a1854a588c2cb8430c0d30 }
            case 6 { z := 0xd88ddfeed400a8755596b21942c1497e114c302e6118290f91e6772976041fa1 }
            case 7 { z := 0x87eb0ddba57e35f6d286673802a4af5975e22506c7cf4c64bb6be5ee11527f2c }
            case 8 { z := 0x26846476fd5fc54a5d43385167c95144f2643f533cc85bb9d16b782f8d7db193 }
            case 9 { z := 0x506d86582d252405b840018792cad2bf1259f1ef5aa5f887e13cb2f0094f51e1 }
            case 10 { z := 0xffff0ad7e659772f9534c195c815efc4014ef1e1daed4404c06385d11192e92b }
            case 11 { z := 0x6cf04127db05441cd833107a52be852868890e4317e6a02ab47683aa75964220 }
            case 12 { z := 0xb7d05f875f140027ef5118a2247bbb84ce8f2f0f1123623085daf7960c329f5f }
            case 13 { z := 0xdf6af5f5bbdb6be9ef8aa618e4bf8073960867171e29676f8b284dea6a08a85e }
            case 14 { z := 0xb58d900f5e182e3c50ef74969ea16c7726c549757cc23523c369587da7293784 }
            case 15 { z := 0xd49a7502ffcfb0340b1d7885688500ca308161a7f96b62df9d083b71fcc8f2bb }
            case 16 { z := 0x8fe6b1689256c0d385f42f5bbe2027a22c1996e110ba97c171d3e5948de92beb }
            case 17 { z := 0x8d0d63c39ebade8509e0ae3c9c3876fb5fa112be18f905ecacfecb92057603ab }
            case 18 { z := 0x95eec8b2e541cad4e91de38385f2e046619f54496c2382cb6cacd5b98c26f5a4 }
            case 19 { z := 0xf893e908917775b62bff23294dbbe3a1cd8e6cc1c35b4801887b646a6f81f17f }
            case 20 { z := 0xcddba7b592e3133393c16194fac7431abf2f5485ed711db282183c819e08ebaa }
            case 21 { z := 0x8a8d7fe3af8caa085a7639a832001457dfb9128a8061142ad0335629ff23ff9c }
            case 22 { z := 0xfeb3c337d7a51a6fbf00b9e34c52e1c9195c969bd4e7a0bfd51d5c5bed9c1167 }
            case 23 { z := 0xe71f0aa83cc32edfbefa9f4d3e0174ca85182eec9f3a09f6a6c0df6377a510d7 }
            case 24 { z := 0x31206fa80a50bb6abe29085058f16212212a60eec8f049fecb92d8c8e0a84bc0 }
            case 25 { z := 0x21352bfecbeddde993839f614c3dac0a3ee37543f9b412b16199dc158e23b544 }
            case 26 { z := 0x619e312724bb6d7c3153ed9de791d764a366b389af13c58bf8a8d90481a46765 }
            case 27 { z := 0x7cdd2986268250628d0c10e385c58c6191e6fbe05191bcc04f133f2cea72c1c4 }
            case 28 { z := 0x848930bd7ba8cac54661072113fb278869e07bb8587f91392933374d017bcbe1 }
            case 29 { z := 0x8869ff2c22b28cc10510d9853292803328be4fb0e80495e8bb8d271f5b889636 }
            case 30 { z := 0xb5fe28e79f1b850f8658246ce9b6a1e7b49fc06db7143e8fe0b4f2b0c5523a5c }
            case 31 { z := 0x985e929f70af28d0bdd1a90a808f977f597c7c778c489e98d3bd8910d31ac0f7 }
            case 32 { z := 0xc6f67e02e6e4e1bdefb994c6098953f34636ba2b6ca20a4721d2b26a886722ff }
        }
        for (uint256 h = ZERO_HASH_TABLE_MAX; h < height; ++h) {
            z = hashPair(z, z);
        }
    }

    ////////////////////////////////////////////////////////////////
    //                     Paths and levels                       //
    ////////////////////////////////////////////////////////////////

    /// @notice The root implied by `leaf` at `index` and its sibling `path` (bottom first):
    ///         at height h the running node is the right child iff bit h of `index` is 1.
    /// @dev    Reverts LeafIndexOutsideTree unless index < 2**path.length, so one path cannot
    ///         be replayed for another slot. Whether path.length is the tree's depth is the
    ///         caller's check (the depth is fixed by the context).
    function rootFromPath(bytes32 leaf, uint256 index, bytes32[] calldata path)
        internal
        view
        returns (bytes32 node)
    {
        uint256 depth = path.length;
        // Rule: the leaf index lies inside a tree of depth len(path).
        if (depth < 256 && index >> depth != 0) revert LeafIndexOutsideTree(index, depth);
        node = leaf;
        assembly ("memory-safe") {
            for { let h := 0 } lt(h, depth) { h := add(h, 1) } {
                let sibling := calldataload(add(path.offset, shl(5, h)))
                // Bit h of index is 1: the node is the right child, (sibling || node) is
                // hashed; else (node || sibling). Branch-free: node goes to word isRight.
                let isRight := and(shr(h, index), 1)
                mstore(shl(5, isRight), node)
                mstore(shl(5, xor(isRight, 1)), sibling)
                if iszero(staticcall(gas(), 0x02, 0x00, 0x40, 0x00, 0x20)) { revert(0, 0) }
                node := mload(0x00)
            }
        }
    }

    /// @notice Fold `count` consecutive nodes stored as 32-byte words from memory address
    ///         `level` into their common ancestor, `count` a power of two (1 returns the node
    ///         itself). The words are overwritten: the fold is done in place.
    /// @dev    Parent i of a level is written to word i after words 2i and 2i+1 were read (the
    ///         precompile copies its input before it writes its output), so no buffer is needed.
    function foldLevelInPlace(uint256 level, uint256 count) internal view returns (bytes32 root) {
        assembly ("memory-safe") {
            for { let n := count } gt(n, 1) { n := shr(1, n) } {
                for { let i := 0 } lt(i, shr(1, n)) { i := add(i, 1) } {
                    let pair := add(level, shl(6, i))
                    if iszero(staticcall(gas(), 0x02, pair, 0x40, add(level, shl(5, i)), 0x20)) {
                        revert(0, 0)
                    }
                }
            }
            root := mload(level)
        }
    }

    /// @notice Root of the tree whose leaves are `nodes` (a power-of-two count of consecutive
    ///         nodes of one level): what `node_from_children` computes in the reference.
    function rootOfNodes(bytes32[] calldata nodes) internal view returns (bytes32 root) {
        uint256 level;
        assembly ("memory-safe") {
            level := mload(0x40)
            calldatacopy(level, nodes.offset, shl(5, nodes.length))
        }
        // Temporary use of free memory: the fold allocates nothing.
        root = foldLevelInPlace(level, nodes.length);
    }

    /// @notice ceil(log2(count)): the depth of a tree over `count` leaves (0 for one leaf, and
    ///         for zero), i.e. the bit length of count - 1.
    /// @dev    Branch-free binary search for the highest set bit (8 halving steps, ~70 gas).
    function treeDepth(uint256 count) internal pure returns (uint256 depth) {
        if (count <= 1) return 0;
        uint256 x = count - 1;
        assembly ("memory-safe") {
            // depth accumulates floor(log2(x)), one bit per step, from the top half down.
            depth := shl(7, lt(0xffffffffffffffffffffffffffffffff, x))
            depth := or(depth, shl(6, lt(0xffffffffffffffff, shr(depth, x))))
            depth := or(depth, shl(5, lt(0xffffffff, shr(depth, x))))
            depth := or(depth, shl(4, lt(0xffff, shr(depth, x))))
            depth := or(depth, shl(3, lt(0xff, shr(depth, x))))
            depth := or(depth, shl(2, lt(0xf, shr(depth, x))))
            depth := or(depth, shl(1, lt(0x3, shr(depth, x))))
            depth := or(depth, lt(0x1, shr(depth, x)))
            // Bit length = floor(log2(x)) + 1.
            depth := add(depth, 1)
        }
    }
}
