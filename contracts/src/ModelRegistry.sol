// SPDX-License-Identifier: MIT
pragma solidity 0.8.37;

import {
    ModelAlreadyRegistered,
    ModelNotRegistered,
    TooManyEosTokenIds,
    UnsupportedOpsetVersion,
    ZeroMaxContext,
    ZeroNodeCount
} from "./Errors.sol";
import {Commitments} from "./lib/Commitments.sol";

/// @title ModelRegistry
/// @notice The models that inference claims may name. A model is identified by its model root:
///         the SHA-256 Merkle root over its graph's node descriptions and its constants
///         (docs/protocol.md), so the id *is* the commitment a one-step proof opens weights and
///         tables against. Registrations are immutable: nobody, the registrant included, can
///         change or remove a registered model, so a claim's model cannot move under a dispute.
/// @dev    Anyone may register. Registering costs the registrant gas and grants nothing: the
///         registry only records which root belongs to which manifest and graph shape.
contract ModelRegistry {
    ////////////////////////////////////////////////////////////////
    //                         Structs                            //
    ////////////////////////////////////////////////////////////////

    /// @notice One registered model.
    /// @param nodesRoot    Root of the graph's node descriptions (docs/protocol.md).
    /// @param constantsRoot Root of the graph's constants.
    /// @param manifestHash SHA-256 of the model's manifest.json bytes, as published.
    /// @param manifestUri  Where the manifest (and the files it lists) can be fetched.
    /// @param opsetVersion Version of the verifiable op set the graph is written in: always
    ///                     OPSET_VERSION, the version the one-step verifier recomputes.
    /// @param maxContext   Longest sequence (prompt + output tokens) the graph accepts.
    /// @param nodeCount    Number of nodes in the graph: the range of the layer bisection.
    /// @param registrant   Who registered it.
    /// @param registeredAt Block timestamp of the registration; never zero for a registered model.
    /// @param eosTokenIds  The end-of-sequence token ids (the manifest's config): an answer
    ///                     ends at the first of them, or at the request's max tokens.
    struct Model {
        bytes32 nodesRoot;
        bytes32 constantsRoot;
        bytes32 manifestHash;
        string manifestUri;
        uint32 opsetVersion;
        uint32 maxContext;
        uint32 nodeCount;
        address registrant;
        uint64 registeredAt;
        uint32[] eosTokenIds;
    }

    ////////////////////////////////////////////////////////////////
    //                          Events                            //
    ////////////////////////////////////////////////////////////////

    /// @notice Emitted once per model, when it is registered.
    event ModelRegistered(
        bytes32 indexed modelRoot,
        address indexed registrant,
        bytes32 nodesRoot,
        bytes32 constantsRoot,
        uint32 opsetVersion,
        bytes32 manifestHash,
        string manifestUri,
        uint32 maxContext,
        uint32 nodeCount,
        uint32[] eosTokenIds
    );

    ////////////////////////////////////////////////////////////////
    //                          State                             //
    ////////////////////////////////////////////////////////////////

    /// @notice Most end-of-sequence token ids one model may declare (Qwen2 models have one or
    ///         two); bounds what every commit of its answers reads.
    uint256 public constant MAX_EOS_TOKEN_IDS = 8;

    /// @notice The op-set version (docs/opset.md) whose semantics OneStepVerifier implements,
    ///         the only one a model may be registered in.
    uint32 public constant OPSET_VERSION = 2;

    /// @notice Registered models by model root. Unset entries have `registeredAt == 0`.
    mapping(bytes32 => Model) internal _models;

    ////////////////////////////////////////////////////////////////
    //                        External                            //
    ////////////////////////////////////////////////////////////////

    /// @notice Register a model under its model root, which the registry computes from the
    ///         model's two roots, op set and node count (`Commitments.modelRoot`): a dispute
    ///         opens the graph against exactly those, so the id cannot be paired with others.
    /// @param nodesRoot     Root of the graph's node descriptions.
    /// @param constantsRoot Root of the graph's constants.
    /// @param opsetVersion  Op-set version of the graph: OPSET_VERSION.
    /// @param manifestHash  SHA-256 of the manifest file.
    /// @param manifestUri   Where to fetch the manifest.
    /// @param maxContext    Longest sequence the graph accepts (nonzero).
    /// @param nodeCount     Number of graph nodes (nonzero).
    /// @param eosTokenIds   End-of-sequence token ids, at most MAX_EOS_TOKEN_IDS (none: every
    ///                      answer runs to the request's max tokens).
    /// @return modelId      The id claims use to name the model: the model root.
    function register(
        bytes32 nodesRoot,
        bytes32 constantsRoot,
        uint32 opsetVersion,
        bytes32 manifestHash,
        string calldata manifestUri,
        uint32 maxContext,
        uint32 nodeCount,
        uint32[] calldata eosTokenIds
    ) external returns (bytes32 modelId) {
        bytes32 modelRoot =
            Commitments.modelRoot(nodesRoot, constantsRoot, opsetVersion, nodeCount);
        // The one-step verifier knows one op set; another version's graph could not be judged.
        if (opsetVersion != OPSET_VERSION) {
            revert UnsupportedOpsetVersion(opsetVersion, OPSET_VERSION);
        }
        // A graph without nodes has no step to dispute.
        if (nodeCount == 0) revert ZeroNodeCount();
        // A model that accepts no token cannot answer a request.
        if (maxContext == 0) revert ZeroMaxContext();
        // Every commit reads them: their number bounds its gas.
        if (eosTokenIds.length > MAX_EOS_TOKEN_IDS) {
            revert TooManyEosTokenIds(eosTokenIds.length, MAX_EOS_TOKEN_IDS);
        }
        // Registrations are immutable: a root is bound to its first manifest for good.
        if (_models[modelRoot].registeredAt != 0) revert ModelAlreadyRegistered(modelRoot);

        Model storage model = _models[modelRoot];
        model.nodesRoot = nodesRoot;
        model.constantsRoot = constantsRoot;
        model.manifestHash = manifestHash;
        model.manifestUri = manifestUri;
        model.opsetVersion = opsetVersion;
        model.maxContext = maxContext;
        model.nodeCount = nodeCount;
        model.registrant = msg.sender;
        model.registeredAt = uint64(block.timestamp);
        model.eosTokenIds = eosTokenIds;
        emit ModelRegistered(
            modelRoot,
            msg.sender,
            nodesRoot,
            constantsRoot,
            opsetVersion,
            manifestHash,
            manifestUri,
            maxContext,
            nodeCount,
            eosTokenIds
        );
        return modelRoot;
    }

    ////////////////////////////////////////////////////////////////
    //                          Views                             //
    ////////////////////////////////////////////////////////////////

    /// @notice The registered model with id (= root) `modelId`; reverts when there is none.
    function getModel(bytes32 modelId) external view returns (Model memory model) {
        model = _models[modelId];
        if (model.registeredAt == 0) revert ModelNotRegistered(modelId);
    }

    /// @notice What a dispute over an answer of model `modelId` opens against: its graph's two
    ///         roots and its node count (the bisection's range). The registry computed the
    ///         model id from exactly these, so a game needs no other word for them. Reverts when
    ///         there is no such model.
    function disputeCommitments(bytes32 modelId)
        external
        view
        returns (bytes32 nodesRoot, bytes32 constantsRoot, uint32 nodeCount)
    {
        Model storage model = _models[modelId];
        if (model.registeredAt == 0) revert ModelNotRegistered(modelId);
        return (model.nodesRoot, model.constantsRoot, model.nodeCount);
    }

    /// @notice The end-of-sequence token ids of model `modelId`; reverts when there is none.
    function eosTokenIds(bytes32 modelId) external view returns (uint32[] memory) {
        Model storage model = _models[modelId];
        if (model.registeredAt == 0) revert ModelNotRegistered(modelId);
        return model.eosTokenIds;
    }

    /// @notice Whether a model with id (= root) `modelId` is registered.
    function isRegistered(bytes32 modelId) external view returns (bool) {
        return _models[modelId].registeredAt != 0;
    }
}
