// SPDX-License-Identifier: MIT
pragma solidity 0.8.37;

import {
    MaxContextBeyondDisputeBound,
    ModelAlreadyRegistered,
    ModelNotRegistered,
    NodeCountBeyondStateTree,
    TooManyEosTokenIds,
    UnsupportedOpsetVersion,
    ZeroMaxContext,
    ZeroNodeCount
} from "./Errors.sol";
import {Commitments} from "./lib/Commitments.sol";

/// @title ModelRegistry
/// @notice The models that inference claims may name. A model's id (`modelIdOf`,
///         docs/protocol.md "Model id") hashes everything that decides its behaviour: its
///         model root (the commitment of the graph's node descriptions and constants that a
///         one-step proof opens against, with the op set and node count), its manifest's hash,
///         its max context, its EOS ids and whether it samples. Registrations are immutable: nobody, the registrant
///         included, can change or remove a registered model, so a claim's model cannot move
///         under a dispute.
/// @dev    Anyone may register. Registering costs the registrant gas and grants nothing: the
///         registry only records the fields the id binds (and a location hint). Whoever
///         registers a known model's roots first with other values registers another model
///         under another id; the id of the model as published stays free for its registration.
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
    /// @param sampling     Whether the graph samples (docs/protocol.md, "Sampling"): its verify
    ///                     input starts with the header [len(P), temperature, topP, seed], and
    ///                     requests may ask for a temperature. Else the header is [len(P)] and
    ///                     every answer is greedy.
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
        bool sampling;
    }

    ////////////////////////////////////////////////////////////////
    //                          Events                            //
    ////////////////////////////////////////////////////////////////

    /// @notice Emitted once per model, when it is registered.
    event ModelRegistered(
        bytes32 indexed modelId,
        address indexed registrant,
        bytes32 nodesRoot,
        bytes32 constantsRoot,
        uint32 opsetVersion,
        bytes32 manifestHash,
        string manifestUri,
        uint32 maxContext,
        uint32 nodeCount,
        uint32[] eosTokenIds,
        bool sampling
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

    /// @notice Most nodes a model may have: node k writes leaf k of the state tree, whose
    ///         2**STATE_DEPTH leaves start with the input (leaf 0), so the bisection can reach
    ///         nodes 1 .. 2**STATE_DEPTH - 1 only.
    uint256 public constant MAX_NODE_COUNT = (1 << Commitments.STATE_DEPTH) - 1;

    /// @notice Longest max context (prompt + output tokens) a model may declare: the coordinator
    ///         admits requests up to the model's max context, and a challenge computes S_0 and
    ///         T_N from the whole prompt and output on chain, so the cost of opening a dispute
    ///         grows with the tokens. At the challenge's target of under 1k gas per token,
    ///         8192 tokens take under 8.2M gas, half the 2**24 per-transaction cap (EIP-7825),
    ///         leaving the rest to everything else the challenge does.
    ///         Mirrored by `optinfer.contracts.registry.MAX_CONTEXT_TOKENS`.
    uint256 public constant MAX_CONTEXT_TOKENS = 8192;

    /// @notice Registered models by model id. Unset entries have `registeredAt == 0`.
    mapping(bytes32 => Model) internal _models;

    ////////////////////////////////////////////////////////////////
    //                        External                            //
    ////////////////////////////////////////////////////////////////

    /// @notice Register a model under its id, which the registry computes from the fields
    ///         given (`modelIdOf`): a dispute opens the graph against exactly the roots and node
    ///         count under the id, and the coordinator judges requests and answer endings by
    ///         exactly its max context and EOS ids, so the id cannot be paired with others.
    /// @param nodesRoot     Root of the graph's node descriptions.
    /// @param constantsRoot Root of the graph's constants.
    /// @param opsetVersion  Op-set version of the graph: OPSET_VERSION.
    /// @param manifestHash  SHA-256 of the manifest file.
    /// @param manifestUri   Where to fetch the manifest.
    /// @param maxContext    Longest sequence the graph accepts: 1 .. MAX_CONTEXT_TOKENS.
    /// @param nodeCount     Number of graph nodes: 1 .. MAX_NODE_COUNT.
    /// @param eosTokenIds   End-of-sequence token ids, at most MAX_EOS_TOKEN_IDS (none: every
    ///                      answer runs to the request's max tokens).
    /// @param sampling      Whether the graph samples (its manifest's `sampling`): how a dispute
    ///                      lays out the verify input, and whether requests may sample.
    /// @return modelId      The id claims use to name the model (`modelIdOf`).
    function register(
        bytes32 nodesRoot,
        bytes32 constantsRoot,
        uint32 opsetVersion,
        bytes32 manifestHash,
        string calldata manifestUri,
        uint32 maxContext,
        uint32 nodeCount,
        uint32[] calldata eosTokenIds,
        bool sampling
    ) external returns (bytes32 modelId) {
        // The one-step verifier knows one op set; another version's graph could not be judged.
        if (opsetVersion != OPSET_VERSION) {
            revert UnsupportedOpsetVersion(opsetVersion, OPSET_VERSION);
        }
        // A graph without nodes has no step to dispute.
        if (nodeCount == 0) revert ZeroNodeCount();
        // Every node's output has a state-tree leaf after the input's: the bisection reaches it.
        if (nodeCount > MAX_NODE_COUNT) {
            revert NodeCountBeyondStateTree(nodeCount, MAX_NODE_COUNT);
        }
        // A model that accepts no token cannot answer a request.
        if (maxContext == 0) revert ZeroMaxContext();
        // Every request the model admits can be challenged within the per-transaction gas cap.
        if (maxContext > MAX_CONTEXT_TOKENS) {
            revert MaxContextBeyondDisputeBound(maxContext, MAX_CONTEXT_TOKENS);
        }
        // Every commit reads them: their number bounds its gas.
        if (eosTokenIds.length > MAX_EOS_TOKEN_IDS) {
            revert TooManyEosTokenIds(eosTokenIds.length, MAX_EOS_TOKEN_IDS);
        }
        modelId = modelIdOf(
            nodesRoot,
            constantsRoot,
            opsetVersion,
            nodeCount,
            manifestHash,
            maxContext,
            eosTokenIds,
            sampling
        );
        // Registrations are immutable: an id keeps the fields it was computed from for good.
        if (_models[modelId].registeredAt != 0) revert ModelAlreadyRegistered(modelId);

        Model storage model = _models[modelId];
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
        model.sampling = sampling;
        emit ModelRegistered(
            modelId,
            msg.sender,
            nodesRoot,
            constantsRoot,
            opsetVersion,
            manifestHash,
            manifestUri,
            maxContext,
            nodeCount,
            eosTokenIds,
            sampling
        );
    }

    ////////////////////////////////////////////////////////////////
    //                          Views                             //
    ////////////////////////////////////////////////////////////////

    /// @notice The id of the model with these fields (docs/protocol.md, "Model id";
    ///         `optinfer.prover.commitments.model_id`):
    ///         sha256(modelRoot || manifestHash || uint32 maxContext || uint32 eosCount
    ///         || uint32 eosTokenIds[0] || ... || uint8 sampling), with modelRoot = `Commitments.modelRoot` of the
    ///         graph's two roots, op set and node count. The manifest URI is left out on
    ///         purpose: it says where to fetch the model, not what the model computes (whatever
    ///         is fetched is checked against the manifest hash and the roots), and with it one
    ///         model published at two places would be two models.
    function modelIdOf(
        bytes32 nodesRoot,
        bytes32 constantsRoot,
        uint32 opsetVersion,
        uint32 nodeCount,
        bytes32 manifestHash,
        uint32 maxContext,
        uint32[] calldata eosTokenIds,
        bool sampling
    ) public pure returns (bytes32) {
        bytes memory packed = abi.encodePacked(
            Commitments.modelRoot(nodesRoot, constantsRoot, opsetVersion, nodeCount),
            manifestHash,
            maxContext,
            uint32(eosTokenIds.length)
        );
        // abi.encodePacked would pad an array's elements to 32 bytes: append them as uint32.
        for (uint256 i = 0; i < eosTokenIds.length; ++i) {
            packed = bytes.concat(packed, bytes4(eosTokenIds[i]));
        }
        return sha256(bytes.concat(packed, sampling ? bytes1(0x01) : bytes1(0x00)));
    }

    /// @notice The registered model with id `modelId`; reverts when there is none.
    function getModel(bytes32 modelId) external view returns (Model memory model) {
        model = _models[modelId];
        if (model.registeredAt == 0) revert ModelNotRegistered(modelId);
    }

    /// @notice What a dispute over an answer of model `modelId` opens against: its graph's two
    ///         roots, its node count (the bisection's range) and whether it samples (the layout
    ///         of leaf 0). The registry computed the model id from these, so a game needs no
    ///         other word for them. Reverts when there is no such model.
    function disputeCommitments(bytes32 modelId)
        external
        view
        returns (bytes32 nodesRoot, bytes32 constantsRoot, uint32 nodeCount, bool sampling)
    {
        Model storage model = _models[modelId];
        if (model.registeredAt == 0) revert ModelNotRegistered(modelId);
        return (model.nodesRoot, model.constantsRoot, model.nodeCount, model.sampling);
    }

    /// @notice The end-of-sequence token ids of model `modelId`; reverts when there is none.
    function eosTokenIds(bytes32 modelId) external view returns (uint32[] memory) {
        Model storage model = _models[modelId];
        if (model.registeredAt == 0) revert ModelNotRegistered(modelId);
        return model.eosTokenIds;
    }

    /// @notice Whether a model with id `modelId` is registered.
    function isRegistered(bytes32 modelId) external view returns (bool) {
        return _models[modelId].registeredAt != 0;
    }
}
