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
    /// @notice The reward the coordinator locked for the last game opened.
    uint256 public lastLockedReward;

    constructor(InferenceCoordinator coordinator_) {
        coordinator = coordinator_;
    }

    function openDispute(uint256 requestId) external {
        coordinator.openDispute(requestId);
    }

    /// @notice What the real game's `challenge` does: open a dispute and lock its reward.
    function openGame(uint256 requestId) external {
        coordinator.openDispute(requestId);
        lastLockedReward = coordinator.lockChallengeReward(requestId);
    }

    function resolveDispute(
        uint256 requestId,
        bool providerWon,
        address challenger,
        uint256 lockedReward
    ) external {
        lastChallengerAmount =
            coordinator.resolveDispute(requestId, providerWon, challenger, lockedReward);
    }
}

/// @notice A contract that claims to dispute another coordinator's claims.
contract ForeignDisputeGame {
    address public immutable coordinator;

    constructor(address coordinator_) {
        coordinator = coordinator_;
    }
}
