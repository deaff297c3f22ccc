// SPDX-License-Identifier: MIT
pragma solidity 0.8.37;

import {
    ChildNotDisputable,
    ChildrenMismatch,
    ClockExpired,
    ClockNotExpired,
    ElementNotInChunk,
    FanOutBitsOutOfRange,
    FinalLeafMismatch,
    GameNotFound,
    GameResolved,
    NotYourMove,
    PromptMismatch,
    StatePathLengthMismatch,
    TensorHeaderMismatch,
    WrongBond,
    WrongChildCount,
    WrongMidpoint,
    WrongNode,
    WrongPhase,
    ZeroChallengerBond,
    ZeroClock
} from "./Errors.sol";
import {InferenceCoordinator} from "./InferenceCoordinator.sol";
import {ModelRegistry} from "./ModelRegistry.sol";
import {IOneStepVerifier} from "./interfaces/IOneStepVerifier.sol";
import {Commitments} from "./lib/Commitments.sol";
import {PullPayments} from "./lib/PullPayments.sol";
import {Sha256Merkle} from "./lib/Sha256Merkle.sol";

/// @title DisputeGame
/// @notice The bisection game of docs/protocol.md ("Dispute game"), one instance per
///         challenge: a provider defends its committed claim against one challenger, layer
///         bisection over state roots, the leaf-k reveal, the element descent inside T_k, the
///         chunk, then the one-step recomputation by the OneStepVerifier. Chess clocks; the
///         party to move that runs out of time loses on `timeout`. The executable spec is
///         `optinfer.prover.game.apply`: same phases, checks in the same order, same outcomes.
///         Several games on one claim are independent; the coordinator counts them open and
///         slashes the provider on the first one it loses.
/// @dev    Money: the challenger's bond is held here; a challenger that loses forfeits it to
///         the provider, one that wins gets it back, and the coordinator pays it the reward
///         locked for its game when it opened (plus its share of the claim's reserve where the
///         lock fell short), whatever order the games end in. Credited and withdrawn (pull
///         payments).
contract DisputeGame is PullPayments {
    /// @notice Where a game is; the party to move follows from it (see `toMove`).
    enum Phase {
        None,
        AwaitRoot,
        Bisection,
        LeafReveal,
        Descent,
        ChunkReveal,
        OneStep,
        Resolved
    }

    /// @notice Who moves, and who won.
    enum Role {
        None,
        Provider,
        Challenger
    }

    /// @notice One game's storage (`GameState` of the reference).
    /// @param requestId       The disputed claim's request.
    /// @param provider        The provider that committed the claim.
    /// @param challenger      Who opened the game and posted the bond.
    /// @param phase           See `Phase`.
    /// @param winner          Set once resolved.
    /// @param pending         Bisection: S_mid is posted and awaits the challenger. Descent:
    ///                        children are revealed and await the pick.
    /// @param dtype           T_k's dtype once revealed.
    /// @param nodeHeight      Height of the disputed data-tree node (0: a leaf chunk).
    /// @param rounds          Provider moves so far.
    /// @param nodeCount       N, the model's node count.
    /// @param lo              Bisection: S_lo is agreed.
    /// @param hi              Bisection: S_hi is disputed; afterwards the disputed node k.
    /// @param providerClock   Seconds left to the provider when its clock last stopped.
    /// @param challengerClock Seconds left to the challenger when its clock last stopped.
    /// @param lastMoveAt      When the running clock started.
    /// @param nodeIndex       Index of the disputed data-tree node in its level.
    /// @param element         The named element of T_k (valid in OneStep once `pending`).
    /// @param loRoot          S_lo (S_{k-1} after bisection).
    /// @param hiRoot          S_hi (S_k after bisection).
    /// @param midRoot         The provider's pending S_mid.
    /// @param tensorRoot      T_k.
    /// @param dataRoot        T_k's data root.
    /// @param nodeHash        The disputed data-tree node's hash.
    /// @param childrenHash    keccak256 of the pending revealed children.
    /// @param nodesRoot       The model's root of node descriptions.
    /// @param constantsRoot   The model's root of constants.
    /// @param shape           T_k's shape.
    struct Game {
        uint256 requestId;
        address provider;
        Phase phase;
        Role winner;
        bool pending;
        uint8 dtype;
        uint8 nodeHeight;
        uint16 rounds;
        address challenger;
        uint32 nodeCount;
        uint32 lo;
        uint32 hi;
        uint64 providerClock;
        uint64 challengerClock;
        uint64 lastMoveAt;
        uint64 nodeIndex;
        uint64 element;
        bytes32 loRoot;
        bytes32 hiRoot;
        bytes32 midRoot;
        bytes32 tensorRoot;
        bytes32 dataRoot;
        bytes32 nodeHash;
        bytes32 childrenHash;
        bytes32 nodesRoot;
        bytes32 constantsRoot;
        uint64[] shape;
    }

    ////////////////////////////////////////////////////////////////
    //                          Events                            //
    ////////////////////////////////////////////////////////////////

    /// @notice A challenger opened game `gameId` against the claim on `requestId`. `finalLeaf`
    ///         is T_N = tensor_root(int64 output); `initialState` is S_0.
    event GameOpened(
        uint256 indexed gameId,
        uint256 indexed requestId,
        address indexed challenger,
        address provider,
        uint32 nodeCount,
        bytes32 initialState,
        bytes32 finalLeaf
    );
    /// @notice The provider posted S_N.
    event RootPosted(uint256 indexed gameId, bytes32 stateRoot);
    /// @notice The provider posted S_mid.
    event MidPosted(uint256 indexed gameId, uint256 mid, bytes32 stateRoot);
    /// @notice The challenger agreed (or not) with S_mid; [lo, hi] is the new disputed range.
    event MidAnswered(uint256 indexed gameId, uint256 mid, bool agreed, uint256 lo, uint256 hi);
    /// @notice The provider revealed T_k with its header and data root.
    event LeafRevealed(
        uint256 indexed gameId,
        uint256 k,
        bytes32 tensorRoot,
        uint8 dtype,
        uint64[] shape,
        bytes32 dataRoot
    );
    /// @notice The provider revealed the disputed node's descendants.
    event ChildrenRevealed(uint256 indexed gameId, bytes32[] children);
    /// @notice The challenger picked the child it disputes.
    event ChildPicked(uint256 indexed gameId, uint256 position, uint256 height, uint256 index);
    /// @notice The provider revealed the disputed leaf chunk.
    event ChunkRevealed(uint256 indexed gameId, uint256 leafIndex, bytes chunk);
    /// @notice The challenger named the element the one-step recomputes.
    event ElementNamed(uint256 indexed gameId, uint256 index);
    /// @notice The game ended. `timedOut`: the loser ran out of time; otherwise the one-step
    ///         decided.
    event GameEnded(uint256 indexed gameId, uint256 indexed requestId, Role winner, bool timedOut);

    ////////////////////////////////////////////////////////////////
    //                    Parameters and state                    //
    ////////////////////////////////////////////////////////////////

    /// @notice The claims this game disputes.
    InferenceCoordinator public immutable coordinator;
    /// @notice Where models' node counts and op-set versions are registered.
    ModelRegistry public immutable registry;
    /// @notice The one-step recomputation.
    IOneStepVerifier public immutable verifier;
    /// @notice Each party's clock budget, in seconds.
    uint64 public immutable clockSeconds;
    /// @notice log2 of the children a descent step reveals.
    uint8 public immutable fanOutBits;
    /// @notice Wei a challenger posts to open a game.
    uint256 public immutable challengerBond;

    /// @notice Number of games opened; ids run from 1.
    uint256 public gameCount;
    /// @notice Games by id.
    mapping(uint256 => Game) internal _games;
    /// @notice Each game's reward as locked by the coordinator when it opened (of the
    ///         provider's free stake; passed back to `resolveDispute`).
    mapping(uint256 => uint256) public lockedReward;

    /// @param coordinator_    The InferenceCoordinator whose claims are disputed (it must name
    ///                        this contract as its dispute game).
    /// @param verifier_       The OneStepVerifier.
    /// @param clockSeconds_   Each party's time budget.
    /// @param fanOutBits_     log2 of a descent step's children, 1..8.
    /// @param challengerBond_ Wei a challenger posts per game.
    constructor(
        InferenceCoordinator coordinator_,
        IOneStepVerifier verifier_,
        uint64 clockSeconds_,
        uint8 fanOutBits_,
        uint256 challengerBond_
    ) {
        if (fanOutBits_ < 1 || fanOutBits_ > 8) revert FanOutBitsOutOfRange(fanOutBits_);
        if (clockSeconds_ == 0) revert ZeroClock();
        // A challenge puts money at risk: losing one pays the provider for its defence.
        if (challengerBond_ == 0) revert ZeroChallengerBond();
        coordinator = coordinator_;
        registry = coordinator_.registry();
        verifier = verifier_;
        clockSeconds = clockSeconds_;
        fanOutBits = fanOutBits_;
        challengerBond = challengerBond_;
    }

    ////////////////////////////////////////////////////////////////
    //                        Opening                             //
    ////////////////////////////////////////////////////////////////

    /// @notice Dispute the claim on `requestId` with the bond; the provider owes S_N.
    /// @param prompt  The request's prompt tokens (checked against its hash): S_0 is computed
    ///                from them and the committed output.
    /// @return gameId The new game's id.
    function challenge(uint256 requestId, uint32[] calldata prompt)
        external
        payable
        returns (uint256 gameId)
    {
        if (msg.value != challengerBond) revert WrongBond(msg.value, challengerBond);
        InferenceCoordinator.Request memory request = coordinator.getRequest(requestId);
        // Rule: S_0 is built from the request's own prompt.
        if (coordinator.hashTokens(prompt) != request.promptHash) revert PromptMismatch();
        // The roots the one-step opens against are the registered model's own.
        (bytes32 nodesRoot, bytes32 constantsRoot, uint32 nodeCount, bool sampling) =
            registry.disputeCommitments(request.modelId);
        // Reverts unless a claim is committed and its window is open.
        coordinator.openDispute(requestId);
        uint32[] memory output = coordinator.getOutput(requestId);

        gameId = ++gameCount;
        Game storage game = _games[gameId];
        game.requestId = requestId;
        game.provider = request.provider;
        game.challenger = msg.sender;
        lockedReward[gameId] = coordinator.lockChallengeReward(requestId);
        game.phase = Phase.AwaitRoot;
        game.nodeCount = nodeCount;
        game.hi = nodeCount;
        game.providerClock = clockSeconds;
        game.challengerClock = clockSeconds;
        game.lastMoveAt = uint64(block.timestamp);
        game.loRoot = initialState(verifyHeader(request, prompt.length, sampling), prompt, output);
        game.nodesRoot = nodesRoot;
        game.constantsRoot = constantsRoot;
        // T_N is kept in hiRoot until S_N replaces it: the root move checks against it.
        game.hiRoot = finalLeaf(output);
        emit GameOpened(
            gameId, requestId, msg.sender, request.provider, nodeCount, game.loRoot,
            game.hiRoot
        );
    }

    ////////////////////////////////////////////////////////////////
    //                       Provider moves                       //
    ////////////////////////////////////////////////////////////////

    /// @notice Post S_N with the path proving leaf N is T_N: the trace ends in the claim.
    function postRoot(uint256 gameId, bytes32 stateRoot, bytes32[] calldata path) external {
        Game storage game = _startMove(gameId, Phase.AwaitRoot, false, Role.Provider);
        _requireStatePath(path);
        if (Sha256Merkle.rootFromPath(game.hiRoot, game.nodeCount, path) != stateRoot) {
            revert FinalLeafMismatch();
        }
        game.hiRoot = stateRoot;
        ++game.rounds;
        emit RootPosted(gameId, stateRoot);
        _afterBisectionStep(game, Role.Provider);
    }

    /// @notice Post S_mid for mid = (lo + hi) / 2.
    function postMid(uint256 gameId, uint256 mid, bytes32 stateRoot) external {
        Game storage game = _startMove(gameId, Phase.Bisection, false, Role.Provider);
        uint256 expected = (uint256(game.lo) + game.hi) / 2;
        if (mid != expected) revert WrongMidpoint(mid, expected);
        game.midRoot = stateRoot;
        game.pending = true;
        ++game.rounds;
        emit MidPosted(gameId, mid, stateRoot);
        _handOver(game, Role.Provider);
    }

    /// @notice Reveal T_k (k = hi = lo + 1) with its header and data root, and the path
    ///         proving S_k is S_{k-1} with the empty leaf k set to T_k.
    function revealLeaf(
        uint256 gameId,
        uint256 k,
        bytes32 tensorRoot,
        uint8 dtype,
        uint64[] calldata shape,
        bytes32 dataRoot,
        bytes32[] calldata path
    ) external {
        Game storage game = _startMove(gameId, Phase.LeafReveal, false, Role.Provider);
        if (k != game.hi) revert WrongNode(k, game.hi);
        if (Commitments.tensorRootFromDataRoot(dtype, shape, dataRoot) != tensorRoot) {
            revert TensorHeaderMismatch();
        }
        Commitments.verifyLeafUpdate(game.loRoot, game.hiRoot, k, tensorRoot, path);
        uint256 depth = Commitments.dataTreeDepth(dtype, shape);
        game.tensorRoot = tensorRoot;
        game.dtype = dtype;
        game.shape = shape;
        game.dataRoot = dataRoot;
        game.nodeHeight = uint8(depth);
        game.nodeIndex = 0;
        game.nodeHash = dataRoot;
        game.phase = depth == 0 ? Phase.ChunkReveal : Phase.Descent;
        ++game.rounds;
        emit LeafRevealed(gameId, k, tensorRoot, dtype, shape, dataRoot);
        _handOver(game, Role.Provider);
    }

    /// @notice Reveal the 2**min(fanOutBits, height) descendants of the disputed node.
    function revealChildren(uint256 gameId, bytes32[] calldata children) external {
        Game storage game = _startMove(gameId, Phase.Descent, false, Role.Provider);
        uint256 height = game.nodeHeight;
        uint256 expected = uint256(1) << (fanOutBits < height ? fanOutBits : height);
        if (children.length != expected) revert WrongChildCount(children.length, expected);
        Commitments.verifyDescentStep(
            game.nodeHash, height, game.nodeIndex, children, game.dtype, game.shape
        );
        game.childrenHash = keccak256(abi.encodePacked(children));
        game.pending = true;
        ++game.rounds;
        emit ChildrenRevealed(gameId, children);
        _handOver(game, Role.Provider);
    }

    /// @notice Reveal the 1 KiB chunk under the disputed leaf.
    function revealChunk(uint256 gameId, bytes calldata chunk) external {
        Game storage game = _startMove(gameId, Phase.ChunkReveal, false, Role.Provider);
        Commitments.verifyLeafChunk(game.nodeHash, game.nodeIndex, chunk, game.dtype, game.shape);
        game.phase = Phase.OneStep;
        ++game.rounds;
        emit ChunkRevealed(gameId, game.nodeIndex, chunk);
        _handOver(game, Role.Provider);
    }

    ////////////////////////////////////////////////////////////////
    //                      Challenger moves                      //
    ////////////////////////////////////////////////////////////////

    /// @notice S_mid is right: the first wrong node lies after mid.
    function agree(uint256 gameId, uint256 mid) external {
        Game storage game = _answerMid(gameId, mid);
        game.lo = uint32(mid);
        game.loRoot = game.midRoot;
        _finishAnswer(gameId, game, mid, true);
    }

    /// @notice S_mid is wrong: the first wrong node lies at or before mid.
    function disagree(uint256 gameId, uint256 mid) external {
        Game storage game = _answerMid(gameId, mid);
        game.hi = uint32(mid);
        game.hiRoot = game.midRoot;
        _finishAnswer(gameId, game, mid, false);
    }

    /// @notice Dispute child `position` of the revealed `children` (sent again, checked
    ///         against the revealed ones).
    function pickChild(uint256 gameId, uint256 position, bytes32[] calldata children) external {
        Game storage game = _startMove(gameId, Phase.Descent, true, Role.Challenger);
        if (keccak256(abi.encodePacked(children)) != game.childrenHash) revert ChildrenMismatch();
        uint256 bits = Sha256Merkle.treeDepth(children.length);
        uint256 childHeight = game.nodeHeight - bits;
        uint256 childIndex = (uint256(game.nodeIndex) << bits) + position;
        uint256 leaves = Commitments.leafCount(Commitments.tensorByteLength(game.dtype, game.shape));
        // Children past the last leaf were proven to be empty subtrees: nothing to dispute.
        if (position >= children.length || childIndex << childHeight >= leaves) {
            revert ChildNotDisputable(position);
        }
        game.nodeHeight = uint8(childHeight);
        game.nodeIndex = uint64(childIndex);
        game.nodeHash = children[position];
        game.pending = false;
        if (childHeight == 0) game.phase = Phase.ChunkReveal;
        emit ChildPicked(gameId, position, childHeight, childIndex);
        _handOver(game, Role.Challenger);
    }

    /// @notice Name the element of T_k, inside the revealed chunk, the one-step recomputes.
    function nameElement(uint256 gameId, uint256 index) external {
        Game storage game = _startMove(gameId, Phase.OneStep, false, Role.Challenger);
        (uint256 first, uint256 end) = chunkElements(gameId);
        // Rule: the element lies in the revealed chunk. An empty T_k has none, yet can be
        // wrong in its header: element 0 then stands for the header, which the one-step judges
        // before it reads any element.
        bool headerOnly = first == end && index == 0;
        if (!headerOnly && (index < first || index >= end)) {
            revert ElementNotInChunk(index, first, end);
        }
        game.element = uint64(index);
        game.pending = true;
        emit ElementNamed(gameId, index);
        _handOver(game, Role.Challenger);
    }

    /// @notice The one-step for the named element of node k against S_{k-1} and T_k: the
    ///         provider loses if the recomputed element differs; the challenger if it equals.
    ///         A malformed witness reverts (with the verifier's error) and stops no clock.
    function oneStep(uint256 gameId, IOneStepVerifier.Witness calldata witness) external {
        Game storage game = _startMove(gameId, Phase.OneStep, true, Role.Challenger);
        IOneStepVerifier.Context memory context = IOneStepVerifier.Context({
            nodesRoot: game.nodesRoot,
            constantsRoot: game.constantsRoot,
            agreedState: game.loRoot,
            outputRoot: game.tensorRoot,
            k: game.hi,
            outIndex: game.element
        });
        bool providerWrong = verifier.providerWrong(context, witness);
        _resolve(gameId, game, providerWrong ? Role.Challenger : Role.Provider, false);
    }

    ////////////////////////////////////////////////////////////////
    //                      Anyone: timeout                       //
    ////////////////////////////////////////////////////////////////

    /// @notice The party to move has no time left: it loses.
    function timeout(uint256 gameId) external {
        Game storage game = _existing(gameId);
        if (game.phase == Phase.Resolved) revert GameResolved(gameId);
        uint256 left = timeLeft(gameId, toMove(gameId));
        if (left != 0) revert ClockNotExpired(left);
        Role mover = toMove(gameId);
        _resolve(gameId, game, mover == Role.Provider ? Role.Challenger : Role.Provider, true);
    }


    ////////////////////////////////////////////////////////////////
    //                          Views                             //
    ////////////////////////////////////////////////////////////////

    /// @notice Game `gameId`'s storage; reverts GameNotFound for an unknown id.
    function getGame(uint256 gameId) external view returns (Game memory) {
        return _existing(gameId);
    }

    /// @notice The party to move (its clock runs); None once resolved.
    function toMove(uint256 gameId) public view returns (Role) {
        Game storage game = _existing(gameId);
        Phase phase = game.phase;
        if (phase == Phase.Resolved) return Role.None;
        if (phase == Phase.Bisection || phase == Phase.Descent) {
            return game.pending ? Role.Challenger : Role.Provider;
        }
        if (phase == Phase.OneStep) return Role.Challenger;
        return Role.Provider;
    }

    /// @notice Seconds `role` has left now (its budget, less the running time if it moves).
    function timeLeft(uint256 gameId, Role role) public view returns (uint256) {
        Game storage game = _existing(gameId);
        uint256 budget = role == Role.Provider ? game.providerClock : game.challengerClock;
        if (role != toMove(gameId)) return budget;
        uint256 spent = block.timestamp - game.lastMoveAt;
        return spent >= budget ? 0 : budget - spent;
    }

    /// @notice [first, end): the flat indices of T_k's elements in the disputed leaf chunk.
    function chunkElements(uint256 gameId) public view returns (uint256 first, uint256 end) {
        Game storage game = _existing(gameId);
        uint256 size = Commitments.itemSize(game.dtype);
        uint256 byteLength = Commitments.tensorByteLength(game.dtype, game.shape);
        uint256 start = uint256(game.nodeIndex) * Commitments.LEAF_BYTES;
        uint256 stop = start + Commitments.LEAF_BYTES;
        if (stop > byteLength) stop = byteLength;
        return (start / size, stop / size);
    }

    /// @notice The verify input's header of `request`'s claim, with `promptLength` prompt
    ///         tokens: [len(P)] for a greedy-only model; for a sampling model [len(P),
    ///         temperature, topP, seed], which a greedy request (temperature 0) reads as
    ///         [len(P), 0, 1000, 0] (docs/protocol.md, "The verified computation").
    function verifyHeader(
        InferenceCoordinator.Request memory request,
        uint256 promptLength,
        bool sampling
    ) public pure returns (uint64[] memory header) {
        header = new uint64[](sampling ? 4 : 1);
        header[0] = uint64(promptLength);
        if (!sampling) return header;
        if (request.temperature == 0) {
            header[2] = 1000;
        } else {
            (header[1], header[2], header[3]) = (request.temperature, request.topP, request.seed);
        }
    }

    /// @notice S_0: the empty state with leaf 0 set to T_0 = tensor_root(int64 sequence),
    ///         sequence = header ++ prompt ++ output[:-1] (docs/protocol.md), the header from
    ///         `verifyHeader`.
    function initialState(uint64[] memory header, uint32[] memory prompt, uint32[] memory output)
        public
        view
        returns (bytes32 node)
    {
        uint256 fedBack = output.length == 0 ? 0 : output.length - 1; // O[:-1]
        uint256 tokensAt = header.length;
        uint256 length = tokensAt + prompt.length + fedBack;
        // Allocated last, so that the final store's spill lands in free memory.
        bytes memory data = new bytes(8 * length);
        _writeHeader(data, header);
        _writeInt64s(data, tokensAt, _words(prompt), prompt.length);
        _writeInt64s(data, tokensAt + prompt.length, _words(output), fedBack);
        uint64[] memory shape = new uint64[](1);
        shape[0] = uint64(length);
        node = Commitments.tensorRoot(Commitments.DTYPE_INT64, shape, data);
        // Every other leaf is empty: the siblings on leaf 0's path are the zero subtrees.
        for (uint256 h = 0; h < Commitments.STATE_DEPTH; ++h) {
            node = Sha256Merkle.hashPair(node, Sha256Merkle.zeroHash(h));
        }
    }

    /// @notice T_N = tensor_root(int64 output): what an honest trace's last node holds.
    function finalLeaf(uint32[] memory output) public view returns (bytes32) {
        bytes memory data = new bytes(8 * output.length);
        _writeInt64s(data, 0, _words(output), output.length);
        uint64[] memory shape = new uint64[](1);
        shape[0] = uint64(output.length);
        return Commitments.tensorRoot(Commitments.DTYPE_INT64, shape, data);
    }

    ////////////////////////////////////////////////////////////////
    //                         Internal                           //
    ////////////////////////////////////////////////////////////////

    function _existing(uint256 gameId) internal view returns (Game storage game) {
        game = _games[gameId];
        if (game.phase == Phase.None) revert GameNotFound(gameId);
    }

    /// @dev The checks every move makes first, in the reference's order: the game is open,
    ///      the caller is the party to move, its clock has not run out, and the move is the
    ///      kind the phase (and its pending flag) expects.
    function _startMove(uint256 gameId, Phase phase, bool pending, Role role)
        internal
        view
        returns (Game storage game)
    {
        game = _existing(gameId);
        if (game.phase == Phase.Resolved) revert GameResolved(gameId);
        Role mover = toMove(gameId);
        address moverAddress = mover == Role.Provider ? game.provider : game.challenger;
        if (msg.sender != moverAddress) revert NotYourMove(msg.sender, moverAddress);
        if (timeLeft(gameId, mover) == 0) revert ClockExpired();
        if (game.phase != phase || game.pending != pending || mover != role) {
            revert WrongPhase(uint8(game.phase));
        }
    }

    function _answerMid(uint256 gameId, uint256 mid) internal view returns (Game storage game) {
        game = _startMove(gameId, Phase.Bisection, true, Role.Challenger);
        uint256 expected = (uint256(game.lo) + game.hi) / 2;
        if (mid != expected) revert WrongMidpoint(mid, expected);
    }

    function _finishAnswer(uint256 gameId, Game storage game, uint256 mid, bool agreed) internal {
        game.pending = false;
        emit MidAnswered(gameId, mid, agreed, game.lo, game.hi);
        _afterBisectionStep(game, Role.Challenger);
    }

    /// @dev Bisection continues while hi > lo + 1; then node k = hi is revealed. The provider
    ///      moves next either way.
    function _afterBisectionStep(Game storage game, Role movedBy) internal {
        game.phase = game.hi == game.lo + 1 ? Phase.LeafReveal : Phase.Bisection;
        _handOver(game, movedBy);
    }

    /// @dev Charge `movedBy` (whose clock was running) for the time since it started, and
    ///      start the next mover's clock (the next mover follows from the phase: `toMove`).
    function _handOver(Game storage game, Role movedBy) internal {
        uint64 spent = uint64(block.timestamp) - game.lastMoveAt;
        if (movedBy == Role.Provider) {
            game.providerClock -= spent;
        } else {
            game.challengerClock -= spent;
        }
        game.lastMoveAt = uint64(block.timestamp);
    }

    /// @dev End the game: charge the running party (to zero at most), record the winner, tell
    ///      the coordinator (which unlocks the game's locked reward for a winning provider, and
    ///      for a losing one credits it to the challenger, records the rest as owed from the
    ///      claim's reserve, and slashes it on its first loss), and settle the bond: back to a
    ///      winning challenger, to the provider else.
    function _resolve(uint256 gameId, Game storage game, Role winner, bool timedOut) internal {
        Role running = toMove(gameId);
        uint256 left = timeLeft(gameId, running);
        if (running == Role.Provider) {
            game.providerClock = uint64(left);
        } else {
            game.challengerClock = uint64(left);
        }
        game.lastMoveAt = uint64(block.timestamp);
        game.phase = Phase.Resolved;
        game.winner = winner;
        game.pending = false;
        address bondTo = winner == Role.Challenger ? game.challenger : game.provider;
        balanceOf[bondTo] += challengerBond;
        emit GameEnded(gameId, game.requestId, winner, timedOut);
        coordinator.resolveDispute(
            game.requestId, winner == Role.Provider, game.challenger, lockedReward[gameId]
        );
    }

    /// @dev Memory pointer to the first element of a uint32[] or uint256[] in memory (each
    ///      element a 32-byte word either way).
    function _words(uint32[] memory values) internal pure returns (uint256 pointer) {
        assembly ("memory-safe") {
            pointer := add(values, 32)
        }
    }

    /// @dev Write the header's values (full 64-bit words: a seed spans them) as the first
    ///      little-endian int64 elements of `data`, a byte at a time (four elements at most).
    function _writeHeader(bytes memory data, uint64[] memory header) internal pure {
        for (uint256 i = 0; i < header.length; ++i) {
            uint64 value = header[i];
            for (uint256 b = 0; b < 8; ++b) {
                data[8 * i + b] = bytes1(uint8(value >> (8 * b)));
            }
        }
    }

    /// @dev Write `count` words from `source` (each below 2**32) into `data` as little-endian
    ///      int64 elements from element `first` on: one 32-byte store per element, its top 8
    ///      bytes the element (bytes 0-3 of the value reversed, then four zeros), the other 24
    ///      zeros that the next store overwrites. The last store spills 24 zero bytes past
    ///      `data` into free memory, which nothing assumes clean. (A byte loop cost ~800 gas an
    ///      element; this is ~40, so a challenge stays cheap at the longest request.)
    function _writeInt64s(bytes memory data, uint256 first, uint256 source, uint256 count)
        internal
        pure
    {
        assembly ("memory-safe") {
            let out := add(add(data, 32), shl(3, first))
            for { let i := 0 } lt(i, count) { i := add(i, 1) } {
                let v := mload(add(source, shl(5, i)))
                let le := or(
                    or(shl(56, and(v, 0xff)), shl(40, and(v, 0xff00))),
                    or(shl(24, and(v, 0xff0000)), shl(8, and(v, 0xff000000)))
                )
                mstore(add(out, shl(3, i)), shl(192, le))
            }
        }
    }

    function _requireStatePath(bytes32[] calldata path) internal pure {
        if (path.length != Commitments.STATE_DEPTH) revert StatePathLengthMismatch(path.length);
    }
}
