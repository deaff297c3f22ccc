"""The one way the project sends a transaction: :class:`TxSender`.

Bindings only *build* transactions (``BoundContract.tx`` and the named ``<write>_tx``
builders: to, data, value); a TxSender signs one with a local key, sends it and waits for it.
It numbers its transactions itself (so several can be sent without waiting), resynchronises
from the chain on "nonce too low", pads the gas estimate by the one gas rule
(:data:`GAS_MARGIN`, capped by ``padded_gas``), and recognises its own transaction when a
retried send reaches a node that already has it, so a dropped connection never sends a
transaction twice. A gas estimate that reverts raises the decoded ``ContractRevert`` before
anything is signed; a transaction mined but failed raises :class:`TxFailed`.

The nodes keep one sender per key; the bindings' ``<write>_send(..., signer)`` conveniences
take a fresh one per call, which reads the pending nonce from the chain (tests revert the
chain to snapshots, under which a kept local count would go stale).
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import rlp
from eth_account.signers.local import LocalAccount
from eth_keys.datatypes import PrivateKey
from eth_typing import ChecksumAddress
from eth_utils import keccak
from hexbytes import HexBytes
from web3 import Web3
from web3._utils.method_formatters import receipt_formatter  # web3 is pinned to 7.x
from web3.datastructures import AttributeDict
from web3.exceptions import TimeExhausted, TransactionNotFound, Web3RPCError
from web3.types import RPCEndpoint, TxParams, TxReceipt

from optinfer.contracts.artifacts import Artifact, load_artifact
from optinfer.contracts.bindings import ContractRevert, decode_revert, padded_gas
from optinfer.errors import UserError

log = logging.getLogger(__name__)

# The one gas rule. An estimate is the least gas with which the transaction succeeds on the
# state it was estimated on; the block it lands in may differ (another transaction moved a
# storage slot first, or one of ours sent without waiting did), so the limit is padded. 20%
# was the nodes' rule; the bindings' sends used 25% + 20,000, headroom no test needs: every
# contract, services, provider and challenger test passes on 20% alone (a finalize's callback
# needs none either: finalize reverts unless the callback gets its whole limit, so the
# estimate already includes it). Unused gas is not charged, but the sender must hold
# limit x fee, and a block is packed by limits: no wider than needed.
GAS_MARGIN = 1.2
"""Every transaction asks for the node's estimate times this, capped at ``TX_GAS_LIMIT_CAP``
by ``padded_gas`` (a chain enforcing EIP-7825 refuses a larger limit)."""


class TxFailed(Exception):
    """A transaction was mined but failed (status 0)."""


class InsufficientFunds(UserError):
    """The signing account cannot pay a transaction's value and gas: the operator funds it."""


class KeyInUse(UserError):
    """Another process sends transactions from this sender's key: a nonce this sender had not
    used was taken by a transaction it did not sign. A node that owns its key (the provider)
    stops on it rather than race the other process for every nonce."""


class TxDropped(TxFailed):
    """A transaction that was sent is neither mined nor known to the node any more (its pool
    was cleared, or it restarted): nothing of it is on chain, as with a failed one."""


DYNAMIC_FEE_TYPE = b"\x02"  # EIP-2718's type byte of an EIP-1559 transaction


def sign_dynamic_fee(key: PrivateKey, tx: dict) -> tuple[bytes, bytes]:
    """The raw bytes and hash of EIP-1559 transaction `tx` (chainId, nonce,
    maxPriorityFeePerGas, maxFeePerGas, gas, value, data, optional to) signed with `key`:
    the bytes eth_account makes (tests check them), at a third of its CPU, which the
    provider's commit thread spends beside generation."""
    to = tx.get("to")
    fields = [tx["chainId"], tx["nonce"], tx["maxPriorityFeePerGas"], tx["maxFeePerGas"],
              tx["gas"], bytes(HexBytes(to)) if to else b"", tx["value"],
              bytes(HexBytes(tx["data"])), []]  # the empty access list
    signature = key.sign_msg_hash(keccak(DYNAMIC_FEE_TYPE + rlp.encode(fields)))
    raw = DYNAMIC_FEE_TYPE + rlp.encode([*fields, signature.v, signature.r, signature.s])
    return raw, keccak(raw)


def _revert_of(err: Web3RPCError) -> bytes | None:
    """The revert data of a failed eth_call/eth_estimateGas (b"" for a bare revert), or None
    when the node's error is not a revert. Nodes answer code 3 with the data, or a message
    that says "revert"."""
    error = (err.rpc_response or {}).get("error")
    if not isinstance(error, dict):
        return None
    data = error.get("data")
    if isinstance(data, dict):  # some nodes nest it
        data = data.get("data")
    if error.get("code") != 3 and "revert" not in str(error.get("message", "")).lower():
        return None
    return bytes(HexBytes(data)) if isinstance(data, str) and data.startswith("0x") else b""


SIGNED_NONCES_KEPT = 4096
"""How many of its latest nonces a sender remembers signing for (a reorganisation deeper
than this many of its transactions is not told from another signer)."""

DROP_CHECK_POLLS = 10
"""Receipt polls between two checks that the node still has the transaction."""


class TxSender:
    """Signs and sends `account`'s transactions, numbering them locally.

    Thread-safe: concurrent sends get consecutive nonces. A nonce found taken is skipped (the
    count is taken from the chain again); with `exclusive`, one taken by a transaction this
    sender never signed raises :class:`KeyInUse` (another process holds the key: nodes whose
    key is theirs alone stop on it). The gas limit is the node's estimate
    times `gas_margin` (default :data:`GAS_MARGIN`, the one rule); an estimate that reverts
    raises the decoded :class:`ContractRevert` (with the contract's `artifact`) before anything
    is signed, and is never retried.
    """

    def __init__(self, w3: Web3, account: LocalAccount, *, gas_margin: float = GAS_MARGIN,
                 receipt_timeout: float = 120.0, receipt_poll: float = 0.1,
                 exclusive: bool = False):
        if gas_margin < 1:
            raise ValueError("gas_margin must be >= 1")
        self.w3 = w3
        self.account = account
        self.address: ChecksumAddress = account.address
        self.gas_margin = gas_margin
        self.receipt_timeout = receipt_timeout
        self.receipt_poll = receipt_poll
        self._lock = threading.RLock()  # resync() takes it too, inside submit()
        self._next_nonce: int | None = None
        self._chain_id: int | None = None
        self._key = PrivateKey(bytes(account.key))
        # With `exclusive`, a nonce taken by a transaction this sender did not sign raises
        # KeyInUse instead of being skipped. The nonces it signed for (recent ones) tell its
        # own transactions (a cancel, a send retried after a lost answer) from another's.
        self.exclusive = exclusive
        self._signed_nonces: set[int] = set()

    @property
    def next_nonce(self) -> int | None:
        """The nonce the next transaction will use (None until the first send or resync)."""
        return self._next_nonce

    def forget_nonce(self) -> None:
        """Take the next nonce from the chain at the next send (not now: no call to the node,
        no lock, safe inside a database transaction)."""
        self._next_nonce = None

    def resync(self) -> int:
        """Take the next nonce from the chain (pending transactions included)."""
        with self._lock:
            self._next_nonce = self.w3.eth.get_transaction_count(self.address, "pending")
            return self._next_nonce

    # -- sending ---------------------------------------------------------------------------

    def submit(self, tx: TxParams, artifact: Artifact | None = None,
               on_signed: Callable[[HexBytes, int], None] | None = None) -> HexBytes:
        """Estimate, sign and send `tx` (to, data, value; the rest is filled); its hash.

        `on_signed` gets the hash and the nonce of each signed transaction before it is sent
        (to record them: an exception there sends nothing; with the nonce a restarted caller
        can tell a transaction that may still land from one that never will). The node is
        asked through :meth:`rpc`: a commit on a small model takes a few milliseconds of
        generation, and web3's request formatting cost as much again.
        """
        tx = dict(tx)
        tx.setdefault("value", 0)
        tx.setdefault("data", b"")
        if "gas" not in tx:
            estimate = self._estimate(tx, artifact)
            tx["gas"] = padded_gas(estimate, math.ceil(estimate * self.gas_margin))
        if "gasPrice" not in tx and "maxFeePerGas" not in tx:
            tx.update(self.fees())
        if self._chain_id is None:
            self._chain_id = self.w3.eth.chain_id
        tx["chainId"] = self._chain_id
        with self._lock:
            nonce = self._next_nonce if self._next_nonce is not None else self.resync()
            for attempt in range(3):
                signed_before = nonce in self._signed_nonces
                raw, tx_hash = self._sign({**tx, "nonce": nonce})
                if on_signed is not None:
                    on_signed(HexBytes(tx_hash), nonce)
                if self._broadcast(raw, tx_hash):
                    self._next_nonce = nonce + 1
                    return HexBytes(tx_hash)
                if self.exclusive and not signed_before:
                    raise KeyInUse(
                        f"another process is sending transactions from {self.address}: "
                        f"nonce {nonce} was taken by a transaction this node did not sign. "
                        "Run one node per key: stop the other process, or give this node a "
                        "key of its own")
                # Our count was stale (another sender used this key, or one of our own
                # transactions, a cancel, holds the nonce).
                nonce = self.resync()
                log.warning("%s: nonce was stale, resynchronised to %d (try %d)",
                            self.address, nonce, attempt + 1)
        raise RuntimeError(f"{self.address}: nonce still rejected after resynchronising")

    def _sign(self, tx: dict) -> tuple[bytes, bytes]:
        self._note_signed(tx["nonce"])
        if "gasPrice" in tx:  # a chain without EIP-1559
            signed = self.account.sign_transaction(tx)
            return bytes(signed.raw_transaction), bytes(signed.hash)
        return sign_dynamic_fee(self._key, tx)

    def _note_signed(self, nonce: int) -> None:
        self._signed_nonces.add(nonce)
        if len(self._signed_nonces) > 2 * SIGNED_NONCES_KEPT:
            floor = max(self._signed_nonces) - SIGNED_NONCES_KEPT
            self._signed_nonces = {n for n in self._signed_nonces if n > floor}

    def rpc(self, method: str, *params: Any) -> Any:
        """One JSON-RPC call through the retrying provider, without web3's formatters: the
        raw result, or Web3RPCError carrying the node's error object."""
        response = self.w3.provider.make_request(RPCEndpoint(method), list(params))
        if "error" in response:
            error = response["error"]
            message = error.get("message", str(error)) if isinstance(error, dict) else str(error)
            raise Web3RPCError(message, rpc_response=response)
        return response["result"]

    def _broadcast(self, raw: bytes, tx_hash: bytes) -> bool:
        """Send `raw`; True when the node has it (now or from an earlier attempt whose answer
        was lost), False when its nonce is taken by another transaction."""
        try:
            self.rpc("eth_sendRawTransaction", "0x" + bytes(raw).hex())
            return True
        except Web3RPCError as err:
            message = str(err).lower()
            if "already known" in message or "already imported" in message:
                return True
            if "insufficient funds" in message:
                raise self._unfunded(err) from None
            if "nonce too low" in message or "replacement transaction underpriced" in message:
                # Ours, mined or pending after a retried send whose answer was lost? Then this
                # is success; anything else means another transaction holds the nonce.
                return self.known(tx_hash)
            raise

    def _unfunded(self, err: Exception) -> InsufficientFunds:
        balance = self.w3.eth.get_balance(self.address)
        return InsufficientFunds(f"the account {self.address} cannot pay for the transaction "
                                 f"(it holds {balance} wei; the node says: {err}): fund it")

    def known(self, tx_hash: bytes) -> bool:
        """Whether the node has transaction `tx_hash`, pending or mined."""
        try:
            self.w3.eth.get_transaction(HexBytes(tx_hash))
            return True
        except TransactionNotFound:
            return False

    def wait(self, tx_hash: bytes) -> TxReceipt:
        """The receipt of `tx_hash` once mined (as web3 formats it); TxFailed when it failed,
        TxDropped when the node no longer has it (the next nonce is then taken from the
        chain again), web3's TimeExhausted when it is not mined within `receipt_timeout`."""
        deadline = time.monotonic() + self.receipt_timeout
        tx_hex = "0x" + bytes(tx_hash).hex()
        # A dev chain mines a few milliseconds after it accepts: ask again soon, then every
        # `receipt_poll` seconds (a first wait of 100 ms was a commit's whole cost there).
        pause = min(0.005, self.receipt_poll)
        polls = 0
        while (raw := self.rpc("eth_getTransactionReceipt", tx_hex)) is None:
            if time.monotonic() > deadline:
                raise TimeExhausted(f"transaction {tx_hex} is not in the chain after "
                                    f"{self.receipt_timeout} s")
            polls += 1
            if polls % DROP_CHECK_POLLS == 0 and (why := self._stranded(tx_hash)):
                # The local nonce count is ahead of the chain: what is sent next would wait
                # forever behind the gap.
                with self._lock:
                    self.resync()
                raise TxDropped(f"transaction {tx_hex} {why}, not mined")
            time.sleep(pause)
            pause = min(2 * pause, self.receipt_poll)
        receipt = AttributeDict.recursive(receipt_formatter(raw))
        if receipt["status"] != 1:
            raise TxFailed(f"transaction {tx_hex} failed in block {receipt['blockNumber']}")
        return receipt

    def outcome(self, tx_hash: bytes, nonce: int) -> TxReceipt | None:
        """What became of a transaction this key signed at `nonce` and recorded before a
        crash (the caller cannot know whether it was sent): its receipt once mined (TxFailed
        when it failed), or None once it can never be mined: the node does not have it and
        the nonce is used by another transaction, by a no-op transfer to ourselves sent here
        first if need be. Only then may the caller send its like again without risking both
        landing."""
        tx_hex = "0x" + bytes(tx_hash).hex()
        while True:
            if self.rpc("eth_getTransactionReceipt", tx_hex) is not None or self.known(tx_hash):
                with contextlib.suppress(TxDropped):  # gone while waited for: look again
                    return self.wait(tx_hash)
            if self.w3.eth.get_transaction_count(self.address, "latest") > nonce:
                # The nonce is spent; by this transaction, if it was mined since the first look.
                if self.rpc("eth_getTransactionReceipt", tx_hex) is not None:
                    return self.wait(tx_hash)
                with self._lock:
                    self.resync()
                return None
            raw, filler = self._sign({"to": self.address, "value": 0, "data": b"",
                                      "gas": 21_000, "nonce": nonce,
                                      "chainId": self._chain_id or self.w3.eth.chain_id,
                                      **self.fees()})
            if self._broadcast(raw, filler):
                with contextlib.suppress(TxFailed):  # replaced or dropped: look again
                    self.wait(filler)

    def _stranded(self, tx_hash: bytes) -> str | None:
        """Why the pending `tx_hash` can never be mined, or None while it can: the node
        dropped it (a restart, a cleared pool), or it waits behind a nonce gap because
        earlier transactions of this key left the chain with a reorganisation (a node counts
        a key's pending nonces up to the first gap)."""
        try:
            tx = self.w3.eth.get_transaction(HexBytes(tx_hash))
        except TransactionNotFound:
            return "was dropped by the node"
        if tx.get("blockNumber") is None \
                and tx["nonce"] >= self.w3.eth.get_transaction_count(self.address, "pending"):
            self._cancel(tx)
            return (f"waits behind a nonce gap (nonce {tx['nonce']}; the chain lost earlier "
                    "transactions of this key) and is cancelled")
        return None

    def _cancel(self, tx) -> None:
        """Replace stranded transaction `tx` in the node's pool by a transfer of nothing to
        ourselves at its nonce: once the transactions sent next fill the gap, that no-op is
        mined in its place, so what the caller was told failed (and may send again) never
        lands as well. A replacement must raise the fees (by 10% at least on most nodes)."""
        bumped = {name: tx[name] * 5 // 4 + 1 for name in
                  ("maxFeePerGas", "maxPriorityFeePerGas", "gasPrice") if tx.get(name)}
        if "maxFeePerGas" in bumped:
            bumped.pop("gasPrice", None)
        chain_id = self._chain_id or self.w3.eth.chain_id
        raw, _ = self._sign({"to": self.address, "value": 0, "data": b"", "gas": 21_000,
                             "nonce": tx["nonce"], "chainId": chain_id, **bumped})
        try:
            self.rpc("eth_sendRawTransaction", "0x" + bytes(raw).hex())
        except Web3RPCError as err:  # mined meanwhile, or the node keeps the original
            log.warning("%s: could not cancel stranded transaction at nonce %d: %s",
                        self.address, tx["nonce"], err)

    def send(self, tx: TxParams, artifact: Artifact | None = None) -> TxReceipt:
        """:meth:`submit` then :meth:`wait`: the receipt of `tx` (a binding's builder's, or
        any to, data, value) once mined; reverts decoded with `artifact`."""
        return self.wait(self.submit(tx, artifact))

    def deploy(self, name: str, *constructor_args: Any) -> ChecksumAddress:
        """Deploy the committed artifact `name`; the new contract's address."""
        artifact = load_artifact(name)
        factory = self.w3.eth.contract(abi=artifact.abi, bytecode=artifact.bytecode)
        data = factory.constructor(*constructor_args).data_in_transaction
        receipt = self.send({"data": data}, artifact)
        return Web3.to_checksum_address(receipt["contractAddress"])

    def fees(self) -> dict[str, int]:
        """EIP-1559 fees (room for the base fee to double), or a gas price on older chains."""
        base_fee = self.w3.eth.get_block("latest").get("baseFeePerGas")
        if base_fee is None:
            return {"gasPrice": self.w3.eth.gas_price}
        tip = self.w3.eth.max_priority_fee
        return {"maxFeePerGas": 2 * base_fee + tip, "maxPriorityFeePerGas": tip}

    # -- helpers ---------------------------------------------------------------------------

    def _estimate(self, tx: dict, artifact: Artifact | None) -> int:
        call = {"from": self.address, "value": hex(tx["value"]),
                "data": "0x" + bytes(HexBytes(tx["data"])).hex()}
        if tx.get("to"):
            call["to"] = tx["to"]
        try:
            return int(self.rpc("eth_estimateGas", call), 16)
        except Web3RPCError as err:
            revert = _revert_of(err)
            if revert is None:
                if "insufficient funds" in str(err).lower():
                    raise self._unfunded(err) from None
                raise
            if artifact is not None:
                raise decode_revert(artifact, revert) from err
            raise ContractRevert(None, (), revert, f"gas estimate reverted: {err}") from err
