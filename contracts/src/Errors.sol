// SPDX-License-Identifier: MIT
pragma solidity 0.8.37;

// Every custom error of the optinfer contracts, one place, each named after the rule that was
// broken. Guards read `if (<rule broken>) revert <Rule>();` and revert with no state change.

////////////////////////////////////////////////////////////////
//                      ModelRegistry                         //
////////////////////////////////////////////////////////////////

/// @notice Thrown when a model is registered with the zero model root (no model commits to it).
error ZeroModelRoot();

/// @notice Thrown when a model root is registered a second time: registrations are immutable.
/// @param modelRoot The root that is already registered.
error ModelAlreadyRegistered(bytes32 modelRoot);

/// @notice Thrown when a model is looked up by a root that was never registered.
/// @param modelRoot The unknown root.
error ModelNotRegistered(bytes32 modelRoot);

/// @notice Thrown when a model is registered with a node count of zero (nothing to dispute).
error ZeroNodeCount();

/// @notice Thrown when a model is registered with a maximum context of zero tokens.
error ZeroMaxContext();
