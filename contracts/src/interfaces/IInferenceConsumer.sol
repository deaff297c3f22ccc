// SPDX-License-Identifier: MIT
pragma solidity 0.8.37;

/// @title IInferenceConsumer
/// @notice What a request's callback contract implements. The InferenceCoordinator calls it once,
///         when the claim finalizes, with exactly the request's callback gas limit; its failure
///         (revert, out of gas) is recorded and does not undo finality. Its return data is ignored.
interface IInferenceConsumer {
    /// @notice The final output of request `requestId`.
    /// @param requestId The coordinator's request id.
    /// @param output    The output token ids the provider committed (1 .. maxTokens of them).
    function onInferenceResult(uint256 requestId, uint32[] calldata output) external;
}
