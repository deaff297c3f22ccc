// SPDX-License-Identifier: MIT
pragma solidity 0.8.37;

// Custom errors of the one-step verifier (OneStepVerifier.sol and its libraries), each named
// after the rule a malformed witness broke: the Python reference raises ProofError there
// (optinfer.prover.one_step.check_witness). A wrong provider element is never an error: the
// verifier returns true for it.

////////////////////////////////////////////////////////////////
//                 Node descriptions (check 1)                //
////////////////////////////////////////////////////////////////

/// @notice Thrown when the disputed node index is 0: node indices start at 1 (leaf 0 is the
///         input).
error NodeIndexZero();

/// @notice Thrown when the description's path does not have STATE_DEPTH siblings.
/// @param length The number of siblings given.
error DescriptionPathLengthMismatch(uint256 length);

/// @notice Thrown when sha256(description) is not leaf k of the model's nodes root.
/// @param k The disputed node.
error DescriptionNotInModel(uint256 k);

/// @notice Thrown when a description ends before a field it must contain.
/// @param offset Where the missing field starts.
error DescriptionTruncated(uint256 offset);

/// @notice Thrown when a description has bytes after its last field.
/// @param length The description's length.
error DescriptionTrailingBytes(uint256 length);

/// @notice Thrown when a description's op code is not a position of the op set's OP_ORDER.
/// @param opCode The code read.
error UnknownOpCode(uint256 opCode);

/// @notice Thrown when an input reference's kind is not 0 (state leaf), 1 (constant) or 2 (absent).
/// @param kind The kind read.
error UnknownInputKind(uint256 kind);

/// @notice Thrown when an attribute code is unknown or not above the previous one.
/// @param code The code read.
error AttributeCodeInvalid(uint256 code);

/// @notice Thrown when a scalar attribute (axis, keepdims, to, select_last_index) lists no value.
/// @param code The attribute's code.
error AttributeWithoutValue(uint256 code);

/// @notice Thrown when a MatMulInteger description names no column source.
error ColumnSourceMissing();

////////////////////////////////////////////////////////////////
//                   Opened tensors (check 2)                 //
////////////////////////////////////////////////////////////////

/// @notice Thrown when the opened tensors are not exactly one per present input of the node
///         (MatMulInteger's B as its column source, flagged `columns`).
/// @param position The input position of the offending opened tensor (or the count given).
error OpenedTensorsMismatch(uint256 position);

/// @notice Thrown when an opened tensor names another tensor than the one the node reads there.
/// @param position The input position.
error OpenedTensorRefMismatch(uint256 position);

/// @notice Thrown when an opened state leaf is not before node k (it is not in S_{k-1}).
/// @param leaf The leaf index.
/// @param k    The disputed node.
error LeafNotBeforeNode(uint256 leaf, uint256 k);

/// @notice Thrown when an opened state leaf's root and path do not give the agreed S_{k-1}.
/// @param position The input position.
error TensorNotInAgreedState(uint256 position);

/// @notice Thrown when an opened constant's root and path do not give the constants root.
/// @param position The input position.
error TensorNotInConstants(uint256 position);

/// @notice Thrown when a MatMulInteger column source has rank below 2 (no rows to swap back).
/// @param rank The column source's rank.
error ColumnSourceRankTooSmall(uint256 rank);

////////////////////////////////////////////////////////////////
//                 Output and openings (3, 5, 6)              //
////////////////////////////////////////////////////////////////

/// @notice Thrown when T_k's header and data root given in the witness do not hash to T_k.
error OutputHeaderMismatch();

/// @notice Thrown when the witness's next opening is missing or is not the one the element
///         needs at this point (position, layout, first element and count, in the reference's
///         order).
/// @param rangeIndex The index in `witness.ranges` where the expected opening should be.
error OpeningMismatch(uint256 rangeIndex);

/// @notice Thrown when the witness opens more ranges than the element needs.
/// @param given  The number of ranges given.
/// @param needed The number the element needs.
error ExtraOpening(uint256 given, uint256 needed);
