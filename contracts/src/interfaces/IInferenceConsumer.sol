// SPDX-License-Identifier: MIT
pragma solidity 0.8.37;

/// @title IInferenceConsumer
/// @notice What a request's callback contract implements. The InferenceCoordinator calls it once,
///         when the claim finalizes, with exactly the request's callback gas limit; its failure
///         (revert, out of gas) is recorded and does not undo finality. Its return data is ignored.
///         Anyone may post a request naming any contract as its callback: check `requester`
///         (and `msg.sender == coordinator`) before trusting a delivery as an answer you asked for.
interface IInferenceConsumer {
    /// @notice The final output of request `requestId`.
    /// @param requestId The coordinator's request id.
    /// @param requester Who posted the request (`getRequest(requestId).consumer`): the only
    ///                  account that chose its prompt, model and provider.
    /// @param output    The output token ids the provider committed (1 .. maxTokens of them).
    function onInferenceResult(uint256 requestId, address requester, uint32[] calldata output)
        external;
}
