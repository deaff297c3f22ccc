// SPDX-License-Identifier: MIT
pragma solidity 0.8.37;

import {NothingToWithdraw, Reentrancy, WithdrawFailed} from "../Errors.sol";

/// @title PullPayments
/// @notice Money owed is credited to `balanceOf` and sent only when its owner calls
///         `withdraw`: no transfer to an arbitrary address ever happens inside another
///         operation, so a recipient that reverts or re-enters cannot block it. Shared by the
///         InferenceCoordinator (fees, refunds, slash shares, removed stake) and the
///         DisputeGame (bonds).
abstract contract PullPayments {
    /// @notice `account` withdrew `amount` wei of its balance.
    event Withdrawn(address indexed account, uint256 amount);

    /// @notice Wei credited to each account, sent by `withdraw`.
    mapping(address => uint256) public balanceOf;

    /// @notice Re-entrancy lock (transient: cleared every transaction).
    bool transient _locked;

    /// @notice No function with this modifier runs while another one is running.
    modifier nonReentrant() {
        if (_locked) revert Reentrancy();
        _locked = true;
        _;
        _locked = false;
    }

    /// @notice Send `msg.sender` its whole credited balance.
    function withdraw() external nonReentrant {
        uint256 amount = balanceOf[msg.sender];
        if (amount == 0) revert NothingToWithdraw();
        balanceOf[msg.sender] = 0;
        emit Withdrawn(msg.sender, amount);
        (bool sent,) = msg.sender.call{value: amount}("");
        // A failed send reverts everything, the zeroed balance included.
        if (!sent) revert WithdrawFailed();
    }
}
