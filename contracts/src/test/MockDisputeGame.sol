// SPDX-License-Identifier: MIT
pragma solidity 0.8.37;

import {InferenceCoordinator} from "../InferenceCoordinator.sol";

/// @title MockDisputeGame
/// @notice Test double of the dispute game: forwards the coordinator's dispute hooks to whoever
///         calls it, with no game in between. Only for the coordinator's own tests.
contract MockDisputeGame {
    InferenceCoordinator public immutable coordinator;

    /// @notice The challenger reward the coordinator returned from the last resolution.
    uint256 public lastChallengerAmount;

    constructor(InferenceCoordinator coordinator_) {
        coordinator = coordinator_;
    }

    function openDispute(uint256 requestId) external {
        coordinator.openDispute(requestId);
    }

    function resolveDispute(uint256 requestId, bool providerWon, address challenger) external {
        lastChallengerAmount = coordinator.resolveDispute(requestId, providerWon, challenger);
    }
}
