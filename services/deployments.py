"""Deploying the protocol's contracts and the file of their addresses the other commands read.

:data:`STEPS` is the deployment, in order: each step deploys one contract (or wires two
together) from what the earlier ones deployed. A step whose artifact or binding is not built
yet is skipped (``available``), so a contract joins the deployment by adding its step here.

The file (``Settings.deployments_file``) is JSON::

    {"chain_id": 31337, "block_number": 1,
     "contracts": {"ModelRegistry": "0x...", "InferenceCoordinator": "0x...", ...}}

`block_number` is the chain's head before the first deployment: no event of these contracts
is older, so event cursors start there.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from eth_account.signers.local import LocalAccount
from eth_typing import ChecksumAddress
from web3 import Web3

from optinfer.contracts.artifacts import artifact_names
from optinfer.contracts.coordinator import CoordinatorParams, InferenceCoordinator
from optinfer.contracts.sender import TxSender
from optinfer.errors import UserError
from optinfer.services.chain import connect_settings

ETHER = 10**18

DEMO_COORDINATOR_PARAMS = CoordinatorParams(
    minimum_stake=1 * ETHER,
    stake_per_claim=ETHER // 2,
    challenge_window=3600,
    challenger_share_bps=5000,
    consumer_share_bps=3000,  # the remaining 20% of a slash is burnt
    max_callback_gas_limit=500_000,
)


@dataclass(frozen=True)
class Deployments:
    """Where the contracts are, on which chain, and from which block to read their events."""

    chain_id: int
    block_number: int
    contracts: dict[str, ChecksumAddress] = field(default_factory=dict)

    def address(self, name: str) -> ChecksumAddress:
        """The address of contract `name`; UserError when this deployment has none."""
        try:
            return self.contracts[name]
        except KeyError:
            raise UserError(
                f"the deployment on chain {self.chain_id} has no {name} "
                f"(it has {', '.join(sorted(self.contracts)) or 'nothing'}); "
                "run `optinfer contracts deploy` again"
            ) from None

    def to_json(self) -> dict:
        return {"chain_id": self.chain_id, "block_number": self.block_number,
                "contracts": dict(sorted(self.contracts.items()))}

    def write(self, path: Path) -> None:
        """Write the file atomically: a reader never sees half of it."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False,
                                         prefix=path.name, suffix=".tmp") as tmp:
            json.dump(self.to_json(), tmp, indent=2)
            tmp.write("\n")
        os.replace(tmp.name, path)

    @classmethod
    def read(cls, path: Path) -> Deployments:
        """The deployment written to `path`; UserError when it is missing or malformed."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            return cls(
                chain_id=int(data["chain_id"]),
                block_number=int(data["block_number"]),
                contracts={name: Web3.to_checksum_address(address)
                           for name, address in data["contracts"].items()},
            )
        except FileNotFoundError:
            raise UserError(f"no deployments file at {path}: run `optinfer contracts deploy` "
                            "(or set OPTINFER_DEPLOYMENTS)") from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise UserError(f"{path} is not a deployments file: {err}") from None

    @classmethod
    def on_chain(cls, settings, w3: Web3 | None = None) -> tuple[Web3, Deployments]:
        """The deployment in the deployments file of `settings` and a client on its RPC node
        (`w3` if given), checked to be on the deployment's chain: UserError otherwise."""
        deployments = cls.read(settings.deployments_file)
        w3 = w3 or connect_settings(settings)
        deployments.check_chain(w3, settings.deployments_file)
        return w3, deployments

    def check_chain(self, w3: Web3, path: Path | None = None) -> None:
        """UserError when `w3` is on another chain than this deployment, or when one of its
        addresses holds no contract there (a chain restarted empty, a file from another
        deployment): checked before anything is sent, which would otherwise go to an address
        that takes the value and does nothing."""
        chain_id = w3.eth.chain_id
        if chain_id != self.chain_id:
            raise UserError(f"the deployments file is for chain {self.chain_id} but the RPC "
                            f"node is on chain {chain_id}")
        empty = sorted(name for name, address in self.contracts.items()
                       if not w3.eth.get_code(address))
        if empty:
            where = f" ({path})" if path is not None else ""
            raise UserError(
                f"the deployments file{where} names {', '.join(empty)} at addresses that hold "
                f"no contract on chain {chain_id}: deploy with `optinfer contracts deploy`, or "
                "point OPTINFER_DEPLOYMENTS at this chain's file")


@dataclass(frozen=True)
class DeployParams:
    coordinator: CoordinatorParams = DEMO_COORDINATOR_PARAMS
    game_clock_seconds: int | None = None  # None: the binding's default
    challenger_bond: int | None = None


@dataclass(frozen=True)
class DeployStep:
    """Deploys contract `name` (or, for a wiring step, sends its transactions); `run` returns
    the new address, or None for a step that deploys nothing."""

    name: str
    run: Callable[[TxSender, LocalAccount, dict[str, ChecksumAddress], DeployParams],
                  ChecksumAddress | None]
    available: Callable[[], bool] = lambda: True


def _built(*names: str, module: str | None = None) -> Callable[[], bool]:
    """Whether every artifact in `names` is committed (and binding `module` exists)."""
    def check() -> bool:
        if module is not None and importlib.util.find_spec(module) is None:
            return False
        return set(names) <= set(artifact_names())
    return check


def _registry(sender, signer, deployed, params):
    return sender.deploy("ModelRegistry")


def _coordinator(sender, signer, deployed, params):
    return sender.deploy("InferenceCoordinator",
                         *params.coordinator.as_args(deployed["ModelRegistry"]))


def _one_step_verifier(sender, signer, deployed, params):
    # Its bytecode links a library: the binding knows how.
    from optinfer.contracts.one_step_binding import OneStepVerifier

    return OneStepVerifier.deploy_from(sender).address


def _dispute_game(sender, signer, deployed, params):
    from optinfer.contracts.dispute_game import GameParams

    defaults = GameParams()
    game = GameParams(
        clock_seconds=params.game_clock_seconds or defaults.clock_seconds,
        fan_out_bits=defaults.fan_out_bits,
        challenger_bond=params.challenger_bond or defaults.challenger_bond,
    )
    return sender.deploy("DisputeGame", deployed["InferenceCoordinator"],
                         deployed["OneStepVerifier"], game.clock_seconds, game.fan_out_bits,
                         game.challenger_bond)


def _wire_game(sender, signer, deployed, params):
    coordinator = InferenceCoordinator(sender.w3, deployed["InferenceCoordinator"])
    sender.send(coordinator.set_dispute_game_tx(deployed["DisputeGame"]), coordinator.artifact)
    return None


STEPS: tuple[DeployStep, ...] = (
    DeployStep("ModelRegistry", _registry),
    DeployStep("InferenceCoordinator", _coordinator),
    DeployStep("OneStepVerifier", _one_step_verifier,
               _built("OneStepVerifier", "OneStepShapes",
                      module="optinfer.contracts.one_step_binding")),
    DeployStep("DisputeGame", _dispute_game,
               _built("OneStepVerifier", "OneStepShapes", "DisputeGame",
                      module="optinfer.contracts.one_step_binding")),
    DeployStep("setDisputeGame", _wire_game,
               _built("OneStepVerifier", "OneStepShapes", "DisputeGame",
                      module="optinfer.contracts.one_step_binding")),
)


def deploy_all(
    w3: Web3, account: LocalAccount, params: DeployParams = DeployParams(),
    steps: Sequence[DeployStep] = STEPS, log: Callable[[str], None] = lambda _: None,
) -> Deployments:
    """Run every available step from `account`; the addresses of what was deployed."""
    sender = TxSender(w3, account)
    start = w3.eth.block_number
    deployed: dict[str, ChecksumAddress] = {}
    for step in steps:
        if not step.available():
            log(f"skipping {step.name}: not built yet")
            continue
        address = step.run(sender, account, deployed, params)
        if address is not None:
            deployed[step.name] = address
            log(f"{step.name} at {address}")
        else:
            log(f"{step.name} done")
    return Deployments(chain_id=w3.eth.chain_id, block_number=start, contracts=deployed)
