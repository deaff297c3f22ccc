// SPDX-License-Identifier: MIT
pragma solidity 0.8.37;

import {
    CallbackGasLimitTooHigh,
    ChallengeWindowClosed,
    ChallengeWindowOpen,
    ClaimNotCommitted,
    CommitDeadlineNotInFuture,
    CommitDeadlineNotPassed,
    ClaimNotRejected,
    CommitDeadlinePassed,
    ContextExceeded,
    DisputeGameAlreadySet,
    DisputeGameNotForThisCoordinator,
    DisputeGameNotSet,
    DisputesOpen,
    EmptyOutput,
    EmptyPrompt,
    EosBeforeEnd,
    InsufficientFreeStake,
    InsufficientGasForCallback,
    MaxCallbackGasLimitAboveCap,
    MaxTokensTooLarge,
    ModelNotRegistered,
    NoOpenDispute,
    NoReserveShare,
    NotDeployer,
    NotDisputeGame,
    NotNamedProvider,
    OutputNotTerminated,
    OutputStoreFailed,
    OutputTooLong,
    SamplingNotSupported,
    TemperatureOutOfRange,
    TopPOutOfRange,
    ProviderAlreadyRegistered,
    ProviderNotRegistered,
    RequestNotFound,
    RequestNotOpen,
    ReserveAlreadySettled,
    SlashSharesExceedWhole,
    StakeBelowMinimum,
    ZeroChallengeWindow,
    ZeroDisputeGame,
    ZeroMaxTokens,
    ZeroStakeAmount,
    ZeroStakePerClaim
} from "./Errors.sol";
import {ModelRegistry} from "./ModelRegistry.sol";
import {IInferenceConsumer} from "./interfaces/IInferenceConsumer.sol";
import {PullPayments} from "./lib/PullPayments.sol";

/// @title TokenPacking
/// @notice The packed encoding of a token list: each token id as 4 big-endian bytes, concatenated
///         (`len(tokens) * 4` bytes, no length prefix). A request stores `keccak256` of its packed
///         prompt; a claim stores its packed output as the code of a data contract.
library TokenPacking {
    /// @notice Code of a data contract = STOP byte || packed tokens (the STOP makes it inert).
    uint256 internal constant DATA_OFFSET = 1;

    /// @notice Largest output a data contract can hold: EIP-170 caps code at 24576 bytes.
    uint256 internal constant MAX_TOKENS = (24_576 - DATA_OFFSET) / 4;

    /// @notice The packed bytes of `tokens`.
    function pack(uint32[] calldata tokens) internal pure returns (bytes memory packed) {
        uint256 count = tokens.length;
        packed = new bytes(count * 4);
        uint256 dst;
        assembly ("memory-safe") {
            dst := add(packed, 32)
        }
        for (uint256 i; i < count; ++i) {
            uint32 token = tokens[i]; // the ABI decoder rejects ids wider than 32 bits
            // A 32-byte store whose top 4 bytes are the token; the next store overwrites the rest
            // and the last one spills past the array into free memory, which nothing assumes clean.
            assembly ("memory-safe") {
                mstore(add(dst, shl(2, i)), shl(224, token))
            }
        }
    }

    /// @notice keccak256 of the packed bytes of `tokens` (what `Request.promptHash` holds).
    function hash(uint32[] calldata tokens) internal pure returns (bytes32) {
        return keccak256(pack(tokens));
    }

    /// @notice Deploy a data contract whose code is STOP || `packed`; return its address.
    /// @dev    Creation code: PUSH4 size, DUP1, PUSH1 14, PUSH1 0, CODECOPY, PUSH1 0, RETURN
    ///         (14 bytes), then the runtime code it returns. Code cannot change once deployed
    ///         (no SELFDESTRUCT in it), so the address commits to the tokens.
    function store(bytes memory packed) internal returns (address data) {
        bytes memory creation = abi.encodePacked(
            hex"63", uint32(packed.length + DATA_OFFSET), hex"80600e6000396000f3", hex"00", packed
        );
        assembly ("memory-safe") {
            data := create(0, add(creation, 32), mload(creation))
        }
        if (data == address(0)) revert OutputStoreFailed();
    }

    /// @notice The token list stored in data contract `data` by `store`.
    function load(address data) internal view returns (uint32[] memory tokens) {
        uint256 size = data.code.length - DATA_OFFSET;
        uint256 count = size / 4;
        tokens = new uint32[](count);
        assembly ("memory-safe") {
            // Copy the packed bytes to scratch memory past the free pointer, then widen each
            // 4-byte group into a 32-byte array element.
            let buffer := mload(0x40)
            extcodecopy(data, buffer, DATA_OFFSET, size)
            let out := add(tokens, 32)
            for { let i := 0 } lt(i, count) { i := add(i, 1) } {
                mstore(add(out, shl(5, i)), shr(224, mload(add(buffer, shl(2, i)))))
            }
        }
    }
}

/// @title InferenceCoordinator
/// @notice The market for verifiable inference. Providers stake ETH; consumers post requests
///         (model, prompt tokens, max tokens, fee, optional callback, optional named provider,
///         commit deadline); a provider commits the output tokens, locking `stakePerClaim` of
///         its stake; during the challenge window the dispute game may open disputes against the
///         claim; after the window, with every dispute won by the provider, anyone finalizes:
///         the provider is credited the fee, its stake is unlocked and the consumer's callback
///         runs, isolated. A lost dispute slashes the provider and refunds the consumer. Requests
///         nobody answers before the commit deadline are refundable.
///         Every challenger that wins its own game against a claim is paid, whatever the order in
///         which games end: each game's reward (`challengerReward`) is locked from the provider's
///         free stake when the game opens, and the part that stake could not back is paid from
///         the claim's reserve, the `challengerReward` part of its slashed stake, shared pro rata
///         once all its games are over (docs/protocol.md, "Challenger rewards").
/// @dev    Prompt and output tokens travel in calldata and events, so a watchtower needs only an
///         RPC endpoint. On-chain, a request keeps `keccak256` of its packed prompt
///         (`TokenPacking`) and a claim keeps its packed output as the code of a data contract:
///         the dispute game reads the output with `getOutput` and checks a prompt it is given
///         against `promptHash`, and from both computes the tensor roots `T_0` of the verify
///         sequence and `T_N` of int64 `O` (docs/protocol.md, "The verified computation").
///         Payments are pull-based: every amount owed is credited to `balanceOf` and sent only
///         by `withdraw`. The functions that send ETH or call out (`finalize`, `withdraw`) are
///         guarded against re-entrancy and follow checks-effects-interactions.
contract InferenceCoordinator is PullPayments {
    ////////////////////////////////////////////////////////////////
    //                         Structs                            //
    ////////////////////////////////////////////////////////////////

    /// @notice Where a request is in its life. Finalized, Refunded and Rejected are terminal.
    /// @custom:value None      No such request (the zero value of unset storage).
    /// @custom:value Open      Posted, no output committed yet.
    /// @custom:value Committed An output is committed; challenge window running or disputes open.
    /// @custom:value Finalized The output is final; the provider was paid.
    /// @custom:value Refunded  Nobody committed before the deadline; the fee went back.
    /// @custom:value Rejected  The provider lost a dispute: slashed, fee refunded to the consumer.
    enum Status {
        None,
        Open,
        Committed,
        Finalized,
        Refunded,
        Rejected
    }

    /// @notice How a request's answer is decoded (docs/protocol.md, "Sampling"). Temperature
    ///         0 is greedy decoding, whatever the other two fields hold; its draw is read as
    ///         (0, 1000, 0).
    /// @param temperature Thousandths: 0 (greedy) or 50-2000.
    /// @param topP        Thousandths, 1-1000: the nucleus's least probability mass.
    /// @param seed        In `postRequest`, the consumer's seed; in a stored request, the draw's
    ///                    seed derived from it (`drawSeed`), below 2**63.
    struct Sampling {
        uint16 temperature;
        uint16 topP;
        uint64 seed;
    }

    /// @notice One request and, once committed, its claim. Packed into seven slots: what
    ///         `postRequest` writes (0-3, 5, and 6 for a sampled request), what `commitOutput`
    ///         adds (4 and the output in 5), and the dispute count (6), which disputes write.
    /// @param consumer          Who posted it (and receives refunds). Passed to the callback.
    /// @param commitDeadline    Last timestamp at which an output may be committed.
    /// @param status            See `Status`.
    /// @param callbackSucceeded Whether the finalization callback returned without reverting.
    /// @param modelId           The ModelRegistry id (= model root) of the model to run.
    /// @param promptHash        `TokenPacking.hash(prompt)`.
    /// @param callback          Contract to call on finalization; zero for none.
    /// @param callbackGasLimit  Gas the callback receives.
    /// @param maxTokens         Most output tokens the claim may hold.
    /// @param promptLength      Number of prompt tokens.
    /// @param provider          Before commitment: the named provider (zero = anyone may
    ///                          answer). After: the provider that committed.
    /// @param committedAt       Timestamp of the commitment; zero before.
    /// @param output            Data contract holding the packed output; zero before commitment.
    /// @param fee               Wei paid by the consumer with the request.
    /// @param openDisputes      Disputes opened by the game and not yet resolved. A uint64: a
    ///                          griefer opening games to overflow it would need 2**64 challenges
    ///                          (each over 100k gas) inside one window.
    /// @param temperature       The sampling temperature in thousandths; 0 (greedy) leaves
    ///                          `topP` and `seed` zero.
    /// @param topP              Top-p in thousandths.
    /// @param seed              The draw's seed (`drawSeed`).
    struct Request {
        address consumer;
        uint64 commitDeadline;
        Status status;
        bool callbackSucceeded;
        bytes32 modelId;
        bytes32 promptHash;
        address callback;
        uint32 callbackGasLimit;
        uint32 maxTokens;
        uint32 promptLength;
        address provider;
        uint64 committedAt;
        address output;
        uint96 fee;
        uint64 openDisputes;
        uint16 temperature;
        uint16 topP;
        uint64 seed;
    }

    /// @notice A rejected claim's reward reserve: the `challengerReward` part of its slashed
    ///         stake, kept locked in the provider's stake to pay the winners of games whose
    ///         reward the provider's free stake could not (wholly) back when they opened.
    /// @param shortfall Sum of those winners' unbacked rewards, less what was claimed (`W`).
    /// @param owed      Once settled: the part of the reserve still owed to them,
    ///                  min(`challengerReward`, `W`) less what was claimed.
    /// @param settled   Every game on the claim is over (window closed, none open) and the part
    ///                  of the reserve nobody is owed went back to the provider's free stake.
    struct Reserve {
        uint256 shortfall;
        uint128 owed;
        bool settled;
    }

    /// @notice A provider's stake. Amounts in wei; uint128 holds far more ETH than exists.
    /// @param stake  Total stake, locked or not.
    /// @param locked Part of `stake` locked by claims not yet finalized or slashed.
    struct Provider {
        uint128 stake;
        uint128 locked;
    }

    /// @notice What `getResult` returns.
    struct Result {
        Status status;
        address provider;
        uint64 committedAt;
        bool callbackSucceeded;
        uint32[] output;
    }

    ////////////////////////////////////////////////////////////////
    //                          Events                            //
    ////////////////////////////////////////////////////////////////

    /// @notice The deployer set the dispute game (once).
    event DisputeGameSet(address indexed disputeGame);

    /// @notice `provider` registered with `stake` wei.
    event ProviderRegistered(address indexed provider, uint256 stake);

    /// @notice `provider` added `amount` wei; its stake is now `totalStake`.
    event StakeAdded(address indexed provider, uint256 amount, uint256 totalStake);

    /// @notice `provider` moved `amount` wei of free stake to its withdrawable balance.
    event StakeRemoved(address indexed provider, uint256 amount, uint256 totalStake);

    /// @notice A request was posted; every field a provider or watchtower needs. `sampling`
    ///         is as stored: zero for a greedy request, else with the derived seed.
    event RequestPosted(
        uint256 indexed requestId,
        address indexed consumer,
        bytes32 indexed modelId,
        uint32[] prompt,
        uint32 maxTokens,
        uint256 fee,
        address callback,
        uint32 callbackGasLimit,
        address namedProvider,
        uint64 commitDeadline,
        Sampling sampling
    );

    /// @notice `provider` committed `output` for `requestId`; finalizable from `challengeDeadline`.
    event OutputCommitted(
        uint256 indexed requestId, address indexed provider, uint32[] output, uint64 challengeDeadline
    );

    /// @notice The dispute game opened a dispute; `openDisputes` are now unresolved.
    event DisputeOpened(uint256 indexed requestId, uint256 openDisputes);

    /// @notice The dispute game resolved a dispute against `challenger`.
    event DisputeResolved(
        uint256 indexed requestId, bool providerWon, address indexed challenger, uint256 openDisputes
    );

    /// @notice `provider` lost a first dispute on `requestId` (against `challenger`): its
    ///         `stakePerClaim` was split into the consumer's share, the burnt share and the
    ///         claim's reward reserve (`challengerReward`, still locked in its stake).
    event Slashed(
        uint256 indexed requestId,
        address indexed provider,
        address indexed challenger,
        uint256 reserve,
        uint256 consumerAmount,
        uint256 burnedAmount
    );

    /// @notice A game opened on `requestId` locked `amount` of `provider`'s free stake as its
    ///         reward (`challengerReward`, or all the free stake when less).
    event RewardLocked(uint256 indexed requestId, address indexed provider, uint256 amount);

    /// @notice `challenger` won a game on `requestId`: `amount` (the game's locked reward) was
    ///         credited now; `shortfall` (the rest of `challengerReward`) is owed from the
    ///         claim's reserve once settled.
    event ChallengerRewarded(
        uint256 indexed requestId, address indexed challenger, uint256 amount, uint256 shortfall
    );

    /// @notice The reserve of `requestId` was settled: `owed` wei are owed to the winners with
    ///         a shortfall, `returned` went back to the provider's free stake.
    event ReserveSettled(uint256 indexed requestId, uint256 owed, uint256 returned);

    /// @notice `challenger` was credited `amount` from the reserve of `requestId`.
    event ReserveShareClaimed(uint256 indexed requestId, address indexed challenger, uint256 amount);

    /// @notice The claim on `requestId` is final: `provider` was credited `fee`.
    /// @param callbackSucceeded False when there was no callback or it failed.
    event Finalized(
        uint256 indexed requestId, address indexed provider, uint256 fee, bool callbackSucceeded
    );

    /// @notice `consumer` was credited `amount` for `requestId` (no answer in time, or rejected).
    event Refunded(uint256 indexed requestId, address indexed consumer, uint256 amount);


    ////////////////////////////////////////////////////////////////
    //                        Parameters                          //
    ////////////////////////////////////////////////////////////////

    /// @notice Denominator of the slash shares.
    uint256 public constant BPS = 10_000;

    /// @notice Sampling limits, in thousandths (mirrored by `optinfer.models.sampling`): a
    ///         sampled request's temperature lies in [MIN_TEMPERATURE, MAX_TEMPERATURE] and its
    ///         top-p in [1, TOP_P_UNIT].
    uint256 public constant MIN_TEMPERATURE = 50;
    uint256 public constant MAX_TEMPERATURE = 2000;
    uint256 public constant TOP_P_UNIT = 1000;

    /// @notice Gas `finalize` keeps on top of a callback's limit for the call itself and what
    ///         follows it (cold account access, recording the outcome, the event).
    uint256 public constant CALLBACK_GAS_OVERHEAD = 30_000;

    /// @notice EIP-7825's cap on one transaction's gas.
    uint256 public constant TX_GAS_CAP = 2 ** 24;

    /// @notice Gas `finalize` spends before its callback check at the longest output
    ///         (`TokenPacking.MAX_TOKENS`), intrinsic gas included: reading 6143 tokens back
    ///         and encoding the call (memory grows past 400 KB) cost 1.52M gas, measured by
    ///         tests/contracts/test_coordinator.py; 2M leaves room.
    uint256 public constant FINALIZE_GAS_BEFORE_CALLBACK = 2_000_000;

    /// @notice Largest `maxCallbackGasLimit`: `finalize` needs `limit + limit / 63 +
    ///         CALLBACK_GAS_OVERHEAD` gas left at the check, and with what it spends before it
    ///         that fits `TX_GAS_CAP` (14 516 790 gas).
    uint256 public constant MAX_CALLBACK_GAS_LIMIT =
        (TX_GAS_CAP - FINALIZE_GAS_BEFORE_CALLBACK - CALLBACK_GAS_OVERHEAD) * 63 / 64;

    /// @notice The registry whose models requests may name.
    ModelRegistry public immutable registry;
    /// @notice Who may set the dispute game.
    address public immutable deployer;
    /// @notice Stake a provider needs to register and to commit.
    uint256 public immutable minimumStake;
    /// @notice Stake each commitment locks, and what a lost dispute slashes.
    uint256 public immutable stakePerClaim;
    /// @notice Seconds after a commitment during which disputes may be opened.
    uint256 public immutable challengeWindow;
    /// @notice Share of a slash credited to the winning challenger, in basis points.
    uint256 public immutable challengerShareBps;
    /// @notice Share of a slash credited to the consumer (on top of its fee), in basis points.
    ///         The rest of the slash is burnt: it stays in this contract, owed to nobody.
    uint256 public immutable consumerShareBps;
    /// @notice Largest callback gas limit a request may ask for (at most
    ///         `MAX_CALLBACK_GAS_LIMIT`, so that finalize fits one transaction).
    uint256 public immutable maxCallbackGasLimit;
    /// @notice Each game's reward: `stakePerClaim * challengerShareBps / BPS`, locked from the
    ///         provider's free stake when the game opens (as much of it as is free), and also the
    ///         size of a rejected claim's reserve, which pays what the locks left short.
    uint256 public immutable challengerReward;

    ////////////////////////////////////////////////////////////////
    //                          State                             //
    ////////////////////////////////////////////////////////////////

    /// @notice The contract allowed to open and resolve disputes; zero until set.
    address public disputeGame;
    /// @notice Number of requests posted; ids run from 1 to `requestCount`.
    uint256 public requestCount;
    /// @notice Total wei burnt by slashes (held here, owed to nobody).
    uint256 public totalBurned;

    /// @notice Requests by id.
    mapping(uint256 => Request) internal _requests;
    /// @notice Stake by provider.
    mapping(address => Provider) public providers;
    /// @notice Whether an address has registered as a provider.
    mapping(address => bool) public isProvider;
    /// @notice The reward reserve of each rejected claim, by request id.
    mapping(uint256 => Reserve) public reserves;
    /// @notice Unbacked reward each challenger won on each claim, owed from its reserve
    ///         (request id => challenger => wei of `challengerReward` its locks left short).
    mapping(uint256 => mapping(address => uint256)) public shortfallOf;

    ////////////////////////////////////////////////////////////////
    //                        Modifiers                           //
    ////////////////////////////////////////////////////////////////


    /// @notice Only the dispute game calls the dispute hooks.
    modifier onlyDisputeGame() {
        // While no game is set, `disputeGame` is zero and no caller matches it.
        if (msg.sender != disputeGame) revert NotDisputeGame(msg.sender);
        _;
    }

    ////////////////////////////////////////////////////////////////
    //                       Constructor                          //
    ////////////////////////////////////////////////////////////////

    /// @param registry_            The ModelRegistry.
    /// @param minimumStake_        Stake needed to register and to commit (wei).
    /// @param stakePerClaim_       Stake each commitment locks and a lost dispute slashes (wei).
    /// @param challengeWindow_     Seconds during which a commitment can be disputed.
    /// @param challengerShareBps_  Slash share of the winning challenger (basis points).
    /// @param consumerShareBps_    Slash share of the consumer (basis points); the rest is burnt.
    /// @param maxCallbackGasLimit_ Largest callback gas limit a request may set (at most
    ///                             `MAX_CALLBACK_GAS_LIMIT`).
    constructor(
        ModelRegistry registry_,
        uint256 minimumStake_,
        uint256 stakePerClaim_,
        uint256 challengeWindow_,
        uint256 challengerShareBps_,
        uint256 consumerShareBps_,
        uint256 maxCallbackGasLimit_
    ) {
        // A claim that locks nothing could be lied about for free.
        if (stakePerClaim_ == 0) revert ZeroStakePerClaim();
        // Without a window nobody can ever dispute.
        if (challengeWindow_ == 0) revert ZeroChallengeWindow();
        // The shares split one slash: together at most all of it.
        if (challengerShareBps_ + consumerShareBps_ > BPS) {
            revert SlashSharesExceedWhole(challengerShareBps_ + consumerShareBps_);
        }
        // finalize with the largest callback and the longest output fits one transaction.
        if (maxCallbackGasLimit_ > MAX_CALLBACK_GAS_LIMIT) {
            revert MaxCallbackGasLimitAboveCap(maxCallbackGasLimit_, MAX_CALLBACK_GAS_LIMIT);
        }
        registry = registry_;
        deployer = msg.sender;
        minimumStake = minimumStake_;
        stakePerClaim = stakePerClaim_;
        challengeWindow = challengeWindow_;
        challengerShareBps = challengerShareBps_;
        consumerShareBps = consumerShareBps_;
        maxCallbackGasLimit = maxCallbackGasLimit_;
        challengerReward = stakePerClaim_ * challengerShareBps_ / BPS;
    }

    /// @notice Set the dispute game, once: a contract whose `coordinator()` is this one. Until
    ///         it is set no output can be committed (such a claim could not be disputed).
    function setDisputeGame(address game) external {
        // Only the deployer wires the game; nobody can swap it afterwards.
        if (msg.sender != deployer) revert NotDeployer(msg.sender);
        if (game == address(0)) revert ZeroDisputeGame();
        if (disputeGame != address(0)) revert DisputeGameAlreadySet(disputeGame);
        // The game disputes this coordinator's claims: an address without code, or a game
        // deployed for another coordinator, could never open a dispute here.
        if (!_namesThisCoordinator(game)) revert DisputeGameNotForThisCoordinator(game);
        disputeGame = game;
        emit DisputeGameSet(game);
    }

    ////////////////////////////////////////////////////////////////
    //                        Providers                           //
    ////////////////////////////////////////////////////////////////

    /// @notice Register `msg.sender` as a provider with `msg.value` (>= `minimumStake`) as stake.
    function registerProvider() external payable {
        if (isProvider[msg.sender]) revert ProviderAlreadyRegistered(msg.sender);
        if (msg.value < minimumStake) revert StakeBelowMinimum(msg.value, minimumStake);
        isProvider[msg.sender] = true;
        providers[msg.sender].stake = uint128(msg.value);
        emit ProviderRegistered(msg.sender, msg.value);
    }

    /// @notice Add `msg.value` to the registered provider `msg.sender`'s stake.
    function addStake() external payable {
        if (!isProvider[msg.sender]) revert ProviderNotRegistered(msg.sender);
        if (msg.value == 0) revert ZeroStakeAmount();
        Provider storage provider = providers[msg.sender];
        provider.stake += uint128(msg.value);
        emit StakeAdded(msg.sender, msg.value, provider.stake);
    }

    /// @notice Move `amount` of `msg.sender`'s stake that no open claim locks to its withdrawable
    ///         balance (send it with `withdraw`). A provider left under `minimumStake` cannot
    ///         commit until it adds stake again.
    function removeStake(uint256 amount) external {
        Provider storage provider = providers[msg.sender];
        uint256 free = provider.stake - provider.locked;
        // Stake backing an unfinished claim is what a lost dispute slashes: it stays.
        if (amount > free) revert InsufficientFreeStake(free, amount);
        if (amount == 0) revert ZeroStakeAmount();
        provider.stake -= uint128(amount);
        balanceOf[msg.sender] += amount;
        emit StakeRemoved(msg.sender, amount, provider.stake);
    }

    ////////////////////////////////////////////////////////////////
    //                        Requests                            //
    ////////////////////////////////////////////////////////////////

    /// @notice Post a request paying `msg.value` as the fee.
    /// @param modelId          A registered model's id.
    /// @param prompt           Prompt token ids (at least one).
    /// @param maxTokens        Most output tokens; len(prompt) + maxTokens - 1 must fit the
    ///                         model's max context (the verify sequence, docs/protocol.md).
    /// @param callback         Contract to call with the output on finalization; zero for none.
    /// @param callbackGasLimit Gas the callback gets (at most `maxCallbackGasLimit`).
    /// @param namedProvider    The only provider allowed to answer; zero for anyone.
    /// @param commitDeadline   Last timestamp for a commitment (after this block's).
    /// @param sampling         Temperature 0 for greedy decoding (top-p and seed are then
    ///                         ignored); else temperature 50-2000 and top-p 1-1000 thousandths,
    ///                         on a model registered as sampling, and the consumer's seed, from
    ///                         which the draw's seed is derived (`drawSeed`).
    /// @return requestId       The new request's id.
    function postRequest(
        bytes32 modelId,
        uint32[] calldata prompt,
        uint32 maxTokens,
        address callback,
        uint32 callbackGasLimit,
        address namedProvider,
        uint64 commitDeadline,
        Sampling calldata sampling
    ) external payable returns (uint256 requestId) {
        if (prompt.length == 0) revert EmptyPrompt();
        if (maxTokens == 0) revert ZeroMaxTokens();
        // A claim stores its output as contract code, which EIP-170 bounds.
        if (maxTokens > TokenPacking.MAX_TOKENS) {
            revert MaxTokensTooLarge(maxTokens, TokenPacking.MAX_TOKENS);
        }
        // Only registered models can be disputed: the game opens nodes against the model root.
        if (!registry.isRegistered(modelId)) revert ModelNotRegistered(modelId);
        // The verify graph reads [len(P)] ++ P ++ O[:-1]; its T = len(P) + len(O) - 1 tokens
        // must fit the context for the longest allowed output.
        {
            ModelRegistry.Model memory model = registry.getModel(modelId);
            uint256 sequenceLength = prompt.length + maxTokens - 1;
            if (sequenceLength > model.maxContext) {
                revert ContextExceeded(sequenceLength, model.maxContext);
            }
            _checkSampling(modelId, model.sampling, sampling);
        }
        if (commitDeadline <= block.timestamp) revert CommitDeadlineNotInFuture(commitDeadline);
        if (callbackGasLimit > maxCallbackGasLimit) {
            revert CallbackGasLimitTooHigh(callbackGasLimit, maxCallbackGasLimit);
        }

        requestId = ++requestCount;
        Request storage request = _requests[requestId];
        request.consumer = msg.sender;
        request.commitDeadline = commitDeadline;
        request.status = Status.Open;
        request.modelId = modelId;
        request.promptHash = TokenPacking.hash(prompt);
        request.callback = callback;
        request.callbackGasLimit = callbackGasLimit;
        request.maxTokens = maxTokens;
        request.promptLength = uint32(prompt.length); // < maxContext, a uint32
        if (namedProvider != address(0)) request.provider = namedProvider;
        // uint96 holds 79 billion ETH: every fee that can exist.
        request.fee = uint96(msg.value);
        Sampling memory draw; // greedy: all zero
        if (sampling.temperature != 0) {
            draw = Sampling(
                sampling.temperature, sampling.topP, drawSeed(requestId, msg.sender, sampling.seed)
            );
            (request.temperature, request.topP, request.seed) =
                (draw.temperature, draw.topP, draw.seed);
        }

        _emitRequestPosted(requestId, request, prompt, draw);
    }

    /// @notice Commit `output` as the answer to open request `requestId`, locking
    ///         `stakePerClaim` of `msg.sender`'s stake until the claim is finalized or slashed.
    /// @param output The output token ids: 1 to maxTokens of them, shaped as greedy decoding
    ///               stops: no end-of-sequence token (the model's, from the registry) before
    ///               the last position, and one at the last position unless the output is
    ///               maxTokens long. Whether they are the model's greedy answer is for a dispute
    ///               to decide; where the answer ends is decided here, since no dispute can
    ///               (each token of a truncated answer is the model's).
    function commitOutput(uint256 requestId, uint32[] calldata output) external {
        Request storage request = _existing(requestId);
        if (request.status != Status.Open) revert RequestNotOpen(requestId);
        if (block.timestamp > request.commitDeadline) {
            revert CommitDeadlinePassed(request.commitDeadline);
        }
        // Every claim can be disputed from the moment it is committed.
        if (disputeGame == address(0)) revert DisputeGameNotSet();
        // A named request is answered by its provider only.
        address named = request.provider;
        if (named != address(0) && named != msg.sender) revert NotNamedProvider(named);
        if (output.length == 0) revert EmptyOutput();
        if (output.length > request.maxTokens) {
            revert OutputTooLong(output.length, request.maxTokens);
        }
        _requireTerminated(registry.eosTokenIds(request.modelId), output, request.maxTokens);
        if (!isProvider[msg.sender]) revert ProviderNotRegistered(msg.sender);
        Provider storage provider = providers[msg.sender];
        if (provider.stake < minimumStake) revert StakeBelowMinimum(provider.stake, minimumStake);
        // Every claim is backed by its own slice of stake, so one provider's claims never
        // compete for the same wei when slashed.
        uint256 free = provider.stake - provider.locked;
        if (free < stakePerClaim) revert InsufficientFreeStake(free, stakePerClaim);

        provider.locked += uint128(stakePerClaim);
        request.status = Status.Committed;
        request.provider = msg.sender;
        request.committedAt = uint64(block.timestamp);
        request.output = TokenPacking.store(TokenPacking.pack(output));

        emit OutputCommitted(
            requestId, msg.sender, output, uint64(block.timestamp + challengeWindow)
        );
    }

    /// @notice Make the claim on `requestId` final: once its challenge window has closed and no
    ///         dispute is open or lost. Credits the fee to the provider, unlocks its stake and
    ///         calls the callback (if any) with exactly its gas limit. Anyone may call.
    /// @dev    The callback is a low-level call that copies no return data: a revert, an
    ///         out-of-gas or a huge return value is recorded as `callbackSucceeded == false`
    ///         and finality stands. The caller must send enough gas for the callback to get its
    ///         whole limit (EIP-150 keeps 1/64 back), else this reverts, so that nobody can
    ///         starve a callback on purpose.
    function finalize(uint256 requestId) external nonReentrant {
        Request storage request = _existing(requestId);
        if (request.status != Status.Committed) revert ClaimNotCommitted(requestId);
        uint256 deadline = uint256(request.committedAt) + challengeWindow;
        if (block.timestamp < deadline) revert ChallengeWindowOpen(deadline);
        // A dispute not yet resolved may still be lost; a lost one made the claim Rejected.
        if (request.openDisputes != 0) revert DisputesOpen(request.openDisputes);

        // Effects first: the claim is final and paid before any outside code runs.
        address providerAddress = request.provider;
        uint256 fee = request.fee;
        request.status = Status.Finalized;
        providers[providerAddress].locked -= uint128(stakePerClaim);
        balanceOf[providerAddress] += fee;

        bool succeeded;
        address callback = request.callback;
        if (callback != address(0)) {
            succeeded = _deliver(
                callback, request.callbackGasLimit, requestId, request.consumer, request.output
            );
            request.callbackSucceeded = succeeded;
        }
        emit Finalized(requestId, providerAddress, fee, succeeded);
    }

    /// @notice Refund an open request nobody answered by its commit deadline: its fee is
    ///         credited to the consumer (send it with `withdraw`). Anyone may call.
    function refund(uint256 requestId) external {
        Request storage request = _existing(requestId);
        if (request.status != Status.Open) revert RequestNotOpen(requestId);
        // Until the deadline a provider may still answer.
        if (block.timestamp <= request.commitDeadline) {
            revert CommitDeadlineNotPassed(request.commitDeadline);
        }
        request.status = Status.Refunded;
        balanceOf[request.consumer] += request.fee;
        emit Refunded(requestId, request.consumer, request.fee);
    }


    ////////////////////////////////////////////////////////////////
    //                     Dispute hooks                          //
    ////////////////////////////////////////////////////////////////

    /// @notice The dispute game opened a dispute against the claim on `requestId`; the claim
    ///         cannot finalize until the game resolves it. Only while the window is open. A claim
    ///         already rejected by a lost game can still be disputed in its window: no game's
    ///         early end keeps another challenger from its own game and its reward.
    function openDispute(uint256 requestId) external onlyDisputeGame {
        Request storage request = _existing(requestId);
        Status status = request.status;
        // A claim is disputable once committed, and stays so after a lost game.
        if (status != Status.Committed && status != Status.Rejected) {
            revert ClaimNotCommitted(requestId);
        }
        uint256 deadline = uint256(request.committedAt) + challengeWindow;
        if (block.timestamp >= deadline) revert ChallengeWindowClosed(deadline);
        uint64 open = request.openDisputes + 1;
        request.openDisputes = open;
        emit DisputeOpened(requestId, open);
    }

    /// @notice Lock the reward of the game the dispute game just opened on `requestId` (right
    ///         after `openDispute`): `challengerReward` of the provider's free stake, or all of
    ///         its free stake when less is free. Never reverts for lack of stake, so no challenge
    ///         is ever refused for it; the part left unlocked is backed by the claim's reserve.
    /// @return locked The wei locked; the game passes it back to `resolveDispute`.
    function lockChallengeReward(uint256 requestId)
        external
        onlyDisputeGame
        returns (uint256 locked)
    {
        address providerAddress = _existing(requestId).provider;
        Provider storage provider = providers[providerAddress];
        uint256 free = provider.stake - provider.locked;
        locked = free < challengerReward ? free : challengerReward;
        provider.locked += uint128(locked);
        emit RewardLocked(requestId, providerAddress, locked);
    }

    /// @notice The dispute game resolved one of the open disputes on `requestId`.
    /// @param providerWon  Whether the provider won: the game's locked reward goes back to its
    ///                     free stake. If not, the challenger is credited that locked reward now
    ///                     and is owed the rest of `challengerReward` from the claim's reserve
    ///                     (`claimReserveShare`); and if the claim is still committed it is
    ///                     rejected: `stakePerClaim` is split into `consumerShareBps` plus the
    ///                     fee to the consumer, the reserve (`challengerReward`, still locked)
    ///                     and the rest burnt. A claim is slashed once; every winner is paid.
    /// @param challenger   The dispute's challenger.
    /// @param lockedReward What `lockChallengeReward` locked for this game.
    /// @return challengerAmount Wei credited to `challenger` now (zero when the provider won).
    function resolveDispute(
        uint256 requestId,
        bool providerWon,
        address challenger,
        uint256 lockedReward
    ) external onlyDisputeGame returns (uint256 challengerAmount) {
        Request storage request = _existing(requestId);
        if (request.openDisputes == 0) revert NoOpenDispute(requestId);
        uint64 open = request.openDisputes - 1;
        request.openDisputes = open;
        emit DisputeResolved(requestId, providerWon, challenger, open);

        address providerAddress = request.provider;
        Provider storage provider = providers[providerAddress];
        // The game's reward leaves the lock either way: back to the provider, or to the winner.
        provider.locked -= uint128(lockedReward);
        if (providerWon) return 0;

        // The provider lied. The first lost game rejects the claim and slashes it; every lost
        // game pays its own winner, so the order in which games end changes nobody's pay.
        if (request.status == Status.Committed) {
            _reject(requestId, request, provider, providerAddress, challenger);
        }
        provider.stake -= uint128(lockedReward);
        balanceOf[challenger] += lockedReward;
        uint256 shortfall = challengerReward - lockedReward;
        if (shortfall != 0) {
            reserves[requestId].shortfall += shortfall;
            shortfallOf[requestId][challenger] += shortfall;
        }
        emit ChallengerRewarded(requestId, challenger, lockedReward, shortfall);
        return lockedReward;
    }

    ////////////////////////////////////////////////////////////////
    //                     Reward reserve                         //
    ////////////////////////////////////////////////////////////////

    /// @notice Settle the reserve of rejected claim `requestId` once its window has closed and
    ///         no game on it is open (the winners' shortfall `W` is then final): min(`W`,
    ///         `challengerReward`) stays owed to them, the rest goes back to the provider's free
    ///         stake. Anyone may call; `claimReserveShare` calls it first if needed.
    function settleReserve(uint256 requestId) public {
        Request storage request = _existing(requestId);
        // Only a lost game creates a reserve.
        if (request.status != Status.Rejected) revert ClaimNotRejected(requestId);
        // New games may open until the window closes, and open ones may still be lost.
        uint256 deadline = uint256(request.committedAt) + challengeWindow;
        if (block.timestamp < deadline) revert ChallengeWindowOpen(deadline);
        if (request.openDisputes != 0) revert DisputesOpen(request.openDisputes);
        Reserve storage reserve = reserves[requestId];
        // The unowed part is returned once.
        if (reserve.settled) revert ReserveAlreadySettled(requestId);

        uint256 owed = reserve.shortfall < challengerReward ? reserve.shortfall : challengerReward;
        uint256 returned = challengerReward - owed;
        reserve.settled = true;
        reserve.owed = uint128(owed);
        providers[request.provider].locked -= uint128(returned);
        emit ReserveSettled(requestId, owed, returned);
    }

    /// @notice Credit `challenger` its share of the reserve of rejected claim `requestId`:
    ///         its shortfall times min(1, `challengerReward` / `W`), `W` the winners' total
    ///         shortfall. Anyone may call (the share is credited to `challenger`, sent by its own
    ///         `withdraw`); settles the reserve first if needed.
    /// @return amount Wei credited. Each claim takes its part of what is left, so the last one
    ///         takes the rest: shares differ from the exact ratio by under 1 wei, none stays locked.
    function claimReserveShare(uint256 requestId, address challenger)
        external
        returns (uint256 amount)
    {
        Reserve storage reserve = reserves[requestId];
        if (!reserve.settled) settleReserve(requestId);
        uint256 shortfall = shortfallOf[requestId][challenger];
        // Only a winner whose reward its game's lock left short is owed a share, once.
        if (shortfall == 0) revert NoReserveShare(requestId, challenger);

        amount = shortfall * reserve.owed / reserve.shortfall;
        shortfallOf[requestId][challenger] = 0;
        reserve.shortfall -= shortfall;
        reserve.owed -= uint128(amount);
        Provider storage provider = providers[_requests[requestId].provider];
        provider.locked -= uint128(amount);
        provider.stake -= uint128(amount);
        balanceOf[challenger] += amount;
        emit ReserveShareClaimed(requestId, challenger, amount);
    }

    ////////////////////////////////////////////////////////////////
    //                          Views                             //
    ////////////////////////////////////////////////////////////////

    /// @notice Request `requestId` (its claim fields are zero before commitment).
    function getRequest(uint256 requestId) external view returns (Request memory) {
        return _existing(requestId);
    }

    /// @notice The committed output of `requestId`; reverts ClaimNotCommitted before commitment.
    ///         Stays readable whatever happened after (finalized, rejected).
    function getOutput(uint256 requestId) external view returns (uint32[] memory) {
        Request storage request = _existing(requestId);
        if (request.output == address(0)) revert ClaimNotCommitted(requestId);
        return TokenPacking.load(request.output);
    }

    /// @notice Status, provider, commit time, callback outcome and output (empty before
    ///         commitment) of `requestId`. Only a Finalized result is a verified answer.
    function getResult(uint256 requestId) external view returns (Result memory result) {
        Request storage request = _existing(requestId);
        result.status = request.status;
        result.committedAt = request.committedAt;
        result.callbackSucceeded = request.callbackSucceeded;
        if (request.output != address(0)) {
            result.provider = request.provider;
            result.output = TokenPacking.load(request.output);
        }
    }

    /// @notice First timestamp at which the claim on `requestId` can be finalized.
    function challengeDeadline(uint256 requestId) external view returns (uint256) {
        Request storage request = _existing(requestId);
        if (request.committedAt == 0) revert ClaimNotCommitted(requestId);
        return uint256(request.committedAt) + challengeWindow;
    }

    /// @notice The seed of request `requestId`'s draw, posted by `consumer` with `consumerSeed`:
    ///         the top 63 bits of keccak256(abi.encode(chainid, this coordinator, requestId,
    ///         consumer, consumerSeed)) (docs/protocol.md, "Sampling"). Fixed when the request
    ///         is posted, from values the provider has no say in; distinct for every request,
    ///         whatever seeds consumers pick.
    function drawSeed(uint256 requestId, address consumer, uint64 consumerSeed)
        public
        view
        returns (uint64)
    {
        bytes32 mixed =
            keccak256(abi.encode(block.chainid, address(this), requestId, consumer, consumerSeed));
        return uint64(uint256(mixed) >> 193);
    }

    /// @notice `keccak256` of the packed tokens (`TokenPacking`): compare with `promptHash`.
    function hashTokens(uint32[] calldata tokens) external pure returns (bytes32) {
        return TokenPacking.hash(tokens);
    }

    /// @notice Stake of `provider` that no open claim locks.
    function freeStake(address provider) external view returns (uint256) {
        return providers[provider].stake - providers[provider].locked;
    }

    ////////////////////////////////////////////////////////////////
    //                         Helpers                            //
    ////////////////////////////////////////////////////////////////

    /// @dev Greedy decoding stops at the first end-of-sequence token or after maxTokens tokens:
    ///      `output` must look like that, or it is a truncated (or overrun) answer.
    function _requireTerminated(uint32[] memory eos, uint32[] calldata output, uint256 maxTokens)
        internal
        pure
    {
        uint256 length = output.length;
        uint256 firstEos = length; // none
        // One pass over the calldata words, in assembly: the checked Solidity loop cost 400
        // gas a token. Each word is validated as a uint32 when the output is packed.
        assembly ("memory-safe") {
            let n := mload(eos)
            let ids := add(eos, 0x20)
            for { let i := 0 } lt(i, length) { i := add(i, 1) } {
                let token := calldataload(add(output.offset, shl(5, i)))
                for { let j := 0 } lt(j, n) { j := add(j, 1) } {
                    if eq(mload(add(ids, shl(5, j))), token) {
                        firstEos := i
                        break
                    }
                }
                if lt(firstEos, length) { break }
            }
        }
        if (firstEos < length - 1) revert EosBeforeEnd(firstEos);
        if (length < maxTokens && firstEos != length - 1) {
            revert OutputNotTerminated(length, maxTokens);
        }
    }

    /// @notice Reject the committed claim on `requestId`, whose provider lost a game against
    ///         `challenger`: `stakePerClaim` leaves its lock, the consumer's share plus the fee
    ///         are credited to the consumer, the burnt share is counted, and the reserve
    ///         (`challengerReward`) stays locked in the provider's stake until settled.
    function _reject(
        uint256 requestId,
        Request storage request,
        Provider storage provider,
        address providerAddress,
        address challenger
    ) internal {
        uint256 consumerAmount = stakePerClaim * consumerShareBps / BPS;
        uint256 burned = stakePerClaim - challengerReward - consumerAmount;
        uint256 removed = consumerAmount + burned;
        provider.locked -= uint128(removed);
        provider.stake -= uint128(removed);
        request.status = Status.Rejected;
        balanceOf[request.consumer] += request.fee + consumerAmount;
        totalBurned += burned;
        emit Slashed(
            requestId, providerAddress, challenger, challengerReward, consumerAmount, burned
        );
        emit Refunded(requestId, request.consumer, request.fee + consumerAmount);
    }

    /// @dev Refuse `sampling` unless it is greedy (temperature 0), or within the limits on a
    ///      model that samples: only a sampling graph's leaf 0 carries the draw a dispute
    ///      recomputes the answer from.
    function _checkSampling(bytes32 modelId, bool modelSamples, Sampling calldata sampling)
        internal
        pure
    {
        uint256 temperature = sampling.temperature;
        if (temperature == 0) return;
        if (!modelSamples) revert SamplingNotSupported(modelId);
        if (temperature < MIN_TEMPERATURE || temperature > MAX_TEMPERATURE) {
            revert TemperatureOutOfRange(temperature);
        }
        if (sampling.topP == 0 || sampling.topP > TOP_P_UNIT) revert TopPOutOfRange(sampling.topP);
    }

    /// @dev `RequestPosted` for the request just stored, its fields read back from storage (with
    ///      the calldata prompt and the stored draw, in `postRequest`'s frame there are more
    ///      values than the stack can reach).
    function _emitRequestPosted(
        uint256 requestId,
        Request storage request,
        uint32[] calldata prompt,
        Sampling memory draw
    ) internal {
        emit RequestPosted(
            requestId,
            request.consumer,
            request.modelId,
            prompt,
            request.maxTokens,
            request.fee,
            request.callback,
            request.callbackGasLimit,
            request.provider, // the named provider until a commitment
            request.commitDeadline,
            draw
        );
    }

    /// @notice Whether `game` is a contract whose `coordinator()` returns this contract.
    function _namesThisCoordinator(address game) internal view returns (bool) {
        (bool ok, bytes memory returned) =
            game.staticcall(abi.encodeWithSignature("coordinator()"));
        // An address without code "succeeds" with no return data.
        return ok && returned.length == 32
            && abi.decode(returned, (uint256)) == uint256(uint160(address(this)));
    }

    /// @notice The stored request `requestId`; reverts RequestNotFound for an unassigned id.
    function _existing(uint256 requestId) internal view returns (Request storage request) {
        request = _requests[requestId];
        if (request.status == Status.None) revert RequestNotFound(requestId);
    }

    /// @notice Call `callback.onInferenceResult(requestId, requester, output)` with `gasLimit`
    ///         gas; whether it returned without reverting. Never reverts because of the callee.
    /// @param requester Who posted the request: anyone may name any callback, so the callee
    ///                  tells its own requests from others' by it.
    function _deliver(
        address callback,
        uint256 gasLimit,
        uint256 requestId,
        address requester,
        address output
    ) internal returns (bool succeeded) {
        bytes memory data = abi.encodeCall(
            IInferenceConsumer.onInferenceResult,
            (requestId, requester, TokenPacking.load(output))
        );
        // The callee gets min(gasLimit, 63/64 of what is left): demand enough that it is gasLimit.
        uint256 required = gasLimit + gasLimit / 63 + CALLBACK_GAS_OVERHEAD;
        if (gasleft() < required) revert InsufficientGasForCallback(gasleft(), required);
        assembly ("memory-safe") {
            // No return data is copied (out size 0): a return bomb costs the caller nothing.
            succeeded := call(gasLimit, callback, 0, add(data, 32), mload(data), 0, 0)
        }
    }
}
