// SPDX-License-Identifier: MIT
pragma solidity 0.8.37;

import {NotCoordinator, NotOwnRequest, NotOwner, RefundTransferFailed} from "../Errors.sol";
import {InferenceCoordinator} from "../InferenceCoordinator.sol";
import {IInferenceConsumer} from "../interfaces/IInferenceConsumer.sol";

/// @title QuestionAsker
/// @notice Example consumer: its owner asks questions (prompt token ids) through the
///         InferenceCoordinator, paying the fee, and the coordinator's callback stores each
///         final answer here. Refunds of unanswered or rejected questions are credited to this
///         contract by the coordinator; the owner collects them with `collectRefunds`.
///         Anyone can post a request naming this contract as its callback; only answers to
///         requests this contract posted itself (the callback's `requester`) are stored.
contract QuestionAsker is IInferenceConsumer {
    /// @notice An answer to `requestId` arrived (`answer` holds its output tokens).
    event Answered(uint256 indexed requestId, uint256 tokenCount);

    InferenceCoordinator public immutable coordinator;
    address public immutable owner;

    /// @notice The answer tokens of each request, set once by the finalization callback.
    mapping(uint256 => uint32[]) internal _answers;
    /// @notice Whether the answer of a request has arrived.
    mapping(uint256 => bool) public answered;

    constructor(InferenceCoordinator coordinator_) {
        coordinator = coordinator_;
        owner = msg.sender;
    }

    /// @notice Ask `prompt` of model `modelId`, paying `msg.value` as the fee, decoded as
    ///         `sampling` says (temperature 0: greedy); the answer comes back through
    ///         `onInferenceResult` with `callbackGasLimit` gas.
    /// @return requestId The coordinator's request id.
    function ask(
        bytes32 modelId,
        uint32[] calldata prompt,
        uint32 maxTokens,
        uint32 callbackGasLimit,
        address namedProvider,
        uint64 commitDeadline,
        InferenceCoordinator.Sampling calldata sampling
    ) external payable returns (uint256 requestId) {
        if (msg.sender != owner) revert NotOwner(msg.sender);
        requestId = coordinator.postRequest{value: msg.value}(
            modelId,
            prompt,
            maxTokens,
            address(this),
            callbackGasLimit,
            namedProvider,
            commitDeadline,
            sampling
        );
    }

    /// @inheritdoc IInferenceConsumer
    function onInferenceResult(uint256 requestId, address requester, uint32[] calldata output)
        external
    {
        // Only the coordinator knows which outputs are final.
        if (msg.sender != address(coordinator)) revert NotCoordinator(msg.sender);
        // Only the owner's questions, which this contract posted, are answers; a stranger's
        // request naming this callback is refused (the coordinator records the failure).
        if (requester != address(this)) revert NotOwnRequest(requestId, requester);
        _answers[requestId] = output;
        answered[requestId] = true;
        emit Answered(requestId, output.length);
    }

    /// @notice The stored answer tokens of `requestId` (empty until it arrives).
    function answer(uint256 requestId) external view returns (uint32[] memory) {
        return _answers[requestId];
    }

    /// @notice Withdraw this contract's refunds from the coordinator and send them to the owner.
    function collectRefunds() external {
        if (msg.sender != owner) revert NotOwner(msg.sender);
        coordinator.withdraw();
        (bool sent,) = owner.call{value: address(this).balance}("");
        if (!sent) revert RefundTransferFailed();
    }

    /// @notice Accept the coordinator's withdrawal.
    receive() external payable {}
}
