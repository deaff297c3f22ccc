"""Python binding of ``InferenceCoordinator.sol`` and the example ``QuestionAsker.sol``.

Every write the nodes send has a builder (see ``bindings.py``): ``<write>_tx`` returns the
unsigned transaction for a ``TxSender`` (``contracts/sender.py``). Besides it a write comes as
a pair: ``<write>_call`` dry-runs it with ``eth_call`` as a given sender (no state change;
returns the function's result or raises the decoded ContractRevert) and ``<write>_send``
sends the builder's transaction through a fresh ``TxSender`` and waits for the receipt. Events
are decoded from receipts with :meth:`InferenceCoordinator.events`.

Token lists are plain ``list[int]`` (uint32 ids). A request keeps :func:`token_hash` of its
prompt on chain; a claim keeps its packed output (:func:`pack_tokens`) as the code of a data
contract, read back by ``get_output``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from eth_abi import encode as abi_encode
from eth_account.signers.local import LocalAccount
from eth_typing import ChecksumAddress
from eth_utils import keccak
from web3 import Web3
from web3.contract.contract import ContractFunction
from web3.types import TxParams, TxReceipt

from optinfer.contracts.bindings import BoundContract, reverts_decoded
from optinfer.contracts.sender import TxSender
from optinfer.models.sampling import Sampling

CONTRACT_NAME = "InferenceCoordinator"
CONSUMER_CONTRACT_NAME = "QuestionAsker"
ZERO_ADDRESS = "0x0000000000000000000000000000000000000000"

TX_GAS_CAP = 2**24
"""EIP-7825's cap on one transaction's gas (``InferenceCoordinator.TX_GAS_CAP``)."""

MAX_CALLBACK_GAS_LIMIT = (TX_GAS_CAP - 2_000_000 - 30_000) * 63 // 64
"""Largest ``maxCallbackGasLimit`` the coordinator accepts (``MAX_CALLBACK_GAS_LIMIT``): with it
and the longest output, ``finalize`` fits `TX_GAS_CAP`."""


def pack_tokens(tokens: list[int]) -> bytes:
    """The packed encoding of a token list: each id as 4 big-endian bytes (``TokenPacking``)."""
    return b"".join(int(token).to_bytes(4, "big") for token in tokens)


def token_hash(tokens: list[int]) -> bytes:
    """``keccak256(pack_tokens(tokens))``: what a request's ``promptHash`` holds."""
    return keccak(pack_tokens(tokens))


def draw_seed(chain_id: int, coordinator: str, request_id: int, consumer: str,
              consumer_seed: int) -> int:
    """The seed of a sampled request's draw (``InferenceCoordinator.drawSeed``): the top 63
    bits of ``keccak256(abi.encode(chainid, coordinator, requestId, consumer,
    consumerSeed))``, fixed at posting (docs/protocol.md, "Sampling")."""
    mixed = keccak(abi_encode(["uint256", "address", "uint256", "address", "uint64"],
                              [chain_id, coordinator, request_id, consumer, consumer_seed]))
    return int.from_bytes(mixed, "big") >> 193


class Status(IntEnum):
    """``InferenceCoordinator.Status``."""

    NONE = 0
    OPEN = 1
    COMMITTED = 2
    FINALIZED = 3
    REFUNDED = 4
    REJECTED = 5


@dataclass(frozen=True)
class CoordinatorParams:
    """The coordinator's constructor parameters (wei, seconds, basis points, gas). Each game's
    reward, and a rejected claim's reserve, is ``challenger_reward``."""

    minimum_stake: int
    stake_per_claim: int
    challenge_window: int
    challenger_share_bps: int
    consumer_share_bps: int
    max_callback_gas_limit: int

    @property
    def challenger_reward(self) -> int:
        """``challengerReward``: what each winning challenger is paid (locked from the
        provider's free stake when its game opens, the rest from the claim's reserve)."""
        return self.stake_per_claim * self.challenger_share_bps // 10_000

    def as_args(self, registry_address: str) -> tuple:
        """The constructor's arguments in order."""
        return (
            Web3.to_checksum_address(registry_address),
            self.minimum_stake,
            self.stake_per_claim,
            self.challenge_window,
            self.challenger_share_bps,
            self.consumer_share_bps,
            self.max_callback_gas_limit,
        )


@dataclass(frozen=True)
class RequestSpec:
    """What ``postRequest`` takes besides the fee. Zero addresses mean "none" / "anyone"."""

    model_id: bytes
    prompt: list[int]
    max_tokens: int
    commit_deadline: int  # unix seconds, after the posting block's timestamp
    callback: str = ZERO_ADDRESS
    callback_gas_limit: int = 0
    named_provider: str = ZERO_ADDRESS
    #: How to decode; greedy by default. Its seed is the consumer's: the draw's seed is
    #: derived from it at posting (`draw_seed`).
    sampling: Sampling = Sampling()

    def as_args(self) -> tuple:
        """The arguments of ``postRequest`` in order."""
        return (
            self.model_id,
            list(self.prompt),
            self.max_tokens,
            Web3.to_checksum_address(self.callback),
            self.callback_gas_limit,
            Web3.to_checksum_address(self.named_provider),
            self.commit_deadline,
            self.sampling.as_chain(),
        )


@dataclass(frozen=True)
class Request:
    """A stored request (``InferenceCoordinator.Request``). `provider` is the named provider
    (or zero) before commitment and the committing provider after; `output` the address of the
    data contract holding the packed output (zero before commitment)."""

    consumer: ChecksumAddress
    commit_deadline: int
    status: Status
    callback_succeeded: bool
    model_id: bytes
    prompt_hash: bytes
    callback: ChecksumAddress
    callback_gas_limit: int
    max_tokens: int
    prompt_length: int
    provider: ChecksumAddress
    committed_at: int
    output: ChecksumAddress
    fee: int
    open_disputes: int
    temperature: int  # thousandths; 0 greedy, with top_p and seed zero
    top_p: int
    seed: int  # the draw's seed, derived at posting

    @property
    def draw(self) -> Sampling:
        """How the answer is decoded (greedy is ``Sampling()``)."""
        return Sampling.from_chain(self.temperature, self.top_p, self.seed)


@dataclass(frozen=True)
class Reserve:
    """A rejected claim's reward reserve (``InferenceCoordinator.Reserve``): `shortfall` is
    the unbacked reward its winners are still owed a share for, `owed` (once `settled`) what
    is left of the reserve for them."""

    shortfall: int
    owed: int
    settled: bool


# Solidity field name -> (Request field, converter), in the ABI's order.
_REQUEST_FIELDS = {
    "consumer": ("consumer", Web3.to_checksum_address),
    "commitDeadline": ("commit_deadline", int),
    "status": ("status", Status),
    "callbackSucceeded": ("callback_succeeded", bool),
    "modelId": ("model_id", bytes),
    "promptHash": ("prompt_hash", bytes),
    "callback": ("callback", Web3.to_checksum_address),
    "callbackGasLimit": ("callback_gas_limit", int),
    "maxTokens": ("max_tokens", int),
    "promptLength": ("prompt_length", int),
    "provider": ("provider", Web3.to_checksum_address),
    "committedAt": ("committed_at", int),
    "output": ("output", Web3.to_checksum_address),
    "fee": ("fee", int),
    "openDisputes": ("open_disputes", int),
    "temperature": ("temperature", int),
    "topP": ("top_p", int),
    "seed": ("seed", int),
}


@dataclass(frozen=True)
class Result:
    """``getResult``: only a FINALIZED result is a verified answer."""

    status: Status
    provider: ChecksumAddress
    committed_at: int
    callback_succeeded: bool
    output: list[int]


class InferenceCoordinator(BoundContract):
    """A deployed InferenceCoordinator at `address`."""

    NAME = CONTRACT_NAME

    @classmethod
    def deploy(
        cls, w3: Web3, signer: LocalAccount, registry_address: str, params: CoordinatorParams
    ) -> InferenceCoordinator:
        """Deploy a coordinator on the registry at `registry_address` from `signer`."""
        return cls(w3, TxSender(w3, signer).deploy(CONTRACT_NAME,
                                                   *params.as_args(registry_address)))

    # -- generic call --------------------------------------------------------------------

    def _call(self, function: ContractFunction, sender: str, value: int = 0) -> Any:
        tx = {"from": Web3.to_checksum_address(sender), "value": value}
        return reverts_decoded(self.artifact, lambda: function.call(tx))

    # -- set-up --------------------------------------------------------------------------

    def set_dispute_game_tx(self, game: str) -> TxParams:
        """The transaction setting the dispute game to `game`."""
        return self.tx("setDisputeGame", Web3.to_checksum_address(game))

    def set_dispute_game_send(self, game: str, signer: LocalAccount) -> TxReceipt:
        """Set the dispute game (deployer only, once; a contract whose ``coordinator()`` is
        this one). Outputs can be committed only once it is set."""
        return self._send(self.set_dispute_game_tx(game), signer)

    # -- providers -----------------------------------------------------------------------

    def register_provider_tx(self, stake: int) -> TxParams:
        """The transaction registering its sender as a provider staking `stake` wei."""
        return self.tx("registerProvider", value=stake)

    def register_provider_send(self, stake: int, signer: LocalAccount) -> TxReceipt:
        """Register `signer` as a provider staking `stake` wei (>= minimum stake)."""
        return self._send(self.register_provider_tx(stake), signer)

    def add_stake_send(self, amount: int, signer: LocalAccount) -> TxReceipt:
        """Add `amount` wei to registered provider `signer`'s stake."""
        return self._send(self.tx("addStake", value=amount), signer)

    def remove_stake_send(self, amount: int, signer: LocalAccount) -> TxReceipt:
        """Move `amount` wei of `signer`'s free stake to its withdrawable balance."""
        return self._send(self.tx("removeStake", amount), signer)

    # -- requests ------------------------------------------------------------------------

    def post_request_call(self, spec: RequestSpec, fee: int, sender: str) -> int:
        """Dry-run ``postRequest`` as `sender` paying `fee`: the id it would get."""
        return self._call(self.contract.functions.postRequest(*spec.as_args()), sender, fee)

    def post_request_tx(self, spec: RequestSpec, fee: int) -> TxParams:
        """The transaction posting `spec` and paying `fee` wei."""
        return self.tx("postRequest", *spec.as_args(), value=fee)

    def post_request_send(self, spec: RequestSpec, fee: int, signer: LocalAccount) -> TxReceipt:
        """Post `spec` paying `fee` wei; the new id is in ``events(receipt, "RequestPosted")``."""
        return self._send(self.post_request_tx(spec, fee), signer)

    def commit_output_tx(self, request_id: int, output: list[int]) -> TxParams:
        """The transaction committing `output` for `request_id`."""
        return self.tx("commitOutput", request_id, list(output))

    def commit_output_send(
        self, request_id: int, output: list[int], signer: LocalAccount
    ) -> TxReceipt:
        """Commit `output` for `request_id` as provider `signer` (locks stake per claim)."""
        return self._send(self.commit_output_tx(request_id, output), signer)

    def finalize_tx(self, request_id: int) -> TxParams:
        """The transaction finalizing the claim on `request_id`."""
        return self.tx("finalize", request_id)

    def finalize_send(self, request_id: int, signer: LocalAccount) -> TxReceipt:
        """Finalize the claim on `request_id` (anyone, after the challenge window).

        The gas estimate covers the callback: ``eth_estimateGas`` finds the least gas for which
        the transaction succeeds, and finalize reverts unless the callback gets its full limit.
        """
        return self._send(self.finalize_tx(request_id), signer)

    def refund_send(self, request_id: int, signer: LocalAccount) -> TxReceipt:
        """Credit the fee of unanswered `request_id` back to its consumer (after the deadline)."""
        return self._send(self.tx("refund", request_id), signer)

    def settle_reserve_call(self, request_id: int, sender: str) -> None:
        """Dry-run ``settleReserve(request_id)`` as `sender`."""
        self._call(self.contract.functions.settleReserve(request_id), sender)

    def settle_reserve_tx(self, request_id: int) -> TxParams:
        """The transaction settling rejected `request_id`'s reserve."""
        return self.tx("settleReserve", request_id)

    def settle_reserve_send(self, request_id: int, signer: LocalAccount) -> TxReceipt:
        """Settle rejected `request_id`'s reserve (anyone, once its window has closed and no game
        on it is open): what no winner is owed goes back to the provider's free stake."""
        return self._send(self.settle_reserve_tx(request_id), signer)

    def claim_reserve_share_call(self, request_id: int, challenger: str, sender: str) -> int:
        """Dry-run ``claimReserveShare(request_id, challenger)`` as `sender`: the wei it would
        credit."""
        return self._call(self.contract.functions.claimReserveShare(
            request_id, Web3.to_checksum_address(challenger)), sender)

    def claim_reserve_share_tx(self, request_id: int, challenger: str) -> TxParams:
        """The transaction crediting `challenger` its share of `request_id`'s reserve."""
        return self.tx("claimReserveShare", request_id, Web3.to_checksum_address(challenger))

    def claim_reserve_share_send(self, request_id: int, challenger: str,
                                 signer: LocalAccount) -> TxReceipt:
        """Credit `challenger` its share of rejected `request_id`'s reserve (anyone may send it;
        settles the reserve first if needed)."""
        return self._send(self.claim_reserve_share_tx(request_id, challenger), signer)

    def withdraw_tx(self) -> TxParams:
        """The transaction sending its sender its whole credited balance."""
        return self.tx("withdraw")

    def withdraw_send(self, signer: LocalAccount) -> TxReceipt:
        """Send `signer` its whole credited balance."""
        return self._send(self.withdraw_tx(), signer)

    # -- views ---------------------------------------------------------------------------

    def get_request(self, request_id: int) -> Request:
        """The stored request; ContractRevert RequestNotFound for an unknown id."""
        fields = reverts_decoded(
            self.artifact, self.contract.functions.getRequest(request_id).call
        )
        names = [c["name"] for c in self._outputs("getRequest")[0]["components"]]
        values = {}
        for name, value in zip(names, fields, strict=True):
            field_name, convert = _REQUEST_FIELDS[name]
            values[field_name] = convert(value)
        return Request(**values)

    def _outputs(self, function: str) -> list[dict]:
        (entry,) = [e for e in self.artifact.abi
                    if e["type"] == "function" and e["name"] == function]
        return entry["outputs"]

    def reserve(self, request_id: int) -> Reserve:
        """The reward reserve of `request_id` (all zero unless the claim was rejected)."""
        shortfall, owed, settled = self.contract.functions.reserves(request_id).call()
        return Reserve(shortfall, owed, settled)

    def shortfall_of(self, request_id: int, challenger: str) -> int:
        """Unbacked reward `challenger` won on `request_id`, owed a share of its reserve."""
        return self.contract.functions.shortfallOf(
            request_id, Web3.to_checksum_address(challenger)).call()

    def get_result(self, request_id: int) -> Result:
        """Status, provider, commit time, callback outcome and output of `request_id`."""
        status, provider, committed_at, succeeded, output = reverts_decoded(
            self.artifact, self.contract.functions.getResult(request_id).call
        )
        return Result(
            Status(status), Web3.to_checksum_address(provider), committed_at, succeeded,
            list(output),
        )

    def get_output(self, request_id: int) -> list[int]:
        """The committed output tokens; ContractRevert ClaimNotCommitted before commitment."""
        return list(
            reverts_decoded(self.artifact, self.contract.functions.getOutput(request_id).call)
        )

    def challenge_deadline(self, request_id: int) -> int:
        """First timestamp at which the claim on `request_id` can be finalized."""
        return reverts_decoded(
            self.artifact, self.contract.functions.challengeDeadline(request_id).call
        )

    def balance_of(self, account: str) -> int:
        """Wei credited to `account`, withdrawable with ``withdraw``."""
        return self.contract.functions.balanceOf(Web3.to_checksum_address(account)).call()

    def provider_stake(self, provider: str) -> tuple[int, int]:
        """``(stake, locked)`` of `provider` in wei."""
        stake, locked = self.contract.functions.providers(
            Web3.to_checksum_address(provider)
        ).call()
        return stake, locked

    def free_stake(self, provider: str) -> int:
        """Wei of `provider`'s stake that no claim, game reward or reserve locks."""
        return self.contract.functions.freeStake(Web3.to_checksum_address(provider)).call()

    def parameter(self, name: str) -> Any:
        """A public parameter or counter by its Solidity name (``"stakePerClaim"``, ...)."""
        return getattr(self.contract.functions, name)().call()


class QuestionAsker(BoundContract):
    """A deployed example consumer ``QuestionAsker`` at `address`."""

    NAME = CONSUMER_CONTRACT_NAME

    @classmethod
    def deploy(cls, w3: Web3, signer: LocalAccount, coordinator_address: str) -> QuestionAsker:
        """Deploy an asker owned by `signer` that uses the coordinator at `coordinator_address`."""
        return cls(w3, TxSender(w3, signer).deploy(CONSUMER_CONTRACT_NAME,
                                                   coordinator_address))

    def ask_tx(self, spec: RequestSpec, fee: int) -> TxParams:
        """The transaction asking `spec.prompt` and paying `fee` wei."""
        return self.tx("ask", spec.model_id, list(spec.prompt), spec.max_tokens,
                       spec.callback_gas_limit, Web3.to_checksum_address(spec.named_provider),
                       spec.commit_deadline, spec.sampling.as_chain(), value=fee)

    def ask_send(self, spec: RequestSpec, fee: int, signer: LocalAccount) -> TxReceipt:
        """Ask `spec.prompt` (owner only) paying `fee`; the callback is this contract."""
        return self._send(self.ask_tx(spec, fee), signer)

    def collect_refunds_send(self, signer: LocalAccount) -> TxReceipt:
        """Withdraw the asker's refunds from the coordinator to its owner (owner only)."""
        return self._send(self.tx("collectRefunds"), signer)

    def answer(self, request_id: int) -> list[int]:
        """The stored answer tokens of `request_id` (empty until delivered)."""
        return list(self.contract.functions.answer(request_id).call())

    def answered(self, request_id: int) -> bool:
        """Whether the answer of `request_id` has been delivered."""
        return bool(self.contract.functions.answered(request_id).call())

