"""Generic web3.py plumbing for the project's contracts: deploy, dry-run, send, decode reverts.

Contract-specific bindings (``registry.py``, ...) come in pairs per write: ``<write>_call`` runs
it as an ``eth_call`` (no state change, returns the function's result or raises the revert)
and ``<write>_send`` signs it with a local key, sends it and waits for the receipt. Reverts
surface as :class:`ContractRevert` carrying the custom error's name and arguments, decoded with
the contract's ABI.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from eth_abi import decode as abi_decode
from eth_abi import encode as abi_encode
from eth_account.signers.local import LocalAccount
from eth_typing import ChecksumAddress
from eth_utils import event_abi_to_log_topic, function_abi_to_4byte_selector
from eth_utils.abi import get_abi_input_types
from hexbytes import HexBytes
from web3 import Web3
from web3.contract import Contract
from web3.contract.contract import ContractFunction
from web3.exceptions import ContractLogicError
from web3.types import TxParams, TxReceipt

from optinfer.contracts.artifacts import Artifact, load_artifact, project_error_selectors

T = TypeVar("T")

GAS_MARGIN = 20_000
"""Gas added (on top of 25%) to every estimate before sending."""

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


def send_transaction(w3: Web3, tx: TxParams, signer: LocalAccount) -> TxReceipt:
    """Fill nonce and chain id, sign with `signer`'s key, send, and wait for the receipt.

    Raises ContractRevert (undecoded) when the transaction is mined but failed.
    """
    tx = dict(tx)
    tx.setdefault("nonce", w3.eth.get_transaction_count(signer.address, "pending"))
    tx.setdefault("chainId", w3.eth.chain_id)
    signed = signer.sign_transaction(tx)
    receipt = w3.eth.wait_for_transaction_receipt(
        w3.eth.send_raw_transaction(signed.raw_transaction), timeout=120
    )
    if receipt["status"] != 1:
        tx_hash = receipt["transactionHash"].hex()
        raise ContractRevert(None, (), b"", f"transaction {tx_hash} failed")
    return receipt


def send_function(
    w3: Web3, artifact: Artifact, function: ContractFunction, signer: LocalAccount,
    value: int = 0,
) -> TxReceipt:
    """Send a contract function call (with `value` wei) as a signed transaction and wait.

    Gas is estimated first, so a call that would revert raises the decoded ContractRevert
    before anything is sent.
    """
    params = {"from": signer.address, "value": value}
    tx = reverts_decoded(artifact, lambda: function.build_transaction(params))
    # An estimate is the gas used after refunds, and the block the transaction lands in may
    # differ from the one it was estimated on: leave a margin (unused gas is not charged).
    tx["gas"] = padded_gas(tx["gas"], tx["gas"] * 5 // 4 + GAS_MARGIN)
    return send_transaction(w3, tx, signer)


def deploy(w3: Web3, name: str, signer: LocalAccount, *constructor_args: Any) -> ChecksumAddress:
    """Deploy the committed artifact `name` from `signer`; return the new contract's address."""
    artifact = load_artifact(name)
    factory = w3.eth.contract(abi=artifact.abi, bytecode=artifact.bytecode)
    tx = reverts_decoded(
        artifact,
        lambda: factory.constructor(*constructor_args).build_transaction({"from": signer.address}),
    )
    receipt = send_transaction(w3, tx, signer)
    return Web3.to_checksum_address(receipt["contractAddress"])


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

    def events(self, receipt: TxReceipt, event: str) -> list[dict[str, Any]]:
        """The arguments of every `event` this contract emitted in `receipt`, in log order."""
        return [found["args"] for found in self.receipt_events(receipt, event)]

    def receipt_events(self, receipt: TxReceipt, event: str) -> list[dict[str, Any]]:
        """The `event` logs this contract emitted in `receipt`, decoded by eth_abi alone and
        shaped as web3's ``process_receipt`` shapes them (which takes 2 ms an event)."""
        entry = self._event_abi(event)
        topic = event_abi_to_log_topic(entry)
        indexed = [param for param in entry["inputs"] if param["indexed"]]
        plain = [param for param in entry["inputs"] if not param["indexed"]]
        found = []
        for log in receipt["logs"]:
            topics = [bytes(t) for t in log["topics"]]
            if Web3.to_checksum_address(log["address"]) != self.address or not topics \
                    or topics[0] != topic:
                continue
            args = {param["name"]: abi_decode([param["type"]], raw)[0]
                    for param, raw in zip(indexed, topics[1:], strict=True)}
            args.update(zip([param["name"] for param in plain],
                            abi_decode([param["type"] for param in plain], bytes(log["data"])),
                            strict=True))
            args = {param["name"]: _web3_value(param["type"], args[param["name"]])
                    for param in entry["inputs"]}
            found.append({"event": event, "address": self.address, "args": args,
                          "blockNumber": log["blockNumber"], "logIndex": log["logIndex"],
                          "transactionHash": log["transactionHash"]})
        return found

    def _event_abi(self, event: str) -> dict[str, Any]:
        (entry,) = [e for e in self.artifact.abi if e["type"] == "event" and e["name"] == event]
        if any(p["indexed"] and (p["type"].endswith("]") or p["type"] in ("string", "bytes")
                                 or p["type"].startswith("tuple")) for p in entry["inputs"]):
            raise ValueError(f"{event} indexes a dynamic type: its topic is a hash")
        return entry


def _web3_value(abi_type: str, value: Any) -> Any:
    """`value` as web3 returns it: checksummed addresses, lists for arrays."""
    if abi_type == "address":
        return Web3.to_checksum_address(value)
    if abi_type.endswith("]"):
        return [_web3_value(abi_type[:abi_type.rindex("[")], item) for item in value]
    return value
