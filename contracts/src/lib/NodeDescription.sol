// SPDX-License-Identifier: MIT
pragma solidity 0.8.37;

import {
    AttributeCodeInvalid,
    AttributeWithoutValue,
    ColumnSourceMissing,
    DescriptionTrailingBytes,
    DescriptionTruncated,
    UnknownInputKind,
    UnknownOpCode
} from "./OneStepErrors.sol";

/// @title NodeDescription
/// @notice Parses a node description (docs/protocol.md, "Nodes"), as
///         `optinfer.prover.one_step_element.parse_node_description` does:
///
///             uint16 op_code || uint8 n_inputs || n_inputs x (uint8 kind || uint32 index)
///               || uint8 n_attributes || per attribute, codes increasing:
///                  uint8 code || uint8 n_values || n_values x int64
///               || MatMulInteger only: uint8 kind || uint32 index      (its column source)
///
///         all big-endian. Op codes are 1-based positions in `opset.OP_ORDER`.
library NodeDescription {
    // Op codes: 1-based positions in optinfer.models.opset.OP_ORDER (append only).
    uint8 internal constant MATMUL_INTEGER = 1;
    uint8 internal constant CAST = 2;
    uint8 internal constant ADD = 3;
    uint8 internal constant SUB = 4;
    uint8 internal constant MUL = 5;
    uint8 internal constant DIV = 6;
    uint8 internal constant MIN = 7;
    uint8 internal constant MAX = 8;
    uint8 internal constant GREATER = 9;
    uint8 internal constant CLIP = 10;
    uint8 internal constant REDUCE_SUM = 11;
    uint8 internal constant REDUCE_MAX = 12;
    uint8 internal constant ARG_MAX = 13;
    uint8 internal constant GATHER = 14;
    uint8 internal constant GATHER_ELEMENTS = 15;
    uint8 internal constant RESHAPE = 16;
    uint8 internal constant TRANSPOSE = 17;
    uint8 internal constant CONCAT = 18;
    uint8 internal constant SLICE = 19;
    uint8 internal constant SHAPE = 20;
    uint8 internal constant RANGE = 21;

    // Input kinds.
    uint8 internal constant KIND_LEAF = 0;
    uint8 internal constant KIND_CONSTANT = 1;
    uint8 internal constant KIND_ABSENT = 2;

    // Attribute codes.
    uint8 internal constant ATTR_AXIS = 1;
    uint8 internal constant ATTR_KEEPDIMS = 2;
    uint8 internal constant ATTR_PERM = 3;
    uint8 internal constant ATTR_TO = 4;
    uint8 internal constant ATTR_SELECT_LAST_INDEX = 5;

    /// @notice A parsed description. `kinds[p]`/`indices[p]` name input p; `attributeMask` has
    ///         bit `code` set for each attribute present; a scalar attribute's value is its
    ///         first listed value (as in the reference), `perm` keeps all of them.
    struct Node {
        uint8 op;
        uint8[] kinds;
        uint32[] indices;
        uint256 attributeMask;
        int64 axis;
        int64 keepdims;
        int64 to;
        int64 selectLastIndex;
        int64[] perm;
        uint8 columnKind;
        uint32 columnIndex;
    }

    /// @notice Parse `description`; reverts DescriptionTruncated, DescriptionTrailingBytes,
    ///         UnknownOpCode, UnknownInputKind, AttributeCodeInvalid, AttributeWithoutValue or
    ///         ColumnSourceMissing, in the reference's reading order.
    function parse(bytes calldata description) internal pure returns (Node memory node) {
        uint256 at = 0;
        uint256 code;
        (code, at) = _read(description, at, 2);
        // Rule: the op is one of the op set's (1-based position in OP_ORDER).
        if (code < MATMUL_INTEGER || code > RANGE) revert UnknownOpCode(code);
        node.op = uint8(code);
        uint256 inputCount;
        (inputCount, at) = _read(description, at, 1);
        node.kinds = new uint8[](inputCount);
        node.indices = new uint32[](inputCount);
        for (uint256 p = 0; p < inputCount; ++p) {
            (node.kinds[p], node.indices[p], at) = _reference(description, at);
        }
        at = _attributes(node, description, at);
        if (node.op == MATMUL_INTEGER) {
            (node.columnKind, node.columnIndex, at) = _reference(description, at);
            // Rule: every MatMulInteger names the tensor whose rows are B's columns.
            if (node.columnKind == KIND_ABSENT) revert ColumnSourceMissing();
        }
        // Rule: a description is exactly its fields.
        if (at != description.length) revert DescriptionTrailingBytes(description.length);
    }

    /// @notice Whether input `position` exists and is not absent.
    function present(Node memory node, uint256 position) internal pure returns (bool) {
        return position < node.kinds.length && node.kinds[position] != KIND_ABSENT;
    }

    /// @notice Whether the attribute with `code` is in the description.
    function has(Node memory node, uint8 code) internal pure returns (bool) {
        return node.attributeMask & (uint256(1) << code) != 0;
    }

    /// @dev The attribute list, starting at `at`; returns the offset after it.
    function _attributes(Node memory node, bytes calldata d, uint256 at)
        private
        pure
        returns (uint256)
    {
        uint256 count;
        (count, at) = _read(d, at, 1);
        uint256 previous = 0;
        for (uint256 a = 0; a < count; ++a) {
            uint256 code;
            (code, at) = _read(d, at, 1);
            // Rule: attribute codes are known and strictly increasing.
            if (code < ATTR_AXIS || code > ATTR_SELECT_LAST_INDEX || code <= previous) {
                revert AttributeCodeInvalid(code);
            }
            previous = code;
            uint256 valueCount;
            (valueCount, at) = _read(d, at, 1);
            int64[] memory values = new int64[](valueCount);
            for (uint256 v = 0; v < valueCount; ++v) {
                uint256 raw;
                (raw, at) = _read(d, at, 8);
                values[v] = int64(uint64(raw));
            }
            node.attributeMask |= uint256(1) << code;
            if (code == ATTR_PERM) {
                node.perm = values;
                continue;
            }
            // Rule: a scalar attribute has a value (the reference reads its first one).
            if (valueCount == 0) revert AttributeWithoutValue(code);
            if (code == ATTR_AXIS) node.axis = values[0];
            else if (code == ATTR_KEEPDIMS) node.keepdims = values[0];
            else if (code == ATTR_TO) node.to = values[0];
            else node.selectLastIndex = values[0];
        }
        return at;
    }

    /// @dev uint8 kind || uint32 index at `at`.
    function _reference(bytes calldata d, uint256 at)
        private
        pure
        returns (uint8 kind, uint32 index, uint256 next)
    {
        uint256 rawKind;
        uint256 rawIndex;
        (rawKind, next) = _read(d, at, 1);
        (rawIndex, next) = _read(d, next, 4);
        // Rule: an input is a state leaf, a constant or absent.
        if (rawKind > KIND_ABSENT) revert UnknownInputKind(rawKind);
        return (uint8(rawKind), uint32(rawIndex), next);
    }

    /// @dev The `size`-byte big-endian unsigned integer at `at`, and the offset after it.
    function _read(bytes calldata d, uint256 at, uint256 size)
        private
        pure
        returns (uint256 value, uint256 next)
    {
        next = at + size;
        // Rule: every field lies inside the description.
        if (next > d.length) revert DescriptionTruncated(at);
        assembly {
            value := shr(sub(256, shl(3, size)), calldataload(add(d.offset, at)))
        }
    }
}
