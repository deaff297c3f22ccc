"""Load the committed contract artifacts at runtime (no compiler needed)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from eth_utils import function_abi_to_4byte_selector

from optinfer.errors import UserError

ARTIFACTS_DIR = Path(__file__).resolve().parent / "artifacts"


@dataclass(frozen=True)
class Artifact:
    """One compiled contract, as ``optinfer.contracts.build`` wrote it."""

    name: str
    source_name: str
    abi: list[dict[str, Any]]
    bytecode: str  # 0x-prefixed creation code
    deployed_bytecode: str  # 0x-prefixed runtime code
    compiler_version: str  # e.g. "0.8.37+commit.f401782d"

    def error_selectors(self) -> dict[bytes, dict[str, Any]]:
        """4-byte selector -> the ABI entry of each custom error the contract can revert with."""
        return {
            function_abi_to_4byte_selector(entry): entry
            for entry in self.abi
            if entry["type"] == "error"
        }


def artifact_names(artifacts_dir: Path = ARTIFACTS_DIR) -> list[str]:
    """Names of the contracts that have a committed artifact, sorted."""
    return sorted(path.stem for path in artifacts_dir.glob("*.json"))


@cache
def project_error_selectors() -> dict[bytes, dict[str, Any]]:
    """Every custom error of every committed artifact by selector: an error raised by a
    contract that another one called bubbles up with the callee's selector."""
    selectors: dict[bytes, dict[str, Any]] = {}
    for name in artifact_names():
        selectors.update(load_artifact(name).error_selectors())
    return selectors


@cache
def load_artifact(name: str, artifacts_dir: Path = ARTIFACTS_DIR) -> Artifact:
    """The artifact of contract `name`; UserError when it was never built."""
    path = artifacts_dir / f"{name}.json"
    if not path.is_file():
        raise UserError(
            f"no artifact for contract {name!r} in {artifacts_dir}; "
            "run `python -m optinfer.contracts.build`"
        )
    data = json.loads(path.read_text(encoding="utf-8"))
    return Artifact(
        name=data["contractName"],
        source_name=data["sourceName"],
        abi=data["abi"],
        bytecode=data["bytecode"],
        deployed_bytecode=data["deployedBytecode"],
        compiler_version=data["compiler"]["version"],
    )
