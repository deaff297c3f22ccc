"""Generic web3.py plumbing for the project's contracts: build transactions, dry-run, decode
reverts.

A binding builds transactions and sends none itself: ``BoundContract.tx`` (and the named
``<write>_tx`` builders of the contract-specific bindings, ``registry.py``, ...) returns the
unsigned transaction (to, data, value) that :class:`optinfer.contracts.sender.TxSender`, the
one sender, signs, sends and waits for. Besides the builder, a write comes as a pair:
``<write>_call`` runs it as an ``eth_call`` (no state change, returns the function's result or
raises the revert) and ``<write>_send(..., signer)`` hands the builder's transaction to a fresh
``TxSender`` for `signer` and returns the receipt. Reverts surface as :class:`ContractRevert`
carrying the custom error's name and arguments, decoded with the contract's ABI; a
transaction mined but failed as the sender's ``TxFailed``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from eth_abi import decode as abi_decode
from eth_abi import encode as abi_encode
from eth_account.signers.local import LocalAccount
from eth_typing import ChecksumAddress
from eth_utils import event_abi_to_log_topic, function_abi_to_4byte_selector
from eth_utils.abi import collapse_if_tuple, get_abi_input_types
from hexbytes import HexBytes
from web3 import Web3
from web3.contract import Contract
from web3.datastructures import AttributeDict
from web3.exceptions import ContractLogicError
from web3.types import TxParams, TxReceipt

from optinfer.contracts.artifacts import Artifact, load_artifact, project_error_selectors

T = TypeVar("T")

TX_GAS_LIMIT_CAP = 2**24
"""The most gas one transaction may ask for (EIP-7825, Ethereum L1 since Osaka; anvil's
``--enable-tx-gas-limit``): a margin above the estimate never goes past it, and every move of
a dispute at the largest request fits under it (docs/protocol.md, "Gas bound")."""


def padded_gas(estimate: int, margin: int) -> int:
    """The gas limit to send for an ``estimate`` padded by ``margin``, capped at
    ``TX_GAS_LIMIT_CAP``: a chain that enforces the cap refuses a limit above it even when the
    transaction would use less."""
    return min(margin, TX_GAS_LIMIT_CAP) if estimate <= TX_GAS_LIMIT_CAP else margin


class ContractRevert(Exception):
    """A contract call or transaction reverted.

    `name` is the custom error's name (``"ModelAlreadyRegistered"``), ``"Error"`` for a string
    revert, ``"Panic"`` for a Solidity panic, or ``None`` when the revert data matches nothing
    in the ABI. `args` are the decoded error arguments; `data` the raw revert data.
    """

    def __init__(self, name: str | None, args: tuple[Any, ...], data: bytes, message: str = ""):
        self.name = name
        self.args_decoded = args
        self.data = data
        super().__init__(message or f"reverted with {name or 'unknown error'}{args!r}")


def decode_revert(artifact: Artifact, data: bytes) -> ContractRevert:
    """Decode revert data against `artifact`'s custom errors (and Error(string)/Panic(uint256))."""
    selector, payload = data[:4], data[4:]
    builtin = {
        bytes.fromhex("08c379a0"): ("Error", ["string"]),
        bytes.fromhex("4e487b71"): ("Panic", ["uint256"]),
    }
    if selector in builtin:
        name, types = builtin[selector]
        return ContractRevert(name, tuple(abi_decode(types, payload)), data)
    entry = artifact.error_selectors().get(selector) or project_error_selectors().get(selector)
    if entry is None:
        return ContractRevert(None, (), data)
    types = [param["type"] for param in entry["inputs"]]
    return ContractRevert(entry["name"], tuple(abi_decode(types, payload)), data)


def _revert_data(err: ContractLogicError) -> bytes:
    """The raw revert bytes web3 attached to `err` (a hex string, or a dict from some nodes)."""
    data = err.data
    if isinstance(data, dict):
        data = data.get("data", "")
    return bytes(HexBytes(data)) if data else b""


def reverts_decoded(artifact: Artifact, action: Callable[[], T]) -> T:
    """Run `action`; turn a web3 revert into a :class:`ContractRevert` decoded with `artifact`."""
    try:
        return action()
    except ContractLogicError as err:
        raise decode_revert(artifact, _revert_data(err)) from err


def contract_at(w3: Web3, name: str, address: str) -> Contract:
    """A web3 contract object for the committed artifact `name` at `address`."""
    return w3.eth.contract(address=Web3.to_checksum_address(address), abi=load_artifact(name).abi)


class BoundContract:
    """A deployed contract bound by name: subclasses set NAME to their artifact's name."""

    NAME: str

    def __init__(self, w3: Web3, address: str):
        self.w3 = w3
        self.artifact = load_artifact(self.NAME)
        self.contract = contract_at(w3, self.NAME, address)
        self.address: ChecksumAddress = self.contract.address
        self._encoders: dict[str, tuple[bytes, list[str]]] = {}

    def calldata(self, function: str, *args: Any) -> bytes:
        """The call data of `function(*args)`, encoded by eth_abi alone: web3's argument
        normalisation costs a millisecond a call, as much as a small model's generation
        of a few tokens. Arguments must already be ABI-ready (ints, bytes, lists, addresses)."""
        if function not in self._encoders:
            (entry,) = [e for e in self.artifact.abi
                        if e["type"] == "function" and e["name"] == function]
            self._encoders[function] = (function_abi_to_4byte_selector(entry),
                                        get_abi_input_types(entry))
        selector, types = self._encoders[function]
        return selector + abi_encode(types, args)

    def tx(self, function: str, *args: Any, value: int = 0) -> TxParams:
        """The unsigned transaction calling `function(*args)` with `value` wei: to, data
        (:meth:`calldata`, so the arguments must be ABI-ready) and value, for a
        ``TxSender`` to estimate, sign and send."""
        return {"to": self.address, "data": self.calldata(function, *args), "value": value}

    def _send(self, tx: TxParams, signer: LocalAccount) -> TxReceipt:
        """Send `tx` (a builder's) from `signer` and wait for it: the ``<write>_send``
        conveniences. A fresh sender per call takes the pending nonce from the chain."""
        from optinfer.contracts.sender import TxSender  # it imports this module

        return TxSender(self.w3, signer).send(tx, self.artifact)

    def events(self, receipt: TxReceipt, event: str) -> list[dict[str, Any]]:
        """The arguments of every `event` this contract emitted in `receipt`, in log order."""
        return [found["args"] for found in self.receipt_events(receipt, event)]

    def receipt_events(self, receipt: TxReceipt, event: str) -> list[dict[str, Any]]:
        """The `event` logs this contract emitted in `receipt`, decoded by :class:`EventDecoder`
        and shaped as web3's ``process_receipt`` shapes them (which takes 2 ms an event)."""
        (entry,) = [e for e in self.artifact.abi if e["type"] == "event" and e["name"] == event]
        decoder = EventDecoder(entry)
        found = []
        for log in receipt["logs"]:
            topics = [bytes(t) for t in log["topics"]]
            if Web3.to_checksum_address(log["address"]) != self.address or not topics \
                    or topics[0] != decoder.topic:
                continue
            found.append({"event": event, "address": self.address, "args": decoder.args(log),
                          "blockNumber": log["blockNumber"], "logIndex": log["logIndex"],
                          "transactionHash": log["transactionHash"],
                          "blockHash": log["blockHash"]})
        return found


class EventDecoder:
    """One event's log arguments, decoded with eth_abi directly: web3's ``process_log`` took
    1.8 ms a log, over half of a watchtower's scan of 200 claims. Gives what web3 gives
    (``tests/services/test_chain.py`` compares them): checksum addresses, ints, bytes, arrays
    as lists and structs as AttributeDicts by component name. Every event the coordinator and
    the game emit indexes only static types, whose topic is their ABI encoding; an event
    indexing a dynamic one is refused."""

    def __init__(self, abi: dict):
        self.name: str = abi["name"]
        self.topic: bytes = event_abi_to_log_topic(abi)
        inputs = abi["inputs"]
        self._names = [i["name"] for i in inputs]
        self._indexed = [i for i in inputs if i["indexed"]]
        self._data = [i for i in inputs if not i["indexed"]]
        self._data_types = [collapse_if_tuple(i) for i in self._data]
        hashed = [i["name"] for i in self._indexed if i["type"] in ("string", "bytes")
                  or i["type"].endswith("]") or i["type"].startswith("tuple")]
        if hashed:
            raise ValueError(f"event {self.name}: indexed dynamic arguments {hashed} are "
                             "hashed into their topics and cannot be decoded")

    def args(self, log: Any) -> dict[str, Any]:
        values = {i["name"]: _abi_value(i, abi_decode([collapse_if_tuple(i)], bytes(topic))[0])
                  for i, topic in zip(self._indexed, log["topics"][1:], strict=True)}
        decoded = abi_decode(self._data_types, bytes(log["data"]))
        values.update((i["name"], _abi_value(i, value))
                      for i, value in zip(self._data, decoded, strict=True))
        return {name: values[name] for name in self._names}  # in the ABI's order


def _abi_value(param: dict, value: Any) -> Any:
    """`value`, decoded by eth_abi for ABI parameter `param`, as web3 returns it."""
    kind = param["type"]
    if kind.endswith("]"):  # an array: a list
        item = {**param, "type": kind[:kind.rindex("[")]}
        return [_abi_value(item, element) for element in value]
    if kind == "tuple":  # a struct: web3's AttributeDict by component name
        return AttributeDict({c["name"]: _abi_value(c, v)
                              for c, v in zip(param["components"], value, strict=True)})
    return _checksum(value) if kind == "address" else value


@functools.lru_cache(maxsize=4096)
def _checksum(address: str) -> str:
    return Web3.to_checksum_address(address)
