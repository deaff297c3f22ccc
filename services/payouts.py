"""What the protocol owes a key, collected: fees and stake credited by the coordinator, bonds
won in the dispute game, and shares of rejected claims' reward reserves. The same for a
provider and a watchtower (``optinfer provider withdraw``, ``optinfer challenger withdraw``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from eth_account.signers.local import LocalAccount
from web3 import Web3

from optinfer.contracts.bindings import ContractRevert
from optinfer.contracts.coordinator import InferenceCoordinator
from optinfer.contracts.dispute_game import DisputeGame
from optinfer.contracts.sender import TxSender
from optinfer.services.deployments import Deployments

log = logging.getLogger("optinfer.payouts")

def collect_reserves(w3: Web3, deployments: Deployments, account: LocalAccount,
                     sender: TxSender | None = None) -> dict[str, list[int]]:
    """Settle what rejected claims' reward reserves owe `account`, as far as they can be now
    (docs/protocol.md, "Challenger rewards"): as a challenger, claim its share of every reserve
    it won a shortfall from (``ChallengerRewarded`` with a shortfall, still unclaimed); as a
    provider, settle the reserve of each of its slashed claims, which frees the part no winner
    is owed. A reserve whose claim's window is still open, or has a game open, is left for a
    later call. Returns the request ids claimed from and settled."""
    coordinator = InferenceCoordinator(w3, deployments.address("InferenceCoordinator"))
    events = coordinator.contract.events
    sender = sender or TxSender(w3, account)
    done: dict[str, list[int]] = {"claimed": [], "settled": []}
    rewarded = events.ChallengerRewarded.get_logs(
        argument_filters={"challenger": account.address}, from_block=deployments.block_number)
    for request_id in sorted({e["args"]["requestId"] for e in rewarded
                              if e["args"]["shortfall"]}):
        if coordinator.shortfall_of(request_id, account.address) and _succeeds(
                coordinator.claim_reserve_share_call, request_id, account.address,
                account.address):
            sender.send(coordinator.claim_reserve_share_tx(request_id, account.address),
                        coordinator.artifact)
            done["claimed"].append(request_id)
    slashed = events.Slashed.get_logs(argument_filters={"provider": account.address},
                                      from_block=deployments.block_number)
    for request_id in sorted({e["args"]["requestId"] for e in slashed}):
        if not coordinator.reserve(request_id).settled and _succeeds(
                coordinator.settle_reserve_call, request_id, account.address):
            sender.send(coordinator.settle_reserve_tx(request_id), coordinator.artifact)
            done["settled"].append(request_id)
    for kind, ids in done.items():
        if ids:
            log.info("reserves %s: requests %s", kind, ", ".join(map(str, ids)))
    return done


def _succeeds(dry_run: Callable[..., Any], *args: Any) -> bool:
    """Whether ``dry_run(*args)`` goes through (a ContractRevert says it would not, yet)."""
    try:
        dry_run(*args)
    except ContractRevert:
        return False
    return True


def withdraw(w3: Web3, deployments: Deployments, account: LocalAccount) -> dict[str, int]:
    """Send `account` its fees and stake credited by the coordinator and the bonds it won in
    the dispute game, after collecting what reward reserves owe it (`collect_reserves`); the
    wei withdrawn from each (0 when there was nothing)."""
    sender = TxSender(w3, account)
    collect_reserves(w3, deployments, account, sender)
    withdrawn = {}
    for name, binding in (("InferenceCoordinator", InferenceCoordinator),
                          ("DisputeGame", DisputeGame)):
        contract = binding(w3, deployments.address(name))
        amount = contract.balance_of(account.address)
        if amount:
            receipt = sender.send(contract.withdraw_tx(), contract.artifact)
            log.info("withdrew %d wei from the %s in tx %s", amount, name,
                     receipt["transactionHash"].to_0x_hex())
        withdrawn[name] = amount
    return withdrawn
