// SPDX-License-Identifier: MIT
pragma solidity 0.8.37;

import {Commitments} from "../lib/Commitments.sol";

/// @title IOneStepVerifier
/// @notice The last move of a dispute (docs/protocol.md, "One step"): recompute ONE element of
///         node k from openings against roots the caller already holds, and say whether the
///         provider's committed element is wrong. The reference is
///         `optinfer.prover.one_step.check_witness`; the Python encoder of `Witness` is
///         `optinfer.contracts.one_step_binding`.
interface IOneStepVerifier {
    /// @notice What the dispute game knows and the witness must be proven against.
    /// @param nodesRoot     The registered model's root of node descriptions.
    /// @param constantsRoot The registered model's root of constants.
    /// @param agreedState   S_{k-1}, agreed by both parties.
    /// @param outputRoot    T_k, the provider's tensor for node k (revealed at the leaf update).
    /// @param k             The disputed node (>= 1).
    /// @param outIndex      The disputed element of T_k (flat, C order).
    struct Context {
        bytes32 nodesRoot;
        bytes32 constantsRoot;
        bytes32 agreedState;
        bytes32 outputRoot;
        uint256 k;
        uint256 outIndex;
    }

    /// @notice One tensor node k reads: its header and data root (which give its tensor root)
    ///         and the path proving that root in S_{k-1} (kind 0, state leaf `index` < k,
    ///         STATE_DEPTH siblings) or in the constants tree (kind 1). For MatMulInteger's B,
    ///         `columns` is true and the tensor is its column source.
    struct OpenedTensor {
        uint8 position;
        bool columns;
        uint8 kind;
        uint32 index;
        uint8 dtype;
        uint64[] shape;
        bytes32 dataRoot;
        bytes32[] path;
    }

    /// @notice One opening: `count` elements from flat element `startElement` of the tensor at
    ///         input `position` (`columns`: of its column source), with its range proof.
    struct OpenedRange {
        uint8 position;
        bool columns;
        uint64 startElement;
        uint64 count;
        Commitments.RangeProof proof;
    }

    /// @notice A complete one-step submission (the reference's `Witness`, without the fields
    ///         the context carries; the claimed value is read from `outputProof`).
    struct Witness {
        bytes description;
        bytes32[] descriptionPath;
        OpenedTensor[] tensors;
        OpenedRange[] ranges;
        uint8 outputDtype;
        uint64[] outputShape;
        bytes32 outputDataRoot;
        Commitments.RangeProof outputProof;
    }

    /// @notice True when the provider's element (or its tensor's dtype/shape, or an op-set
    ///         refusal on the agreed inputs) is wrong: the provider loses. False when the
    ///         recomputed element equals the claim: the challenger loses. Reverts, with the
    ///         custom error of the broken rule, on a malformed witness.
    function providerWrong(Context calldata context, Witness calldata witness)
        external
        view
        returns (bool);
}
