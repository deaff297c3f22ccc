// SPDX-License-Identifier: MIT
pragma solidity 0.8.37;

// Every custom error of the optinfer contracts, one place, each named after the rule that was
// broken. Guards read `if (<rule broken>) revert <Rule>();` and revert with no state change.

////////////////////////////////////////////////////////////////
//                      ModelRegistry                         //
////////////////////////////////////////////////////////////////

/// @notice Thrown when a model id is registered a second time: registrations are immutable.
/// @param modelId The id that is already registered.
error ModelAlreadyRegistered(bytes32 modelId);

/// @notice Thrown when a model is looked up by an id that was never registered.
/// @param modelId The unknown id.
error ModelNotRegistered(bytes32 modelId);

/// @notice Thrown when a model is registered with a node count of zero (nothing to dispute).
error ZeroNodeCount();

/// @notice Thrown when a model is registered with more nodes than the state tree can address.
/// @param nodeCount The node count given.
/// @param maximum   The registry's maximum, 2**STATE_DEPTH - 1.
error NodeCountBeyondStateTree(uint256 nodeCount, uint256 maximum);

/// @notice Thrown when a model is registered with a maximum context of zero tokens.
error ZeroMaxContext();

/// @notice Thrown when a model's max context is longer than a dispute can take under the gas cap.
/// @param maxContext The maximum context given.
/// @param maximum    The registry's maximum, MAX_CONTEXT_TOKENS.
error MaxContextBeyondDisputeBound(uint256 maxContext, uint256 maximum);

/// @notice Thrown when a model is registered in an op-set version other than the one the
///         one-step verifier recomputes: its disputes would be decided by other semantics.
/// @param opsetVersion The version given.
/// @param supported    The only version this deployment accepts.
error UnsupportedOpsetVersion(uint32 opsetVersion, uint32 supported);

////////////////////////////////////////////////////////////////
//                    InferenceCoordinator                    //
////////////////////////////////////////////////////////////////

/// @notice Thrown when the coordinator is deployed with a challenge window of zero seconds.
error ZeroChallengeWindow();

/// @notice Thrown when the coordinator is deployed with a zero stake per claim (nothing to slash).
error ZeroStakePerClaim();

/// @notice Thrown when the challenger and consumer shares of a slash add up to more than 100%.
/// @param totalBps The sum of the two shares, in basis points.
error SlashSharesExceedWhole(uint256 totalBps);

/// @notice Thrown when a deployer-only function is called by anyone else.
/// @param caller Who called.
error NotDeployer(address caller);

/// @notice Thrown when the dispute game is set to the zero address.
error ZeroDisputeGame();

/// @notice Thrown when the dispute game is set a second time: it is set once, for good.
/// @param disputeGame The game already set.
error DisputeGameAlreadySet(address disputeGame);

/// @notice Thrown when the dispute game set is not a contract whose `coordinator()` is this
///         coordinator: it could never open a dispute here, and every claim would go unchallenged.
/// @param game The address given.
error DisputeGameNotForThisCoordinator(address game);

/// @notice Thrown when an output is committed before the dispute game is set: nobody could
///         dispute the claim.
error DisputeGameNotSet();

/// @notice Thrown when the coordinator is deployed with a maximum callback gas limit under
///         which `finalize` with the longest output would not fit the 2**24 per-transaction gas
///         cap (EIP-7825).
/// @param maxCallbackGasLimit The maximum given.
/// @param cap                 The largest that fits, `MAX_CALLBACK_GAS_LIMIT`.
error MaxCallbackGasLimitAboveCap(uint256 maxCallbackGasLimit, uint256 cap);

/// @notice Thrown when a dispute hook is called by anyone but the dispute game.
/// @param caller Who called.
error NotDisputeGame(address caller);

/// @notice Thrown when an address registers as a provider a second time.
/// @param provider The registered provider.
error ProviderAlreadyRegistered(address provider);

/// @notice Thrown when an address that never registered adds stake or commits an output.
/// @param provider The unregistered address.
error ProviderNotRegistered(address provider);

/// @notice Thrown when a provider registers, or commits, with less stake than the minimum.
/// @param stake   The provider's stake.
/// @param minimum The minimum stake.
error StakeBelowMinimum(uint256 stake, uint256 minimum);

/// @notice Thrown when stake is added with no ETH attached.
error ZeroStakeAmount();

/// @notice Thrown when a provider commits or unstakes more than its stake not locked by claims.
/// @param free      Stake not locked by an open claim.
/// @param requested Stake the action needs.
error InsufficientFreeStake(uint256 free, uint256 requested);

/// @notice Thrown when a request is posted with no prompt tokens.
error EmptyPrompt();

/// @notice Thrown when a request is posted with a maximum of zero output tokens.
error ZeroMaxTokens();

/// @notice Thrown when prompt plus output could exceed the model's context.
/// @param sequenceLength len(prompt) + maxTokens - 1, the longest verify sequence.
/// @param maxContext     The model's maximum context.
error ContextExceeded(uint256 sequenceLength, uint256 maxContext);

/// @notice Thrown when a request asks a model that decodes greedily only to sample.
/// @param modelId The model, registered with `sampling` false.
error SamplingNotSupported(bytes32 modelId);

/// @notice Thrown when a sampled request's temperature is outside 50-2000 thousandths (0.05-2).
/// @param temperature The temperature asked for, in thousandths.
error TemperatureOutOfRange(uint256 temperature);

/// @notice Thrown when a sampled request's top-p is outside 1-1000 thousandths.
/// @param topP The top-p asked for, in thousandths.
error TopPOutOfRange(uint256 topP);

/// @notice Thrown when a request's max tokens exceed what one claim can store (24 KiB of code).
/// @param maxTokens The requested maximum.
/// @param maximum   The largest output a claim can hold.
error MaxTokensTooLarge(uint256 maxTokens, uint256 maximum);

/// @notice Thrown when a request's commit deadline is not after the current block's timestamp.
/// @param commitDeadline The deadline given.
error CommitDeadlineNotInFuture(uint256 commitDeadline);

/// @notice Thrown when a request asks for more callback gas than the coordinator allows.
/// @param gasLimit The requested callback gas limit.
/// @param maximum  The coordinator's maximum.
error CallbackGasLimitTooHigh(uint256 gasLimit, uint256 maximum);

/// @notice Thrown when a request id was never assigned.
/// @param requestId The unknown id.
error RequestNotFound(uint256 requestId);

/// @notice Thrown when a commit or refund targets a request that is no longer open.
/// @param requestId The request.
error RequestNotOpen(uint256 requestId);

/// @notice Thrown when an output is committed after the request's commit deadline.
/// @param commitDeadline The request's deadline.
error CommitDeadlinePassed(uint256 commitDeadline);

/// @notice Thrown when an unanswered request is refunded before its commit deadline has passed.
/// @param commitDeadline The request's deadline.
error CommitDeadlineNotPassed(uint256 commitDeadline);

/// @notice Thrown when someone other than a request's named provider commits its output.
/// @param namedProvider The provider the consumer named.
error NotNamedProvider(address namedProvider);

/// @notice Thrown when an output of zero tokens is committed.
error EmptyOutput();

/// @notice Thrown when an output longer than the request's max tokens is committed.
/// @param length    The output's length.
/// @param maxTokens The request's maximum.
error OutputTooLong(uint256 length, uint256 maxTokens);

/// @notice Thrown when a committed output holds an end-of-sequence token before its last
///         position: greedy decoding stops at the first EOS, so nothing can follow it.
/// @param position The position of that EOS token.
error EosBeforeEnd(uint256 position);

/// @notice Thrown when a committed output shorter than the request's max tokens does not end
///         with an end-of-sequence token: greedy decoding stops only at EOS or at max tokens,
///         so such an output is a truncated answer.
/// @param length    The output's length.
/// @param maxTokens The request's maximum.
error OutputNotTerminated(uint256 length, uint256 maxTokens);

/// @notice Thrown when a model is registered with more end-of-sequence token ids than allowed.
/// @param count   The ids given.
/// @param maximum The registry's maximum.
error TooManyEosTokenIds(uint256 count, uint256 maximum);

/// @notice Thrown when the coordinator cannot store a committed output (contract creation failed).
error OutputStoreFailed();

/// @notice Thrown when a claim is finalized but is not in the committed state, or disputed while
///         neither committed nor rejected (a rejected claim stays disputable in its window).
/// @param requestId The request.
error ClaimNotCommitted(uint256 requestId);

/// @notice Thrown when a claim is finalized before its challenge window has closed.
/// @param challengeDeadline The first timestamp at which it can be finalized.
error ChallengeWindowOpen(uint256 challengeDeadline);

/// @notice Thrown when a dispute is opened after the claim's challenge window has closed.
/// @param challengeDeadline When the window closed.
error ChallengeWindowClosed(uint256 challengeDeadline);

/// @notice Thrown when a claim with unresolved disputes is finalized.
/// @param openDisputes How many disputes are still open.
error DisputesOpen(uint256 openDisputes);

/// @notice Thrown when a dispute is resolved on a claim that has no open dispute.
/// @param requestId The request.
error NoOpenDispute(uint256 requestId);

/// @notice Thrown when a claim's reward reserve is settled or claimed from while the claim is not
///         rejected (only a lost game creates a reserve).
/// @param requestId The request.
error ClaimNotRejected(uint256 requestId);

/// @notice Thrown when a rejected claim's reward reserve is settled a second time.
/// @param requestId The request.
error ReserveAlreadySettled(uint256 requestId);

/// @notice Thrown when a share of a claim's reward reserve is claimed for a challenger that is
///         owed none (it won no game whose reward the provider's free stake left short).
/// @param requestId  The request.
/// @param challenger The challenger named.
error NoReserveShare(uint256 requestId, address challenger);

/// @notice Thrown when finalize is sent with too little gas to give the callback its full limit.
/// @param available Gas left before the callback.
/// @param required  Gas needed so that the callback receives its whole limit.
error InsufficientGasForCallback(uint256 available, uint256 required);

/// @notice Thrown when withdraw is called by an account with no credited balance.
error NothingToWithdraw();

/// @notice Thrown when sending a withdrawal's ETH fails (the recipient reverted).
error WithdrawFailed();

/// @notice Thrown when a value-moving function is re-entered while it is running.
error Reentrancy();

////////////////////////////////////////////////////////////////
//                QuestionAsker (example consumer)            //
////////////////////////////////////////////////////////////////

/// @notice Thrown when anyone but the asker's owner asks a question or collects refunds.
/// @param caller Who called.
error NotOwner(address caller);

/// @notice Thrown when anyone but the coordinator delivers an answer to a consumer.
/// @param caller Who called.
error NotCoordinator(address caller);

/// @notice Thrown when sending collected refunds on to the asker's owner fails.
error RefundTransferFailed();

/// @notice Thrown when the coordinator delivers to the asker the answer to a request that someone
///         else posted (anyone may name any contract as a request's callback).
/// @param requestId The request.
/// @param requester Who posted it.
error NotOwnRequest(uint256 requestId, address requester);

////////////////////////////////////////////////////////////////
//          Commitments (lib/Commitments.sol, Sha256Merkle)   //
////////////////////////////////////////////////////////////////

/// @notice Thrown when a tensor's dtype code is not one of uint8 (2), int8 (3), int32 (6),
///         int64 (7), bool (9).
/// @param dtype The rejected ONNX TensorProto code.
error UnsupportedDtype(uint8 dtype);

/// @notice Thrown when a tensor's rank does not fit the header's uint8 rank field.
/// @param rank The rejected rank.
error TensorRankTooLarge(uint256 rank);

/// @notice Thrown when a tensor's data would reach 2**64 bytes (the contracts' size bound).
error TensorTooLarge();

/// @notice Thrown when a tensor's data bytes do not have the length its dtype and shape fix.
/// @param length   Bytes given.
/// @param expected Bytes the dtype and shape require.
error TensorDataLengthMismatch(uint256 length, uint256 expected);

/// @notice Thrown when a Merkle path is opened at an index outside a tree of its depth.
/// @param index The leaf index.
/// @param depth The path's length.
error LeafIndexOutsideTree(uint256 index, uint256 depth);

/// @notice Thrown when a state-tree path does not have STATE_DEPTH siblings.
/// @param length The path's length.
error StatePathLengthMismatch(uint256 length);

/// @notice Thrown when a state leaf is set to ZERO: a tensor root is never ZERO.
error ZeroTensorRoot();

/// @notice Thrown when leaf `index` is not an empty (ZERO) slot of the previous state under
///         the given path.
error StateSlotNotEmpty(uint256 index);

/// @notice Thrown when the next state is not the previous one with leaf `index` set.
error StateUpdateMismatch(uint256 index);

/// @notice Thrown when a range proof opens an empty range or one past the tensor's data.
/// @param start      First byte of the range.
/// @param end        One past its last byte.
/// @param byteLength The tensor's data length.
error InvalidByteRange(uint256 start, uint256 end, uint256 byteLength);

/// @notice Thrown when a range proof's chunks are not exactly the covering leaf chunks.
/// @param length   Chunk bytes given.
/// @param expected 1024 times the number of covering leaves.
error RangeChunksLengthMismatch(uint256 length, uint256 expected);

/// @notice Thrown when a range proof does not carry exactly the boundary siblings it needs.
/// @param count    Siblings given.
/// @param expected Siblings the range and the tree depth require.
error RangeSiblingCountMismatch(uint256 count, uint256 expected);

/// @notice Thrown when a range proof does not rebuild the tensor root it is checked against.
error RangeProofRootMismatch();

/// @notice Thrown when a descent step starts from a node that is not above the leaves of the
///         tensor's data tree.
error DescentNodeOutsideTree(uint256 height, uint256 index, uint256 depth);

/// @notice Thrown when a descent step reveals a number of children that is not 2**m with
///         1 <= m <= the node's height.
error DescentFanOutInvalid(uint256 count, uint256 height);

/// @notice Thrown when a descent step's children do not rehash to the agreed node.
error DescentChildrenMismatch();

/// @notice Thrown when a child lying wholly in the data tree's padding is not Z_h.
/// @param position The child's position in the step (0 = leftmost).
error DescentPaddingNotZero(uint256 position);

/// @notice Thrown when a leaf chunk is revealed at a leaf index past the tensor's last chunk.
error LeafChunkOutsideTensor(uint256 leafIndex, uint256 leafCount);

/// @notice Thrown when a revealed leaf chunk is not exactly 1024 bytes.
error LeafChunkLengthMismatch(uint256 length);

/// @notice Thrown when a revealed leaf chunk does not hash to the disputed leaf.
error LeafChunkHashMismatch();

/// @notice Thrown when a revealed leaf chunk has a nonzero byte past the tensor's end.
error LeafChunkPaddingNotZero();

/// @notice Thrown when an element is read past the end of the bytes that hold it.
error ElementOutsideData(uint256 index, uint256 dataLength);

/// @notice Thrown when an element index is not below the tensor's element count.
error ElementIndexOutsideTensor(uint256 index, uint256 elementCount);

/// @notice Thrown when a bool element's byte is neither 0x00 nor 0x01.
error InvalidBoolElement(uint8 value);

////////////////////////////////////////////////////////////////
//                        DisputeGame                         //
////////////////////////////////////////////////////////////////

/// @notice Thrown when the game is deployed with a fan-out outside 2..256 children per step.
/// @param fanOutBits The rejected log2 of the fan-out.
error FanOutBitsOutOfRange(uint256 fanOutBits);

/// @notice Thrown when the game is deployed with a zero clock budget (nobody could move).
error ZeroClock();

/// @notice Thrown when the game is deployed with a zero challenger bond: a challenge would cost
///         nothing, and losing one would pay the provider nothing.
error ZeroChallengerBond();

/// @notice Thrown when a challenge does not carry exactly the challenger bond.
/// @param sent     Wei sent with the challenge.
/// @param required The bond.
error WrongBond(uint256 sent, uint256 required);

/// @notice Thrown when the prompt given with a challenge is not the request's.
error PromptMismatch();

/// @notice Thrown when a move names a game that was never opened.
/// @param gameId The unknown id.
error GameNotFound(uint256 gameId);

/// @notice Thrown when a move is made in a game that is already resolved.
/// @param gameId The game.
error GameResolved(uint256 gameId);

/// @notice Thrown when someone other than the party to move makes a move.
/// @param caller Who called.
/// @param mover  The party whose move it is.
error NotYourMove(address caller, address mover);

/// @notice Thrown when the party to move moves after its clock ran out: only Timeout remains.
error ClockExpired();

/// @notice Thrown when Timeout is claimed while the party to move still has time.
/// @param remaining Seconds the party to move has left.
error ClockNotExpired(uint256 remaining);

/// @notice Thrown when a move is not one the game's phase expects now.
/// @param phase The phase the game is in.
error WrongPhase(uint8 phase);

/// @notice Thrown when S_N's path does not put the claimed output's root at leaf N.
error FinalLeafMismatch();

/// @notice Thrown when a move names another midpoint than the bisection rule's.
/// @param given    The midpoint named.
/// @param expected (lo + hi) / 2.
error WrongMidpoint(uint256 given, uint256 expected);

/// @notice Thrown when the leaf reveal names another node than the disputed one.
/// @param given    The node named.
/// @param expected The disputed node k.
error WrongNode(uint256 given, uint256 expected);

/// @notice Thrown when T_k's header and data root do not hash to the revealed T_k.
error TensorHeaderMismatch();

/// @notice Thrown when a descent step reveals another number of children than the rule's.
/// @param count    Children revealed.
/// @param expected 2 ** min(fanOutBits, height).
error WrongChildCount(uint256 count, uint256 expected);

/// @notice Thrown when the children sent with a pick are not the ones the provider revealed.
error ChildrenMismatch();

/// @notice Thrown when the picked child is out of range or lies entirely in the padding.
/// @param position The child's position in the revealed list.
error ChildNotDisputable(uint256 position);

/// @notice Thrown when the named element does not lie in the revealed chunk.
/// @param index The element named.
/// @param first The chunk's first element.
/// @param end   One past its last element.
error ElementNotInChunk(uint256 index, uint256 first, uint256 end);
