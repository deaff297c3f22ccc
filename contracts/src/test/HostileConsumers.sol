// SPDX-License-Identifier: MIT
pragma solidity 0.8.37;

import {InferenceCoordinator} from "../InferenceCoordinator.sol";
import {IInferenceConsumer} from "../interfaces/IInferenceConsumer.sol";

// Callback contracts that misbehave in every way the coordinator must survive. Test-only.

/// @notice Reverts on every delivery.
contract RevertingConsumer is IInferenceConsumer {
    error NoThanks();

    function onInferenceResult(uint256, address, uint32[] calldata) external pure {
        revert NoThanks();
    }
}

/// @notice Burns all the gas it is given.
contract GasBurningConsumer is IInferenceConsumer {
    function onInferenceResult(uint256, address, uint32[] calldata) external pure {
        assembly {
            for {} 1 {} {}
        }
    }
}

/// @notice Returns (successfully) a huge block of return data.
contract ReturnBombConsumer is IInferenceConsumer {
    function onInferenceResult(uint256, address, uint32[] calldata) external pure {
        assembly {
            return(0, 100000)
        }
    }
}

/// @notice Re-enters `finalize` and `withdraw` from its callback and records how each attempt
///         reverted (the callback itself succeeds, so the records persist).
contract ReenteringConsumer is IInferenceConsumer {
    InferenceCoordinator public immutable coordinator;
    /// @notice Revert data of the re-entrant `finalize` (empty when it did not revert).
    bytes public finalizeRevert;
    /// @notice Revert data of the re-entrant `withdraw` (empty when it did not revert).
    bytes public withdrawRevert;
    /// @notice Whether the callback ran at all.
    bool public called;

    constructor(InferenceCoordinator coordinator_) {
        coordinator = coordinator_;
    }

    function onInferenceResult(uint256 requestId, address, uint32[] calldata) external {
        called = true;
        try coordinator.finalize(requestId) {} catch (bytes memory reason) {
            finalizeRevert = reason;
        }
        try coordinator.withdraw() {} catch (bytes memory reason) {
            withdrawRevert = reason;
        }
    }

    receive() external payable {}
}
